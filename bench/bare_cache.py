"""The hits' yardstick: the bare proxy (bench/bare_proxy.py) plus an exact-match cache in LMDB, nothing else.

    python -m bench.bare_cache --upstream http://127.0.0.1:9000 --dir /tmp/cache --port 0

The key is the SHA-256 of the method, target and body; a 200 JSON answer is stored (one LMDB write, no
fsync) and served again as it came; streams and other answers pass as the bare proxy passes them. No
credential partition, no records, no limits: what a cache hit costs at the least in aiohttp and LMDB.
"""

import argparse
import hashlib

import aiohttp
import lmdb
import uvloop
from aiohttp import web

from .bare_proxy import forward, serve


async def main(upstream: str, directory: str, host: str, port: int) -> None:
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    env = lmdb.open(directory, map_size=1 << 30, sync=False, metasync=False, readahead=False)

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        key = hashlib.sha256(request.method.encode() + b" " + request.path_qs.encode() + b"\n" + body).digest()
        with env.begin() as txn:
            stored = txn.get(key)
        if stored is not None:
            return web.Response(body=stored, content_type="application/json")

        def keep(up: aiohttp.ClientResponse, answer: bytes) -> None:
            if up.status == 200 and up.content_type == "application/json":
                with env.begin(write=True) as txn:
                    txn.put(key, answer)
        return await forward(http, upstream, request, body, keep)
    try:
        await serve(relay, "bare cache", host, port)
    finally:
        await http.close()
        env.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.bare_cache", description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    p.add_argument("--dir", required=True, help="the LMDB directory (made if missing)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    try:
        uvloop.run(main(a.upstream.rstrip("/"), a.dir, a.host, a.port))
    except KeyboardInterrupt:
        pass
