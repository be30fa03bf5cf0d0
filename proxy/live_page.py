"""The live page's routes under /_sidecar/: the page and its files, its data, the push, a session's messages.

The page is plain HTML, CSS and a small script shipped in proxy/static/: no
build step, no CDN. Conversation content is served only by the session page's
own endpoint, and anything shaped like an API key is masked before it leaves.
The Host check in front of these routes is host_guard's; the push is live_push's.
"""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import orjson
from aiohttp import web

from .live_push import PUSH_HUB, PushHub
from .live_snapshot import snapshot
from .redact import redact
from .state import STATE

STATIC = Path(__file__).with_name("static")
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                                                 "frame-ancestors 'none'"}


def _json(doc) -> web.Response:
    body = redact(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS))
    return web.Response(body=body, content_type="application/json", headers=HEADERS)


def _static(name: str, content_type: str):
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / name).read_bytes(), content_type=content_type, headers=HEADERS)
    return serve


async def data(request: web.Request) -> web.Response:
    """GET /_sidecar/overview: what the page and `sidecar top --once` show."""
    await request.app[STATE].settled()
    return _json({**snapshot(request.app[STATE]), "push": request.app[PUSH_HUB].timings()})


async def live(request: web.Request) -> web.StreamResponse:
    """GET /_sidecar/live: the snapshot now, then each push, as server-sent events."""
    response = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        async with aclosing(request.app[PUSH_HUB].frames()) as frames:
            async for frame in frames:
                await response.write(frame)
    except (ConnectionResetError, ConnectionError):
        pass   # the viewer left; closing the frames took it off the hub
    return response


async def session_messages(request: web.Request) -> web.Response:
    """The one place conversation content leaves the sidecar: the session page's own data."""
    sessions = request.app[STATE].sessions
    found = sessions.find(request.match_info["sid"])
    if found is None:
        raise web.HTTPNotFound(text="sidecar: no such session; see /_sidecar/ or 'sidecar sessions list'\n")
    found.pop("hashes", None)
    return _json({"session": found, "messages": sessions.messages(found["id"])})


def add_routes(app: web.Application) -> None:
    """The live page's routes and its push hub (fed after every call, ended on shutdown)."""
    app[PUSH_HUB] = hub = PushHub(app[STATE])
    app[STATE].after_call = hub.changed
    app.on_shutdown.append(hub.close)
    router = app.router
    router.add_get("/_sidecar/", _static("index.html", "text/html"))
    router.add_get("/_sidecar/static/dashboard.css", _static("dashboard.css", "text/css"))
    router.add_get("/_sidecar/static/dashboard.js", _static("dashboard.js", "text/javascript"))
    router.add_get("/_sidecar/static/session.js", _static("session.js", "text/javascript"))
    router.add_get("/_sidecar/overview", data)
    router.add_get("/_sidecar/live", live, allow_head=False)   # a HEAD would wait for a push forever
    router.add_get("/_sidecar/sessions/{sid}", _static("session.html", "text/html"))
    router.add_get("/_sidecar/sessions/{sid}/messages", session_messages)
