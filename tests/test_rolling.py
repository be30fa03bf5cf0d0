"""proxy/rolling.py: the live summary and chart kept record by record are the batch ones over the window.

Any sequence of records (hits, misses, coalesced, errors, unknown prices, missing phases, several models,
times spread over the chart and beyond it) through a window small enough to turn over many times: after
each one, `Rolling.summary()` is `stats.summarize(window, by="model")` and `Rolling.chart` is the plain
bucketing below (the definition the live page had), dollars and seconds included: both sum them exactly.
"""

from __future__ import annotations

import asyncio
from collections import deque

from hypothesis import given, settings, strategies as st

from agent_sidecar.proxy.rolling import Rolling, batch_chart
from agent_sidecar.proxy.stats import summarize

maybe_ms = st.one_of(st.none(), st.floats(0, 5000, allow_nan=False).map(lambda v: round(v, 3)))
record = st.fixed_dictionaries({
    "ts": st.floats(1_000_000, 1_000_400), "model": st.sampled_from(["m1", "m2", None]),
    "cache": st.sampled_from(["hit", "miss", "coalesced", "bypass", ""]),
    "status": st.sampled_from([200, 200, 429, 500]), "error": st.sampled_from(["", "", "upstream_timeout"]),
    "input_tokens": st.integers(0, 10_000), "output_tokens": st.integers(0, 2_000), "retries": st.integers(0, 3),
    "cache_read_tokens": st.integers(0, 500), "cache_write_tokens": st.integers(0, 500),
    "cache_write_1h_tokens": st.just(0), "reasoning_tokens": st.integers(0, 100),
    "cost_usd": st.one_of(st.none(), st.floats(0, 1, allow_nan=False)),
    "saved_usd": st.one_of(st.none(), st.floats(0, 1, allow_nan=False)),
    "saved_s": st.one_of(st.none(), st.floats(0, 30, allow_nan=False)),
    "total_ms": maybe_ms, "ttft_ms": maybe_ms, "queue_ms": maybe_ms, "overhead_ms": maybe_ms,
})


def same(kept: dict, batch: dict) -> None:
    for key in batch:
        assert kept[key] == batch[key], (key, kept[key], batch[key])
    assert set(kept) == set(batch)


def window_of(size: int) -> Rolling:
    """A Rolling over a window of its own (in the proxy: Stats.recent)."""
    return Rolling(deque(maxlen=size))


def add(rolling: Rolling, record: dict) -> None:
    """As the proxy does: the record enters the window, then the Rolling is told."""
    rolling.records.append(record)
    rolling.add(record)


def watched(window: int) -> Rolling:
    """A Rolling with a viewer, its build done (run on a loop of its own)."""
    rolling = window_of(window)

    async def watch():
        await rolling.watch()
    asyncio.run(watch())
    return rolling


@given(st.lists(record, max_size=120), st.integers(1, 30), st.integers(0, 40))
@settings(max_examples=200, deadline=None)
def test_the_kept_summary_and_chart_are_the_batch_ones(records, window, before):
    """Records before the viewer came (counted in by the build) and after it (one by one)."""
    rolling = window_of(window)
    for one in records[:before]:
        add(rolling, one)

    async def watch():
        await rolling.watch()
    asyncio.run(watch())
    assert rolling.live
    for n, one in enumerate(records):
        if n >= before:
            add(rolling, one)
        if n + 1 < before:
            continue
        kept = list(records[max(0, n + 1 - window):n + 1])
        batch, ours = summarize(kept, by="model"), rolling.summary()
        same(ours["all"], batch["all"])
        assert list(ours["groups"]) == list(batch["groups"])
        for name in batch["groups"]:
            same(ours["groups"][name], batch["groups"][name])
        assert rolling.chart(1_000_300, 300) == batch_chart(kept, 1_000_300, 300)
    rolling.clear()
    assert rolling.summary()["all"]["calls"] == 0 and not rolling.summary()["groups"]


