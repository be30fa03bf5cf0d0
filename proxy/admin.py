"""The sidecar's own endpoints under /_sidecar/."""

from __future__ import annotations

import os
import time

from aiohttp import web

from . import __version__
from .state import STATE


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"status": "ok", "version": __version__, "pid": os.getpid(),
                              "agent": state.agent_id, "uptime_s": round(time.time() - state.started, 3)})


async def limits(request: web.Request) -> web.Response:
    """Queue depth, calls in flight, the effective limit, waits and retries."""
    state = request.app[STATE]
    return web.json_response({**state.limiter.snapshot(), "retries": state.counters["retries"]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/_sidecar/health", health)
    app.router.add_get("/_sidecar/limits", limits)
