"""The one seam to the upstream APIs: a pooled keep-alive session.

Bodies pass as raw bytes both ways (no decompression, so a compressed answer
keeps its content-encoding and gets a correct length); headers go by the rules
of headers.py. Connection failures become `UpstreamError` (errors.from_library).
"""

from __future__ import annotations

import asyncio

import aiohttp
from multidict import CIMultiDict

from .config import ProxySection, env_proxy_configured
from .errors import from_library

# Added by aiohttp when missing; the agent's own choice must go upstream unchanged.
SKIP_AUTO = ("Accept-Encoding", "User-Agent", "Content-Type")
# A body this large goes upstream piece by piece, each in its own loop turn: one write of 4 MB is a kernel
# copy of milliseconds that would stall every other agent's stream. Same bytes, same Content-Length framing.
# (Smaller ones go as the bytes that arrived, in one write; aiohttp warns only about larger raw bytes.)
LARGE_BODY = 1 << 20
PIECE = 256 << 10


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
        data = body or None
        if len(body) >= LARGE_BODY:
            headers["Content-Length"] = str(len(body))   # framed as bytes are, not chunked
            data = _pieces(body)
        try:
            return await self.session.request(method, url, headers=headers, data=data,
                                              skip_auto_headers=SKIP_AUTO, allow_redirects=False,
                                              compress=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise from_library(exc, url, api) from exc


async def _pieces(body: bytes):
    view = memoryview(body)
    for at in range(0, len(body), PIECE):
        if at:
            await asyncio.sleep(0)
        yield view[at:at + PIECE]


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
