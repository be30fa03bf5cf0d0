"""The yardstick: a bare aiohttp+uvloop reverse proxy, nothing else (no cache, records, limits or parsing).

    python -m bench.bare_proxy --upstream http://127.0.0.1:9000 --port 0

One pooled ClientSession; method, path, query, body and end-to-end headers go
upstream; SSE answers are relayed chunk by chunk, other bodies whole. One path
of its own, /_bare/health, answers "ok" from this process.
"""

import argparse
import asyncio
import sys
from typing import Callable

import aiohttp
import uvloop
from aiohttp import web

HEALTH = "/_bare/health"   # answered here, not forwarded: the realistic scenario probes this loop's stalls
DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length"}


def end_to_end(headers) -> list:
    drop = DROP | {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


async def forward(http: aiohttp.ClientSession, upstream: str, request: web.Request, body: bytes,
                  keep: Callable[[aiohttp.ClientResponse, bytes], None] | None = None) -> web.StreamResponse:
    """The request upstream and its answer back: a JSON body whole (shown to `keep` first), SSE chunk by chunk."""
    async with http.request(request.method, upstream + request.path_qs, headers=end_to_end(request.headers),
                            data=body or None, allow_redirects=False) as up:
        headers = end_to_end(up.headers)
        if up.content_type != "text/event-stream":
            answer = await up.read()
            if keep is not None:
                keep(up, answer)
            return web.Response(status=up.status, headers=headers, body=answer)
        out = web.StreamResponse(status=up.status, headers=headers)
        await out.prepare(request)
        async for chunk in up.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


async def serve(handler, name: str, host: str, port: int) -> None:
    """Serve every path with `handler` until cancelled; says where it listens on stderr (as bench/procs.py reads)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"{name} listening on http://{host}:{site._server.sockets[0].getsockname()[1]}", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def main(upstream: str, host: str, port: int) -> None:
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def relay(request: web.Request) -> web.StreamResponse:
        if request.path == HEALTH:
            return web.Response(text="ok")
        return await forward(http, upstream, request, await request.read())
    try:
        await serve(relay, "bare proxy", host, port)
    finally:
        await http.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.bare_proxy", description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    try:
        uvloop.run(main(a.upstream.rstrip("/"), a.host, a.port))
    except KeyboardInterrupt:
        pass
