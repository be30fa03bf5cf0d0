"""Every error the sidecar itself makes, and the one place library errors become ours.

    SidecarError          kind + a message that starts `sidecar:` and says what to do
    ├── Refusal           the request is declined before it goes upstream (bad input, limits, replay miss)
    ├── UpstreamError     the upstream could not be reached, did not answer in time, or broke off
    │                     (refused or unresolvable: "upstream_unreachable", never retried)
    └── Fault             an unexpected failure inside the sidecar (a bug, a broken store)

`from_library` converts aiohttp, asyncio, lmdb and orjson errors (chained with
`raise ... from`); `api_error` renders any SidecarError in the shape of the API
the agent called. The official clients parse these shapes and retry by status
(408/409/429/5xx) and `retry-after`, so a sidecar error behaves like an API
error to the agent.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os

import aiohttp
import orjson
from aiohttp import web

from . import gemini_api
# Connect failures no retry can mend in seconds: the call fails at once, and the SDK is told not to retry either.
UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL})
# What sets each API's upstream, for the message that says what to fix.
UPSTREAM_SETTINGS = {"anthropic": "[upstream] anthropic (or ANTHROPIC_BASE_URL / SIDECAR_UPSTREAM_ANTHROPIC)",
                     "openai": "[upstream] openai (or OPENAI_BASE_URL / SIDECAR_UPSTREAM_OPENAI)",
                     "gemini": "[upstream] gemini (or GOOGLE_GEMINI_BASE_URL / SIDECAR_UPSTREAM_GEMINI)"}

# kind -> (HTTP status, Anthropic error type, OpenAI error type, OpenAI code)
KINDS: dict[str, tuple[int, str, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", "invalid_request_error", None),
    "forbidden": (403, "permission_error", "invalid_request_error", "forbidden"),
    "not_found": (404, "not_found_error", "invalid_request_error", "not_found"),
    "replay_miss": (404, "not_found_error", "invalid_request_error", "cache_miss"),
    "budget": (402, "billing_error", "insufficient_quota", "budget_exceeded"),
    "too_large": (413, "request_too_large", "invalid_request_error", "request_too_large"),
    "rate_limit": (429, "rate_limit_error", "requests", "rate_limit_exceeded"),
    "overloaded": (529, "overloaded_error", "server_error", "overloaded"),
    "api_error": (500, "api_error", "server_error", None),
    "bad_gateway": (502, "api_error", "server_error", "bad_gateway"),
    "upstream_unreachable": (502, "api_error", "server_error", "upstream_unreachable"),
    "timeout": (504, "api_error", "server_error", "timeout"),
}
# x-should-retry: false, which the official SDKs obey before their status rules: no retries on top
NOT_RETRIED = frozenset({"budget", "upstream_unreachable"})


class SidecarError(Exception):
    """An error the sidecar answers itself, in the API's own shape."""

    kind = "api_error"

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


class Refusal(SidecarError):
    """A stage declines the request; nothing went upstream."""


class UpstreamError(SidecarError):
    """The upstream could not be reached ("bad_gateway"), or did not answer in time ("timeout")."""


class Fault(SidecarError):
    """Something inside the sidecar failed unexpectedly; `stage` says where."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__("bad_gateway", f"sidecar: internal fault in the {stage} stage ({error!r}); the call "
                                        f"was not completed, retry it (and report this with the sidecar's log)")
        self.stage = stage


def from_library(exc: BaseException, url=None, api: str | None = None) -> SidecarError:
    """The sidecar's error for a library error met while talking to the upstream at `url` (of `api`)."""
    where = f"upstream {url.origin()}" if url is not None else "the upstream"
    if isinstance(exc, SidecarError):
        return exc
    unreachable = unreachable_reason(exc)
    if unreachable is not None:
        return UpstreamError("upstream_unreachable", f"sidecar: {where} is unreachable: {unreachable}; fix "
                                                     f"{UPSTREAM_SETTINGS.get(api, '[upstream] in the config')} "
                                                     f"or start the server it names")
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamError("timeout", f"sidecar: {where} did not answer in time; raise [proxy] "
                                        f"connect_timeout/read_timeout if it is slow")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamError("bad_gateway", f"sidecar: {where} broke off its answer ({exc}); retry the call")
    if isinstance(exc, (aiohttp.ClientError, OSError, ValueError)):
        return UpstreamError("bad_gateway", f"sidecar: {where} unreachable ({exc}); check [upstream] in the "
                                            f"config or ANTHROPIC_BASE_URL/OPENAI_BASE_URL/GOOGLE_GEMINI_BASE_URL")
    return Fault("upstream", exc)


def unreachable_reason(exc: BaseException) -> str | None:
    """Why a connect failed for good (refused, no route, no such host), in plain words; None for the rest."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"its host name does not resolve ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(exc, aiohttp.ClientSSLError):
        if exc.os_error.errno in UNREACHABLE_ERRNOS:   # not aiohttp's wording, which says ssl:default for http
            return os.strerror(exc.os_error.errno).lower()
    return None


def error_body(api: str, kind: str, message: str) -> bytes:
    _, anthropic_type, openai_type, code = KINDS[kind]
    if api == "gemini":
        return gemini_api.error_body(kind, message)[1]
    if api == "openai":
        return orjson.dumps({"error": {"message": message, "type": openai_type, "param": None, "code": code}})
    return orjson.dumps({"type": "error", "error": {"type": anthropic_type, "message": message}})


def api_error(api: str, kind: str, message: str, *, retry_after: float | None = None,
              status: int | None = None) -> web.Response:
    """A complete error response; `message` should already start with 'sidecar:'."""
    headers = {"x-sidecar-error": kind}
    if kind in NOT_RETRIED:
        headers["x-should-retry"] = "false"   # the official SDKs honour it: no retries on top
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        headers["retry-after-ms"] = str(int(retry_after * 1000))
    if api == "gemini":   # Google's status codes (no 529) and its RetryInfo
        google_status, body = gemini_api.error_body(kind, message, retry_after)
        return web.Response(status=status or google_status, body=body, content_type="application/json",
                            headers=headers)
    return web.Response(status=status or KINDS[kind][0], body=error_body(api, kind, message),
                        content_type="application/json", headers=headers)


def answer_for(api: str, exc: SidecarError) -> web.Response:
    return api_error(api, exc.kind, exc.message, retry_after=exc.retry_after)
