"""What the live page shows: the overview plus a latency chart and the latest sessions, as one snapshot."""

from __future__ import annotations

import time

from .overview import overview
from .state import ProxyState

CHART_SPAN = 900   # the chart: the last 15 minutes (in buckets of rolling.CHART_STEP seconds)
SESSION_FIELDS = ("id", "agent", "api", "model", "turns", "messages", "created", "updated")


def snapshot(state: ProxyState, sessions: int = 10) -> dict:
    """The overview plus the chart and the latest sessions (their metadata only, never content)."""
    now = time.time()
    doc = overview(state)
    doc.update(now=now, agent=state.agent_id, uptime_s=round(now - state.started, 1),
               chart=state.rolling.chart(now, CHART_SPAN), events=doc["events"][::-1],
               sessions=[{**{k: m.get(k) for k in SESSION_FIELDS}, **state.stats.session_view(m["id"])}
                         for m in state.sessions.latest(sessions)])
    return doc
