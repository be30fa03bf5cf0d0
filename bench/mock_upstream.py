"""A local emulator of the Anthropic and OpenAI HTTP APIs for tests and benchmarks.

Real JSON shapes, SSE event sequences, error bodies and headers, so the official SDKs
(and a proxy in front of it) parse it as they parse the real services.  Reply text is a
function of the request (caches can be tested); ids are fresh each time (a cached answer
can be told from a new one).  Latency, pacing, a concurrency cap and failures come from a
mutable `Profile` and `inject()`.  Never reaches the network.

Standalone:  python -m bench.mock_upstream --port 9000 --ttft 0.4 --tps 60 [--log]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import hashlib
import math
import random
import struct
import sys
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
    "mike november oscar papa quebec romeo sierra tango uniform victor whiskey "
    "xray yankee zulu amber birch cedar dune ember fjord glade harbor island "
    "jasper kernel lantern meadow nectar orchid pebble quartz river saffron "
    "timber umbra velvet willow xenon yarrow zephyr anchor beacon canyon "
    "drift eclipse falcon granite horizon ivory jungle koala lotus"
).split()
assert len(WORDS) == 64  # a byte & 63 picks a word
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
MODELS = [("claude-sonnet-4-5", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
          ("claude-opus-4-1", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
          ("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-01T00:00:00Z")]
# (status, anthropic error type, openai error type, openai code, message) per injected kind
_FAILURES = {
    "rate_limit": (429, "rate_limit_error", "requests", "rate_limit_exceeded",
                   "Number of requests has exceeded your rate limit. Please try again later."),
    "overloaded": (529, "overloaded_error", "server_error", None, "Overloaded"),
    "server_error": (500, "api_error", "server_error", None, "Internal server error"),
    "bad_gateway": (502, "api_error", "server_error", None, "Bad gateway"),
}
_MID_STREAM = ("drop_mid_stream", "error_mid_stream")
KINDS = (*_FAILURES, "drop", *_MID_STREAM)
_OPENAI_PREFIXES = ("/v1/chat/", "/v1/embeddings", "/v1/completions")
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


def _rand(n: int) -> str:
    return "".join(random.choices(_ALNUM, k=n))


def _sse(event: str, data: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _words(material: bytes, n: int) -> list[str]:
    """n words chosen by a hash of the request: same request, same text."""
    return [WORDS[b & 63] for b in hashlib.shake_256(material).digest(n)] if n > 0 else []


def _material(data: dict) -> bytes:
    """What an Anthropic reply is a function of: identical requests, identical text."""
    return orjson.dumps([data.get("model"), data.get("system"), data.get("messages")],
                        option=orjson.OPT_SORT_KEYS)


def _deltas(words: list[str]) -> list[str]:
    """Stream pieces whose concatenation equals ' '.join(words)."""
    return [w + " " for w in words[:-1]] + words[-1:]


def _block_delta(delta: dict) -> bytes:
    return _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})


# Anthropic events that never change, computed once.
_PING = _sse("ping", {"type": "ping"})
_BLOCK_STOP = _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
_MESSAGE_STOP = _sse("message_stop", {"type": "message_stop"})
_TEXT_START = _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
_TEXT_DELTA = {d: _block_delta({"type": "text_delta", "text": d})
               for w in WORDS for d in (w, w + " ")}
_OVERLOADED_EVENT = _sse("error", {"type": "error", "error": {"type": "overloaded_error",
                                                              "message": "Overloaded"}})
_OPENAI_STREAM_ERROR = b"data: " + orjson.dumps({"error": {
    "message": "The server is overloaded. Please try again later.", "type": "server_error",
    "param": None, "code": None}}) + b"\n\n"


def _text_of(content: object) -> str:
    if not isinstance(content, list):
        return content if isinstance(content, str) else ""
    return " ".join(b.get("text", "") for b in content if isinstance(b, dict)
                    and b.get("type") == "text")


def _tool_call(data: dict, words: list[str]) -> dict | None:
    """A tool_use block when tools are offered and the user asks to 'use a tool'."""
    tools, msgs = data.get("tools"), data.get("messages")
    if not tools or not isinstance(tools, list) or not isinstance(tools[0], dict):
        return None
    last_user = next((m for m in reversed(msgs) if isinstance(m, dict)
                      and m.get("role") == "user"), None) if isinstance(msgs, list) else None
    if last_user is None or "use a tool" not in _text_of(last_user.get("content")).lower():
        return None
    props = (tools[0].get("input_schema") or {}).get("properties") or {}
    fill = {"string": words[0] if words else "x", "integer": 1, "number": 1, "boolean": True}
    args = {k: fill[v.get("type")] for k, v in props.items()
            if isinstance(v, dict) and v.get("type") in fill}
    return {"type": "tool_use", "id": "toolu_01" + _rand(22),
            "name": tools[0].get("name", "tool"), "input": args}


def anthropic_problem(body: object, need_max_tokens: bool = True,
                      strict: bool = True) -> str | None:
    """The message the real API gives for a malformed Messages request, or None.
    Not strict: only what the mock itself needs to answer (a dict with model, messages)."""
    if not isinstance(body, dict):
        return "Input should be a valid dictionary"
    for name in ("model", "max_tokens", "messages"):
        if name not in body and (name != "max_tokens" or need_max_tokens and strict):
            return f"{name}: Field required"
    if not strict:
        return None
    if not isinstance(body["model"], str):
        return "model: Input should be a valid string"
    mt = body.get("max_tokens", 1)
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        return "max_tokens: Input should be a valid integer greater than or equal to 1"
    msgs = body["messages"]
    if not isinstance(msgs, list):
        return "messages: Input should be a valid list"
    if not msgs:
        return "messages: at least one message is required"
    pending: list[str] = []  # tool_use ids of the previous assistant message
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages.{i}: Input should be a valid dictionary"
        role = m.get("role")
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if "content" not in m:
            return f"messages.{i}.content: Field required"
        blocks = [] if isinstance(m["content"], str) else m["content"]
        if not isinstance(blocks, list):
            return f"messages.{i}.content: Input should be a valid list"
        if role != ("user" if i % 2 == 0 else "assistant"):  # strict alternation from user
            if i == 0:
                return 'messages: first message must use the "user" role'
            return ('messages: roles must alternate between "user" and "assistant", '
                    f'but found multiple "{role}" roles in a row')
        for j, b in enumerate(blocks):
            if not isinstance(b, dict) or not isinstance(b.get("type"), str):
                return f"messages.{i}.content.{j}.type: Field required"
        if role == "user":
            answered = set()
            for j, b in enumerate(blocks):
                if b["type"] == "tool_result":
                    tid = b.get("tool_use_id")
                    if tid not in pending:
                        return (f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                                f"`tool_result` blocks: {tid}. Each `tool_result` block must have "
                                "a corresponding `tool_use` block in the previous message.")
                    answered.add(tid)
            missing = [t for t in pending if t not in answered]
            if missing:
                return _missing_results(i, missing)
            pending = []
        else:
            pending = [b.get("id") for b in blocks if b["type"] == "tool_use"]
    if pending:
        return _missing_results(len(msgs) - 1, pending)
    return None


def _missing_results(i: int, ids: list) -> str:
    return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
            f"after: {', '.join(map(str, ids))}. Each `tool_use` block must have a "
            "corresponding `tool_result` block in the next message.")


@dataclass
class Profile:
    ttft: float = 0.0               # seconds before the first byte of an answer (JSON or stream)
    tokens_per_second: float = 0.0  # streaming pace between deltas; 0 = no delay
    output_tokens: int = 12         # words in a generated reply (each word one token / one delta)
    max_concurrency: int = 0        # 0 = unlimited; beyond it answer 429 with retry-after
    retry_after: float = 1.0        # seconds sent in retry-after on 429/529 (also retry-after-ms)
    validate: bool = True           # validate Anthropic message structure as the real API does


@dataclass
class Received:
    """One request as the mock saw it."""
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: object | None
    at: float = field(default_factory=time.monotonic)


class _Fail(Exception):
    """An error answer decided before the response starts (status + body)."""
    def __init__(self, status: int, kind: str, message: str, **kw):
        self.status, self.kind, self.message, self.kw = status, kind, message, kw


class MockUpstream:
    """The emulator: an aiohttp app plus counters, an injection queue and a profile."""

    def __init__(self, profile: Profile | None = None, *, record: bool = True, log: bool = False):
        self.profile = profile or Profile()
        self.record = record  # benchmarks turn this off so `received` does not grow forever
        self.log = log
        self.received: list[Received] = []
        self.hold_after_first_event: asyncio.Event | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._reset_counters()
        self._routes = {("POST", "/v1/messages"): self._messages,
                        ("POST", "/v1/messages/count_tokens"): self._count_tokens,
                        ("GET", "/v1/models"): self._models,
                        ("POST", "/v1/chat/completions"): self._chat,
                        ("POST", "/v1/embeddings"): self._embeddings}
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_get("/_mock/stats", self._ctl_stats)
        self.app.router.add_post("/_mock/reset", self._ctl_reset)
        self.app.router.add_post("/_mock/inject", self._ctl_inject)
        self.app.router.add_post("/_mock/profile", self._ctl_profile)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    # ---- public API ----------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, backlog=1024).start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{port}"
        return port

    async def stop(self) -> None:
        if self.hold_after_first_event is not None:
            self.hold_after_first_event.set()  # release held streams rather than hang shutdown
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def count(self, path: str | None = None) -> int:
        return self._total if path is None else self._per_path.get(path, 0)

    def inject(self, kind: str, times: int = 1, **kw) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; expected one of {KINDS}")
        self._injected.extend([(kind, kw)] * times)

    def reset(self) -> None:
        self.received.clear()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._total = 0
        self._per_path: collections.Counter[str] = collections.Counter()
        self._injected: collections.deque[tuple[str, dict]] = collections.deque()
        self.rate_limited = 0
        self.in_flight = getattr(self, "in_flight", 0)  # streams still running stay counted
        self.peak_in_flight = self.in_flight

    # ---- dispatch ------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        start = time.monotonic()
        body = await request.read()
        path = request.path
        try:
            data = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            data = None
        self._total += 1
        self._per_path[path] += 1
        if self.record:
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.received.append(Received(request.method, path, request.query_string,
                                          headers, body, data, start))
        resp = await self._answer(request, path, body, data, start)
        if self.log:
            print(f"{request.method} {request.path_qs} -> {resp.status} "
                  f"{(time.monotonic() - start) * 1000:.1f}ms", file=sys.stderr, flush=True)
        return resp

    async def _answer(self, request, path, body, data, start) -> web.StreamResponse:
        openai = path.startswith(_OPENAI_PREFIXES)
        if path == "/" and request.method in ("GET", "HEAD"):
            return web.Response(text="OK")  # Claude Code's connectivity check
        route = self._routes.get((request.method, path))
        if route is None and openai:
            msg = f"Invalid URL ({request.method} {path})"
            return self._error(True, 404, "invalid_request_error", msg)
        if route is None:
            return self._error(False, 404, "not_found_error", "Not Found")
        cap = self.profile.max_concurrency
        if cap and self.in_flight >= cap:
            self.rate_limited += 1
            return self._failure(openai, "rate_limit", {})
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            kind, kw = self._injected.popleft() if self._injected else (None, {})
            if kind in _MID_STREAM and not (isinstance(data, dict) and data.get("stream") is True):
                kind = "drop" if kind == "drop_mid_stream" else "overloaded"  # no stream to cut
            if kind in _FAILURES:
                return self._failure(openai, kind, kw)
            if kind == "drop":
                return self._drop(request)
            if body and data is None:
                raise _Fail(400, "invalid_request_error",
                            "We could not parse the JSON body of your request." if openai
                            else "There was an error parsing the body of your request.")
            return await route(request, data, kind, start)
        except _Fail as f:
            return self._error(openai, f.status, f.kind, f.message, **f.kw)
        finally:
            self.in_flight -= 1

    # ---- answers, errors, headers -------------------------------------------------
    @staticmethod
    def _json(payload: object, headers: dict, status: int = 200) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(payload), headers=headers,
                            content_type="application/json")

    async def _slow_json(self, payload: object, headers: dict) -> web.Response:
        """A non-streamed answer: ttft, then the whole body at once."""
        if self.profile.ttft > 0:
            await asyncio.sleep(self.profile.ttft)
        return self._json(payload, headers)

    def _error(self, openai: bool, status: int, kind: str, message: str, *,
               code: str | None = None, param: str | None = None,
               headers: dict | None = None) -> web.Response:
        if openai:
            h = self._openai_headers(time.monotonic())
            payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        else:
            h = self._anthropic_headers()
            payload = {"type": "error", "error": {"type": kind, "message": message},
                       "request_id": h["request-id"]}
        return self._json(payload, {**h, **(headers or {})}, status)

    def _failure(self, openai: bool, kind: str, kw: dict) -> web.Response:
        status, a_type, o_type, o_code, message = _FAILURES[kind]
        headers = {}
        if status in (429, 529):
            ra = float(kw.get("retry_after", self.profile.retry_after))
            headers = {"retry-after": str(math.ceil(ra)), "retry-after-ms": str(int(ra * 1000))}
            if status == 429 and not openai:
                headers["anthropic-ratelimit-requests-remaining"] = "0"
                headers["anthropic-ratelimit-requests-reset"] = _rfc3339(time.time() + ra)
        if openai:
            return self._error(True, status, o_type, message, code=o_code, headers=headers)
        return self._error(False, status, a_type, message, headers=headers)

    @staticmethod
    def _drop(request: web.Request, resp: web.StreamResponse | None = None) -> web.StreamResponse:
        """Close the socket; aiohttp then fails to write the response and ignores that."""
        if request.transport is not None:
            request.transport.close()
        return resp if resp is not None else web.Response()

    def _anthropic_headers(self) -> dict[str, str]:
        limit = self.profile.max_concurrency or 4000
        return {"request-id": "req_011C" + _rand(20),
                "anthropic-ratelimit-requests-limit": str(limit),
                "anthropic-ratelimit-requests-remaining": str(max(limit - self.in_flight, 0)),
                "anthropic-ratelimit-requests-reset": _rfc3339(time.time() + 1)}

    def _openai_headers(self, start: float) -> dict[str, str]:
        limit = self.profile.max_concurrency or 10000
        return {"x-request-id": "req_" + _rand(32), "openai-version": "2020-10-01",
                "openai-processing-ms": str(int((time.monotonic() - start) * 1000)),
                "x-ratelimit-limit-requests": str(limit),
                "x-ratelimit-remaining-requests": str(max(limit - self.in_flight, 0)),
                "x-ratelimit-reset-requests": "6ms", "x-ratelimit-limit-tokens": "30000000",
                "x-ratelimit-remaining-tokens": "29999000", "x-ratelimit-reset-tokens": "0s"}

    async def _stream(self, request, headers: dict, first: bytes, before: list[bytes],
                      deltas: list[bytes], tail: list[bytes], error: bytes,
                      kind: str | None) -> web.StreamResponse:
        """Send an SSE answer event by event: ttft, `first`, the optional hold, `before`,
        `deltas` paced at tokens_per_second, then `tail`; for the mid-stream failures,
        stop after two deltas and close, or send `error` (the in-band error event)."""
        if self.profile.ttft > 0:
            await asyncio.sleep(self.profile.ttft)
        resp = web.StreamResponse(headers={**headers, **_SSE_HEADERS})
        try:
            await resp.prepare(request)
            await resp.write(first)
            if self.hold_after_first_event is not None:
                await self.hold_after_first_event.wait()
            for piece in before:
                await resp.write(piece)
            if kind in _MID_STREAM:
                deltas, tail = deltas[:2], [error] if kind == "error_mid_stream" else []
            tps = self.profile.tokens_per_second
            pause = 1.0 / tps if tps > 0 else 0.0
            for i, piece in enumerate(deltas):
                if pause and i:
                    await asyncio.sleep(pause)
                await resp.write(piece)
            if kind == "drop_mid_stream":
                return self._drop(request, resp)
            for piece in tail:
                await resp.write(piece)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; nothing more to say
        return resp

    # ---- Anthropic ---------------------------------------------------------------
    def _check(self, data, need_max_tokens: bool) -> None:
        if problem := anthropic_problem(data, need_max_tokens, strict=self.profile.validate):
            raise _Fail(400, "invalid_request_error", problem)

    async def _count_tokens(self, request, data, kind, start) -> web.Response:
        self._check(data, need_max_tokens=False)
        n = len(_material(data)) // 4 + 1
        return self._json({"input_tokens": n}, self._anthropic_headers())

    async def _models(self, request, data, kind, start) -> web.Response:
        items = [{"type": "model", "id": i, "display_name": d, "created_at": c}
                 for i, d, c in MODELS]
        return self._json({"data": items, "has_more": False, "first_id": items[0]["id"],
                           "last_id": items[-1]["id"]}, self._anthropic_headers())

    async def _messages(self, request, data, kind, start) -> web.StreamResponse:
        self._check(data, need_max_tokens=True)
        material = _material(data)
        max_tokens = data.get("max_tokens")
        n = min(self.profile.output_tokens, max_tokens if isinstance(max_tokens, int) else 4096)
        words = _words(material, n)
        tool = _tool_call(data, words)
        stop = ("tool_use" if tool else "end_turn" if n == self.profile.output_tokens
                else "max_tokens")
        message = {"id": "msg_01" + _rand(24), "type": "message", "role": "assistant",
                   "model": data["model"], "content": [], "stop_reason": None,
                   "stop_sequence": None,
                   "usage": {"input_tokens": len(material) // 4 + 1, "output_tokens": 1,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
        headers = self._anthropic_headers()
        if data.get("stream") is not True:
            message["content"] = [tool or {"type": "text", "text": " ".join(words)}]
            message["stop_reason"] = stop
            message["usage"]["output_tokens"] = len(words)
            return await self._slow_json(message, headers)
        if tool is None:
            start_block = _TEXT_START
            pieces = [_TEXT_DELTA.get(d) or _block_delta({"type": "text_delta", "text": d})
                      for d in _deltas(words)]
        else:
            start_block = _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                       "content_block": {**tool, "input": {}}})
            js = orjson.dumps(tool["input"]).decode()
            pieces = [_block_delta({"type": "input_json_delta", "partial_json": part})
                      for part in ("", js[:len(js) // 2], js[len(js) // 2:])]
        message_delta = _sse("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": len(words)}})
        return await self._stream(
            request, headers, _sse("message_start", {"type": "message_start", "message": message}),
            [start_block, _PING], pieces, [_BLOCK_STOP, message_delta, _MESSAGE_STOP],
            _OVERLOADED_EVENT, kind)

    # ---- OpenAI ------------------------------------------------------------------
    @staticmethod
    def _openai_check(data, needs: tuple[str, ...]) -> None:
        for name in ("model", *needs):
            if not isinstance(data, dict) or name not in data:
                raise _Fail(400, "invalid_request_error", f"Missing required parameter: '{name}'.",
                            param=name, code="missing_required_parameter")

    async def _chat(self, request, data, kind, start) -> web.StreamResponse:
        self._openai_check(data, ("messages",))
        material = orjson.dumps([data["model"], data["messages"]], option=orjson.OPT_SORT_KEYS)
        prompt = len(material) // 4 + 1
        limit = data.get("max_completion_tokens") or data.get("max_tokens") or 1 << 30
        n = min(self.profile.output_tokens, limit)
        finish = "stop" if n == self.profile.output_tokens else "length"
        words = _words(material, n)
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        head = {"id": "chatcmpl-" + _rand(29), "created": int(time.time()),
                "model": data["model"], "system_fingerprint": "fp_mock"}
        if data.get("stream") is not True:
            message = {"role": "assistant", "content": " ".join(words), "refusal": None}
            return await self._slow_json({**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage}, self._openai_headers(start))
        base = {**head, "object": "chat.completion.chunk"}
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            return b"data: " + orjson.dumps({**base, "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                **extra}) + b"\n\n"

        tail = [chunk({}, finish)]
        if include_usage:
            tail.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        return await self._stream(
            request, self._openai_headers(start),
            chunk({"role": "assistant", "content": "", "refusal": None}), [],
            [chunk({"content": d}) for d in _deltas(words)], tail, _OPENAI_STREAM_ERROR, kind)

    async def _embeddings(self, request, data, kind, start) -> web.Response:
        self._openai_check(data, ("input",))
        inputs = data["input"]
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                       and isinstance(inputs[0], int)):
            inputs = [inputs]  # one string or one token array
        if not isinstance(inputs, list) or not inputs:
            raise _Fail(400, "invalid_request_error", "'input' must be a non-empty string or array",
                        param="input")
        dims = data.get("dimensions") or 8
        as_base64 = data.get("encoding_format") == "base64"
        items, tokens = [], 0
        for i, item in enumerate(inputs):
            raw = orjson.dumps([data["model"], item])
            tokens += len(raw) // 4 + 1
            vec = [(b - 127.5) / 127.5 for b in hashlib.shake_256(raw).digest(dims)]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            packed = struct.pack(f"<{dims}f", *(v / norm for v in vec))  # little-endian float32
            emb = (base64.b64encode(packed).decode() if as_base64
                   else list(struct.unpack(f"<{dims}f", packed)))
            items.append({"object": "embedding", "index": i, "embedding": emb})
        return await self._slow_json({"object": "list", "data": items, "model": data["model"],
                                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                                     self._openai_headers(start))

    # ---- control routes (for out-of-process use) -----------------------------------
    def stats(self) -> dict:
        return {"count": self._total, "paths": dict(self._per_path), "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight, "rate_limited": self.rate_limited,
                "pending_injections": len(self._injected)}

    async def _ctl_stats(self, request: web.Request) -> web.Response:
        return self._json(self.stats(), {})

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return self._json({"ok": True}, {})

    async def _ctl_inject(self, request: web.Request) -> web.Response:
        try:
            spec = dict(orjson.loads(await request.read()))
            self.inject(spec.pop("kind"), int(spec.pop("times", 1)), **spec)
        except (ValueError, KeyError, TypeError) as e:
            return self._json({"ok": False, "error": repr(e)}, {}, 400)
        return self._json({"ok": True, "pending": len(self._injected)}, {})

    async def _ctl_profile(self, request: web.Request) -> web.Response:
        current = dataclasses.asdict(self.profile)
        try:  # convert every field first so a bad value changes nothing
            new = {k: v if isinstance(current[k], bool) else type(current[k])(v)
                   for k, v in dict(orjson.loads(await request.read())).items()}
        except (ValueError, KeyError, TypeError) as e:
            return self._json({"ok": False, "error": repr(e)}, {}, 400)
        for name, value in new.items():
            setattr(self.profile, name, value)
        return self._json(dataclasses.asdict(self.profile), {})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Mock Anthropic/OpenAI upstream for benchmarks.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--ttft", type=float, default=0.0)
    p.add_argument("--tps", type=float, default=0.0, help="tokens per second when streaming")
    p.add_argument("--output-tokens", type=int, default=12)
    p.add_argument("--max-concurrency", type=int, default=0)
    p.add_argument("--retry-after", type=float, default=1.0)
    p.add_argument("--no-validate", action="store_true")
    p.add_argument("--log", action="store_true", help="one line per request on stderr")
    a = p.parse_args(argv)
    profile = Profile(ttft=a.ttft, tokens_per_second=a.tps, output_tokens=a.output_tokens,
                      max_concurrency=a.max_concurrency, retry_after=a.retry_after,
                      validate=not a.no_validate)

    async def serve() -> None:
        mock = MockUpstream(profile, record=False, log=a.log)
        await mock.start(a.host, a.port)
        print(f"mock upstream listening on {mock.url}", file=sys.stderr, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await mock.stop()

    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as r:
        r.run(serve())


if __name__ == "__main__":
    main()
