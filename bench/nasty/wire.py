"""The hostile upstream's server: HTTP/1.1 on raw asyncio streams, so every answer byte is its own.

A framework server would fix what this one must get wrong on purpose (a
content-length that lies, a reset before the head, an HTTP/1.0 answer read
until close, a garbage status line), so requests are parsed and answers
written here, in a few small functions. Every request is recorded (raw
target byte for byte, headers in order, body digest) and readable in-process
(`NastyUpstream.requests`) or as JSON at `GET /_nasty/requests?since=N`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import http
import socket
import struct
import zlib
from dataclasses import dataclass
from urllib.parse import parse_qsl

import orjson

from .cases import ALL, CASES, Answer, a_json, a_sse, error, o_json, o_sse
from .shapes import (anthropic_error, chat_chunks, completion, data_lines, dumps, echo_text,
                     message, message_events, openai_error, sse)

HEAD_LIMIT = 1 << 20
KEEP_BODY = 1 << 20       # request bodies up to this size are kept whole in the record
REASONS = {529: "Site Overloaded"}


class BadRequest(Exception):
    pass


@dataclass
class Request:
    method: str
    target: bytes
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name), "")

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    @property
    def query(self) -> dict[str, str]:
        raw = self.target.split(b"?", 1)[1] if b"?" in self.target else b""
        return dict(parse_qsl(raw.decode("latin-1")))

    def json(self) -> object:
        body, encoding = self.body, self.header("content-encoding").lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            return orjson.loads(body)
        except (ValueError, OSError, zlib.error):
            return None


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
    """One request, or None at a clean end of the connection; 100 Continue is sent when asked for."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("connection closed inside a request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large") from None
    lines = head[:-4].split(b"\r\n")
    try:
        method, target, version = lines[0].split(b" ", 2)
    except ValueError:
        raise BadRequest(f"bad request line {lines[0]!r}") from None
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().decode("latin-1"), value.strip().decode("latin-1")))
    request = Request(method.decode("latin-1"), target, version.decode("latin-1"), headers, b"")
    if request.header("expect").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in request.header("transfer-encoding").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")   # no trailers expected
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        request.body = b"".join(parts)
    elif request.header("content-length"):
        request.body = await reader.readexactly(int(request.header("content-length")))
    return request


def writes_of(answer: Answer) -> list[bytes]:
    """The body as it goes on the wire, write by write, without the last chunk of a chunked body."""
    if answer.framing == "chunked":
        parts = [b"%x\r\n%s\r\n" % (len(p), p) for p in answer.pieces if p] + ([answer.tail] if answer.tail else [])
    else:
        parts = [p for p in answer.pieces if p]
    if answer.write_size:
        body, size = b"".join(parts), answer.write_size
        parts = [body[i:i + size] for i in range(0, len(body), size)]
    return parts


