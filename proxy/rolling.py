"""The live page's summary and chart of the recent calls, kept as calls come and go while it is watched.

`summarize(recent, by="model")` walks every record of the window (5,000 by
default) and sorts each phase's values: about 20 ms, on the event loop, at
every push of the live page. While a viewer is connected `Rolling` keeps the
same figures up to date as each record enters the window and the oldest
leaves it (about 20 µs a call): sums and counts move by one record, each
phase's values stay in a sorted list (a binary search and a move in C), and
the chart's ten-second buckets keep their own, so a push reads them off in a
fraction of a millisecond. Nobody watching, a call costs nothing here, and a
one-off read (/_sidecar/overview) computes from the records. The figures are
`stats.summarize`'s and `batch_chart`'s (tests compare them). Dollars and
seconds are summed exactly, as integers of 2**-1074 (every float is a whole
number of them): a running sum never drifts however often the window turns
over, and reads as the correctly rounded sum that `stats.exact_sum` gives.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import Counter, deque
from typing import Any

from .stats import PHASES, TOKEN_KINDS, _round, is_error, summarize

CHART_STEP = 10    # seconds a bucket of the live page's chart spans
BUILD_SLICE = 250  # records counted in per turn of the event loop while a first viewer waits

HITS = ("hit", "coalesced")
CACHEABLE = ("hit", "miss", "coalesced")
QUANTILES = (50, 90, 95, 99)


def sorted_percentile(ordered: list[float], q: float) -> float | None:
    """stats.percentile of values already sorted."""
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# A record's part in the additive figures, in this order (see `part_of`).
FIELDS = ("calls", "hits", "cacheable", "input_tokens", "output_tokens", "saved_tokens", "retries", "cost_unknown",
          "saved_unknown", "upstream_read", "upstream_sent", *TOKEN_KINDS, "saved_s", "cost", "saved_usd")
EXACT = FIELDS.index("saved_s")   # from here on, sums of floats, kept as exact integers (`exact`)
UNIT = 1 << 1074                  # 2**-1074, the smallest float, is the unit of the exact sums


def exact(value: float | None) -> int:
    """A float as a whole number of 2**-1074 (None and inf as nothing, as `stats.exact_sum` counts them)."""
    if not value or not math.isfinite(value):
        return 0
    numerator, denominator = value.as_integer_ratio()   # the denominator is a power of two, at most 2**1074
    return numerator << (1075 - denominator.bit_length())


def part_of(record: dict) -> tuple[tuple, str | None, tuple]:
    """What one record adds: its additive figures, its error's name (or None), its phases' values."""
    get = record.get
    cache = get("cache")
    hit = cache in HITS
    inputs, outputs = get("input_tokens", 0), get("output_tokens", 0)
    cost, saved = get("cost_usd", 0.0), get("saved_usd", 0.0) if hit else 0.0
    numbers = (1, hit, cache in CACHEABLE, inputs, outputs, inputs + outputs if hit else 0, get("retries", 0),
               cost is None, saved is None, 0 if hit else get("cache_read_tokens") or 0,
               0 if hit else get("input_tokens") or 0, *(get(kind) or 0 for kind in TOKEN_KINDS),
               exact(get("saved_s")) if hit else 0, exact(cost), exact(saved))
    error = (get("error") or f"http_{get('status')}") if is_error(record) else None
    return numbers, error, tuple(get(phase) for phase in PHASES)


class Totals:
    """One group's summary figures over the records it holds."""

    __slots__ = ("sums", "errors", "phases")

    def __init__(self):
        self.sums = [0] * len(FIELDS)
        self.errors: Counter[str] = Counter()
        self.phases: tuple[list[float], ...] = tuple([] for _ in PHASES)

    @property
    def calls(self) -> int:
        return self.sums[0]

    def move(self, part: tuple, sign: int) -> None:
        """Count a record's part in (sign 1) or out (sign -1)."""
        numbers, error, phases = part
        sums = self.sums
        for index, value in enumerate(numbers):
            if value:
                sums[index] += value if sign > 0 else -value
        if error is not None:
            self.errors[error] += sign
            if not self.errors[error]:
                del self.errors[error]
        for ordered, value in zip(self.phases, phases):
            if value is not None:
                if sign > 0:
                    bisect.insort(ordered, value)
                else:
                    del ordered[bisect.bisect_left(ordered, value)]

    def summary(self) -> dict[str, Any]:
        f = dict(zip(FIELDS, self.sums[:EXACT] + [total / UNIT for total in self.sums[EXACT:]]))
        out: dict[str, Any] = {
            "calls": f["calls"], "hits": f["hits"],
            "hit_rate": round(f["hits"] / f["cacheable"], 4) if f["cacheable"] else None,
            "input_tokens": f["input_tokens"], "output_tokens": f["output_tokens"],
            "saved_tokens": f["saved_tokens"], "saved_upstream_s": round(f["saved_s"], 3),
            "errors": dict(self.errors), "retries": f["retries"], **{kind: f[kind] for kind in TOKEN_KINDS},
            "cost_usd": round(f["cost"], 8), "cost_unknown": f["cost_unknown"],
            "saved_usd": round(f["saved_usd"], 8), "saved_unknown": f["saved_unknown"],
            "prompt_cache_ratio": round(f["upstream_read"] / f["upstream_sent"], 4) if f["upstream_sent"] else None,
        }
        for phase, ordered in zip(PHASES, self.phases):
            out[phase.removesuffix("_ms")] = {f"p{q}": _round(sorted_percentile(ordered, q)) for q in QUANTILES}
        return out


