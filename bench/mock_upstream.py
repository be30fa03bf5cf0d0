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
import collections
import contextlib
import dataclasses
import math
import sys
import time

import orjson
from aiohttp import web

from .mock.anthropic import AnthropicAPI, anthropic_problem
from .mock.common import SSE_HEADERS, Fail, Profile, Received, rfc3339
from .mock.openai_chat import OpenAIChatAPI
from .mock.prompt_cache import PromptCache

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
_OPENAI_PREFIXES = ("/v1/chat/", "/v1/embeddings", "/v1/completions")


class MockUpstream(AnthropicAPI, OpenAIChatAPI):
    """The emulator: an aiohttp app plus counters, an injection queue and a profile.
    Each API's routes live in its own module under bench/mock/, mixed in here."""

    def __init__(self, profile: Profile | None = None, *, record: bool = True, log: bool = False):
        self.profile = profile or Profile()
        self.record = record  # benchmarks turn this off so `received` does not grow forever
        self.log = log
        self.received: list[Received] = []
        self.sent_usage: list[dict] = []   # the usage block of each model answer, as the client gets it in the end
        self.prompt_cache = PromptCache()  # the providers' prompt caches (bench/mock/prompt_cache.py)
        self.hold_after_first_event: asyncio.Event | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._reset_counters()
        self._routes = {key: getattr(self, name)
                        for api in (AnthropicAPI, OpenAIChatAPI) for key, name in api.ROUTES.items()}
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
        self.sent_usage.clear()
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
                raise Fail(400, "invalid_request_error",
                            "We could not parse the JSON body of your request." if openai
                            else "There was an error parsing the body of your request.")
            return await route(request, data, kind, start)
        except Fail as f:
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
                headers["anthropic-ratelimit-requests-reset"] = rfc3339(time.time() + ra)
        if openai:
            return self._error(True, status, o_type, message, code=o_code, headers=headers)
        return self._error(False, status, a_type, message, headers=headers)

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
