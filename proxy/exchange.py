"""The exchanges of a Responses socket: each `response.create` is one call, cached like its HTTP form.

On the socket (Codex's transport) a request is `{"type": "response.create",
...the body of POST /v1/responses...}` and its answer is the stream's events,
one text message each, ending at `response.completed` (or `response.failed`,
`response.incomplete`, `error`). A call is made of each: the request stages
key it and look it up as the same POST would be; a hit is sent back event by
event; a miss takes a limiter slot and goes up the socket, and the answer's
messages go through the capture, checkpoint and store stages framed as the
SSE stream they are on HTTP, so a stored answer serves either transport.

Chains. A request may carry only what is new since the socket's last answer,
with `previous_response_id` naming it (Codex: a `generate: false` warm-up,
then every turn). The key is made of the whole request (the last request's
input, that answer's output items, the new input; no id), so it does not
depend on ids, and a request that names an answer the upstream socket never
produced (it came from the cache) goes up in that whole form: the upstream
only knows answers it sent on this socket.

Fail open: a failure in these stages is a fault, the message goes up as sent
and the answer down as it comes; only the upstream can end an exchange.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
import aiohttp
import orjson
from multidict import CIMultiDict

from . import pipeline
from .call import Call
from .errors import KINDS, SidecarError
from .flight import Head
from .sse import EventParser

RESPONSES = "/v1/responses"
ENDS = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


def error_event(exc: SidecarError) -> str:
    """The Responses socket's own error event (Codex reads `status` as the HTTP status of the request)."""
    status, _, kind, code = KINDS[exc.kind]
    return orjson.dumps({"type": "error", "status": status, "error": {
        "type": kind, "code": code, "message": exc.message, "param": None}}).decode()


def refusal_headers(exc: aiohttp.WSServerHandshakeError) -> dict[str, str]:
    """The headers of the upstream's refused upgrade that are about the refusal, not its framing."""
    return {str(k): v for k, v in (exc.headers or {}).items()
            if k.lower() not in ("content-length", "content-type", "connection", "transfer-encoding")}


def refusal_event(exc: aiohttp.WSServerHandshakeError) -> str:
    """The upstream refused the socket at the first miss: the error event with its status and headers."""
    headers = refusal_headers(exc)
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return orjson.dumps({"type": "error", "status": exc.status, "headers": headers, "error": {
        "type": kind, "code": None, "param": None,
        "message": f"sidecar: the upstream refused the Responses socket (HTTP {exc.status} {exc.message})"}}).decode()


def framed(kind: str, data: bytes) -> bytes:
    """One socket message as the SSE event it is on HTTP."""
    lines = data.split(b"\n")
    return b"event: " + kind.encode() + b"\n" + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def events_of(chunks: list[bytes]) -> list[tuple[str, bytes]]:
    parser = EventParser()
    return [*parser.feed(b"".join(chunks)), *parser.feed(b"\n\n")]


class Chain:
    """The socket's last answer: what a request naming it builds on."""

    __slots__ = ("response_id", "input", "output", "upstream_has")

    def __init__(self) -> None:
        self.response_id: str | None = None
        self.input: list | None = None      # the whole input of the request it answered
        self.output: list = []              # its output items, in order
        self.upstream_has: str | None = None   # the last answer the upstream socket itself sent

    def whole(self, body: dict) -> list | None:
        """The whole input of `body`, or None when it builds on an answer this socket does not know."""
        new = body.get("input")
        previous = body.get("previous_response_id")
        if previous is None:
            return new if isinstance(new, list) else None
        if previous == self.response_id and self.input is not None and isinstance(new, list):
            return [*self.input, *self.output, *new]
        return None

    def answered(self, whole: list | None, events: list[tuple[str, bytes]], upstream: bool) -> None:
        response_id, output, items = None, None, {}
        for kind, data in events:
            if kind == "response.output_item.done":
                doc = orjson.loads(data)
                items[doc.get("output_index", len(items))] = doc.get("item")
            elif kind == "response.completed":
                response = orjson.loads(data).get("response") or {}
                response_id, output = response.get("id"), response.get("output")
        if response_id is None:
            return
        self.response_id, self.input = response_id, whole
        self.output = [items[i] for i in sorted(items)] if items else list(output or [])
        if upstream:
            self.upstream_has = response_id


class Exchange:
    """One `response.create` and its answer, as a call."""

    __slots__ = ("call", "whole", "slot", "chunks", "started")

    def __init__(self, call: Call, whole: list | None):
        self.call = call
        self.whole = whole
        self.slot: tuple | None = None   # (token,) while the exchange holds a limiter slot
        self.chunks: list[bytes] = []
        self.started = False


