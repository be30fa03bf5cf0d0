"""WebSockets: an `Upgrade: websocket` request proxied both ways, one message at a time.

Any path is a relay: the upstream socket is opened first (its refusal reaches
the agent as the upstream sent it), then every frame goes on as it arrives,
in both directions, and a close on one side closes the other with its code.

The Responses socket (`/v1/responses`, Codex's default transport) is also a
series of exchanges: each `response.create` message is one call, taken through
the same side stages as a POST /v1/responses (key, lookup, slot, capture,
store, record; see `exchange.py`). A hit is answered on the socket with the
events of the stored answer, one text message each, so a run whose answers
are all stored never opens the upstream socket: it is opened at the first
miss. If it cannot be opened then, the agent gets the error event the
Responses socket sends for a failed request (`{"type": "error", "status":
...}`), on which Codex reconnects or falls back as after a refused upgrade.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict

from .errors import SidecarError, error_body, from_library
from .exchange import RESPONSES, Exchanges, refusal_headers
from .routes import Route
from .state import ProxyState
from .headers import request_headers

log = logging.getLogger("sidecar")
# The handshake's own headers: each hop makes its own.
HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                       "sec-websocket-protocol", "sec-websocket-accept", "origin"})
# Close codes that are never sent in a close frame (RFC 6455 7.4.1): the other side gets a plain close.
UNSENDABLE = frozenset({1005, 1006, 1015})
CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
CLOSING: set[asyncio.Task] = set()   # upstream closes under way (asyncio keeps only weak references to tasks)


def is_upgrade(request: web.Request) -> bool:
    return request.method == "GET" and request.headers.get("upgrade", "").lower() == "websocket"


async def relay(request: web.Request, state: ProxyState, route: Route) -> web.StreamResponse:
    """The agent's socket, joined to the upstream's; returns once both are closed."""
    protocols = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    socket = Socket(state, route, request.headers, protocols)
    if socket.exchanges is None:   # a plain relay: the upstream decides whether there is a socket at all
        try:
            await socket.connect()
        except aiohttp.WSServerHandshakeError as exc:
            return refused(route, exc)
    client = web.WebSocketResponse(protocols=socket.upstream_protocols(), compress=True,
                                   max_msg_size=state.body_limit)
    try:
        await client.prepare(request)
    except BaseException:   # the agent went away before its socket was up: so does the upstream's
        await socket.close_upstream(None)
        raise
    await socket.run(client)
    return client


def refused(route: Route, exc: aiohttp.WSServerHandshakeError) -> web.Response:
    """The upstream said no to the upgrade: the agent gets its status and headers."""
    headers = refusal_headers(exc)
    body = error_body(route.api, "bad_gateway", f"sidecar: the upstream refused the WebSocket upgrade "
                                                f"(HTTP {exc.status} {exc.message})")
    return web.Response(status=exc.status, headers=headers, body=body, content_type="application/json")


class Socket:
    """One agent socket and, once needed, its upstream socket; messages pumped both ways."""

    def __init__(self, state: ProxyState, route: Route, headers, protocols: list[str]):
        self.state = state
        self.route = route
        self.protocols = protocols
        self.forwarded = CIMultiDict((k, v) for k, v in request_headers(headers).items()
                                     if k.lower() not in HANDSHAKE)
        self.upstream: aiohttp.ClientWebSocketResponse | None = None
        self.client: web.WebSocketResponse | None = None
        self._pump: asyncio.Task | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()
        reads = state.cache is not None and state.cache.store is not None
        self.exchanges = Exchanges(self, headers) if route.path == RESPONSES and reads else None

    def upstream_protocols(self) -> tuple[str, ...]:
        if self.upstream is not None:
            return (self.upstream.protocol,) if self.upstream.protocol else ()
        return tuple(self.protocols[:1])

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        """The upstream socket (opened once); a failure is an `UpstreamError` or the handshake's refusal."""
        async with self._connecting:
            if self.upstream is not None and not self.upstream.closed:
                return self.upstream
            url = self.state.upstreams.url(self.route)
            try:
                self.upstream = await self.state.client.session.ws_connect(
                    url, headers=self.forwarded, protocols=self.protocols, compress=15, max_msg_size=0,
                    autoclose=False, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0))
            except aiohttp.WSServerHandshakeError:   # the upstream's answer, not a failure to reach it
                raise
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                raise from_library(exc, url) from exc
            if self.exchanges is not None:
                self.exchanges.upstream_opened()
            if self.client is not None:
                self._pump = asyncio.get_running_loop().create_task(self.pump_upstream())
            return self.upstream

    async def run(self, client: web.WebSocketResponse) -> None:
        """Pump the agent's messages up until its socket closes, then close the upstream's."""
        self.client = client
        if self.upstream is not None:
            self._pump = asyncio.get_running_loop().create_task(self.pump_upstream())
        try:
            async for msg in client:
                if msg.type == WSMsgType.TEXT:
                    if self.exchanges is not None and await self.exchanges.from_client(msg.data):
                        continue   # answered from the cache, or sent up as its exchange
                    await self.send_up(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self.send_up(msg.data)
        except SidecarError as exc:   # a relayed socket whose upstream cannot be reached any more
            log.warning("websocket %s: %s", self.route.path, exc.message)
            await client.close(code=WSCloseCode.TRY_AGAIN_LATER, message=exc.message[:120].encode())
        except Exception as exc:   # a bug: once upgraded, the socket can only be closed, never answered
            self.state.fault("websocket", exc)
            await client.close(code=WSCloseCode.INTERNAL_ERROR, message=b"sidecar: internal fault")
        finally:
            if self.exchanges is not None:
                self.exchanges.closed("client_disconnected")
            # aiohttp cancels this handler once the agent's connection is gone: the upstream's close goes on
            closing = asyncio.ensure_future(self.close_upstream(client.close_code))
            CLOSING.add(closing)
            closing.add_done_callback(CLOSING.discard)
            await asyncio.shield(closing)

    async def send_up(self, data: str | bytes) -> None:
        upstream = await self.connect()
        if isinstance(data, str):
            await upstream.send_str(data)
        else:
            await upstream.send_bytes(data)

    async def pump_upstream(self) -> None:
        """Every upstream message to the agent as it arrives; the upstream's close closes the agent's socket."""
        upstream, client = self.upstream, self.client
        reason = b""
        try:
            while True:
                msg = await upstream.receive()
                if msg.type == WSMsgType.TEXT:
                    if self.exchanges is not None:
                        await self.exchanges.from_upstream(msg.data)
                    await client.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await client.send_bytes(msg.data)
                elif msg.type in CLOSED:
                    reason = msg.extra.encode()[:123] if isinstance(msg.extra, str) else b""
                    break
        except (ConnectionError, RuntimeError) as exc:   # the agent's side is gone: run() closes the rest
            log.debug("websocket %s: %r", self.route.path, exc)
            return
        code = upstream.close_code
        if self.exchanges is not None:
            self.exchanges.closed("upstream_closed")
        if not client.closed:
            await client.close(code=code if code and code not in UNSENDABLE else WSCloseCode.GOING_AWAY,
                               message=reason if code is not None else b"upstream closed")

    async def close_upstream(self, code: int | None) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.closed:
            await upstream.close(code=code if code and code not in UNSENDABLE else WSCloseCode.OK)
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except (asyncio.CancelledError, Exception):   # its own failure is logged there
                pass

