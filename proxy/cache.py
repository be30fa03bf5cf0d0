"""The cache stage: decide, look up, replay a hit, store a complete answer.

Modes: read-write (default), read-only, refresh (write, never read), off, and
replay (a miss is an error instead of an upstream call, for offline CI). A
request header `x-sidecar-cache: bypass|refresh` overrides per call. A hit is
replayed in the form the request asks for: recorded stream or JSON, whichever
was stored, converted when the forms differ.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web

from .cache_key import ANY_KEY, KeyMaker
from .call import Call, Refusal
from .config import CacheSection
from .entry import CorruptEntry, Entry, kept_headers
from .flight import Head
from .record import Recorder
from .sse import synthesize_anthropic, synthesize_openai
from .store import ResponseStore

log = logging.getLogger("sidecar")
READS = {"read-write", "read-only", "replay"}
WRITES = {"read-write", "refresh"}
SSE_HEADERS = (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"))


def form_of(call: Call) -> tuple:
    """What shape of answer the request asks for; a recorded answer of another shape is converted."""
    if not call.wants_stream:
        return ("json",)
    options = call.json.get("stream_options") or {}
    return ("sse", bool(options.get("include_usage"))) if call.route.api == "openai" else ("sse",)


class Cache:
    def __init__(self, settings: CacheSection, store: ResponseStore | None, keys: KeyMaker):
        self.settings = settings
        self.store = store
        self.keys = keys
        self.routes = frozenset(settings.routes)
        # Imported recordings are readable with any key; looked up after a miss only when some exist.
        self.has_shared_entries = bool(store and store.shared_entries())
        self.writes: set[asyncio.Task] = set()
        self.write_errors = 0

    def plan(self, call: Call, headers) -> None:
        """Decide whether this call reads and writes the cache, and compute its key."""
        mode = self.settings.mode
        override = headers.get("x-sidecar-cache", "").lower()
        if override in ("bypass", "refresh"):
            mode = "off" if override == "bypass" else "refresh"
        if (self.store is None or call.method != "POST" or call.route.path not in self.routes
                or not isinstance(call.json, dict)):
            return
        if mode == "off" or self.settings.deterministic_only and call.json.get("temperature") != 0:
            if mode == "replay":  # replay never reaches the upstream
                raise Refusal("replay_miss", "sidecar: cache miss in replay mode: calls without temperature 0 "
                                             "are never cached ([cache] deterministic_only = true); set it to "
                                             "false to record and replay them")
            call.cache = "bypass"
            return
        call.cache_mode = mode
        canonical = self.keys.canonical(call.method, call.route.path, call.route.query, headers, call.json)
        call.request_hash = self.keys.request_hash(canonical)
        call.cache_key = self.keys.key(call.request_hash, self.keys.partition(headers))
        call.cache = "miss"

    async def lookup(self, call: Call) -> Entry | None:
        if call.cache_key is None or call.cache_mode not in READS:
            return None
        entry = await self._get(call.cache_key)
        if entry is None and self.has_shared_entries:
            entry = await self._get(self.keys.key(call.request_hash, ANY_KEY))
        call.t_lookup = time.monotonic()
        if entry is not None:
            call.cache = "hit"
            return entry
        if call.cache_mode == "replay":
            raise Refusal("replay_miss", f"sidecar: cache miss in replay mode for {call.route.path} (key "
                                         f"{call.cache_key.hex()}); record this run first with --cache read-write, "
                                         f"or compare requests with 'sidecar cache key < request.json'")
        return None

    async def _get(self, key: bytes) -> Entry | None:
        blob = await self.store.get(key)
        if blob is None:
            return None
        try:
            entry = Entry.decode(blob)
        except CorruptEntry as exc:
            log.warning("cache entry %s unreadable (%s): removed", key.hex(), exc)
            self._spawn(self.store.delete(key))
            return None
        ttl = self.settings.ttl_seconds
        if ttl and time.time() - entry.created > ttl:
            return None
        return entry

    def should_store(self, call: Call) -> bool:
        return call.cache_key is not None and call.cache_mode in WRITES

    def save(self, call: Call, head: Head, recorder: Recorder) -> asyncio.Task | None:
        """Store a complete 2xx answer in the background; returns the write's task."""
        if not (self.should_store(call) and recorder.complete and 200 <= head.status < 300):
            return None
        meta = {"path": call.route.path, "model": call.model, "input_tokens": call.input_tokens,
                "output_tokens": call.output_tokens, "upstream_s": round(time.monotonic() - call.t_sent, 4),
                "hash": call.request_hash.hex()}
        if head.stream and call.route.api == "openai":
            meta["include_usage"] = form_of(call)[-1]
        entry = Entry(status=head.status, headers=kept_headers(head.headers), body=recorder.body, stream=head.stream,
                      chunks=recorder.offsets if head.stream else None, meta=meta)
        return self._spawn(self.store.put(call.cache_key, entry.encode()))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._guarded(coro))
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)
        return task

    async def _guarded(self, coro) -> None:
        try:
            await coro
        except Exception as exc:  # disk full, LMDB error: keep serving uncached
            self.write_errors += 1
            log.error("cache write failed, serving uncached: %s", exc)

    async def drain(self) -> None:
        if self.writes:
            await asyncio.gather(*self.writes, return_exceptions=True)
        if self.store is not None:
            await self.store.flush_touches()


