"""What lives as long as the proxy app: config, upstream client, stores.

Held under one typed AppKey; opened and closed by the app's cleanup context,
never in module globals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, Callable
from dataclasses import dataclass, field

from aiohttp import web

from . import telemetry
from .body_json import BodyParser
from .rolling import Rolling
from .cache import Cache
from .last_miss import LAST_MISS, LastMiss
from .circuit import Circuits
from .headroom import Pacer
from .heap import Collector
from .backends import Backends, open_backends
from .cache_key import KeyMaker
from .config import Config
from .flight import Flights
from .events import EventLog, make_event
from .limits import Limiter
from .monitor import Monitor, relieve_memory
from .budget import FREE, Budgets
from .prices import Prices, model_of
from .prompt_cache import PromptCacheWatch
from .usage import flavor_of
from .records import RecordLog
from .sessions import Sessions
from .stats import Stats
from .timing import record_of
from .routes import Upstreams
from .state_budget import StateBudget
from .response_store import ResponseStore
from .store import Lmdb, StoreError, budget_of, map_size_of, open_lmdb
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
    circuits: Circuits | None = None   # overload walls: one probe at a time
    pacer: Pacer = field(default_factory=Pacer)   # rate-limit headroom: hold what would run into a 429
    cache: Cache | None = None
    lmdb: Lmdb | None = None
    flights: Flights = field(default_factory=Flights)
    bodies: BodyParser = field(default_factory=BodyParser)   # request bodies, parsed reusing the last turn's
    counters: Counter = field(default_factory=Counter)   # retries, ...
    collector: Collector = field(default_factory=Collector)   # the garbage collector's pauses (heap.py)
    stats: Stats = field(default_factory=Stats)
    rolling: Rolling = field(init=False)   # the live summary of stats.recent, kept as calls end while watched
    records: RecordLog | None = None
    monitor: Monitor | None = None
    sessions: Sessions | None = None
    backends: Backends | None = None
    after_call: Callable[[], None] | None = None   # the live page's push, when it is served
    prices: Prices = field(default_factory=Prices)
    priced: asyncio.Future | None = None              # done once the price table is loaded (or failed to load)
    _waiting: list = field(default_factory=list)      # (call, record) of the calls that ended before it
    budgets: Budgets | None = None
    prompt_cache: PromptCacheWatch | None = None
    started: float = field(default_factory=time.time)
    stage_hooks: dict = field(default_factory=dict)   # the pipeline's side stages, hook by hook
    telemetry: Any = None                              # the OpenTelemetry exporter, when [telemetry] is on
    _fault_seen: dict = field(default_factory=dict)   # (stage, error type) -> when its last event went out

    def __post_init__(self) -> None:
        self.rolling = Rolling(self.stats.recent)

    @classmethod
    def build(cls, config: Config) -> "ProxyState":
        return cls(config=config, client=UpstreamClient(config.proxy), limiter=Limiter(config.limits),
                   circuits=Circuits(config.retry),
                   upstreams=Upstreams(config.upstream.anthropic, config.upstream.openai, config.upstream.gemini))

    @property
    def agent_id(self) -> str:
        return self.config.proxy.agent_id or "default"

    @property
    def body_limit(self) -> int:
        return int(self.config.proxy.max_body_mb * 1024 * 1024)

    async def open(self) -> None:
        settings = self.config.cache
        # The price table loads in a thread (a few hundred ms) while the proxy already serves: the calls that end
        # before it are recorded the moment it is there.
        self.priced = asyncio.ensure_future(self.prices.load())
        self.priced.add_done_callback(lambda _: self._record_waiting())
        self.collector.watch()
        self.monitor = Monitor(self.config.monitor, EventLog(self.config.state_dir), self.limiter,
                               relieve=lambda: relieve_memory(self), upstreams=self.upstreams.bases)
        try:
            self.lmdb = open_lmdb(self.config, writemap=True)
        except StoreError as exc:   # the proxy starts anyway: calls are forwarded, nothing is stored
            log.error("sidecar: %s; forwarding calls uncached until then", exc)
            self.lmdb = Lmdb.unavailable(self.config.state_dir, map_size_of(self.config), self.config.state.durable,
                                         budget_of(self.config))
            self._store_failed(exc)
        self.lmdb.report = self._store_failed
        self.budgets = Budgets(self.config.limits, self.monitor.emit)
        self.prompt_cache = PromptCacheWatch(self.monitor.emit, self.cost_of)
        self.backends = await open_backends(self.config, self.lmdb,
                                            lambda kind, state, **detail: self.monitor.emit(make_event(kind, state, **detail)))
        self.limiter.global_slots = self.backends.global_slots
        if self.backends.budget is not None:   # the fleet's one rate-limit budget
            self.pacer = Pacer(self.backends.budget)
            self.backends.budget.on_report = self.pacer.wake
        self.circuits.on_change = lambda crossed, **detail: self.monitor._set("upstream_overloaded", crossed, **detail)
        keys = KeyMaker(self.backends.secret, settings.ignore_fields, settings.key_headers, settings.credential_headers)
        self.cache = Cache(settings, self.backends.store, keys, LastMiss(self.lmdb, self.config.state_dir / LAST_MISS))
        self.cache.on_fault = self.fault
        self.records = RecordLog(self.lmdb, self.config.stats.max_records)
        self._seed_budgets()
        self.sessions = Sessions(self.lmdb, mirror=self.backends.mirror)
        if self.config.state.max_mb:
            store = self.backends.store if isinstance(self.backends.store, ResponseStore) else None
            loop = asyncio.get_running_loop()
            self.lmdb.budget = StateBudget(self.lmdb, int(self.config.state.max_mb * 1024 * 1024), store, self.records,
                                      self.sessions, agents=self._agents,
                                      on_evicted=lambda dropped: loop.call_soon_threadsafe(self._evicted, dropped))
        self.telemetry = telemetry.start(self.config.telemetry, self.upstreams, self._export_failing)
        if self.telemetry is not None:
            self.monitor.listeners.append(self._agent_run_span)
        await self.client.open()

    def _seed_budgets(self) -> None:
        """Today's earlier spend, read before the proxy serves (only when a day or session budget is set)."""
        since = self.budgets.since()
        if since is not None:
            self._side("budget", lambda: self.budgets.seed(self.records.read(since)))

    def _agents(self) -> dict[str, bool]:
        """The agents attached: id -> whether it runs (read from the writer thread too: a copy taken at once)."""
        return {ident: agent.state != "exited" for ident, agent in list(self.monitor.agents.items())}

    def _evicted(self, dropped: list[dict]) -> None:
        """The state's budget had to drop running conversations' checkpoints: one event says which."""
        self.monitor.emit(make_event("checkpoint_evicted", "info", sessions=[d["session"] for d in dropped][:20],
                                     agents=sorted({d["agent"] for d in dropped})[:20],
                                     effect="the agents go on; each conversation is checkpointed again, whole, "
                                            "at its next turn; a restore before then would not find it",
                                     fix="raise [state] max_mb (the state's byte budget)"))

    def _store_failed(self, error: BaseException | None) -> None:
        """The state store stopped (or resumed) taking writes: the `store_unavailable` event, raised once."""
        detail = {"store": str(self.lmdb.path if self.lmdb is not None else self.config.state_dir / "lmdb")}
        if error is not None:
            detail.update(error=str(error)[:300], effect="calls are answered uncached; no checkpoints or records",
                          fix="free disk space where the state directory is, or move it ([state] dir / "
                              "SIDECAR_STATE_DIR); a broken store: 'sidecar cache clear' sets it aside")
        self.monitor._set("store_unavailable", error is not None, **detail)

    def _export_failing(self, failing: bool) -> None:
        """OTLP exports fail (or work again): the `telemetry_unavailable` event, raised once."""
        endpoint = telemetry.shown(self.config.telemetry.otlp_endpoint)
        self.monitor._set("telemetry_unavailable", failing, endpoint=endpoint,
                          effect="spans and metrics are dropped; calls are not affected",
                          fix="start the OTLP/HTTP receiver, or correct [telemetry] otlp_endpoint")

    def _agent_run_span(self, event: dict) -> None:
        """An agent whose run's trace the launcher began has exited (the first time): its run's span."""
        if event["kind"] != "agent_exited":
            return
        agent = self.monitor.agents.get(event.get("agent"))
        if agent is not None and agent.trace_root:
            agent.trace_root = False   # once per run: a restarted agent's calls stay under the same span
            try:
                self.telemetry.export_run(agent)
            except Exception as exc:   # fails open, as the telemetry stage does
                self.fault("telemetry", exc)

    def finish(self, call) -> None:
        """A call is over: its record, priced, the live aggregates, budgets and thresholds."""
        if not self.config.stats.record:   # for measuring what recording costs (bench/)
            return
        record = record_of(call)
        if self.priced is not None and not self.priced.done():
            self._waiting.append((call, record))
            return
        self._record(call, record)

    def _record_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for call, record in waiting:
            self._side("record", self._record, call, record)

    async def settled(self) -> None:
        """Every call that has ended is recorded (only the first ones wait, for the price table)."""
        if self.priced is not None:
            await asyncio.shield(self.priced)

    def _record(self, call, record: dict) -> None:
        cost = self.cost_of(call, call.usage)
        if call.usage is None and 200 <= call.status < 300 and not call.route.path.endswith(FREE):
            cost = None   # billed, but the answer did not say how much (an OpenAI stream without include_usage)
        if call.cache_outcome in ("hit", "coalesced"):   # nothing paid: what it would have cost is saved
            record["saved_usd"] = None if cost is None else round(cost, 8)
        else:
            record["cost_usd"] = None if cost is None else round(cost, 8)
            self._side("budget", self.budgets.add, call, cost)
            self._side("prompt cache", self.prompt_cache.observe, call)
        self.stats.observe(record)
        self._side("live figures", self.rolling.add, record)
        self.records.add(record)
        self.monitor.on_call(record, call.rate_limited)
        if self.after_call is not None:
            self.after_call()

    def cost_of(self, call, usage) -> float | None:
        return self.prices.cost(flavor_of(call.route.api, call.route.path), model_of(call), usage, call.wall_received)

    def _side(self, name: str, method, *args) -> None:
        """A side job of the record: failing, it is a fault and the record goes on."""
        try:
            method(*args)
        except Exception as exc:
            self.fault(name, exc)

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
        self.collector.unwatch()
        await self.client.close()
        await self.settled()
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
        if self.telemetry is not None:   # last: a receiver that is down may take its few seconds
            await self.telemetry.close()



STATE = web.AppKey("state", ProxyState)
