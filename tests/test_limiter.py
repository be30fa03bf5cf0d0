"""The limiter alone: slots, the fair queue, its bounds, and that a slot is never lost.

No proxy and no network: a Limiter on its settings, a small fake for the
fleet-wide slots, and an event loop whose clock is virtual. Time moves only
when a test moves it, or when the loop has nothing left to do but wait for its
next timer (it then jumps there at once), so a queue timeout of minutes takes
no real time and a deadline can be made to fall in the very loop turn that
grants a slot. Every test ends with the limiter idle: all counters at zero.
"""

from __future__ import annotations

import asyncio
import random
import selectors
from typing import Any, Awaitable, Callable

import pytest

from agent_sidecar.proxy.config import LimitsSection
from agent_sidecar.proxy.errors import Refusal
from agent_sidecar.proxy.limits import Limiter

M1, M2 = "model-one", "model-two"


# ---- a loop with virtual time ------------------------------------------------------------------


class _JumpingSelector(selectors.DefaultSelector):
    """Never sleeps: a wait for the next timer moves the loop's clock to it instead."""

    def __init__(self, loop: "VirtualTimeLoop"):
        super().__init__()
        self.loop = loop

    def select(self, timeout: float | None = None):
        if timeout is None:
            raise RuntimeError("deadlock: nothing is ready and no timer is due; the loop would wait forever")
        self.loop.now += timeout
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


@pytest.fixture
def run() -> Callable[[Callable[[VirtualTimeLoop], Awaitable[Any]]], Any]:
    """run(scenario): await scenario(loop) on a fresh loop with virtual time, return its result."""
    def run(scenario):
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            return runner.run(scenario(runner.get_loop()))
    return run


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the other tasks run (no time passes) until `condition` holds; fail after a bounded number of turns."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"still waiting for {what}")


# ---- small fakes and checks ------------------------------------------------------------------


class FleetSlots:
    """The fleet-wide slots' interface (acquire() -> token, release(token)), failing or blocking on demand."""

    def __init__(self, fail: BaseException | None = None, block: bool = False, fail_release: bool = False):
        self.fail, self.fail_release = fail, fail_release
        self.gate = asyncio.Event() if block else None
        self.held: set[str] = set()
        self.given = 0

    async def acquire(self) -> str:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.given += 1
        token = f"lease-{self.given}"
        self.held.add(token)
        return token

    def release(self, token: str) -> None:
        self.held.remove(token)
        if self.fail_release:
            raise ConnectionError("the fleet's store went away")


def limiter(global_slots=None, **settings: Any) -> Limiter:
    return Limiter(LimitsSection(**settings), global_slots)


def holding(lim: Limiter) -> dict[str, int]:
    """Slots held per agent (zero counts left out, negative ones kept: they would be a bug)."""
    return {agent: n for agent, n in lim.by_agent.items() if n}


def assert_idle(lim: Limiter) -> None:
    assert (lim.in_flight, lim.queued, lim.queues) == (0, 0, {}), lim.snapshot()
    assert set(lim.by_agent.values()) <= {0} and set(lim.by_model.values()) <= {0}, (lim.by_agent, lim.by_model)
    assert lim.snapshot()["in_flight"] == 0 and lim.snapshot()["queued"] == 0


async def queued(lim: Limiter, agent: str, model: str = M1, retrying: bool = False) -> asyncio.Task:
    """A task that waits in line for a slot (it is in the queue when this returns)."""
    before = lim.queued
    task = asyncio.create_task(lim.acquire(agent, model, retrying))
    await until(lambda: lim.queued == before + 1, f"{agent}'s call to queue")
    return task


# ---- taking and waiting ------------------------------------------------------------------------


def test_a_call_that_fits_takes_a_slot_at_once(run):
    async def scenario(loop):
        lim = limiter(max_concurrency=2)
        assert await lim.acquire("a", M1) is None    # no fleet-wide limit: no token
        assert (lim.in_flight, holding(lim), lim.waited) == (1, {"a": 1}, 0)
        lim.release("a", M1)
        assert_idle(lim)
    run(scenario)


