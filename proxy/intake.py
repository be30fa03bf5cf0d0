"""Receive: refuse what must not pass, read the body within its limit, parse JSON.

A request that fails here never reaches the upstream; the message says what to
do about it. The request target is taken exactly as sent (`raw_path`), so it
is checked here for what no API accepts.
"""

from __future__ import annotations

import asyncio
import re

import orjson
from aiohttp import web

from .body_json import BodyParser
from .call import Call
from .conversation import turns_field
from .errors import Refusal
from .routes import route_of
from .state import STATE

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
# Content types a web page may POST to any origin without a CORS preflight (the Fetch standard's safelist).
SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
# A NUL (raw or percent-encoded) or a raw control character: no API takes one, and HTTP stacks choke on it.
BAD_TARGET = re.compile(r"%00|[\x00-\x20\x7f]")
# A body this large takes milliseconds to copy (aiohttp joins it), to parse and to key: each in its own loop
# turn, so that the other agents' streams go on between them.
LARGE_BODY = 512 << 10


def check_target(request: web.Request, allow_remote: bool) -> None:
    """Only origin-form requests addressed to this machine: no open proxy, no DNS rebinding."""
    target = request.raw_path
    if not target.startswith("/"):
        raise Refusal("invalid_request", "sidecar: absolute-form request refused: the sidecar is not an open proxy; "
                                         "send API paths to it (base URL http://127.0.0.1:PORT)")
    bad = BAD_TARGET.search(target)
    if bad:
        raise Refusal("invalid_request", f"sidecar: the request target holds {bad.group()!r} (a NUL or control "
                                         f"character), which no API accepts; fix the path or query the client sends")
    if not allow_remote:
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if host and name.lower() not in LOCAL_HOSTS:   # HTTP/1.0 may send no Host at all: a local client
            raise Refusal("invalid_request", f"sidecar: request addressed to host {host!r} refused; use "
                                             f"http://127.0.0.1:PORT (or set [proxy] allow_remote = true)")
    check_browser(request)


def check_browser(request: web.Request) -> None:
    """No web page may drive the sidecar: a browser's cross-site request is refused, whatever its target.

    The official SDKs and CLIs send neither Origin nor Sec-Fetch-Site, so for them this is two header
    lookups (three on a POST)."""
    headers = request.headers
    origin = headers.get("origin")
    if origin is not None and origin.lower() != "http://" + headers.get("host", "\0").lower():
        raise Refusal("forbidden", f"sidecar: refused a request a web page at {origin[:100]!r} sent; this sidecar "
                                   f"serves only its own agents and its own page, never another site")
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Refusal("forbidden", f"sidecar: refused a {site[:20]} request from a web page (Sec-Fetch-Site); "
                                   f"this sidecar serves only its own agents and its own page")
    if request.method == "POST":
        kind = headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind in SIMPLE_TYPES and (kind != "multipart/form-data" or _json_route(request)):
            raise Refusal("forbidden", f"sidecar: refused a POST with content-type {kind}, which any web page can "
                                       f"send; send the JSON body as content-type: application/json")


def _json_route(request: web.Request) -> bool:
    """A model route: its body is JSON (multipart is for uploads such as /v1/files)."""
    return request.app[STATE].cache.is_model_route(route_of(request.raw_path, request.headers, "").path)


async def read_body(request: web.Request, call: Call, limit: int, parser: BodyParser) -> None:
    """Read the whole body into the call and parse it when it is JSON (a conversation's next request
    mostly from the previous one's parse: body_json.py)."""
    if not request.body_exists:
        return
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(length, limit)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(None, limit) from None
    call.body = body
    if body and _is_json(request) and "content-encoding" not in request.headers:
        large = len(body) >= LARGE_BODY
        if large:
            await asyncio.sleep(0)
        try:
            parsed = parser.parse(body, turns_field(call.route.path))
            call.json, call.turn_rows, call.turns_lineage = parsed.json, parsed.rows, parsed.lineage
        except orjson.JSONDecodeError as exc:
            detail = str(exc)
            if "depth" in detail.lower():   # valid JSON, just deeper than the parser goes: forwarded uncached
                return
            detail = "invalid UTF-8" if "utf-8" in detail.lower() else detail
            raise Refusal("invalid_request", f"sidecar: request body is not valid JSON ({detail}); "
                                             f"send a JSON object encoded as UTF-8") from None
        if large:
            await asyncio.sleep(0)


def _is_json(request: web.Request) -> bool:
    return "json" in request.headers.get("content-type", "")


def _too_large(length: int | None, limit: int) -> Refusal:
    size = f"{length} bytes" if length is not None else "the body"
    return Refusal("too_large", f"sidecar: {size} exceeds the {limit}-byte request limit; "
                                f"raise [proxy] max_body_mb in the config")