class Exchanges:
    """The Responses side of one socket: its calls, in order, and its chain."""

    def __init__(self, socket, headers):
        self.socket = socket
        self.state = socket.state
        self.headers = headers
        self.chain = Chain()
        self.pending: deque[Exchange] = deque()   # sent up, answer not over yet

    def upstream_opened(self) -> None:
        self.chain.upstream_has = None   # a new upstream socket knows no earlier answer

    # -- agent -> upstream --------------------------------------------------------------------------

    async def from_client(self, text: str) -> bool:
        """Handle one agent message; False: not an exchange, relay it as it is."""
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(doc, dict) or doc.get("type") != "response.create":
            if isinstance(doc, dict) and doc.get("type") == "response.processed":
                # about an answer the upstream never sent (a hit): nothing to tell it
                return doc.get("response_id") != self.chain.upstream_has
            return False
        state = self.state
        call, whole, forward = None, None, text
        try:
            call, whole, body = self._call(doc)
            hit = await pipeline.run(state, "request", call)   # restore, cache key, cache lookup
            if hit is not None:
                if not self.pending:
                    await self._replay(call, whole, hit)
                    return True
                call.cache_outcome, call.entry = "miss", None   # an answer still coming first: in order, upstream
            if call.json is not body or self._rewrite(doc, whole):
                forward = orjson.dumps({"type": "response.create", **call.json}).decode()
        except SidecarError as exc:   # a decision (replay-mode miss): the agent gets it as the socket's error
            if call is not None:
                call.error = exc.kind
                call.status = KINDS[exc.kind][0]
                self._done(call)
            await self.socket.client.send_str(error_event(exc))
            return True
        except Exception as exc:
            state.fault("websocket", exc)
            return False   # relayed as sent, no call made of it
        await self._send(call, whole, forward)
        return True

    def _call(self, doc: dict) -> tuple[Call, list | None, dict]:
        body = {k: v for k, v in doc.items() if k != "type"}
        whole = self.chain.whole(body)
        keyed = body
        if body.get("previous_response_id") is not None and whole is not None:
            keyed = {k: v for k, v in body.items() if k != "previous_response_id"}
            keyed["input"] = whole
        call = Call(self.socket.route, "POST")
        call.headers = self.headers
        call.model_call = True
        call.json = keyed
        return call, whole, keyed

    def _rewrite(self, doc: dict, whole: list | None) -> bool:
        """A request naming an answer the upstream socket did not send goes up whole."""
        previous = doc.get("previous_response_id")
        return previous is not None and previous != self.chain.upstream_has and whole is not None

    async def _send(self, call: Call, whole: list | None, text: str) -> None:
        exchange = Exchange(call, whole)
        state = self.state
        try:
            exchange.slot = (await pipeline.take_slot(state, call, False),)
            upstream = await self.socket.connect()
        except aiohttp.WSServerHandshakeError as exc:
            call.error, call.status = "upstream_refused", exc.status
            await self._failed(exchange, refusal_event(exc))
            return
        except Exception as exc:
            error = exc if isinstance(exc, SidecarError) else state.fault("forward", exc)
            call.error, call.status = error.kind, KINDS[error.kind][0]
            await self._failed(exchange, error_event(error))
            return
        self.pending.append(exchange)
        call.t_sent = time.monotonic()
        await upstream.send_str(text)

    async def _failed(self, exchange: Exchange, event: str) -> None:
        self._release(exchange)
        self._done(exchange.call)
        await self.socket.client.send_str(event)

    async def _replay(self, call: Call, whole: list | None, hit) -> None:
        events = events_of(hit.chunks)
        call.status = hit.status
        call.streamed = True
        call.t_first_byte = time.monotonic()
        client = self.socket.client
        delivered = False
        try:
            for _, data in events:
                if data:
                    await client.send_str(data.decode())
            delivered = True
            call.t_done = time.monotonic()
            await pipeline.run(self.state, "end", call)   # the checkpoint of a hit
        finally:   # recorded however it ends: an agent that leaves (the handler cancelled) included
            if not delivered:
                call.error = call.error or "client_disconnected"
            call.t_done = call.t_done or time.monotonic()
            self._done(call)
        self._chain(whole, events, upstream=False)

    # -- upstream -> agent ----------------------------------------------------------------------------

    async def from_upstream(self, text: str) -> None:
        """One upstream message, before it is relayed: into the exchange it answers (side stages only)."""
        if not self.pending:
            return
        exchange = self.pending[0]
        call = exchange.call
        try:
            data = text.encode()
            kind = orjson.loads(data).get("type", "")
            chunk = framed(kind if isinstance(kind, str) else "", data)
            if not exchange.started:
                exchange.started = True
                call.t_first_byte = time.monotonic()
                call.status, call.streamed = 200, True
                call.head = Head(200, "OK", CIMultiDict(), sse=True, incremental=True)   # the socket's 101 said it all
                await pipeline.run(self.state, "head", call, call.head)
            exchange.chunks.append(chunk)
            if b"\r" in data and call.capture is not None:   # SSE would read it as a line end: not stored
                call.capture.malformed = True
            await pipeline.run(self.state, "chunk", call, chunk)
        except Exception as exc:   # not JSON, or a stage broke: relayed all the same
            self.state.fault("websocket", exc)
            kind = ""
        if kind in ENDS:
            self.pending.popleft()
            await self._end(exchange, kind)

    async def _end(self, exchange: Exchange, kind: str) -> None:
        call = exchange.call
        call.t_done = time.monotonic()
        try:
            if kind == "error":
                call.error = "upstream_error"
            call.body_out = b"".join(exchange.chunks)
            await pipeline.run(self.state, "end", call)   # capture, checkpoint, store
            self._chain(exchange.whole, events_of(exchange.chunks), upstream=True)
        except Exception as exc:
            self.state.fault("websocket", exc)
        finally:
            self._release(exchange)
            self._done(call)

    def _chain(self, whole: list | None, events: list[tuple[str, bytes]], upstream: bool) -> None:
        try:
            self.chain.answered(whole, events, upstream)
        except Exception as exc:   # the next request then goes up as sent
            self.state.fault("websocket", exc)

    def closed(self, why: str) -> None:
        """The socket closed: exchanges still waiting for their answer end, unstored."""
        while self.pending:
            exchange = self.pending.popleft()
            exchange.call.error = why
            self._release(exchange)
            self._done(exchange.call)

    def _release(self, exchange: Exchange) -> None:
        if exchange.slot is not None:
            slot, exchange.slot = exchange.slot, None
            self.state.limiter.release(exchange.call.route.agent, exchange.call.model, slot[0])

    def _done(self, call: Call) -> None:
        asyncio.get_running_loop().call_soon(pipeline.run_done, self.state, call)