def test_a_waiting_call_is_granted_the_freed_slot(run):
    async def scenario(loop):
        lim = limiter(max_concurrency=1)
        await lim.acquire("a", M1)
        waiting = await queued(lim, "b")
        assert not waiting.done() and lim.waited == 1
        lim.release("a", M1)
        assert await waiting is None
        assert (lim.in_flight, holding(lim), lim.queued) == (1, {"b": 1}, 0)
        lim.release("b", M1)
        assert_idle(lim)
    run(scenario)


def test_a_full_queue_refuses_at_once_without_a_slot(run):
    async def scenario(loop):
        lim = limiter(max_concurrency=1, max_queue=1)
        await lim.acquire("a", M1)
        waiting = await queued(lim, "b")
        with pytest.raises(Refusal) as refused:
            await lim.acquire("c", M1)
        assert refused.value.kind == "rate_limit" and refused.value.retry_after
        assert refused.value.message.startswith("sidecar:") and "limits.max_queue" in refused.value.message
        assert (lim.refused, lim.in_flight, lim.queued, holding(lim)) == (1, 1, 1, {"a": 1})
        lim.release("a", M1)
        await waiting
        lim.release("b", M1)
        assert_idle(lim)
    run(scenario)


def test_a_queue_timeout_refuses_without_a_slot(run):
    async def scenario(loop):
        lim = limiter(max_concurrency=1, queue_timeout=300.0)
        await lim.acquire("a", M1)
        started = loop.time()
        waiting = await queued(lim, "b")
        with pytest.raises(Refusal) as refused:
            await waiting
        assert loop.time() - started == 300.0      # virtual time: the deadline, exactly
        assert "limits.queue_timeout" in refused.value.message and refused.value.kind == "rate_limit"
        assert (lim.refused, lim.in_flight, lim.queued, holding(lim)) == (1, 1, 0, {"a": 1})
        lim.release("a", M1)
        assert_idle(lim)
        await lim.acquire("c", M1)                 # the slot is free for the next call at once
        lim.release("c", M1)
        assert_idle(lim)
    run(scenario)


def test_a_deadline_in_the_same_turn_as_the_grant_leaks_no_slot(run):
    """The grant comes first in the turn, the deadline right after, before the waiter runs again."""
    async def scenario(loop):
        lim = limiter(max_concurrency=1, queue_timeout=10.0)
        await lim.acquire("a", M1)
        deadline = loop.time() + 10.0
        waiting = await queued(lim, "b")

        def reach_the_deadline() -> None:
            loop.now = deadline                        # B's deadline is due in the next turn ...
            loop.call_soon(lim.release, "a", M1)       # ... which grants A's slot to B just before it
        loop.call_soon(reach_the_deadline)
        assert await waiting is None                   # granted in time: B holds its slot
        assert (lim.in_flight, holding(lim), lim.refused) == (1, {"b": 1}, 0)
        lim.release("b", M1)
        assert_idle(lim)
    run(scenario)


def test_a_grant_in_the_same_turn_as_the_deadline_leaks_no_slot(run):
    """The deadline comes first in the turn, the grant right after: either B holds one slot, or none."""
    async def scenario(loop):
        lim = limiter(max_concurrency=1, queue_timeout=10.0)
        await lim.acquire("a", M1)
        deadline = loop.time() + 10.0
        waiting = await queued(lim, "b")

        def reach_the_deadline() -> None:
            loop.now = deadline
            loop.call_at(deadline, lim.release, "a", M1)   # due with B's deadline, scheduled after it
        loop.call_soon(reach_the_deadline)
        [outcome] = await asyncio.gather(waiting, return_exceptions=True)
        if isinstance(outcome, Refusal):
            assert (lim.in_flight, holding(lim), lim.refused) == (0, {}, 1)
        else:
            assert (outcome, lim.in_flight, holding(lim)) == (None, 1, {"b": 1})
            lim.release("b", M1)
        assert_idle(lim)
    run(scenario)


def test_a_call_cancelled_while_waiting_leaves_the_line(run):
    async def scenario(loop):
        lim = limiter(max_concurrency=1)
        await lim.acquire("a", M1)
        gone = await queued(lim, "b")
        behind = await queued(lim, "c")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert (lim.queued, list(lim.queues)) == (1, ["c"])
        lim.release("a", M1)
        await behind                                   # the slot goes to the next in line, not to the gone call
        assert holding(lim) == {"c": 1}
        lim.release("c", M1)
        assert_idle(lim)
    run(scenario)