async def test_kept_only_while_watched_and_built_a_slice_at_a_time():
    """Nobody watching: an append per call, nothing kept; a viewer: the window counted in over several turns
    of the loop (no turn holding it long), then kept; the last viewer gone: dropped."""
    from agent_sidecar.proxy.rolling import BUILD_SLICE
    rolling = window_of(5000)
    for n in range(3 * BUILD_SLICE):
        add(rolling, {"ts": 1_000_000.0 + n, "model": "m", "cache": "miss", "status": 200, "total_ms": float(n)})
    assert not rolling.live and not rolling.parts
    ready = rolling.watch()
    turns = 0
    while not ready.done():
        await asyncio.sleep(0)
        turns += 1
        assert len(rolling.parts) <= BUILD_SLICE * turns
    assert turns >= 3 and rolling.live and len(rolling.parts) == 3 * BUILD_SLICE
    assert rolling.summary() == summarize(rolling.records, by="model")
    second = rolling.watch()
    assert second.done()
    rolling.unwatch()
    assert rolling.live
    rolling.unwatch()
    assert not rolling.live and not rolling.parts and len(rolling.records) == 3 * BUILD_SLICE
    add(rolling, {"ts": 1_000_999.0, "model": "m", "cache": "hit", "status": 200})
    assert not rolling.parts and rolling.summary() == summarize(rolling.records, by="model")


def test_a_read_of_a_watched_full_window_visits_no_record():
    """Not a timing assertion: the work of a read does not depend on the window (no record is visited)."""
    rolling = watched(5000)
    visited = []

    class Counting(dict):
        def get(self, *args):
            visited.append(args[0])
            return super().get(*args)
    for n in range(6000):
        add(rolling, Counting(ts=1_000_000.0 + n / 10, model="m", cache="miss", status=200, error="", input_tokens=1,
                             output_tokens=1, retries=0, total_ms=float(n % 97), cost_usd=0.001, saved_s=None))
    visited.clear()
    rolling.summary()
    rolling.chart(1_000_600.0, 900)
    assert visited == []


def test_the_window_turning_over_visits_no_record():
    """Each record counted in costs the same, the one that turns the window over too (summing the whole
    window again there held the loop 5 ms at 5,000 records while the live page was watched). Dollars stay
    exact however often it turns: after 20,000 records of 0.1 the kept sum is the exact one."""
    rolling = watched(1000)
    visited = []

    class Counting(deque):
        def __iter__(self):
            visited.append(len(self))
            return super().__iter__()
    rolling.parts = Counting(rolling.parts)
    for n in range(20_000):
        add(rolling, {"ts": 1_000_000.0 + n / 100, "model": f"m{n % 3}", "cache": "miss", "status": 200,
                      "total_ms": 1.0, "cost_usd": 0.1})
    assert visited == []
    assert rolling.summary()["all"]["cost_usd"] == summarize(rolling.records)["all"]["cost_usd"] == 100.0


def test_a_record_that_breaks_the_kept_figures_leaves_correct_ones():
    """Fail open: a record the kept figures cannot take (here a total that is not a number) raises to the
    caller (state.py makes it a fault, the record goes on) and the kept figures, maybe half moved, are
    dropped: reads go back to the records, and a good window reads right."""
    rolling = watched(100)
    good = {"ts": 1_000_000.0, "model": "m", "cache": "miss", "status": 200, "total_ms": 5.0}
    add(rolling, good)
    try:
        add(rolling, {**good, "total_ms": "five"})
    except TypeError:
        pass
    else:
        raise AssertionError("the broken record was taken")
    assert not rolling.live and not rolling.parts
    rolling.records.pop()   # (summarize itself cannot sort such a total either)
    add(rolling, good)
    assert rolling.summary() == summarize(list(rolling.records), by="model")
    assert rolling.summary()["all"]["calls"] == 2
