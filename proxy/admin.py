"""The sidecar's admin JSON endpoints under /_sidecar/: health, stats, metrics, limits, agents.

The live page's routes are live_page's; both are registered by app.py.
"""

from __future__ import annotations

import os
import time

import orjson
from aiohttp import web

from . import __version__
from .overview import overview
from .state import STATE
from .stats import summarize


def _json(doc) -> web.Response:
    return web.Response(body=orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _json({"status": "ok", "version": __version__, "pid": os.getpid(), "agent": state.agent_id,
                  "uptime_s": round(time.time() - state.started, 3)})


async def stats(request: web.Request) -> web.Response:
    """JSON stats: recent calls in memory, or every stored record of one agent since a time."""
    state = request.app[STATE]
    agent, since, by = request.query.get("agent"), request.query.get("since"), request.query.get("by")
    if agent is None and since is None:
        doc = overview(state)
        if by:
            doc["summary"] = summarize(state.stats.recent, by=by)
        return _json(doc)
    try:
        since_ts = float(since or 0)
    except ValueError:
        raise web.HTTPBadRequest(text="sidecar: since must be epoch seconds") from None
    await state.records.drain()
    records = [r for r in state.records.read(since_ts) if agent is None or r["agent"] == agent]
    events = [e for e in state.monitor.recent_events if e["ts"] >= since_ts]
    return _json({"summary": summarize(records, by=by), "events": events})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    limits = state.limiter.snapshot()
    cache = state.cache.store.stats()
    gauges = {
        "sidecar_in_flight": ("Upstream calls in flight.", limits["in_flight"]),
        "sidecar_queued": ("Calls waiting for a concurrency slot.", limits["queued"]),
        "sidecar_effective_limit": ("Effective concurrency limit (-1: none).", limits["effective_limit"] or -1),
        "sidecar_upstream_retries_total": ("Upstream attempts retried.", state.counters["retries"]),
        "sidecar_queue_refused_total": ("Calls refused by the queue (full or too long a wait).", limits["refused"]),
        "sidecar_cache_entries": ("Entries in the response cache.", cache["entries"]),
        "sidecar_cache_bytes": ("Bytes in the response cache.", cache["bytes"]),
    }
    return web.Response(body=state.stats.prometheus(gauges).encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def limits(request: web.Request) -> web.Response:
    """Queue depth, calls in flight, the effective limit, waits and retries."""
    state = request.app[STATE]
    return _json({**state.limiter.snapshot(), "retries": state.counters["retries"]})


async def agents(request: web.Request) -> web.Response:
    """GET: the agents attached. POST: an agent started/exited (`sidecar run --connect`)."""
    state = request.app[STATE]
    if request.method == "POST":
        try:
            message = orjson.loads(await request.read())
            state.control({"agent": message})
            if state.after_call is not None:   # an agent attached or left: the live view changed
                state.after_call()
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='sidecar: send {"id": ..., "event": "started"|"exited", ...}') from None
    return _json([a.view() for a in state.monitor.agents.values()])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/_sidecar/health", health)
    app.router.add_get("/_sidecar/stats", stats)
    app.router.add_get("/_sidecar/metrics", metrics)
    app.router.add_get("/_sidecar/limits", limits)
    app.router.add_route("*", "/_sidecar/agents", agents)
