"""The sidecar's admin JSON endpoints under /_sidecar/: health, stats, metrics, limits, agents.

Everything they send passes the live page's secret redaction and carries its
no-store/nosniff headers. The one state-changing endpoint, POST
/_sidecar/agents (how `sidecar run --connect`/`--shared` attaches an agent),
takes only a launcher that shows this process's token: a random value made at
start and left in <state_dir>/tokens/<pid>.token, readable by the user alone.
A web page can neither read that file nor send the header (host_guard refuses
its cross-site requests before they get here). The live page's routes are
live_page's; both are registered by app.py.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from pathlib import Path
from typing import AsyncIterator

import orjson
from aiohttp import web

from . import __version__, tracecontext
from .live_page import HEADERS
from .overview import overview
from .redact import redact
from .routes import AGENT_ID
from .run_file import write_private
from .state import STATE
from .stats import _labels as labels
from .stats import summarize

log = logging.getLogger("sidecar")
TOKEN_HEADER = "x-sidecar-token"          # launcher/client.py sends it under the same name
ADMIN_TOKEN = web.AppKey("admin_token", str)
MAX_AGENTS = 1000                          # in the agent table; the oldest exited ones make room first
MAX_CMD = 8192                             # characters of an agent's command line
MAX_MESSAGE = 64 * 1024                    # bytes of one agent event
EVENTS = ("started", "exited", "restarted")
FIELDS = frozenset({"id", "event", "pid", "cmd", "status", "watch", "traceparent", "trace_root", "launcher",
                    "peak_rss"})


def token_path(state_dir: Path, pid: int) -> Path:
    """Where the sidecar of process `pid` leaves its token (launcher/client.py reads it from there)."""
    return state_dir / "tokens" / f"{pid}.token"


def _json(doc) -> web.Response:
    body = redact(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS))
    return web.Response(body=body, content_type="application/json", headers=HEADERS)


def _refuse(error: type[web.HTTPError], message: str, *args) -> web.HTTPError:
    return error(*args, text=f"sidecar: {message}\n", headers=HEADERS)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _json({"status": "ok", "version": __version__, "pid": os.getpid(), "agent": state.agent_id,
                  "uptime_s": round(time.time() - state.started, 3)})


async def stats(request: web.Request) -> web.Response:
    """JSON stats: recent calls in memory, or every stored record of one agent since a time."""
    state = request.app[STATE]
    await state.settled()
    agent, since, by = request.query.get("agent"), request.query.get("since"), request.query.get("by")
    if agent is None and since is None:
        doc = overview(state)
        if by:
            doc["summary"] = summarize(state.stats.recent, by=by)
        return _json(doc)
    try:
        since_ts = float(since or 0)
    except ValueError:
        raise _refuse(web.HTTPBadRequest, "since must be epoch seconds") from None
    await state.records.drain()
    records = [r for r in state.records.read(since_ts) if agent is None or r["agent"] == agent]
    events = [e for e in state.monitor.recent_events if e["ts"] >= since_ts]
    return _json({"summary": summarize(records, by=by), "events": events})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    await state.settled()
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
    text = state.stats.prometheus(gauges) + upstream_metrics(state)
    return web.Response(body=redact(text.encode()),
                        headers={**HEADERS, "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def upstream_metrics(state) -> str:
    """The upstream's rate-limit headroom per budget and bucket, and the overload circuits, in Prometheus text."""
    pacing, overload = state.pacer.snapshot(), state.circuits.snapshot()
    lines = []
    for name, what in (("limit", "Rate-limit bucket size the upstream reports."),
                       ("remaining", "What the upstream last said remains in the bucket."),
                       ("reserved", "Taken from the bucket by calls whose answers have not reported yet."),
                       ("reset_in_s", "Seconds until the upstream says the bucket is full again.")):
        lines += [f"# HELP sidecar_ratelimit_{name} {what}", f"# TYPE sidecar_ratelimit_{name} gauge"]
        for budget, buckets in pacing["budgets"].items():
            for bucket, values in buckets.items():
                lines.append(f"sidecar_ratelimit_{name}{labels([('budget', budget), ('bucket', bucket)])} {values[name]}")
    for name, what, value in (("paced_holding", "Calls held now until the rate-limit headroom covers them.",
                               pacing["holding"]),
                              ("paced_total", "Calls ever held by the rate-limit pacing.", pacing["held"]),
                              ("overload_open", "Upstreams answering overloaded to everything (circuits open).",
                               len(overload["open"])),
                              ("overload_holding", "Calls held now by an open overload circuit.", overload["holding"]),
                              ("overload_held_total", "Calls ever held by an overload circuit.", overload["held"])):
        lines += [f"# HELP sidecar_{name} {what}", f"# TYPE sidecar_{name} gauge", f"sidecar_{name} {value}"]
    return "\n".join(lines) + "\n"


async def limits(request: web.Request) -> web.Response:
    """Queue depth, calls in flight, the effective limit, waits and retries."""
    state = request.app[STATE]
    return _json({**state.limiter.snapshot(), "retries": state.counters["retries"]})


