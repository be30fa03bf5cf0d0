"""Figures from repeated rounds: percentiles, medians across rounds, spread, targets.

A `Series` holds one configuration's load results over the measured rounds
(warm-up rounds are never added). A figure is the median over rounds of a
per-round value, with the min–max of those per-round values as its spread.
Comparisons (added latency, ratios) are taken round by round, pairing rounds
run back to back, then the median of those. A `Result` collects one
scenario's figures (for --json) and its markdown table.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable


def pct(values: list[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def p50(key: str) -> Callable[[dict], float]:
    return lambda r: pct(r[key], 50)


def p99(key: str) -> Callable[[dict], float]:
    return lambda r: pct(r[key], 99)


def rps(r: dict) -> float:
    return r["rps"]


@dataclass
class Fig:
    value: float
    unit: str
    lo: float | None = None
    hi: float | None = None
    failed: str | None = None

    @classmethod
    def of(cls, values: list[float], unit: str) -> "Fig":
        if not values:
            return cls(float("nan"), unit, failed="no measured round")
        return cls(statistics.median(values), unit, min(values), max(values))

    def text(self, spread: bool = True) -> str:
        if self.failed:
            return f"FAILED: {self.failed}"
        out = fmt(self.value, self.unit)
        if spread and self.lo is not None and self.hi is not None and self.hi - self.lo > 0:
            out += f" ({num(self.lo, self.unit)}–{num(self.hi, self.unit)})"
        return out


def num(v: float, unit: str) -> str:
    if v != v:
        return "n/a"
    if unit in ("calls", "tokens", "429s", "errors") or abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if unit != "ms" or abs(v) >= 0.1 else f"{v:.3f}"


def fmt(v: float, unit: str) -> str:
    if unit == "x":
        return f"×{num(v, unit)}"
    if unit == "%":
        return f"{v:.0f} %"
    return f"{num(v, unit)} {unit}".strip()


@dataclass
class Series:
    """One configuration (e.g. direct, JSON, concurrency 1) over the measured rounds."""
    name: str
    rounds: list[dict] = field(default_factory=list)
    failed: str | None = None

    def add(self, result: dict, expect_cache: str | None = None) -> None:
        if result["errors"]:
            self.failed = self.failed or "errors " + ", ".join(f"{k}×{v}" for k, v in result["errors"].items())
        elif expect_cache and result["cache"].get(expect_cache, 0) != result["ok"]:
            self.failed = self.failed or f"expected every answer '{expect_cache}', got {result['cache']}"
        self.rounds.append(result)

    def fig(self, fn: Callable[[dict], float], unit: str) -> Fig:
        if self.failed:
            return Fig(float("nan"), unit, failed=self.failed)
        return Fig.of([fn(r) for r in self.rounds], unit)

    def pooled(self, key: str) -> list[float]:
        return [v for r in self.rounds for v in r[key]]


def paired(a: Series, b: Series, fn: Callable[[dict], float], how: str, unit: str) -> Fig:
    """Round-by-round comparison of b against a: how='diff' (b - a) or 'ratio' (b / a)."""
    if a.failed or b.failed:
        return Fig(float("nan"), unit, failed=a.failed or b.failed)
    values = []
    for ra, rb in zip(a.rounds, b.rounds):
        x, y = fn(ra), fn(rb)
        values.append(y - x if how == "diff" else (y / x if x else float("nan")))
    return Fig.of(values, unit)


def vs(a: Series, b: Series, fn: Callable[[dict], float], unit: str) -> str:
    """'+0.42 ms, ×1.6': b's change from a, absolute and relative."""
    d, r = paired(a, b, fn, "diff", unit), paired(a, b, fn, "ratio", "x")
    if d.failed:
        return "n/a"
    sign = "+" if d.value >= 0 else "−"
    return f"{sign}{fmt(abs(d.value), unit)}, ×{num(r.value, 'x')}"


class Result:
    """One scenario's output: figures for JSON, tables and notes for markdown."""

    def __init__(self, name: str, title: str, setup: str):
        self.name, self.title, self.setup = name, title, setup
        self.figures: dict[str, dict] = {}
        self.tables: list[tuple[list[str], list[list[str]]]] = []
        self.notes: list[str] = []
        self.error: str | None = None
        self.skipped: str | None = None   # could not run here (e.g. no redis-server): said, not a failure
        self.seconds = 0.0
        self.series: dict[str, Series] = {}   # raw data kept for --plot

    def put(self, key: str, fig: Fig, target: str | None = None, met: bool | None = None) -> str:
        if fig.value != fig.value and not fig.failed:   # NaN: nothing to measure (e.g. no success at all)
            fig = Fig(fig.value, fig.unit, failed="no data")
        doc = {"value": None if fig.failed else round(fig.value, 6), "unit": fig.unit}
        if fig.lo is not None and not fig.failed:
            doc["spread"] = [round(fig.lo, 6), round(fig.hi, 6)]
        if fig.failed:
            doc["failed"] = fig.failed
        if target:
            doc["target"], doc["met"] = target, (None if fig.failed else met)
        self.figures[key] = doc
        return fig.text()

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.tables.append((header, rows))

    def to_json(self) -> dict:
        return {"title": self.title, "setup": self.setup, "status": "failed" if self.error else "skipped" if self.skipped else "ok",
                "error": self.error or self.skipped, "seconds": round(self.seconds, 2), "figures": self.figures, "notes": self.notes}


def met_text(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "**NO**")
