"""Running the proxy app on a socket, on uvloop, until told to stop.

Two ways in: `sidecar serve` runs it in the foreground; `sidecar run` starts
`python -m proxy` as a child that takes the launcher's socket, reads its
config from stdin and stops when stdin closes (the launcher ended, even by
SIGKILL), so it never outlives its agent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Callable

from aiohttp import web

from .app import make_app
from .config import Config

log = logging.getLogger("sidecar")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(config: Config, sock: socket.socket, *, stop_on_eof: int | None = None,
                on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, or until `stop_on_eof` (a pipe fd) reaches end of file."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if stop_on_eof is not None:
        def on_readable() -> None:
            if not _drain(stop_on_eof):
                loop.remove_reader(stop_on_eof)
                stop.set()
        loop.add_reader(stop_on_eof, on_readable)

    app = make_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.SockSite(runner, sock, shutdown_timeout=5.0)
    await site.start()
    port = sock.getsockname()[1]
    log.info("listening on %s:%d", config.proxy.host, port)
    if on_ready:
        on_ready(port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _drain(fd: int) -> bool:
    """Read what the pipe holds; False at end of file."""
    try:
        return bool(os.read(fd, 4096))
    except BlockingIOError:
        return True


def run(config: Config, sock: socket.socket, **kwargs) -> None:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(serve(config, sock, **kwargs))
