"""Which agent sent a request, which API it speaks, and where it goes upstream.

Agents sharing one sidecar are told apart by a path prefix in their base URL,
`/a/<agent-id>`, which the official SDKs and Claude Code keep; an agent's own
cache mode (`sidecar run --connect URL --cache replay`) follows it as
`/a/<agent-id>/cache=<mode>`. The upstream URL
is always built from the configured base, never from the request's Host or an
absolute request target, so the sidecar cannot be used as an open proxy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING


from . import gemini_api
from .config import CACHE_MODES

if TYPE_CHECKING:
    from yarl import URL

AGENT_PREFIX = re.compile(r"^/a/([A-Za-z0-9][A-Za-z0-9._-]{0,63})(?:/cache=(" + "|".join(CACHE_MODES) + r"))?(/.*|)$")
AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Paths only the OpenAI API has; everything else goes to Anthropic unless the
# request plainly comes from an OpenAI client (Bearer key, no anthropic-version)
# or is Gemini's (its paths or its key: gemini_api.is_gemini).
OPENAI_PATHS = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/audio/",
                "/v1/images/", "/v1/moderations", "/v1/files", "/v1/batches", "/v1/fine_tuning/",
                "/v1/assistants", "/v1/threads", "/v1/vector_stores", "/v1/uploads")


@dataclass(frozen=True, slots=True)
class Route:
    agent: str
    api: str          # "anthropic" | "openai" | "gemini"
    path: str         # the API path as the agent sent it (still percent-encoded), without any agent prefix
    query: str        # raw query string, without '?'
    cache_mode: str = ""   # the agent's own cache mode, from its base URL; "" for the sidecar's

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def api_of(path: str, headers, query: str = "") -> str:
    if gemini_api.is_gemini(path, headers, query):
        return "gemini"
    if "anthropic-version" in headers or "x-api-key" in headers:
        return "anthropic"
    if path.startswith(OPENAI_PATHS) or "authorization" in headers and path != "/":
        return "openai"
    return "anthropic"


def route_of(target: str, headers, default_agent: str) -> Route:
    """The route of a request target exactly as sent (`request.raw_path`: path and query, undecoded)."""
    path, _, query = target.partition("?")
    agent, mode = default_agent, ""
    match = AGENT_PREFIX.match(path)
    if match:
        agent, mode, path = match.group(1), match.group(2) or "", match.group(3) or "/"
    return Route(agent, api_of(path, headers, query), path, query, mode)


def agent_base(server: str, agent: str, cache_mode: str = "") -> str:
    """The base URL an agent of the sidecar at `server` is given (the inverse of route_of's prefix)."""
    return f"{server.rstrip('/')}/a/{agent}" + (f"/cache={cache_mode}" if cache_mode else "")


class Upstreams:
    """The configured upstream bases, one per API; the only place upstream URLs are made."""

    def __init__(self, anthropic: str, openai: str, gemini: str = "https://generativelanguage.googleapis.com"):
        self.bases = {"anthropic": anthropic.rstrip("/"), "openai": openai.rstrip("/"), "gemini": gemini.rstrip("/")}
        # OPENAI_BASE_URL conventionally ends in /v1 and so does the path the SDK appends to.
        self._openai_has_v1 = self.bases["openai"].endswith("/v1")
        from yarl import URL   # only the proxy makes upstream URLs: the launcher, importing this module, never
        self._url = URL        # loads yarl (10 ms of every `sidecar run`'s start)

    def url(self, route: Route) -> URL:
        base = self.bases[route.api]
        path = route.path_qs
        if route.api == "openai" and self._openai_has_v1 and (path.startswith("/v1/") or path == "/v1"):
            path = path[3:]
        return self._url(base + path, encoded=True)   # encoded: the target goes upstream byte for byte
