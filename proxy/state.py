"""What lives as long as the proxy app: config, upstream client, stores.

Held under one typed AppKey; opened and closed by the app's cleanup context,
never in module globals.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable
from dataclasses import dataclass, field

from aiohttp import web

from .cache import LAST_MISS, Cache
from .backends import Backends, open_backends
from .cache_key import KeyMaker
from .config import Config
from .flight import Flights
from .events import EventLog, make_event
from .limits import Limiter
from .monitor import Monitor, relieve_memory
from .records import RecordLog
from .sessions import Sessions
from .stats import Stats
from .timing import record_of
from .routes import Upstreams
from .store import Lmdb, StoreError, open_lmdb
from .errors import Fault
from .upstream import UpstreamClient

log = logging.getLogger("sidecar")
FAULT_EVENT_GAP = 10.0   # seconds: one sidecar_fault event per stage and error type at most this often


@dataclass(eq=False)
class ProxyState:
    config: Config
    client: UpstreamClient
    upstreams: Upstreams
    limiter: Limiter | None = None
    cache: Cache | None = None
    lmdb: Lmdb | None = None
    flights: Flights = field(default_factory=Flights)
    counters: Counter = field(default_factory=Counter)   # retries, ...
    stats: Stats = field(default_factory=Stats)
    records: RecordLog | None = None
    monitor: Monitor | None = None
    sessions: Sessions | None = None
    backends: Backends | None = None
    after_call: Callable[[], None] | None = None   # the live page's push, when it is served
    started: float = field(default_factory=time.time)
    stage_hooks: dict = field(default_factory=dict)   # the pipeline's side stages, hook by hook
    _fault_seen: dict = field(default_factory=dict)   # (stage, error type) -> when its last event went out

    @classmethod
    def build(cls, config: Config) -> "ProxyState":
        return cls(config=config, client=UpstreamClient(config.proxy), limiter=Limiter(config.limits),
                   upstreams=Upstreams(config.upstream.anthropic, config.upstream.openai))

    @property
    def agent_id(self) -> str:
        return self.config.proxy.agent_id or "default"

    @property
    def body_limit(self) -> int:
        return int(self.config.proxy.max_body_mb * 1024 * 1024)

    async def open(self) -> None:
        settings = self.config.cache
        self.monitor = Monitor(self.config.monitor, EventLog(self.config.state_dir), self.limiter,
                               relieve=lambda: relieve_memory(self), upstreams=self.upstreams.bases)
        try:
            self.lmdb = open_lmdb(self.config)
        except StoreError as exc:   # the proxy starts anyway: calls are forwarded, nothing is stored
            log.error("sidecar: %s; forwarding calls uncached until then", exc)
            self.lmdb = Lmdb.unavailable(self.config.state_dir)
            self._store_failed(exc)
        self.lmdb.report = self._store_failed
        self.backends = await open_backends(self.config, self.lmdb,
                                            lambda kind, state, **detail: self.monitor.emit(make_event(kind, state, **detail)))
        self.limiter.global_slots = self.backends.global_slots
        keys = KeyMaker(self.backends.secret, settings.ignore_fields, settings.key_headers, settings.credential_headers)
        self.cache = Cache(settings, self.backends.store, keys, self.config.state_dir / LAST_MISS)
        self.cache.on_fault = self.fault
        self.records = RecordLog(self.lmdb, self.config.stats.max_records)
        self.sessions = Sessions(self.lmdb, mirror=self.backends.mirror)
        await self.client.open()

    def _store_failed(self, error: BaseException | None) -> None:
        """The state store stopped (or resumed) taking writes: the `store_unavailable` event, raised once."""
        detail = {"store": str(self.lmdb.path if self.lmdb is not None else self.config.state_dir / "lmdb")}
        if error is not None:
            detail.update(error=str(error)[:300], effect="calls are answered uncached; no checkpoints or records",
                          fix="free disk space where the state directory is, or move it ([state] dir / "
                              "SIDECAR_STATE_DIR); a broken store: 'sidecar cache clear' sets it aside")
        self.monitor._set("store_unavailable", error is not None, **detail)

    def finish(self, call) -> None:
        """A call is over: its record, the live aggregates, the thresholds."""
        if not self.config.stats.record:   # for measuring what recording costs (bench/)
            return
        record = record_of(call)
        self.stats.observe(record)
        self.records.add(record)
        self.monitor.on_call(record, call.rate_limited)
        if self.after_call is not None:
            self.after_call()

    def fault(self, stage: str, error: BaseException) -> Fault:
        """A stage failed unexpectedly: one log line, a `sidecar_fault` event; the call goes on without it."""
        self.counters["faults"] += 1
        key = (stage, type(error).__name__)
        now = time.monotonic()
        first = key not in self._fault_seen
        log.error("sidecar fault in the %s stage: %r", stage, error, exc_info=error if first else None)
        if first or now - self._fault_seen[key] >= FAULT_EVENT_GAP:
            self._fault_seen[key] = now
            if self.monitor is not None:
                try:
                    self.monitor.emit(make_event("sidecar_fault", "info", stage=stage, error=repr(error)[:300]))
                except Exception as exc:   # the events log itself failing must not fail the call
                    log.error("could not record the sidecar_fault event: %r", exc)
        return Fault(stage, error)

    def control(self, message: dict) -> None:
        """A message from the launcher over the control pipe."""
        if "agent" in message:
            self.monitor.on_agent(message["agent"])
        if "restore" in message:
            found = self.sessions.arm(message["restore"])
            self.monitor.emit(make_event("session_restore", "info", session=message["restore"],
                                         found=bool(found),
                                         messages=len(self.sessions.armed.messages) if found else 0))

    async def close(self) -> None:
        await self.client.close()
        if self.monitor is not None:
            await self.monitor.drain()
        if self.records is not None:
            await self.records.drain()
        if self.cache is not None:
            await self.cache.drain()
        if self.backends is not None:
            await self.backends.close()
        if self.lmdb is not None:
            self.lmdb.close()



STATE = web.AppKey("state", ProxyState)
