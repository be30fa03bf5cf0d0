"""Concurrency limits with a queue that is fair across agents, and adaptive limits.

A call takes a slot before it goes upstream and gives it back when its answer
has been relayed. Limits: all agents together, per agent, per model. Calls
over a limit wait in per-agent FIFO queues served round-robin, so one busy
agent cannot starve the others; the queue is bounded in length and in waiting
time, and a call refused by either gets a 429 its client backs off from.

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

from .call import Refusal
from .config import LimitsSection


def parse_model_limits(entries: tuple[str, ...]) -> dict[str, int]:
    limits = {}
    for entry in entries:
        model, _, count = entry.rpartition("=")
        limits[model.strip()] = int(count)
    return limits


@dataclass(slots=True, eq=False)
class Waiter:
    agent: str
    model: str
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


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
        self.by_agent[agent] -= 1
        self.by_model[model] -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant freed slots round-robin: each agent's oldest waiter in turn."""
        progress = True
        while self.queued and progress and self.in_flight < self.effective:
            progress = False
            for agent in list(self.queues):
                queue = self.queues[agent]
                while queue and queue[0].future.done():   # cancelled or timed out meanwhile
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
                head.future.set_result(None)
                progress = True
                del self.queues[agent]            # to the back of the rotation
                if queue:
                    self.queues[agent] = queue

    async def acquire(self, agent: str, model: str, retrying: bool = False):
        """Take a slot, waiting in line if needed; a retrying call waits at the front of its agent's line.

        Returns the token `release` needs (a global lease, when a fleet-wide limit is configured).
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
        if token is not None:
            self.global_slots.release(token)
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
        try:
            async with asyncio.timeout(settings.queue_timeout or None):
                await waiter.future
        except TimeoutError:
            self.refused += 1
            raise Refusal("rate_limit", f"sidecar: waited {settings.queue_timeout:g} s for an upstream slot "
                                        f"(limits.queue_timeout) with {self.in_flight} calls in flight "
                                        f"(effective limit {self._limit_text()}, limits.max_concurrency); "
                                        f"retry later or raise the limits", retry_after=1.0) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._give_back(agent, model)   # granted just as the caller went away
            raise
        finally:
            if not waiter.future.done() or waiter.future.cancelled():
                waiter.future.cancel()
                self._forget(waiter)

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