async def agents(request: web.Request) -> web.Response:
    """GET: the agents attached. POST (with the token): an agent started, exited or restarted; answers its view."""
    state = request.app[STATE]
    table = state.monitor.agents
    if request.method in ("GET", "HEAD"):
        return _json([a.view() for a in table.values()])
    if request.method != "POST":
        raise _refuse(web.HTTPMethodNotAllowed, "use GET to list the agents, POST to report one",
                      request.method, ("GET", "HEAD", "POST"))
    sent = request.headers.get(TOKEN_HEADER, "").encode("utf-8", "replace")
    if not hmac.compare_digest(sent, request.app[ADMIN_TOKEN].encode()):
        raise _refuse(web.HTTPForbidden, f"reporting an agent needs this sidecar's token in the {TOKEN_HEADER} "
                                         f"header; 'sidecar run --connect URL' sends it, reading it from "
                                         f"<state dir>/tokens/<pid>.token (run it with the server's state dir)")
    if request.content_length is not None and request.content_length > MAX_MESSAGE:
        raise _refuse(web.HTTPRequestEntityTooLarge, f"an agent event is at most {MAX_MESSAGE} bytes",
                      MAX_MESSAGE, request.content_length)
    message = agent_event(await request.read())
    known = table.get(message["id"])
    if known is None and message["event"] == "exited":
        return _json(None)   # never attached (or already dropped): nothing to record
    if known is None:
        make_room(table)
    state.control({"agent": message})
    if state.after_call is not None:   # an agent attached or left: the live view changed
        state.after_call()
    return _json(table[message["id"]].view())


def agent_event(body: bytes) -> dict:
    """A launcher's agent event, checked field by field: a bad one is refused alone and changes nothing."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        message = None
    if not isinstance(message, dict):
        raise _bad('send a JSON object {"id": ..., "event": "started"|"exited"|"restarted", "pid": ..., ...}')
    unknown = sorted(set(message) - FIELDS)
    if unknown:
        raise _bad(f"unknown field {unknown[0][:40]!r}; the fields are {', '.join(sorted(FIELDS))}")
    ident, event, pid, status = message.get("id"), message.get("event"), message.get("pid"), message.get("status")
    if not isinstance(ident, str) or not AGENT_ID.fullmatch(ident):
        raise _bad("id must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if event not in EVENTS:
        raise _bad(f"event must be one of {', '.join(EVENTS)}")
    if (pid is not None or event != "exited") and not (_is_int(pid) and 0 < pid < 2 ** 31):
        raise _bad("pid must be a positive integer (the agent's process id)")
    if not isinstance(message.get("cmd", ""), str) or len(message.get("cmd", "")) > MAX_CMD:
        raise _bad(f"cmd must be a string of at most {MAX_CMD} characters")
    if status is not None and not (_is_int(status) and -2 ** 31 < status < 2 ** 31):
        raise _bad("status must be an integer (the exit status) or null")
    if not isinstance(message.get("watch", False), bool):
        raise _bad("watch must be true or false")
    if "traceparent" in message and not tracecontext.valid(message["traceparent"]):
        raise _bad("traceparent must be a W3C traceparent: 00-<32 hex>-<16 hex>-<2 hex>")
    if not isinstance(message.get("trace_root", False), bool):
        raise _bad("trace_root must be true or false")
    if "launcher" in message and not (_is_int(message["launcher"]) and 0 < message["launcher"] < 2 ** 31):
        raise _bad("launcher must be a positive integer (the process id of the agent's 'sidecar run')")
    if "peak_rss" in message and not (_is_int(message["peak_rss"]) and 0 <= message["peak_rss"] < 2 ** 50):
        raise _bad("peak_rss must be a number of bytes (the agent's peak resident size)")
    return message


def make_room(table: dict) -> None:
    """Room for one more agent: the oldest exited agents leave the table; if all are running, a 503."""
    if len(table) < MAX_AGENTS:
        return
    exited = [key for key, agent in table.items() if agent.state == "exited"]
    for key in exited[:len(table) - MAX_AGENTS + 1]:
        del table[key]
    if len(table) >= MAX_AGENTS:
        raise _refuse(web.HTTPServiceUnavailable, f"{len(table)} agents are running on this sidecar, its limit; "
                                                  f"stop some, or start another sidecar for more")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(message: str) -> web.HTTPError:
    return _refuse(web.HTTPBadRequest, message)


async def token_file(app: web.Application) -> AsyncIterator[None]:
    """While serving, leave the token where only this user's launchers read it: <state_dir>/tokens/<pid>.token, 0600."""
    path = token_path(app[STATE].config.state_dir, os.getpid())
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _forget_the_dead(path.parent)
        write_private(path, app[ADMIN_TOKEN].encode())
    except OSError as exc:   # serving matters more: only `sidecar run --connect` cannot report its agents
        log.warning("could not write %s (%s): 'sidecar run --connect' cannot report agents here", path, exc)
    yield
    try:
        if path.read_text() == app[ADMIN_TOKEN]:   # still ours (another app of this process may share the dir)
            path.unlink()
    except OSError:
        pass


def _forget_the_dead(tokens: Path) -> None:
    """Remove the token files of sidecars that are gone (killed before they could remove their own)."""
    for stale in tokens.glob("*.token"):
        try:
            os.kill(int(stale.stem), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except (ValueError, OSError):
            pass   # not a pid, or another user's live process


def add_routes(app: web.Application) -> None:
    app[ADMIN_TOKEN] = secrets.token_urlsafe(32)
    app.cleanup_ctx.append(token_file)
    app.router.add_get("/_sidecar/health", health)
    app.router.add_get("/_sidecar/stats", stats)
    app.router.add_get("/_sidecar/metrics", metrics)
    app.router.add_get("/_sidecar/limits", limits)
    app.router.add_route("*", "/_sidecar/agents", agents)
