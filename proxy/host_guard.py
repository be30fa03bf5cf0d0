"""The Host guard: /_sidecar/ answers only requests addressed to this machine (no DNS rebinding),
and never a web page's cross-site request.

Proxied calls get the same checks in intake; this middleware covers the
sidecar's own endpoints (the admin JSON and the live page). The Host check is
off when [proxy] allow_remote is set; the browser check never is.
"""

from __future__ import annotations

from aiohttp import web

from .errors import Refusal
from .intake import check_target
from .live_page import HEADERS
from .state import STATE


@web.middleware
async def local_only(request: web.Request, handler) -> web.StreamResponse:
    """/_sidecar/ only for requests addressed to this machine: others get a 403 that says why."""
    if not request.path.startswith("/_sidecar"):
        return await handler(request)
    try:
        check_target(request, request.app[STATE].config.proxy.allow_remote)
    except Refusal as refusal:
        return web.Response(status=403, text=refusal.message + "\n", headers=HEADERS)
    return await handler(request)
