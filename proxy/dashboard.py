"""The live view: a page at /_sidecar/, its data, and updates pushed over server-sent events.

Why push and not poll: the page (and `sidecar top`) should cost nothing while
nobody looks. Nothing here runs on a timer of its own. After a call completes
(the middleware below sees every request end) or the monitor emits an event,
`Live.changed` arms one timer, and only while a viewer is connected; the timer
builds one snapshot and wakes every viewer, at most once per PUSH_INTERVAL.

The page is plain HTML, CSS and a small script shipped in proxy/static/: no
build step, no CDN. /_sidecar/ answers only requests addressed to this machine
(the same Host check as the proxied calls: no DNS rebinding), conversation
content is served only by the session page's own endpoint, and anything
shaped like an API key is masked before it leaves.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import orjson
from aiohttp import web

from .admin import overview
from .call import Refusal
from .intake import check_target
from .state import STATE, ProxyState
from .stats import percentile

STATIC = Path(__file__).with_name("static")
PUSH_INTERVAL = 0.5          # seconds: at most two pushes a second, however busy the sidecar
CHART_SPAN, CHART_STEP = 900, 10   # the chart: the last 15 minutes in 10-second buckets
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                                                 "frame-ancestors 'none'"}
SECRETS = re.compile(rb"(?<![A-Za-z0-9])(sk-[A-Za-z0-9]{0,12})[A-Za-z0-9_\-]{8,}"           # sk-ant-..., sk-proj-...
                     rb"|(?i:((?:(?:api|access|auth|secret)[_-]?(?:key|token)|password|bearer)"  # name=, name: , name
                     rb"(?:\"?\s*[:=]\s*\"?|\s+)))[A-Za-z0-9._~+/=\-]{4,}")   # only token characters: JSON stays valid


def redact(data: bytes) -> bytes:
    """Mask what looks like a credential (an agent's command line may carry one)."""
    return SECRETS.sub(lambda m: (m.group(1) or m.group(2)) + b"***", data)


def _json(doc) -> web.Response:
    body = redact(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS))
    return web.Response(body=body, content_type="application/json", headers=HEADERS)


# ---- what the page shows ---------------------------------------------------------------


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


SESSION_FIELDS = ("id", "agent", "api", "model", "turns", "messages", "created", "updated")


def snapshot(state: ProxyState, sessions: int = 10) -> dict:
    """The overview plus the chart and the latest sessions (their metadata only, never content)."""
    now = time.time()
    doc = overview(state)
    doc.update(now=now, agent=state.agent_id, uptime_s=round(now - state.started, 1),
               chart=chart(state.stats.recent, now), events=doc["events"][::-1],
               sessions=[{k: m.get(k) for k in SESSION_FIELDS} for m in state.sessions.list()[:sessions]])
    return doc


# ---- the live push ---------------------------------------------------------------------


class Live:
    """The viewers of /_sidecar/live and the one coalesced push they share."""

    def __init__(self, state: ProxyState):
        self.state = state
        self.viewers: set[asyncio.Event] = set()
        self.payload = b""
        self.timer: asyncio.TimerHandle | None = None
        self.last = 0.0
        self.closing = False

    def changed(self, _event: dict | None = None) -> None:
        """Something happened: push soon, if anyone is watching and no push is already due."""
        if not self.viewers or self.timer is not None:
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(max(0.0, self.last + PUSH_INTERVAL - loop.time()), self._push)

    def _push(self) -> None:
        self.timer = None
        self.last = asyncio.get_running_loop().time()
        self.payload = self._frame()
        for viewer in self.viewers:
            viewer.set()

    def _frame(self) -> bytes:
        return b"data: " + redact(orjson.dumps(snapshot(self.state), option=orjson.OPT_NON_STR_KEYS)) + b"\n\n"

    def _join(self, viewer: asyncio.Event) -> None:
        if not self.viewers:
            self.state.monitor.listeners.append(self.changed)
        self.viewers.add(viewer)

    def _leave(self, viewer: asyncio.Event) -> None:
        self.viewers.discard(viewer)
        if not self.viewers:
            self.state.monitor.listeners.remove(self.changed)
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        viewer = asyncio.Event()
        self._join(viewer)
        try:
            await response.write(b"retry: 2000\n" + self._frame())   # the current state at once
            while True:
                await viewer.wait()
                viewer.clear()
                if self.closing:
                    break
                await response.write(self.payload)
        except (ConnectionResetError, ConnectionError):
            pass   # the viewer left; the finally does the rest
        finally:
            self._leave(viewer)
        return response

    async def close(self, _app: web.Application) -> None:
        """on_shutdown: end the open streams, so stopping the sidecar does not wait for viewers."""
        self.closing = True
        for viewer in self.viewers:
            viewer.set()


