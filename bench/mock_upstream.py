"""A local emulator of the Anthropic, OpenAI (chat, embeddings, Responses) and Gemini HTTP APIs for tests and benchmarks.

Real JSON shapes, SSE event sequences, error bodies and headers, so the official SDKs
(and a proxy in front of it) parse it as they parse the real services.  Reply text is a
function of the request (caches can be tested); ids are fresh each time (a cached answer
can be told from a new one).  Latency, pacing, a concurrency cap, token-bucket rate limits
(bench/mock/ratelimit.py) and failures come from a mutable `Profile`, `inject()` and
`wall()` (an overload wall: 529 to every call for a while).  Never reaches the network.

Standalone:  python -m bench.mock_upstream --port 9000 --ttft 0.4 --tps 60 [--log]
Control:     GET /_mock/stats, POST /_mock/reset, /_mock/inject {"kind": ..., "times": N},
             /_mock/profile {field: value}, /_mock/wall {"seconds": 60, "status": 529} (from the next call)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import math
import sys
import time

import orjson
from aiohttp import web

from .mock.anthropic import AnthropicAPI, anthropic_problem
from .mock.common import SSE_HEADERS, Fail, Profile, Received
from .mock.gemini import GeminiAPI, is_gemini
from .mock.openai_chat import OpenAIChatAPI
from .mock.ratelimit import RateLimits, Wall
from .mock.openai_responses import OpenAIResponsesAPI
from .mock.openai_responses_ws import OpenAIResponsesSocketAPI

__all__ = ["MockUpstream", "Profile", "Received", "KINDS", "anthropic_problem"]

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
_OPENAI_PREFIXES = ("/v1/chat/", "/v1/embeddings", "/v1/completions", "/v1/responses")


class MockUpstream(AnthropicAPI, OpenAIChatAPI, OpenAIResponsesAPI, OpenAIResponsesSocketAPI, GeminiAPI):
    """The emulator: an aiohttp app plus counters, an injection queue and a profile.
    Each API's routes live in its own module under bench/mock/, mixed in here."""

    def __init__(self, profile: Profile | None = None, *, record: bool = True, log: bool = False):
        self.profile = profile or Profile()
        self.record = record  # benchmarks turn this off so `received` does not grow forever
        self.log = log
        self.received: list[Received] = []
        self.hold_after_first_event: asyncio.Event | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._reset_counters()
        self._routes = {key: getattr(self, name)
                        for api in (AnthropicAPI, OpenAIChatAPI, OpenAIResponsesAPI)
                        for key, name in api.ROUTES.items()}
        # What each model route counts against the input-token bucket (the others count one request).
        self._metered = {"/v1/messages": self.anthropic_input_tokens,
                         "/v1/chat/completions": self.openai_input_tokens, "/v1/embeddings": lambda data: 1}
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_get("/_mock/stats", self._ctl_stats)
        self.app.router.add_post("/_mock/reset", self._ctl_reset)
        self.app.router.add_post("/_mock/inject", self._ctl_inject)
        self.app.router.add_post("/_mock/profile", self._ctl_profile)
        self.app.router.add_post("/_mock/wall", self._ctl_wall)
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

    def wall(self, seconds: float, status: int = 529) -> None:
        """For `seconds` from the next model call on, every model call is answered `status` (overloaded),
        then the upstream recovers."""
        self._wall = Wall(seconds, status)

    def rate_limits(self) -> RateLimits:
        """The token buckets of the current profile (new, full buckets when the profile's limits change)."""
        shape = (self.profile.rate_requests, self.profile.rate_input_tokens, self.profile.rate_window)
        if self._limits_shape != shape:
            self._limits, self._limits_shape = RateLimits(*shape), shape
        return self._limits

    def reset(self) -> None:
        self.received.clear()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._total = 0
        self._per_path: collections.Counter[str] = collections.Counter()
        self._injected: collections.deque[tuple[str, dict]] = collections.deque()
        self.rate_limited = 0
        self._limits_shape = None   # full buckets again
        self._wall = Wall()
        self.socket_requests = 0   # response.create messages on Responses sockets (each also in socket_messages)
        self.socket_messages: list = []
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
        gemini = is_gemini(path, request.headers, request.query_string)
        if path == "/" and request.method in ("GET", "HEAD"):
            return web.Response(text="OK")  # Claude Code's connectivity check
        if path == "/v1/responses" and request.headers.get("upgrade", "").lower() == "websocket":
            return await self._responses_socket(request, start)
        if gemini:
            route = self._gemini_route(request.method, path)
            if route is None:
                return self._gemini_error(404, f"Method not found: {request.method} {path}")
        else:
            route = (self._routes.get((request.method, path))  # or a route ending in /{id}
                     or self._routes.get((request.method, path.rsplit("/", 1)[0] + "/*")))
        if route is None and openai:
            msg = f"Invalid URL ({request.method} {path})"
            return self._error(True, 404, "invalid_request_error", msg)
        if route is None:
            return self._error(False, 404, "not_found_error", "Not Found")
        if path in self._metered and self._wall.meet():
            return await self._overloaded(openai)
        cap = self.profile.max_concurrency
        if cap and self.in_flight >= cap:
            self.rate_limited += 1
            return self._gemini_failure("rate_limit", {}) if gemini else self._failure(openai, "rate_limit", {})
        if path in self._metered and request.method == "POST":
            wait = self.rate_limits().admit(self._metered[path](data))
            if wait:
                self.rate_limited += 1
                return self._bucket_exhausted(openai, wait)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            kind, kw = self._injected.popleft() if self._injected else (None, {})
            streams = isinstance(data, dict) and data.get("stream") is True or path.endswith(":streamGenerateContent")
            if kind in _MID_STREAM and not streams:
                kind = "drop" if kind == "drop_mid_stream" else "overloaded"  # no stream to cut
            if kind in _FAILURES:
                return self._gemini_failure(kind, kw) if gemini else self._failure(openai, kind, kw)
            if kind == "drop":
                return self._drop(request)
            if body and data is None:
                raise Fail(400, "invalid_request_error",
                            "We could not parse the JSON body of your request." if openai
                            else "There was an error parsing the body of your request.")
            return await route(request, data, kind, start)
        except Fail as f:
            if gemini:
                return self._gemini_error(f.status, f.message)
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
        if openai:
            return self._error(True, status, o_type, message, code=o_code, headers=headers)
        return self._error(False, status, a_type, message, headers=headers)

    async def _overloaded(self, openai: bool) -> web.Response:
        """An answer from inside an overload wall: the wall's status, after its latency."""
        wall = self._wall
        wall.requests += 1
        late = wall.first_answered > 0
        wall.in_flight += 1
        wall.late_in_flight += late
        wall.peak_in_flight = max(wall.peak_in_flight, wall.in_flight)
        wall.peak_late_in_flight = max(wall.peak_late_in_flight, wall.late_in_flight)
        try:
            if self.profile.wall_latency > 0:
                await asyncio.sleep(self.profile.wall_latency)
        finally:
            wall.in_flight -= 1
            wall.late_in_flight -= late
            wall.first_answered = wall.first_answered or time.monotonic()
        kind = "rate_limit" if wall.status == 429 else "overloaded"
        if wall.status in (429, 529):
            return self._failure(openai, kind, {})
        message = "Service Unavailable"
        return self._error(openai, wall.status, "server_error" if openai else "api_error", message)

    def _bucket_exhausted(self, openai: bool, wait: float) -> web.Response:
        """The token bucket cannot cover the call: 429, retry-after = when it could."""
        headers = {"retry-after": str(max(1, math.ceil(wait)))}
        limits = self.rate_limits()
        if openai:
            message = (f"Rate limit reached for requests or tokens per min: limit {limits.input.capacity} tokens. "
                       f"Please try again in {wait:.3f}s.")
            return self._error(True, 429, "tokens", message, code="rate_limit_exceeded", headers=headers)
        message = (f"This request would exceed your organization's rate limit of {limits.input.capacity} input "
                   f"tokens per {self.profile.rate_window:g} s. Please reduce the prompt length or try again later.")
        return self._error(False, 429, "rate_limit_error", message, headers=headers)

    @staticmethod
    def _drop(request: web.Request, resp: web.StreamResponse | None = None) -> web.StreamResponse:
        """Close the socket; aiohttp then fails to write the response and ignores that."""
        if request.transport is not None:
            request.transport.close()
        return resp if resp is not None else web.Response()

    async def _stream(self, request, headers: dict, first: bytes, before: list[bytes],
                      deltas: list[bytes], tail: list[bytes], error: bytes,
                      kind: str | None) -> web.StreamResponse:
        """Send an SSE answer event by event: ttft, `first`, the optional hold, `before`,
        `deltas` paced at tokens_per_second, then `tail`; for the mid-stream failures,
        stop after two deltas and close, or send `error` (the in-band error event)."""
        if self.profile.ttft > 0:
            await asyncio.sleep(self.profile.ttft)
        resp = web.StreamResponse(headers={**headers, **SSE_HEADERS})
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

    # ---- control routes (for out-of-process use) -----------------------------------
    def stats(self) -> dict:
        return {"count": self._total, "paths": dict(self._per_path), "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight, "rate_limited": self.rate_limited,
                "pending_injections": len(self._injected), "wall": self._wall.stats()}

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

    async def _ctl_wall(self, request: web.Request) -> web.Response:
        try:
            spec = dict(orjson.loads(await request.read()))
            self.wall(float(spec["seconds"]), int(spec.get("status", 529)))
        except (ValueError, KeyError, TypeError) as e:
            return self._json({"ok": False, "error": repr(e)}, {}, 400)
        return self._json({"ok": True, **self._wall.stats()}, {})

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
    p = argparse.ArgumentParser(description="Mock Anthropic/OpenAI/Gemini upstream for benchmarks.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--ttft", type=float, default=0.0)
    p.add_argument("--tps", type=float, default=0.0, help="tokens per second when streaming")
    p.add_argument("--output-tokens", type=int, default=12)
    p.add_argument("--max-concurrency", type=int, default=0)
    p.add_argument("--retry-after", type=float, default=1.0)
    p.add_argument("--rate-requests", type=int, default=0, help="requests per --rate-window (token bucket)")
    p.add_argument("--rate-input-tokens", type=int, default=0, help="input tokens per --rate-window")
    p.add_argument("--rate-window", type=float, default=60.0)
    p.add_argument("--wall-latency", type=float, default=0.05, help="seconds an overload wall takes per answer")
    p.add_argument("--no-validate", action="store_true")
    p.add_argument("--log", action="store_true", help="one line per request on stderr")
    a = p.parse_args(argv)
    profile = Profile(ttft=a.ttft, tokens_per_second=a.tps, output_tokens=a.output_tokens,
                      max_concurrency=a.max_concurrency, retry_after=a.retry_after,
                      rate_requests=a.rate_requests, rate_input_tokens=a.rate_input_tokens,
                      rate_window=a.rate_window, wall_latency=a.wall_latency, validate=not a.no_validate)

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
