"""What the live page shows: the overview plus a latency chart and the latest sessions, as one snapshot."""

from __future__ import annotations

import time

from .overview import overview
from .state import ProxyState
from .stats import percentile

CHART_SPAN, CHART_STEP = 900, 10   # the chart: the last 15 minutes in 10-second buckets
SESSION_FIELDS = ("id", "agent", "api", "model", "turns", "messages", "created", "updated")


def chart(records, now: float, span: int = CHART_SPAN, step: int = CHART_STEP) -> dict:
    """Calls, hits and total-latency p50/p95 per bucket; the last bucket holds `now`."""
    count = span // step
    start = (int(now) // step + 1) * step - span
    buckets: list[list[dict]] = [[] for _ in range(count)]
    for record in records:
        index = int((record["ts"] - start) // step)
        if 0 <= index < count:
            buckets[index].append(record)
    out: dict = {"start": start, "step": step, "calls": [], "hits": [], "p50": [], "p95": []}
    for rows in buckets:
        totals = [r["total_ms"] for r in rows if r.get("total_ms") is not None]
        out["calls"].append(len(rows))
        out["hits"].append(sum(1 for r in rows if r.get("cache") in ("hit", "coalesced")))
        out["p50"].append(_round(percentile(totals, 50)))
        out["p95"].append(_round(percentile(totals, 95)))
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def snapshot(state: ProxyState, sessions: int = 10) -> dict:
    """The overview plus the chart and the latest sessions (their metadata only, never content)."""
    now = time.time()
    doc = overview(state)
    doc.update(now=now, agent=state.agent_id, uptime_s=round(now - state.started, 1),
               chart=chart(state.stats.recent, now), events=doc["events"][::-1],
               sessions=[{**{k: m.get(k) for k in SESSION_FIELDS}, **state.stats.session_view(m["id"])}
                         for m in state.sessions.list()[:sessions]])
    return doc