@pytest.mark.parametrize("grant_first", [True, False], ids=["grant-then-cancel", "cancel-then-grant"])
def test_a_call_cancelled_in_the_same_turn_as_the_grant_gives_it_back(run, grant_first):
    async def scenario(loop):
        lim = limiter(max_concurrency=1)
        await lim.acquire("a", M1)
        gone = await queued(lim, "b")
        behind = await queued(lim, "c")

        def same_turn() -> None:
            if grant_first:
                lim.release("a", M1)        # grants B ...
                gone.cancel()               # ... whose caller goes away before it runs again
            else:
                gone.cancel()
                lim.release("a", M1)
        loop.call_soon(same_turn)
        with pytest.raises(asyncio.CancelledError):
            await gone
        await behind                        # B's slot (given back, or never granted) went on to C
        assert (lim.in_flight, holding(lim)) == (1, {"c": 1})
        lim.release("c", M1)
        assert_idle(lim)
    run(scenario)


# ---- per-agent and per-model limits, fairness ---------------------------------------------------


def test_per_agent_limit_queues_only_that_agent(run):
    async def scenario(loop):
        lim = limiter(per_agent=1)
        await lim.acquire("a", M1)
        second = await queued(lim, "a")
        await lim.acquire("b", M1)                     # another agent is not held up
        assert holding(lim) == {"a": 1, "b": 1}
        lim.release("a", M1)
        await second
        assert holding(lim) == {"a": 1, "b": 1}
        lim.release("a", M1)
        lim.release("b", M1)
        assert_idle(lim)
    run(scenario)


def test_per_model_limit_does_not_hold_up_other_models(run):
    async def scenario(loop):
        lim = limiter(max_concurrency=2, per_model=(f"{M1}=1",))
        await lim.acquire("a", M1)
        await lim.acquire("a", M2)                     # all slots taken
        same_model = await queued(lim, "a", M1)        # the agent's oldest waiter: its model is at its limit
        other_model = await queued(lim, "a", M2)
        lim.release("a", M2)                           # a slot frees that only the M2 call may take
        await other_model
        assert not same_model.done() and lim.by_model[M1] == 1 and lim.by_model[M2] == 1
        lim.release("a", M1)
        await same_model
        lim.release("a", M1)
        lim.release("a", M2)
        assert_idle(lim)
    run(scenario)


def test_waiters_are_served_round_robin_across_agents(run):
    async def scenario(loop):
        lim = limiter(max_concurrency=1)
        await lim.acquire("holder", M1)
        order: list[str] = []

        async def call(agent: str, name: str) -> None:
            await lim.acquire(agent, M1)
            order.append(name)
        tasks = []
        for agent, name in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("b", "b2"), ("c", "c1")]:
            before = lim.queued
            tasks.append(asyncio.create_task(call(agent, name)))
            await until(lambda: lim.queued == before + 1, f"{name} to queue")
        released = "holder"
        while len(order) < len(tasks):
            lim.release(released, M1)
            count = len(order)
            await until(lambda: len(order) == count + 1, "the next grant")
            released = order[-1][0]
        assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]
        lim.release(released, M1)
        await asyncio.gather(*tasks)
        assert_idle(lim)
    run(scenario)


def test_a_retrying_call_waits_at_the_front_of_its_agents_line(run):
    async def scenario(loop):
        lim = limiter(max_concurrency=1)
        await lim.acquire("a", M1)
        fresh = await queued(lim, "a")
        retry = await queued(lim, "a", retrying=True)
        lim.release("a", M1)
        await retry
        assert not fresh.done()
        lim.release("a", M1)
        await fresh
        lim.release("a", M1)
        assert_idle(lim)
    run(scenario)


# ---- the fleet-wide slot on top ----------------------------------------------------------------


def test_the_fleet_slot_is_taken_after_the_local_one_and_given_back_with_it(run):
    async def scenario(loop):
        fleet = FleetSlots()
        lim = limiter(fleet, max_concurrency=1)
        token = await lim.acquire("a", M1)
        assert fleet.held == {token} and lim.in_flight == 1
        lim.release("a", M1, token)
        assert fleet.held == set()
        assert_idle(lim)
    run(scenario)