class Bucket:
    __slots__ = ("calls", "hits", "totals")

    def __init__(self):
        self.calls = self.hits = 0
        self.totals: list[float] = []


def batch_chart(records, now: float, span: int, step: int = CHART_STEP) -> dict:
    """The chart from the records themselves (while nobody watches, the aggregates are not kept)."""
    count = span // step
    start = (int(now) // step + 1) * step - span
    buckets: list[list[dict]] = [[] for _ in range(count)]
    for record in records:
        index = int((record["ts"] - start) // step)
        if 0 <= index < count:
            buckets[index].append(record)
    out: dict = {"start": start, "step": step, "calls": [], "hits": [], "p50": [], "p95": []}
    for rows in buckets:
        totals = sorted(r["total_ms"] for r in rows if r.get("total_ms") is not None)
        out["calls"].append(len(rows))
        out["hits"].append(sum(1 for r in rows if r.get("cache") in HITS))
        out["p50"].append(_round(sorted_percentile(totals, 50)))
        out["p95"].append(_round(sorted_percentile(totals, 95)))
    return out


class Rolling:
    """A window of records (`Stats.recent`: its owner appends each record, then calls `add`); while someone
    watches, its summary (overall and by `by`) and chart kept.

    Kept only while watched (`watch`, `unwatch`: the live page's viewers), so a call costs nothing here when
    nobody looks. A first viewer waits while the window is counted in, BUILD_SLICE records per turn of the
    event loop (no turn held long); until then, and for one-off reads while nobody watches, the figures
    are computed from the records (`summarize`, `batch_chart`)."""

    def __init__(self, records: deque, by: str = "model", step: int = CHART_STEP):
        self.records = records   # read, never appended to here
        self.window, self.by, self.step = records.maxlen, by, step
        self.watchers = 0
        self.live = False                      # the aggregates cover the window
        self._backlog: deque | None = None     # records still to count in while they are being built
        self._ready: asyncio.Future | None = None
        self._reset()

    def _reset(self) -> None:
        self.parts: deque[tuple] = deque()   # each counted record's part_of, group, bucket, hit, total
        self.all = Totals()
        self.groups: dict[str, Totals] = {}
        self.buckets: dict[int, Bucket] = {}   # int(ts // step) -> the window's calls in those seconds

    def clear(self) -> None:
        self.records.clear()
        self._reset()
        if self._backlog is not None:
            self._backlog.clear()

    def add(self, record: dict) -> None:
        """`record` has just entered the window."""
        if self.live:
            try:
                self._count_in(record)
            except Exception:   # the kept figures may be half moved: drop them, reads go back to the records
                self.live, self._backlog = False, None
                self._reset()
                raise
        elif self._backlog is not None:
            self._backlog.append(record)

    def watch(self) -> asyncio.Future:
        """One more viewer; done once the aggregates cover the window."""
        self.watchers += 1
        loop = asyncio.get_running_loop()
        if self.live:
            done = loop.create_future()
            done.set_result(None)
            return done
        if self._backlog is None:
            self._reset()
            self._backlog, self._ready = deque(self.records), loop.create_future()
            loop.call_soon(self._build)
        return self._ready

    def unwatch(self) -> None:
        self.watchers = max(0, self.watchers - 1)
        if not self.watchers:   # nobody looks: stop keeping them (a build in progress stops too)
            self.live, self._backlog = False, None
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            self._reset()

    def _build(self) -> None:
        backlog = self._backlog
        if backlog is None:
            return
        for _ in range(min(BUILD_SLICE, len(backlog))):
            self._count_in(backlog.popleft())
        if backlog:
            asyncio.get_running_loop().call_soon(self._build)
            return
        self._backlog, self.live = None, True
        if not self._ready.done():
            self._ready.set_result(None)

    def _count_in(self, record: dict) -> None:
        if len(self.parts) >= self.window:
            self._move(self.parts.popleft(), -1)
        ts, total = record.get("ts"), record.get("total_ms")
        entry = (part_of(record), record.get(self.by) or "-", None if ts is None else int(ts // self.step),
                 record.get("cache") in HITS, total)
        self.parts.append(entry)
        self._move(entry, 1)

    def _move(self, entry: tuple, sign: int) -> None:
        part, name, index, hit, total = entry
        self.all.move(part, sign)
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = Totals()
        group.move(part, sign)
        if not group.calls:
            del self.groups[name]
        if index is None:
            return
        bucket = self.buckets.get(index)
        if bucket is None:
            bucket = self.buckets[index] = Bucket()
        bucket.calls += sign
        bucket.hits += sign * hit
        if total is not None:
            if sign > 0:
                bisect.insort(bucket.totals, total)
            else:
                del bucket.totals[bisect.bisect_left(bucket.totals, total)]
        if not bucket.calls:
            del self.buckets[index]

    def summary(self) -> dict[str, Any]:
        """summarize(the window, by=self.by)."""
        if not self.live:
            return summarize(self.records, by=self.by)
        return {"all": self.all.summary(), "by": self.by,
                "groups": {name: self.groups[name].summary() for name in sorted(self.groups)}}

    def chart(self, now: float, span: int) -> dict:
        """The calls, hits and total-latency p50/p95 per bucket of the last `span` seconds; the last holds `now`."""
        if not self.live:
            return batch_chart(self.records, now, span, self.step)
        step = self.step
        count = span // step
        start = (int(now) // step + 1) * step - span
        calls, hits, p50, p95 = [0] * count, [0] * count, [None] * count, [None] * count
        first = start // step
        for at, index in enumerate(range(first, first + count)):
            bucket = self.buckets.get(index)
            if bucket is None:   # most of a 15-minute chart, most of the time
                continue
            calls[at], hits[at] = bucket.calls, bucket.hits
            p50[at], p95[at] = _round(sorted_percentile(bucket.totals, 50)), _round(sorted_percentile(bucket.totals, 95))
        return {"start": start, "step": step, "calls": calls, "hits": hits, "p50": p50, "p95": p95}
