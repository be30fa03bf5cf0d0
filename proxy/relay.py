"""Relay an upstream answer to the agent: streams chunk by chunk, the rest whole.

A stream's bytes are written the moment they arrive (no buffering), so the
agent's time to first token is the upstream's. A tap sees every chunk; when it
says a chunk completes the answer, its commit runs before that chunk is
written, so whatever the agent has seen is already stored.
"""

from __future__ import annotations

import time
from typing import Protocol

import aiohttp
from aiohttp import web

from .call import Call
from .upstream import end_to_end


class Tap(Protocol):
    def feed(self, chunk: bytes) -> bool: ...   # True when this chunk completes the answer
    async def commit(self) -> None: ...


def is_stream(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream" or (
        response.content_length is None and response.headers.get("transfer-encoding", "").lower() == "chunked")


async def relay(request: web.Request, call: Call, upstream: aiohttp.ClientResponse, tap: Tap | None) -> web.StreamResponse:
    headers = end_to_end(upstream.headers)
    call.status = upstream.status
    if not is_stream(upstream):
        body = await upstream.read()
        call.t_done = time.monotonic()
        call.bytes_out = len(body)
        if tap is not None and tap.feed(body):
            await tap.commit()
        return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)

    call.streamed = True
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    async for chunk in upstream.content.iter_any():
        call.bytes_out += len(chunk)
        if tap is not None and tap.feed(chunk):
            await tap.commit()
        await response.write(chunk)
    call.t_done = time.monotonic()
    await response.write_eof()
    return response
