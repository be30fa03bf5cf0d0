"""Answer a call from a stored entry, in the form and the coding the request asks for.

Everything is decided before the first byte goes out (`prepare`): an entry
that cannot be served to this request (an unreadable conversion) is a miss,
and the call goes upstream as if nothing were stored. A client is sent the
stored coding only if its Accept-Encoding takes it, else the decoded body.
What a replay makes of an entry (a body in another form, the recorded
chunks) is made once and kept with it (`Entry.made`) for the next hits.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiohttp import web

from . import convert
from .call import Call
from .encoding import UndecodableBody, accepts, decoded
from .entry import Entry
from .usage import from_meta

SSE_HEADERS = (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"))


@dataclass(slots=True)
class Replay:
    status: int
    headers: list[tuple[str, str]]
    chunks: list[bytes]
    sse: bool
    pacing: list[tuple[float, int]] | None = None   # recorded timing, when replayed with it


def prepare(call: Call, entry: Entry, pacing: bool) -> Replay | None:
    """How to answer `call` from `entry`; None when this entry cannot serve it. Made once per form, coding
    and pacing, and kept with the entry: the next hit of the same kind reuses it (nothing in it is changed)."""
    want = convert.form_of(call)
    coding = _made(entry, ("coding",), lambda: entry.header("content-encoding"))
    as_stored = accepts(call.accept_encoding, coding)
    timed = pacing and bool(entry.pacing)
    try:
        return _made(entry, ("replay", want, as_stored, timed), lambda: _replay(call.route.api, entry, want,
                                                                                  coding, as_stored, timed))
    except (convert.Unconvertible, UndecodableBody):
        return None


def _replay(api: str, entry: Entry, want: tuple, coding: str, as_stored: bool, timed: bool) -> Replay:
    headers = [(k, v) for k, v in entry.headers if k.lower() not in ("content-type", "content-encoding")]
    if want == convert.stored_form(entry):
        if as_stored and coding:
            headers.append(("Content-Encoding", coding))
        if not entry.stream:
            body = entry.body if as_stored else decoded(entry.body, coding)
            content_type = entry.header("content-type") or "application/json"
            return Replay(entry.status, [("Content-Type", content_type), *headers], [body], sse=False)
        if not as_stored:
            return Replay(entry.status, [*SSE_HEADERS, *headers], [decoded(entry.body, coding)], sse=True)
        if timed:
            return Replay(entry.status, [*SSE_HEADERS, *headers], _recorded_chunks(entry), sse=True,
                          pacing=entry.pacing)
        return Replay(entry.status, [*SSE_HEADERS, *headers], [entry.body], sse=True)
    body = _made(entry, (api, *want), lambda: _converted(entry, api, want))
    if want[0] == "json":
        return Replay(entry.status, [("Content-Type", "application/json"), *headers], [body], sse=False)
    return Replay(entry.status, [*SSE_HEADERS, *headers], [body], sse=True)


def _made(entry: Entry, what: tuple, make):
    """What `make` makes of `entry`, made once: kept with the entry (an Unconvertible is not kept)."""
    made = entry.made
    if made is None:
        made = entry.made = {}
    found = made.get(what)
    if found is None:
        found = made[what] = make()
    return found


def _converted(entry: Entry, api: str, want: tuple) -> bytes:
    """The entry's answer in the form `want`, other than the one it was stored in."""
    message = convert.message_of(entry, api)
    if want[0] == "json":
        return convert.as_json(message)
    return convert.as_stream(message, api, want[-1] if len(want) > 1 else False)


def account(call: Call, entry: Entry) -> None:
    """A hit's record: the tokens and the upstream time the original call cost, now saved."""
    call.cache_outcome = "hit"
    call.saved_s = entry.meta.get("upstream_s", 0.0)
    call.usage = _made(entry, ("usage",), lambda: from_meta(entry.meta))   # never changed once made


def _recorded_chunks(entry: Entry) -> list[bytes]:
    if not entry.pacing:
        return [entry.body]
    out, at = [], 0
    for _, size in entry.pacing:
        out.append(entry.body[at:at + size])
        at += size
    return out


async def send(request: web.Request, call: Call, replay: Replay) -> web.StreamResponse:
    call.status = replay.status
    if not replay.sse:
        call.t_first_byte = call.t_done = time.monotonic()
        return web.Response(status=replay.status, body=replay.chunks[0], headers=replay.headers)
    call.streamed = True
    response = web.StreamResponse(status=replay.status, headers=replay.headers)
    await response.prepare(request)
    call.t_first_byte = time.monotonic()
    if replay.pacing is None:
        await response.write(replay.chunks[0] if len(replay.chunks) == 1 else b"".join(replay.chunks))
    else:
        start = time.monotonic()
        for (offset, _), chunk in zip(replay.pacing, replay.chunks):
            delay = offset - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            await response.write(chunk)
    call.t_done = time.monotonic()
    await response.write_eof()
    return response
