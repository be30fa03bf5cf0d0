"""Running the proxy app on a socket, on uvloop, until told to stop.

Two ways in: `sidecar serve` runs it in the foreground; `sidecar run` starts
`python -m agent_sidecar.proxy` as a child that takes the launcher's socket, reads its
config from stdin and stops when stdin closes (the launcher ended, even by
SIGKILL), so it never outlives its agent. Either way aiohttp's own log records
are filtered first, so a malformed request's bytes (its headers) are never logged.

Bounded for a long-lived shared sidecar: a connection that sits idle or sends
an unfinished request head for `[proxy] header_timeout` seconds is closed
(aiohttp's keep-alive timer, which also runs from the connection's start), and
at most `[proxy] max_connections` client connections are open at once: one
more gets an API-shaped 503 and is closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
from typing import Callable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .app import make_app
from .config import Config
from .errors import error_body
from .routes import route_of
from .run_file import register_run
from .state import STATE

log = logging.getLogger("sidecar")
AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal")
QUOTED = re.compile(r"[:'\"\n]")   # where the part of a parser message that quotes the request begins
REFUSED_LINGER = 5.0                # seconds a refused connection may take to send its head and read the 503


class NoRawRequests(logging.Filter):
    """aiohttp logs a malformed request with the bytes it choked on (an `x-api-key` line, say) and a
    traceback: such a record becomes one line naming the fault and the client, without those bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            what = QUOTED.split(error.message or type(error).__name__, 1)[0].strip()[:80]
            record.msg = f"{record.getMessage()}: {what or type(error).__name__} (HTTP {error.code}); " \
                         f"the request is not logged"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def keep_requests_out_of_logs() -> None:
    """Install NoRawRequests on aiohttp's loggers (once): nothing the proxy logs holds a request's headers."""
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoRawRequests) for f in logger.filters):
            logger.addFilter(NoRawRequests())


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(config: Config, sock: socket.socket, *, control_fd: int | None = None,
                on_ready: Callable[[int], None] | None = None, idle_timeout: float = 0.0) -> None:
    """Serve until SIGTERM/SIGINT, or until the launcher's control pipe reaches end of file.

    The control pipe carries one JSON message a line (agent started/exited);
    its end of file means the launcher is done, or gone.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = make_app(config)
    if control_fd is not None:
        pending = bytearray()

        def on_readable() -> None:
            try:
                data = os.read(control_fd, 65536)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(control_fd)
                stop.set()
                return
            pending.extend(data)
            *lines, rest = pending.split(b"\n")
            pending[:] = rest
            for line in lines:
                _control(app, line)

    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                           shutdown_timeout=5.0, keepalive_timeout=config.proxy.header_timeout or 3630.0)
    await runner.setup()
    site = CappedSite(runner, sock, max_connections=config.proxy.max_connections)
    await site.start()
    if control_fd is not None:  # read only now: messages wait in the pipe until the state is open
        loop.add_reader(control_fd, on_readable)
    if idle_timeout:
        _stop_when_idle(app[STATE], idle_timeout, stop)
    # Start-up is over once the price table is in: what it left is frozen, out of every later collection.
    app[STATE].priced.add_done_callback(lambda _: app[STATE].collector.freeze())
    port = sock.getsockname()[1]
    log.info("listening on %s:%d", config.proxy.host, port)
    if on_ready:
        on_ready(port)
    run_file = None
    if control_fd is not None:   # `sidecar run`'s embedded proxy: findable by `sidecar top` while it serves
        host = sock.getsockname()[0]
        run_file = register_run(config.state_dir, f"http://{f'[{host}]' if ':' in host else host}:{port}",
                                config.proxy.agent_id)
    try:
        await stop.wait()
    finally:
        if run_file is not None:
            run_file.unlink(missing_ok=True)
        await runner.cleanup()


class CappedSite(web.SockSite):
    """A SockSite whose connections beyond `max_connections` (0: no limit) are answered by `Refused` instead
    of the app."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, *, max_connections: int, **kwargs):
        super().__init__(runner, sock, **kwargs)
        self.max_connections = max_connections

    async def start(self) -> None:
        await web.BaseSite.start(self)   # registers the site with its runner
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            if self.max_connections and len(server.connections) >= self.max_connections:
                return Refused(self.max_connections)
            return server()
        self._server = await asyncio.get_running_loop().create_server(protocol, sock=self._sock,
                                                                      backlog=self._backlog)


class Refused(asyncio.Protocol):
    """One connection over the cap: read its request head, answer 503 in the API's shape, close.

    Its one timer (armed only while it is open) closes it if the client neither finishes its head nor
    goes away after the answer."""

    def __init__(self, limit: int):
        self.limit = limit
        self.head = bytearray()
        self.answered = False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(REFUSED_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return   # the rest of its request: read and dropped, so closing does not reset the answer
        self.head += data
        if b"\r\n\r\n" in self.head or len(self.head) > 65536:
            self._answer()

    def eof_received(self) -> bool:
        if not self.answered and self.head:
            self._answer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _answer(self) -> None:
        self.answered = True
        line, _, rest = bytes(self.head).partition(b"\r\n")
        parts = line.split(b" ")
        path = parts[1].decode("latin-1") if len(parts) > 1 else "/"
        headers = {h.partition(b":")[0].strip().lower().decode("latin-1"): ""
                   for h in rest.split(b"\r\n") if b":" in h}
        body = error_body(route_of(path, headers, "").api, "overloaded",
                          f"sidecar: too many connections ({self.limit} open, the limit); retry shortly, "
                          f"use fewer connections, or raise [proxy] max_connections")
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nretry-after: 1\r\nretry-after-ms: 1000\r\n"
                             b"x-sidecar-error: overloaded\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        if self.transport.can_write_eof():
            self.transport.write_eof()   # the client reads the answer, then closes (or the timer does)
        else:
            self.transport.close()


def _stop_when_idle(state, idle_timeout: float, stop: asyncio.Event) -> None:
    """Stop once no agent has been attached for idle_timeout seconds: one timer, armed only while idle."""
    loop = asyncio.get_running_loop()
    timer: list[asyncio.TimerHandle] = []

    def changed() -> None:
        if timer:
            timer.pop().cancel()
        if state.monitor.running_agents() == 0:
            timer.append(loop.call_later(idle_timeout, stop.set))
    state.monitor.on_agents_changed = changed
    changed()


def _control(app: web.Application, line: bytes) -> None:
    try:
        message = orjson.loads(line)
    except orjson.JSONDecodeError:
        log.warning("ignored a control message that is not JSON")
        return
    app[STATE].control(message)


def run(config: Config, sock: socket.socket, **kwargs) -> None:
    keep_requests_out_of_logs()
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(serve(config, sock, **kwargs))
