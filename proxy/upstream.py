"""The one seam to the upstream APIs: a pooled keep-alive session and header rules.

Bodies pass as raw bytes both ways (no decompression, so a compressed answer
keeps its content-encoding and gets a correct length); hop-by-hop headers stay
on their own hop, and so does `Expect` (the sidecar answered it and has read
the body). Connection failures become `UpstreamError` (errors.from_library).
"""

from __future__ import annotations

import warnings

import aiohttp
from multidict import CIMultiDict

from .config import ProxySection, env_proxy_configured
from .errors import from_library

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Recomputed per hop by aiohttp from the URL and the body; Expect was answered by the sidecar itself.
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}
# A request body is sent as the bytes that arrived, whatever its size: one write to the transport, which
# copies nothing more and blocks nothing (aiohttp warns above 1 MB; a BytesIO would cost a thread per read).
warnings.filterwarnings("ignore", "Sending a large body directly with raw bytes", ResourceWarning, "aiohttp")
# Added by aiohttp when missing; the agent's own choice must go upstream unchanged.
SKIP_AUTO = ("Accept-Encoding", "User-Agent", "Content-Type")


def end_to_end(headers) -> CIMultiDict:
    """Headers minus hop-by-hop ones, including any the Connection header names. (A copy, then deletions:
    multidict does both in C, where a filter would lower() every name in Python, on every call, twice.)"""
    forwarded = CIMultiDict(headers)
    for name in NOT_FORWARDED:
        forwarded.popall(name, None)
    for connection in headers.getall("connection", ()):
        for token in connection.split(","):
            forwarded.popall(token.strip(), None)
    return forwarded


def without_prefix(headers: CIMultiDict, prefix: str) -> CIMultiDict:
    """`headers` (changed in place) minus every header whose name starts with `prefix` (lower case)."""
    if "\n" + prefix in "\n" + "\n".join(headers.keys()).lower():   # one scan in C; rarely any
        for name in {k for k in headers.keys() if k.lower().startswith(prefix)}:
            headers.popall(name, None)
    return headers


def request_headers(headers) -> CIMultiDict:
    """What goes upstream: end-to-end headers, minus the sidecar's own x-sidecar-* controls."""
    return without_prefix(end_to_end(headers), "x-sidecar-")


class UpstreamClient:
    def __init__(self, settings: ProxySection):
        self._timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout,
                                              sock_read=settings.read_timeout)
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        # trust_env makes aiohttp look up proxies and netrc on every request (in a thread): only when needed.
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False, timeout=self._timeout,
                                             trust_env=env_proxy_configured(), cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def send(self, method: str, url, headers: CIMultiDict, body: bytes,
                   api: str | None = None) -> aiohttp.ClientResponse:
        """Send one request to `api`'s upstream; the caller must release the response."""
        try:
            return await self.session.request(method, url, headers=headers, data=body or None,
                                              skip_auto_headers=SKIP_AUTO, allow_redirects=False,
                                              compress=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise from_library(exc, url, api) from exc


def end_body_with_connection(response: aiohttp.ClientResponse) -> None:
    """Make a body whose connection is lost end with an error, never wait forever.

    aiohttp 3.14 drops a response's read timeout and leaves its body waiting when a later chunk header
    is garbage and it closes the connection; without this, such an answer would hang the agent."""
    connection = response.connection
    closed = connection.protocol.closed if connection is not None and connection.protocol is not None else None
    if closed is None:
        return
    content = response.content

    def lost(future) -> None:
        if not future.cancelled():
            future.exception()   # retrieved: a lost keep-alive connection is no news
        if not content.is_eof():
            content.set_exception(aiohttp.ClientPayloadError("the upstream connection closed mid-answer"))
    closed.add_done_callback(lost)
