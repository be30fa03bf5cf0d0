"""Concurrency limits with a queue that is fair across agents, and adaptive limits.

A call takes a slot before it goes upstream; the request pipeline gives it
back once the upstream's answer has been read to its end, or the call failed
(a retried attempt gives its slot back while it waits). Limits: all agents
together, per agent, per model. Calls over a limit wait in per-agent FIFO
queues served round-robin, so one busy agent cannot starve the others; the
queue is bounded in length and in waiting time, and a call refused by either
gets a 429 its client backs off from.

A slot is never lost: a waiting call's outcome is decided once, by the limiter
itself (granted, or its deadline passed, whichever comes first, even in one
loop turn), and a caller that goes away after its grant gives the slot back.
`acquire` either returns holding exactly one slot or raises holding none.

Adaptive (AIMD): an upstream 429/529 halves the effective global limit (once
per round of calls); calls succeeding while the limit binds raise it by one
per round, never above the configured maximum. With no maximum configured the
sidecar learns the upstream's limit from its first 429.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from .errors import Refusal
from .config import LimitsSection


def parse_model_limits(entries: tuple[str, ...]) -> dict[str, int]:
    limits = {}
    for entry in entries:
        model, _, count = entry.rpartition("=")
        limits[model.strip()] = int(count)
    return limits


@dataclass(slots=True, eq=False)
class Waiter:
    """A call in line. The limiter resolves its future once: True, a slot was granted; False, the deadline
    passed first. A cancelled future means the caller went away first."""
    agent: str
    model: str
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    deadline: asyncio.TimerHandle | None = None

    def resolve(self, granted: bool) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.future.set_result(granted)


class Limiter:
    def __init__(self, settings: LimitsSection, global_slots=None):
        self.settings = settings
        self.global_slots = global_slots   # a fleet-wide semaphore (Redis) on top of the local limits
        self.maximum = settings.max_concurrency or math.inf
        self.effective = float(self.maximum)
        self.per_model = parse_model_limits(settings.per_model)
        self.in_flight = 0
        self.by_agent: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.queues: dict[str, deque[Waiter]] = {}   # insertion order = round-robin order
        self.queued = 0
        self.waited = 0          # calls that had to queue
        self.refused = 0         # calls refused: queue full or wait too long
        self.decreases = 0
        self._last_decrease = 0.0
        self._successes = 0

    # -- taking and giving back slots --
    def _fits(self, agent: str, model: str) -> bool:
        per_agent = self.settings.per_agent
        model_limit = self.per_model.get(model)
        return (self.in_flight < self.effective and (not per_agent or self.by_agent[agent] < per_agent)
                and (model_limit is None or self.by_model[model] < model_limit))

    def _take(self, agent: str, model: str) -> None:
        self.in_flight += 1
        self.by_agent[agent] += 1
        self.by_model[model] += 1

    def _give_back(self, agent: str, model: str) -> None:
        self.in_flight -= 1
        _decrement(self.by_agent, agent)
        _decrement(self.by_model, model)
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant freed slots round-robin: each agent's oldest waiter in turn."""
        progress = True
        while self.queued and progress and self.in_flight < self.effective:
            progress = False
            for agent in list(self.queues):
                queue = self.queues[agent]
                while queue and queue[0].future.done():   # cancelled meanwhile (an expired one has left already)
                    queue.popleft()
                    self.queued -= 1
                if not queue:
                    del self.queues[agent]
                    continue
                # The agent's oldest call that fits: one at its model's limit does not block the others.
                head = next((w for w in queue if not w.future.done() and self._fits(agent, w.model)), None)
                if head is None:
                    continue
                queue.remove(head)
                self.queued -= 1
                self._take(agent, head.model)
                head.resolve(True)
                progress = True
                del self.queues[agent]            # to the back of the rotation
                if queue:
                    self.queues[agent] = queue

    async def acquire(self, agent: str, model: str, retrying: bool = False):
        """Take a slot, waiting in line if needed; a retrying call waits at the front of its agent's line.

        Returns holding exactly one slot (and the token `release` needs: a global lease, when a fleet-wide
        limit is configured), or raises holding none: refused, cancelled, or the fleet-wide slot failed.
        Every change dispatches the queue at once, so a waiting call is one that cannot run: a new call
        that fits takes nothing from them."""
        if self._fits(agent, model):
            self._take(agent, model)
        else:
            await self._wait(agent, model, retrying)
        if self.global_slots is None:
            return None
        try:
            return await self.global_slots.acquire()
        except BaseException:
            self._give_back(agent, model)
            raise

    def release(self, agent: str, model: str, token=None) -> None:
        """Give back what `acquire` took: the local slot always (even if the fleet-wide release fails)."""
        try:
            if token is not None:
                self.global_slots.release(token)
        finally:
            self._give_back(agent, model)

    async def _wait(self, agent: str, model: str, retrying: bool) -> None:
        settings = self.settings
        if self.queued >= settings.max_queue:
            self.refused += 1
            raise Refusal("rate_limit", f"sidecar: {self.queued} calls already wait for an upstream slot, the "
                                        f"queue's limit (limits.max_queue = {settings.max_queue}); the client "
                                        f"should retry later, or raise limits.max_queue", retry_after=1.0)
        waiter = Waiter(agent, model)
        queue = self.queues.setdefault(agent, deque())
        queue.appendleft(waiter) if retrying else queue.append(waiter)
        self.queued += 1
        self.waited += 1
        if settings.queue_timeout:
            # The limiter's own timer, not a cancellation of the caller: a grant and a deadline in one loop
            # turn cannot both happen, the first one resolves the future and the other finds it resolved.
            waiter.deadline = asyncio.get_running_loop().call_later(settings.queue_timeout, self._expire, waiter)
        try:
            granted = await waiter.future
        except BaseException:
            if _granted(waiter.future):
                self._give_back(agent, model)   # granted just as the caller went away
            raise
        finally:
            if waiter.deadline is not None:
                waiter.deadline.cancel()
            if not waiter.future.done():
                waiter.future.cancel()
            self._forget(waiter)
        if not granted:
            raise Refusal("rate_limit", f"sidecar: waited {settings.queue_timeout:g} s for an upstream slot "
                                        f"(limits.queue_timeout) with {self.in_flight} calls in flight "
                                        f"(effective limit {self._limit_text()}, limits.max_concurrency); "
                                        f"retry later or raise the limits", retry_after=1.0)

    def _expire(self, waiter: Waiter) -> None:
        """A waiter's deadline passed before a slot was granted to it: out of the line, refused."""
        if waiter.future.done():
            return
        self._forget(waiter)
        self.refused += 1
        waiter.resolve(False)

    def _forget(self, waiter: Waiter) -> None:
        queue = self.queues.get(waiter.agent)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.queued -= 1
            if not queue:
                del self.queues[waiter.agent]

    # -- adapting to the upstream --
    def upstream_limited(self, sent_at: float) -> None:
        """The upstream said 429/529: halve the effective limit, once per round of calls."""
        if not self.settings.adaptive or sent_at < self._last_decrease:
            return
        current = min(self.effective, max(self.in_flight, 1))
        self.effective = max(1.0, math.floor(current / 2)) if current > 1 else 1.0
        self._last_decrease = time.monotonic()
        self._successes = 0
        self.decreases += 1

    def upstream_ok(self) -> None:
        """A success while the limit binds: one more slot per round of successes."""
        if self.effective >= self.maximum or self.in_flight < self.effective - 1:
            return
        self._successes += 1
        if self._successes >= self.effective:
            self._successes = 0
            self.effective = min(self.maximum, self.effective + 1)
            self._dispatch()

    def _limit_text(self) -> str:
        return "none" if math.isinf(self.effective) else f"{self.effective:g}"

    def snapshot(self) -> dict:
        return {"in_flight": self.in_flight, "queued": self.queued,
                "queued_by_agent": {a: len(q) for a, q in self.queues.items() if q},
                "in_flight_by_agent": {a: n for a, n in self.by_agent.items() if n},
                "effective_limit": None if math.isinf(self.effective) else self.effective,
                "max_concurrency": self.settings.max_concurrency or None, "per_agent": self.settings.per_agent or None,
                "per_model": self.per_model, "waited": self.waited, "refused": self.refused,
                "adaptive_decreases": self.decreases}


def _decrement(counter: Counter[str], key: str) -> None:
    """One less for `key`; at zero the key leaves the counter, so idle agents and models hold no memory."""
    left = counter[key] - 1
    if left:
        counter[key] = left
    else:
        del counter[key]


def _granted(future: asyncio.Future) -> bool:
    """Whether a waiter's future says a slot was granted (a slot the waiter then holds)."""
    return future.done() and not future.cancelled() and future.result() is True