@pytest.mark.parametrize("waited", [False, True], ids=["fitted-at-once", "after-waiting"])
def test_a_failing_fleet_slot_gives_the_local_slot_back(run, waited):
    async def scenario(loop):
        fleet = FleetSlots()
        lim = limiter(fleet, max_concurrency=1)
        if waited:
            token = await lim.acquire("a", M1)
            waiting = await queued(lim, "b")
            fleet.fail = ConnectionError("fleet store down")
            lim.release("a", M1, token)                # grants B its local slot; its fleet slot then fails
            with pytest.raises(ConnectionError):
                await waiting
        else:
            fleet.fail = ConnectionError("fleet store down")
            with pytest.raises(ConnectionError):
                await lim.acquire("b", M1)
        assert fleet.held == set()
        assert_idle(lim)
    run(scenario)


def test_a_call_cancelled_while_taking_the_fleet_slot_gives_the_local_slot_back(run):
    async def scenario(loop):
        fleet = FleetSlots(block=True)
        lim = limiter(fleet, max_concurrency=1)
        call = asyncio.create_task(lim.acquire("a", M1))
        await until(lambda: lim.in_flight == 1, "the local slot")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert fleet.held == set()
        assert_idle(lim)
    run(scenario)


def test_release_gives_the_local_slot_back_even_if_the_fleet_release_fails(run):
    async def scenario(loop):
        fleet = FleetSlots(fail_release=True)
        lim = limiter(fleet, max_concurrency=1)
        token = await lim.acquire("a", M1)
        waiting = asyncio.create_task(lim.acquire("b", M1))
        await until(lambda: lim.queued == 1, "b to queue")
        with pytest.raises(ConnectionError):
            lim.release("a", M1, token)
        second = await waiting                         # the local slot was given back and went on to B
        assert holding(lim) == {"b": 1}
        fleet.fail_release = False
        lim.release("b", M1, second)
        assert_idle(lim)
    run(scenario)


# ---- everything at once ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_interleavings_never_lose_or_double_a_slot(run, seed):
    """Calls that hold, time out, get cancelled (while waiting, holding, or just as they are granted).

    Times are whole virtual seconds, so releases, deadlines and cancellations keep falling in one loop turn."""
    rng = random.Random(seed)

    async def scenario(loop):
        lim = limiter(max_concurrency=3, per_agent=2, per_model=(f"{M1}=2",), max_queue=25,
                      queue_timeout=rng.choice([0.0, 1.0, 2.0, 3.0]))
        holders: dict[int, str] = {}
        outcomes: dict[str, int] = {"held": 0, "refused": 0, "cancelled": 0}

        def check() -> None:
            """The limits hold; the counters cover the running holders (and calls granted but not yet resumed)."""
            assert len(holders) <= lim.in_flight <= 3, (lim.snapshot(), holders)
            assert all(0 <= n <= 2 for n in lim.by_agent.values()) and 0 <= lim.by_model[M1] <= 2
            for agent in set(holders.values()):
                assert list(holders.values()).count(agent) <= lim.by_agent[agent]

        async def call(i: int) -> None:
            agent, model = rng.choice("abcd"), rng.choice([M1, M2])
            await asyncio.sleep(rng.randint(0, 3))
            try:
                await lim.acquire(agent, model, retrying=rng.random() < 0.2)
            except Refusal:
                outcomes["refused"] += 1
                return
            holders[i] = agent
            check()
            freed = loop.create_future()

            def give_back() -> None:
                del holders[i]
                lim.release(agent, model)
                check()
                if not freed.done():
                    freed.set_result(None)
            # Released from a timer, so a release (a grant) shares its loop turn with other timers: deadlines.
            release = loop.call_at(loop.time() + rng.randint(1, 3), give_back)
            try:
                await freed
            finally:
                if i in holders:                       # cancelled while holding
                    release.cancel()
                    give_back()
            outcomes["held"] += 1

        tasks = [asyncio.create_task(call(i)) for i in range(60)]
        for _ in range(20):                            # cancellations at random moments
            loop.call_at(rng.randint(0, 8), rng.choice(tasks).cancel)
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, asyncio.CancelledError):
                outcomes["cancelled"] += 1
            else:
                assert result is None, result
        assert sum(outcomes.values()) == 60 and outcomes["held"] > 0
        assert holders == {}
        assert_idle(lim)
    run(scenario)