LIVE = web.AppKey("live", Live)


# ---- the Host check ----------------------------------------------------------------------


@web.middleware
async def guard(request: web.Request, handler) -> web.StreamResponse:
    """/_sidecar/ only for requests addressed to this machine (proxied calls check it in intake).

    Completed calls reach the live page through ProxyState.after_call; here only the sidecar's own
    POSTs (an agent attaching or leaving) may change the view."""
    if not request.path.startswith("/_sidecar"):
        return await handler(request)
    try:
        check_target(request, request.app[STATE].config.proxy.allow_remote)
    except Refusal as refusal:
        return web.Response(status=403, text=refusal.message + "\n")
    if request.method in ("GET", "HEAD"):
        return await handler(request)
    try:
        return await handler(request)
    finally:
        request.app[LIVE].changed()


# ---- routes ----------------------------------------------------------------------------


def _static(name: str, content_type: str):
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / name).read_bytes(), content_type=content_type, headers=HEADERS)
    return serve


async def data(request: web.Request) -> web.Response:
    """GET /_sidecar/overview: what the page and `sidecar top --once` show."""
    return _json(snapshot(request.app[STATE]))


async def live(request: web.Request) -> web.StreamResponse:
    return await request.app[LIVE].stream(request)


async def session_messages(request: web.Request) -> web.Response:
    """The one place conversation content leaves the sidecar: the session page's own data."""
    sessions = request.app[STATE].sessions
    found = sessions.find(request.match_info["sid"])
    if found is None:
        raise web.HTTPNotFound(text="sidecar: no such session; see /_sidecar/ or 'sidecar sessions list'\n")
    found.pop("hashes", None)
    return _json({"session": found, "messages": sessions.messages(found["id"])})


def add_routes(app: web.Application) -> None:
    app[LIVE] = live_hub = Live(app[STATE])
    app[STATE].after_call = live_hub.changed
    app.on_shutdown.append(live_hub.close)
    router = app.router
    router.add_get("/_sidecar/", _static("index.html", "text/html"))
    router.add_get("/_sidecar/static/dashboard.css", _static("dashboard.css", "text/css"))
    router.add_get("/_sidecar/static/dashboard.js", _static("dashboard.js", "text/javascript"))
    router.add_get("/_sidecar/static/session.js", _static("session.js", "text/javascript"))
    router.add_get("/_sidecar/overview", data)
    router.add_get("/_sidecar/live", live, allow_head=False)   # a HEAD would wait for a push forever
    router.add_get("/_sidecar/sessions/{sid}", _static("session.html", "text/html"))
    router.add_get("/_sidecar/sessions/{sid}/messages", session_messages)


# ---- `sidecar run`'s embedded proxy, findable by `sidecar top` ------------------------------


def register_run(state_dir: Path, url: str, agent: str) -> Path | None:
    """Write <state_dir>/run/<pid>.json so `sidecar top` finds this proxy; the caller removes it on exit."""
    path = state_dir / "run" / f"{os.getpid()}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps({"pid": os.getpid(), "url": url, "agent": agent, "started": time.time()}))
        os.replace(temporary, path)
    except OSError:
        return None   # serving matters more than being found
    return path
