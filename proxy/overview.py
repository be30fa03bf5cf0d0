"""The sidecar at a glance: the one document that the live page, `sidecar top` and /_sidecar/stats share."""

from __future__ import annotations

import os

from . import __version__
from .state import ProxyState


def overview(state: ProxyState) -> dict:
    """Everything at a glance: what the live page, `sidecar top` and /stats show."""
    return {"version": __version__, "pid": os.getpid(), "started": state.started,
            "summary": state.rolling.summary(), "limits": state.limiter.snapshot(),
            "retries": state.counters["retries"], "cache": {**state.cache.store.stats(), "mode": state.cache.settings.mode,
                                                            "write_errors": state.cache.write_errors},
            "agents": [a.view() for a in state.monitor.agents.values()],
            "active_events": sorted(state.monitor.active), "events": list(state.monitor.recent_events)[-20:],
            "system_memory_percent": state.monitor.system_memory,
            "headroom": state.pacer.snapshot(), "overload": state.circuits.snapshot(),
            "parsing": state.bodies.snapshot(), "collector": state.collector.snapshot(),
            "checkpoints": state.sessions.snapshot()}
