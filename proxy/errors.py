"""Every error the sidecar itself makes, in the shape of the API the agent called.

The official clients parse these shapes and retry by status (408/409/429/5xx)
and `retry-after`, so a sidecar error behaves like an API error to the agent.
Messages start with `sidecar:` and say what to do.
"""

from __future__ import annotations

import math

import orjson
from aiohttp import web

# kind -> (HTTP status, Anthropic error type, OpenAI error type, OpenAI code)
KINDS: dict[str, tuple[int, str, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", "invalid_request_error", None),
    "not_found": (404, "not_found_error", "invalid_request_error", "not_found"),
    "replay_miss": (404, "not_found_error", "invalid_request_error", "cache_miss"),
    "too_large": (413, "request_too_large", "invalid_request_error", "request_too_large"),
    "rate_limit": (429, "rate_limit_error", "requests", "rate_limit_exceeded"),
    "overloaded": (529, "overloaded_error", "server_error", "overloaded"),
    "api_error": (500, "api_error", "server_error", None),
    "bad_gateway": (502, "api_error", "server_error", "bad_gateway"),
    "timeout": (504, "api_error", "server_error", "timeout"),
}


def error_body(api: str, kind: str, message: str) -> bytes:
    _, anthropic_type, openai_type, code = KINDS[kind]
    if api == "openai":
        return orjson.dumps({"error": {"message": message, "type": openai_type, "param": None, "code": code}})
    return orjson.dumps({"type": "error", "error": {"type": anthropic_type, "message": message}})


def api_error(api: str, kind: str, message: str, *, retry_after: float | None = None,
              status: int | None = None) -> web.Response:
    """A complete error response; `message` should already start with 'sidecar:'."""
    headers = {"x-sidecar-error": kind}
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        headers["retry-after-ms"] = str(int(retry_after * 1000))
    return web.Response(status=status or KINDS[kind][0], body=error_body(api, kind, message),
                        content_type="application/json", headers=headers)