def head_of(answer: Answer, closing: bool) -> bytes:
    if answer.raw_head:
        return answer.raw_head
    reason = REASONS.get(answer.status) or (http.HTTPStatus(answer.status).phrase
                                            if answer.status in http.HTTPStatus._value2member_map_ else "Unknown")
    headers = list(answer.headers)
    if answer.framing == "length":
        headers.append(("content-length", str(len(answer.body) if answer.length is None else answer.length)))
    elif answer.framing == "chunked":
        headers.append(("transfer-encoding", "chunked"))
    if closing:
        headers.append(("connection", "close"))
    lines = [f"{answer.version} {answer.status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def peer_gone(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Wait up to `timeout` for the peer to close; True if it did."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except asyncio.TimeoutError:
        return False


async def send(answer: Answer, request: Request, reader, writer) -> bool:
    """Write one answer; True if the connection may carry another request."""
    if answer.wait and await peer_gone(reader, answer.wait):
        return False
    if answer.end == "reset":
        reset(writer)
        return False
    if answer.end == "fin":
        return False
    keep = (answer.end == "keep" and answer.framing in ("length", "chunked", "none")
            and answer.version == "HTTP/1.1" and request.version == "HTTP/1.1"
            and request.header("connection").lower() != "close")
    writer.write(head_of(answer, closing=not keep and answer.end in ("keep", "close")))
    if answer.pause:   # the head is a write of its own: what follows arrives after it
        await writer.drain()
        await asyncio.sleep(answer.pause)
    if request.method != "HEAD":
        for data in writes_of(answer):
            writer.write(data)
            await writer.drain()
            if answer.pause:
                await asyncio.sleep(answer.pause)
        if answer.framing == "chunked" and answer.end in ("keep", "close"):
            writer.write(b"0\r\n\r\n")
    await writer.drain()
    if answer.end == "rst":
        reset(writer)
    if answer.end == "silence":
        await peer_gone(reader, 30.0)
    return keep


# ---- the default answers: well-formed, a function of the request ----------------------------------


def default_answer(request: Request) -> Answer:
    path, method = request.path, request.method
    data = request.json()
    text = echo_text(request.body)
    if method == "POST" and path.endswith(b"/v1/messages"):
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            return error(400, anthropic_error("invalid_request_error", "messages: Field required"))
        if data.get("stream") is True:
            return a_sse(sse(message_events(text)))
        return a_json(dumps(message(text)))
    if method == "POST" and path.endswith(b"/v1/chat/completions"):
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            return error(400, openai_error("invalid_request_error", "Missing required parameter: 'messages'.",
                                           "missing_required_parameter"))
        if data.get("stream") is True:
            return o_sse(data_lines(chat_chunks(text)))
        return o_json(dumps(completion(text)))
    if method == "POST" and path.endswith(b"/v1/messages/count_tokens"):
        return a_json(b'{"input_tokens":12}')
    if method in ("GET", "HEAD") and path.endswith(b"/v1/models"):
        return a_json(dumps({"data": [{"type": "model", "id": "claude-sonnet-4-5-20250929",
                                       "display_name": "Claude Sonnet 4.5", "created_at": "2025-09-29T00:00:00Z"}],
                             "has_more": False, "first_id": "claude-sonnet-4-5-20250929",
                             "last_id": "claude-sonnet-4-5-20250929"}))
    if method in ("GET", "HEAD") and b"/v1/files/" in path:
        file_id = path.rsplit(b"/v1/files/", 1)[1].decode("latin-1")
        return o_json(dumps({"id": file_id, "object": "file", "bytes": 0, "created_at": 1735689600,
                             "filename": file_id, "purpose": "assistants"}))
    if method == "OPTIONS":
        return Answer(status=204, framing="none", headers=(
            ("access-control-allow-origin", "*"), ("access-control-allow-methods", "GET, POST, OPTIONS"),
            ("access-control-allow-headers", "*"), ("access-control-max-age", "86400")))
    return error(404, anthropic_error("not_found_error", "Not Found"))


# ---- the server ---------------------------------------------------------------------------------


class NastyUpstream:
    """The hostile upstream, in-process: `await start()`, then point a proxy at `url`."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._connection, host, port, limit=HEAD_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    def case_of(self, request: Request) -> str:
        name = request.query.get("nasty", "")
        data = request.json()
        if not name and isinstance(data, dict) and isinstance(data.get("model"), str):
            name = data["model"].removeprefix("nasty-") if data["model"].startswith("nasty-") else ""
        if not name and b"/models/nasty-" in request.path:   # Gemini: the model is in the path
            name = request.path.split(b"/models/nasty-", 1)[1].split(b":", 1)[0].decode("latin-1")
        return name if name in ALL else ""

    def record(self, request: Request, case: str) -> None:
        body = request.body
        self.requests.append({
            "seq": len(self.requests), "case": case, "method": request.method,
            "target": request.target.decode("latin-1"), "version": request.version,
            "headers": request.headers, "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_b64": base64.b64encode(body).decode() if len(body) <= KEEP_BODY else None})

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                request = await read_request(reader, writer)
                if request is None:
                    break
                if request.target.startswith(b"/_nasty/"):
                    keep = await send(self._control(request), request, reader, writer)
                else:
                    case = self.case_of(request)
                    self.record(request, case)
                    keep = await send(ALL[case].answer if case else default_answer(request), request, reader, writer)
                if not keep:
                    break
        except (BadRequest, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            if not writer.transport.is_closing():
                writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    def _control(self, request: Request) -> Answer:
        path = request.path
        if path == b"/_nasty/requests":
            since = int(request.query.get("since", "0") or 0)
            return a_json(dumps({"next": len(self.requests), "requests": self.requests[since:]}))
        if path == b"/_nasty/cases":
            return a_json(dumps([{"name": c.name, "doc": c.doc, "kind": c.kind, "api": c.api, "stream": c.stream}
                                 for c in CASES.values()]))
        if path == b"/_nasty/clear" and request.method == "POST":
            self.requests.clear()
            return a_json(b'{"cleared":true}')
        return error(404, anthropic_error("not_found_error", "no such control path"))


__all__ = ["NastyUpstream", "Request", "default_answer"]
