"""Forward one call upstream and feed the answer into its flight.

Runs as the flight's own task: it records the answer (for the cache, the
call's tokens and first-token time) while appending each chunk for the
subscribers, then hands a complete answer to the cache.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from .call import Call, Refusal
from .flight import Flight, Head
from .record import Recorder
from .retry import send_with_retries
from .upstream import UpstreamError, end_to_end, request_headers


def is_stream(response: aiohttp.ClientResponse) -> bool:
    """SSE, or a chunked body of unknown length: relayed as it arrives, never buffered."""
    return response.content_type == "text/event-stream" or (
        response.content_length is None and response.headers.get("transfer-encoding", "").lower() == "chunked")


async def fetch(state, call: Call, flight: Flight, headers) -> None:
    """The flight's task: a limiter slot, the upstream call with retries, the answer."""
    write = None
    try:
        url = state.upstreams.url(call.route)
        upstream = await send_with_retries(state, call, url, request_headers(headers))
    except (UpstreamError, Refusal) as exc:
        flight.abort(exc)
        state.flights.remove(flight)
        return
    except asyncio.CancelledError:
        flight.abort(asyncio.CancelledError())
        state.flights.remove(flight)
        raise
    try:
        call.t_first_byte = time.monotonic()
        stream = is_stream(upstream)
        head = Head(upstream.status, upstream.reason, end_to_end(upstream.headers), stream)
        encoding = upstream.headers.get("content-encoding", "")
        keep = state.cache.should_store(call) and 200 <= upstream.status < 300
        recorder = Recorder(call, stream, encoding, keep)
        checkpoint = 200 <= upstream.status < 300 and state.sessions.applies(call)
        flight.start_head(head)
        if stream:
            async for chunk in upstream.content.iter_any():
                if recorder.feed(chunk) and checkpoint:
                    await state.sessions.checkpoint(call, recorder.message(), headers)
                flight.append(chunk)
        else:
            body = await upstream.read()
            if recorder.feed(body) and checkpoint:
                await state.sessions.checkpoint(call, recorder.message(), headers)
            flight.append(body)
        call.t_done = time.monotonic()
        flight.finish()   # first: the subscribers' wake-ups are queued before the cache write
        write = state.cache.save(call, head, recorder)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        flight.abort(UpstreamError("bad_gateway", f"sidecar: upstream answer broke off ({exc!r})"))
    except asyncio.CancelledError:
        upstream.close()  # nobody is listening any more: stop the generation upstream
        flight.abort(asyncio.CancelledError())
        raise
    finally:
        upstream.release()
        state.limiter.release(call.route.agent, call.model, call.slot_token)
        if write is None:
            state.flights.remove(flight)
        else:  # late identical requests join the finished flight until the entry is readable
            write.add_done_callback(lambda _: state.flights.remove(flight))
