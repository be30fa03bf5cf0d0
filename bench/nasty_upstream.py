"""The hostile upstream as a process: `python -m bench.nasty_upstream --port 0` prints its URL, serves until SIGTERM.

Point a proxy's upstreams at it (`ANTHROPIC_BASE_URL=URL`, `OPENAI_BASE_URL=URL/v1`)
and send a request whose JSON model is `"nasty-<case>"` (or with a `nasty=<case>`
query); the cases are listed at `GET /_nasty/cases`, every request received at
`GET /_nasty/requests?since=N`. Importable: `from agent_sidecar.bench.nasty_upstream import NastyUpstream`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from agent_sidecar.bench.nasty import ALL, CASES, HELPERS, NastyUpstream

__all__ = ["ALL", "CASES", "HELPERS", "NastyUpstream", "main"]


async def serve(host: str, port: int) -> None:
    upstream = NastyUpstream()
    await upstream.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"http://{host}:{upstream.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await upstream.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nasty_upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for case in CASES.values():
            print(f"{case.name:30} {case.kind:8} {case.doc}")
        return
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":
    main()
