"""Event-driven monitoring: thresholds checked when something happens, never on a timer.

Checks run when a call completes and when the launcher reports a process
event. psutil samples (the agent's process tree, system memory) are taken
then too, at most once per `sample_interval`. An event is raised when a
threshold is crossed, not again while it stays crossed, and cleared once when
it recovers. Each event goes to the events log and, if configured, to a hook
command (JSON on stdin, bounded by a timeout, never awaited by a call).
Under memory pressure the sidecar sheds what it can and says so.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shlex
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import psutil

from .config import MonitorSection
from .conversation import forget_derived
from .events import EventLog, make_event

log = logging.getLogger("sidecar")
UNBILLED = ("hit", "coalesced")   # answers the upstream did not give to this call: they say nothing of it


@dataclass(eq=False)
class Agent:
    id: str
    pid: int = 0
    cmd: str = ""
    started: float = field(default_factory=time.time)
    state: str = "running"       # running | exited | restarted
    restarts: int = 0
    exit_status: int | None = None
    rss: int = 0                 # bytes, the whole process tree, at the last sample
    peak_rss: int = 0            # bytes, as /usr/bin/time counts: the largest process's high-water mark
    launcher: int = 0            # pid of the `sidecar run` that reports this agent's exit (attached agents)
    cpu_percent: float = 0.0
    process: psutil.Process | None = None
    traceparent: str = ""        # the agent run's W3C trace context (TRACEPARENT), the parent of its calls' spans
    trace_root: bool = False     # the launcher began that trace: the run's span is ours to export

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "cmd": self.cmd, "started": self.started, "state": self.state,
                "uptime_s": round(time.time() - self.started, 1), "restarts": self.restarts,
                "exit_status": self.exit_status, "rss": self.rss, "peak_rss": self.peak_rss,
                "cpu_percent": self.cpu_percent}


class Monitor:
    keep_exited = 32   # exited agents kept in the table (the most recent ones); older ones leave it

    def __init__(self, settings: MonitorSection, events: EventLog, limiter, relieve=None,
                 upstreams: dict[str, str] | None = None):
        self.settings = settings
        self.upstreams = upstreams or {}     # api -> base URL, named in upstream_unreachable
        self.events = events
        self.limiter = limiter
        self.relieve = relieve or (lambda: {})
        self.active: set[str] = set()
        self.errors: deque[bool] = deque(maxlen=settings.error_window)
        self.failed_in_window = 0             # how many of `errors` are True, kept as calls come and go
        self.agents: dict[str, Agent] = {}
        self._exited_order: dict[str, None] = {}   # the exited agents' ids, oldest exit first
        self.recent_events: deque[dict] = deque(maxlen=100)
        self.system_memory = 0.0
        self._last_sample = 0.0
        self._hooks: set[asyncio.Task] = set()
        self.listeners: list = []            # called with each event (the live page)
        self.on_agents_changed = None        # called when an agent starts or exits (the shared server's idle stop)

    # -- inputs --
    def on_call(self, record: dict, rate_limited: bool) -> None:
        # Each threshold is only handed to _set (which builds the event) when its state would change: this
        # runs on every call, after the answer went out, on the loop the next call needs.
        s, active = self.settings, self.active
        response_ms = record["ttfb_ms"] if record["stream"] and record["ttfb_ms"] is not None else record["total_ms"]
        if (response_ms > s.slow_ms) != ("slow_response" in active):
            self._set("slow_response", response_ms > s.slow_ms, response_ms=response_ms, threshold_ms=s.slow_ms,
                      route=record["route"], model=record["model"], agent=record["agent"])
        failed = record["status"] >= 500 or record["status"] == 429 or bool(record["error"])
        if self.errors and len(self.errors) == self.errors.maxlen:
            self.failed_in_window -= self.errors[0]   # the one the append below pushes out
        self.errors.append(failed)
        self.failed_in_window += failed
        rate = self.failed_in_window / len(self.errors)
        high = len(self.errors) >= min(20, s.error_window) and rate > s.error_rate
        if high != ("error_rate_high" in active):
            self._set("error_rate_high", high, error_rate=round(rate, 4), threshold=s.error_rate,
                      window=len(self.errors))
        if record["error"] == "upstream_unreachable":
            self._set("upstream_unreachable", True, api=record["api"], upstream=self.upstreams.get(record["api"]),
                      agent=record["agent"], fix=f"check [upstream] {record['api']} in 'sidecar config'")
        elif "upstream_unreachable" in active and record["status"] < 500 and record["cache"] not in UNBILLED:
            self._set("upstream_unreachable", False, api=record["api"], upstream=self.upstreams.get(record["api"]))
        if rate_limited:
            self._set("upstream_rate_limited", True, agent=record["agent"], model=record["model"],
                      effective_limit=self.limiter.snapshot()["effective_limit"])
        elif "upstream_rate_limited" in active and record["status"] < 400:
            self._set("upstream_rate_limited", False)
        self.check_queue()
        self.sample()

    def check_queue(self) -> None:
        limit = self.limiter.settings.max_queue
        queued = self.limiter.queued
        crossed = queued >= limit * self.settings.queue_saturation
        if crossed != ("queue_saturated" in self.active) and (crossed or queued <= limit * self.settings.queue_saturation / 2):
            self._set("queue_saturated", crossed, queued=queued, max_queue=limit)

    def on_agent(self, message: dict) -> None:
        """A process event from the launcher: an agent started, exited or was restarted."""
        agent = self.agents.get(message["id"]) or self.agents.setdefault(message["id"], Agent(message["id"]))
        kind = message.get("event", "started")
        if kind in ("started", "restarted"):
            agent.pid, agent.cmd = message.get("pid", 0), message.get("cmd", agent.cmd)
            agent.traceparent = message.get("traceparent", agent.traceparent)
            if kind == "started":   # its run's span is exported at its first exit, not again after a restart
                agent.trace_root = message.get("trace_root", False)
            agent.launcher = message.get("launcher", 0)
            agent.process = None
            agent.state = "running" if kind == "started" else "restarted"
            self._exited_order.pop(agent.id, None)
            if message.get("watch"):   # no launcher pipe to report its exit (--connect, --shared)
                self._watch(agent)
            if kind == "restarted":
                agent.restarts += 1
                self.emit(make_event("agent_restarted", agent=agent.id, pid=agent.pid, restarts=agent.restarts))
        elif kind == "exited" and agent.state != "exited":
            agent.peak_rss = max(agent.peak_rss, message.get("peak_rss") or 0)   # wait4's figure: exact
            self._exited(agent, message.get("status"))
        elif kind == "exited" and agent.exit_status is None:   # the kernel told first; the launcher knows the status
            agent.exit_status = message.get("status")
        if agent.state != "exited" and agent.pid:
            self._sample_agent(agent)   # this one only: all of them per event is O(agents) psutil calls on the loop
        if self.on_agents_changed:
            self.on_agents_changed()

    def _exited(self, agent: Agent, status: int | None) -> None:
        agent.state, agent.exit_status = "exited", status
        self.emit(make_event("agent_exited", agent=agent.id, pid=agent.pid, status=status, peak_rss=agent.peak_rss))
        self._exited_order.pop(agent.id, None)
        self._exited_order[agent.id] = None
        while len(self._exited_order) > self.keep_exited:   # checked when an agent exits: no timer, O(1)
            oldest = next(iter(self._exited_order))
            del self._exited_order[oldest]
            if self.agents.get(oldest) is not None and self.agents[oldest].state == "exited":
                del self.agents[oldest]

    def _watch(self, agent: Agent) -> None:
        """Learn of the agent's exit from the kernel (a pidfd), even if its launcher is killed.

        The launcher reports the exit status and the exact peak as soon as it has reaped the agent; so when
        the agent is gone but its launcher lives, the exit is recorded when the launcher's report comes, or
        when the launcher too is gone (killed before it could report)."""
        pid = agent.pid

        def agent_gone() -> None:
            if agent.pid != pid or agent.state == "exited":
                return
            if not (agent.launcher and self._on_exit(agent.launcher, launcher_gone)):
                launcher_gone()

        def launcher_gone() -> None:
            if agent.pid == pid and agent.state != "exited":
                self._exited(agent, None)
                if self.on_agents_changed:
                    self.on_agents_changed()
        self._on_exit(pid, agent_gone)

    @staticmethod
    def _on_exit(pid: int, callback) -> bool:
        """Call `callback` once process `pid` has exited (a pidfd turns readable); False if it cannot be watched."""
        if not pid or not hasattr(os, "pidfd_open"):
            return False
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        loop = asyncio.get_running_loop()

        def readable() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            callback()
        loop.add_reader(fd, readable)
        return True

    def running_agents(self) -> int:
        return sum(1 for a in self.agents.values() if a.state != "exited")

    # -- psutil, at most once per interval, only when something happened --
    def sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sample < self.settings.sample_interval:
            return
        self._last_sample = now
        memory = psutil.virtual_memory().percent
        self.system_memory = memory
        for agent in self.agents.values():
            if agent.state != "exited" and agent.pid:
                self._sample_agent(agent)
        crossed = memory > self.settings.memory_percent
        if crossed and "memory_pressure" not in self.active:
            self._set("memory_pressure", True, memory_percent=memory, threshold=self.settings.memory_percent,
                      relieved=self.relieve())
        else:
            self._set("memory_pressure", crossed, memory_percent=memory, threshold=self.settings.memory_percent)

    def _sample_agent(self, agent: Agent) -> None:
        try:
            if agent.process is None:
                agent.process = psutil.Process(agent.pid)
                agent.process.cpu_percent(None)
            tree = [agent.process, *agent.process.children(recursive=True)]
            rss = cpu = 0.0
            peak = agent.peak_rss
            for proc in tree:
                try:
                    now = proc.memory_info().rss
                    rss += now
                    peak = max(peak, high_water_mark(proc.pid) or now)
                    cpu += proc.cpu_percent(None) if proc is agent.process else 0.0
                except psutil.Error:
                    continue
            agent.rss, agent.cpu_percent, agent.peak_rss = int(rss), round(cpu, 1), peak
        except psutil.Error:
            agent.process = None

    # -- output --
    def _set(self, kind: str, crossed: bool, **detail: Any) -> None:
        if crossed and kind not in self.active:
            self.active.add(kind)
            self.emit(make_event(kind, "raised", **detail))
        elif not crossed and kind in self.active:
            self.active.discard(kind)
            self.emit(make_event(kind, "cleared", **{k: v for k, v in detail.items() if k != "relieved"}))

    def emit(self, event: dict) -> None:
        self.recent_events.append(event)
        try:
            self.events.append(event)
        except OSError as exc:
            log.error("could not write event %s: %s", event["kind"], exc)
        for listener in self.listeners:
            listener(event)
        if self.settings.hook:
            task = asyncio.get_running_loop().create_task(self._run_hook(event))
            self._hooks.add(task)
            task.add_done_callback(self._hooks.discard)

    async def _run_hook(self, event: dict) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *shlex.split(self.settings.hook), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            log.error("event hook %r could not start: %s", self.settings.hook, exc)
            return
        try:
            await asyncio.wait_for(proc.communicate(orjson.dumps(event)), self.settings.hook_timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("event hook %r took over %gs: killed", self.settings.hook, self.settings.hook_timeout)

    async def drain(self) -> None:
        if self._hooks:
            await asyncio.gather(*self._hooks, return_exceptions=True)


def high_water_mark(pid: int) -> int:
    """A process's peak resident size so far (VmHWM), in bytes; 0 if it cannot be read.

    The kernel keeps it, so a peak between two samples is not missed; it is the figure wait4 reports."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def relieve_memory(state) -> dict[str, int]:
    """Shed in-memory state under memory pressure: recent-call windows, the decoded cache entries, the
    bodies kept for parsing the next turns (body_json.py), then a full collection."""
    dropped = len(state.stats.recent)
    state.rolling.clear()   # the window (stats.recent) and its kept figures
    if state.cache is not None:
        state.cache.forget_decoded()
    state.bodies.forget()
    forget_derived()
    return {"dropped_recent_records": dropped, "gc_collected": gc.collect()}