async def replay(request: web.Request, call: Call, entry: Entry, pacing: bool) -> web.StreamResponse:
    """Answer from a stored entry in the form the request asks for."""
    want = form_of(call)
    headers = [(k, v) for k, v in entry.headers if k.lower() != "content-type"]
    call.status = entry.status
    call.saved_s = entry.meta.get("upstream_s", 0.0)
    call.input_tokens = entry.meta.get("input_tokens", 0)
    call.output_tokens = entry.meta.get("output_tokens", 0)
    stored = ("sse", entry.meta["include_usage"]) if entry.stream and "include_usage" in entry.meta else \
        ("sse",) if entry.stream else ("json",)
    if want == stored:
        if not entry.stream:
            return _json_response(entry.status, entry.body, headers, entry.header("content-type"))
        return await _send_stream(request, call, entry.status, headers, _recorded_chunks(entry), pacing and entry.chunks)
    message = _message_of(entry, call)
    headers = [(k, v) for k, v in headers if k.lower() != "content-encoding"]
    if want[0] == "json":
        return _json_response(entry.status, orjson.dumps(message), headers, "application/json")
    events = synthesize_openai(message, want[1]) if call.route.api == "openai" else synthesize_anthropic(message)
    return await _send_stream(request, call, entry.status, headers, [b"".join(events)], None)


def _message_of(entry: Entry, call: Call) -> dict:
    """The stored answer as a JSON body, assembled from its events if it was a stream."""
    encoding = "" if entry.stream else entry.header("content-encoding")
    recorder = Recorder(call, stream=entry.stream, encoding=encoding, keep=True)
    recorder.feed(entry.body)
    message = recorder.message()
    if message is None:
        raise Refusal("api_error", "sidecar: a cached answer could not be converted; retry with header "
                                   "'x-sidecar-cache: refresh'")
    return message


def _recorded_chunks(entry: Entry) -> list[bytes]:
    if not entry.chunks:
        return [entry.body]
    out, at = [], 0
    for _, size in entry.chunks:
        out.append(entry.body[at:at + size])
        at += size
    return out


def _json_response(status: int, body: bytes, headers: list, content_type: str) -> web.Response:
    response = web.Response(status=status, body=body, headers=headers)
    response.headers["Content-Type"] = content_type or "application/json"
    return response


async def _send_stream(request, call, status, headers, chunks, pacing) -> web.StreamResponse:
    response = web.StreamResponse(status=status, headers=[*SSE_HEADERS, *headers])
    await response.prepare(request)
    call.t_first_byte = time.monotonic()
    if not pacing:
        await response.write(b"".join(chunks))
    else:
        start = time.monotonic()
        for (offset, _), chunk in zip(pacing, chunks):
            delay = offset - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            await response.write(chunk)
    call.streamed = True
    call.t_done = time.monotonic()
    await response.write_eof()
    return response
