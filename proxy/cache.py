"""The cache policy: decide, key, look up, and store a complete, well-formed answer.

Modes: read-write (default), read-only, refresh (write, never read), off, and
replay (a miss is an error instead of an upstream call, for offline CI). A
request header `x-sidecar-cache: bypass|refresh` overrides per call. Hits are
answered by replay.py, in the form and coding the request asks for.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from typing import Awaitable

from .cache_key import ANY_KEY, KeyMaker, Uncacheable
from .call import Call
from .capture import Capture
from .config import CacheSection
from .conversation import turns_field
from .convert import form_of
from .entry import CorruptEntry, Entry, kept_headers
from .errors import Refusal
from .flight import Head
from .last_miss import LastMiss
from .response_store import ResponseStore
from .usage import flavor_of

log = logging.getLogger("sidecar")
READS = {"read-write", "read-only", "replay"}
# An entry keeps the request it was keyed on (for `sidecar cache why`) up to this size: a long agent context
# would double every entry and crowd the cache out; the last miss's request is always kept (last_miss.py).
KEPT_REQUEST = 16 << 10   # (larger ones made the state outgrow its byte budget: tests/test_state_store.py long run)
HASH_IN_THREAD = 256 << 10   # bytes of canonical request above which hashing (~0.1 ms) leaves the loop
WRITES = {"read-write", "refresh"}
# Recently hit entries stay decoded (with what replays made of them), each checked against the stored bytes
# at every hit (one memcmp): a hit decodes nothing again. Bounded: only entries up to DECODED_MAX bytes,
# DECODED_KEPT_BYTES of stored bytes at most (kept twice, as stored and decoded, and with the other forms a
# replay made: a few times that in memory, at the very most).
DECODED_MAX = 64 << 10
DECODED_KEPT_BYTES = 4 << 20


class Cache:
    def __init__(self, settings: CacheSection, store: ResponseStore | None, keys: KeyMaker,
                 last_miss: LastMiss | None = None):
        self.settings = settings
        self.last_miss = last_miss   # where the last miss's canonical request goes, for `sidecar cache why`
        self.store = store
        self.keys = keys
        self.routes = frozenset(settings.routes)
        # Routes with `*` (a model name in the path, as Gemini's): one pattern, tried after the exact routes.
        patterns = [re.escape(r).replace(r"\*", "[^/:]+") for r in settings.routes if "*" in r]
        self._route_pattern = re.compile("|".join(patterns)) if patterns else None
        # Imported recordings are readable with any key; looked up after a miss only when some exist.
        self.has_shared_entries = bool(store and store.shared_entries())
        self.writes: set[asyncio.Task] = set()
        self.write_errors = 0
        self._decoded: OrderedDict[bytes, tuple[bytes, Entry]] = OrderedDict()   # key -> (stored bytes, entry)
        self._decoded_bytes = 0
        self.on_fault = lambda stage, exc: None   # the pipeline's fault report (log line and event)

    def is_model_route(self, path: str) -> bool:
        """A path of `[cache] routes`: a model call, cached, limited and counted."""
        pattern = self._route_pattern
        return path in self.routes or pattern is not None and pattern.fullmatch(path) is not None

    def plan(self, call: Call, headers) -> Awaitable[None] | None:
        """Decide whether this call reads and writes the cache, and compute its key (awaitable when the
        request is large enough to be hashed in a thread)."""
        mode = call.route.cache_mode or self.settings.mode   # an attached agent's own, else the sidecar's
        override = headers.get("x-sidecar-cache", "").lower()
        if override in ("bypass", "refresh"):
            mode = "off" if override == "bypass" else "refresh"
        if self.store is None or not call.model_call or not isinstance(call.json, dict):
            return
        if mode == "off" or self.settings.deterministic_only and call.json.get("temperature") != 0:
            if mode == "replay":  # replay never reaches the upstream
                raise Refusal("replay_miss", "sidecar: cache miss in replay mode: calls without temperature 0 "
                                             "are never cached ([cache] deterministic_only = true); set it to "
                                             "false to record and replay them")
            call.cache_outcome = "bypass"
            return
        try:
            turns = (turns_field(call.route.path), call.turn_rows) if call.turn_rows else None
            parts = self.keys.canonical_parts(call.method, call.route.path, call.route.query, headers, call.json,
                                              turns)
        except Uncacheable as exc:   # too deep to canonicalise: forwarded as it is, never stored
            if mode == "replay":
                raise Refusal("replay_miss", f"sidecar: this request cannot be cached ({exc}), so replay mode "
                                             f"cannot answer it; run it with --cache read-write") from None
            call.cache_outcome = "bypass"
            return
        call.cache_mode = mode
        if sum(map(len, parts)) >= HASH_IN_THREAD:   # never joined: no copy of the body
            call.canonical_parts = parts
            return self._keyed_in_thread(call, parts, headers)
        call.canonical = b"".join(parts)   # (a single bytes part is returned as it is, not copied)
        self._keyed(call, self.keys.request_hash(call.canonical), headers)
        return None

    async def _keyed_in_thread(self, call: Call, canonical: list, headers) -> None:
        """A large request is hashed off the event loop (hashlib releases the GIL): other calls' streams go on."""
        digest = await asyncio.get_running_loop().run_in_executor(None, self.keys.request_hash, canonical)
        self._keyed(call, digest, headers)

    def _keyed(self, call: Call, request_hash: bytes, headers) -> None:
        call.request_hash = request_hash
        call.cache_key = self.keys.key(request_hash, self.keys.partition(headers, call.route.query))
        call.cache_outcome = "miss"

    async def lookup(self, call: Call) -> Entry | None:
        if call.cache_key is None or call.cache_mode not in READS:
            return None
        entry = await self._get(call.cache_key)
        if entry is None and self.has_shared_entries:
            entry = await self._get(self.keys.key(call.request_hash, ANY_KEY))
        call.t_lookup = time.monotonic()
        if entry is not None:
            return entry
        self.note_miss(call)
        self.refuse_in_replay(call)
        return None

    def note_miss(self, call: Call) -> None:
        """Keep the last miss's canonical request (last_miss.py: with the loop turn's commit, or a file)."""
        if self.last_miss is not None:
            self.last_miss.note({"key": call.cache_key.hex(), "hash": call.request_hash.hex(), "ts": time.time(),
                                 "agent": call.route.agent, "mode": call.cache_mode},
                                call.canonical_parts or [call.canonical], self._spawn)

    def refuse_in_replay(self, call: Call) -> None:
        """Replay mode never reaches the upstream: a miss (or an entry that cannot serve) is an error."""
        if call.cache_mode == "replay":
            raise Refusal("replay_miss", f"sidecar: cache miss in replay mode for {call.route.path} (key "
                                         f"{call.cache_key.hex()}); record this run first with --cache read-write, "
                                         f"or compare requests with 'sidecar cache key < request.json'")

    async def _get(self, key: bytes) -> Entry | None:
        blob = await self.store.get(key)
        if blob is None:
            return None
        kept = self._decoded.get(key)
        if kept is not None and kept[0] == blob:   # the very bytes decoded before: the entry as it was
            self._decoded.move_to_end(key)
            entry = kept[1]
        else:
            try:
                entry = Entry.decode(blob)
            except CorruptEntry as exc:
                log.warning("cache entry %s unreadable (%s): removed", key.hex(), exc)
                self._spawn(self.store.delete(key))
                return None
            self._keep_decoded(key, blob, entry)
        ttl = self.settings.ttl_seconds
        if ttl and time.time() - entry.created > ttl:
            return None
        return entry

    def _keep_decoded(self, key: bytes, blob: bytes, entry: Entry) -> None:
        old = self._decoded.pop(key, None)
        if old is not None:
            self._decoded_bytes -= len(old[0])
        if len(blob) > DECODED_MAX:
            return
        self._decoded[key] = (blob, entry)
        self._decoded_bytes += len(blob)
        while self._decoded_bytes > DECODED_KEPT_BYTES:
            _, (dropped, _) = self._decoded.popitem(last=False)
            self._decoded_bytes -= len(dropped)

    def forget_decoded(self) -> None:
        """Memory relief (monitor.py): the decoded entries go; hits decode again."""
        self._decoded.clear()
        self._decoded_bytes = 0

    def should_store(self, call: Call) -> bool:
        return call.cache_key is not None and call.cache_mode in WRITES

    def save(self, call: Call, head: Head, capture: Capture, body: bytes) -> asyncio.Future | None:
        """Store a complete, well-formed 2xx answer in the background; returns the write's task."""
        if not (self.should_store(call) and capture.storable and 200 <= head.status < 300):
            return None
        meta = {"path": call.route.path, "model": call.model, "input_tokens": call.input_tokens,
                "output_tokens": call.output_tokens, "upstream_s": round(time.monotonic() - call.t_sent, 4),
                "hash": call.request_hash.hex()}
        if call.usage is not None and call.usage.raw is not None:   # a hit reports (and saves) the same usage
            meta.update(flavor=flavor_of(call.route.api, call.route.path), usage=call.usage.raw)
        if head.sse and len(form := form_of(call)) > 1:   # OpenAI chat: whether usage was streamed
            meta["include_usage"] = form[-1]
        entry = Entry(status=head.status, headers=kept_headers(head.headers), body=body, stream=head.sse,
                      pacing=capture.pacing if head.sse else None, meta=meta,
                      request=call.canonical if len(call.canonical) <= KEPT_REQUEST else b"")
        return self._spawn(self.store.put(call.cache_key, entry.encode()))

    def _spawn(self, write) -> asyncio.Future:
        """Track a background write (a queued commit's future, or a coroutine run as a task); a failure is
        counted and reported as a fault: the call goes on uncached."""
        future = asyncio.ensure_future(write)
        self.writes.add(future)
        future.add_done_callback(self._written)
        return future

    def _written(self, future: asyncio.Future) -> None:
        self.writes.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            self.write_errors += 1
            self.on_fault("store", exc)

    async def drain(self) -> None:
        if self.writes:
            await asyncio.gather(*self.writes, return_exceptions=True)
        if self.store is not None:
            await self.store.flush_touches()
