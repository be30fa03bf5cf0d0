"""The request pipeline: the whole way of one call, declared once and in order.

    stage         module              what a failure does
    receive       intake              refusal: an API-shaped 4xx, nothing goes upstream
    route         routes              -
    restore       restore, sessions   side: the request goes on unchanged
    cache key     cache, cache_key    side: the call is not cached
    cache lookup  cache, replay       side: a miss             (a hit is replayed: the way ends here)
    join          flight              -                        (an identical call in flight is joined)
    slot          limits              refusal: a 429 the client backs off from
    forward       upstream, retry     UpstreamError: an API-shaped 502/504 before the head, a cut after it
    capture       capture             side: the answer is relayed but neither stored nor checkpointed
    checkpoint    sessions            side
    store         cache               side
    relay         (here)              a cut, as a broken upstream would cut it
    record        state.finish        side: records, stats, monitor, live page, after the last byte

`handle` owns the call from its receipt to its last byte. `exchange` is the
flight's task, the upstream half that every identical call shares: it holds
the limiter slot of each attempt and the upstream response, and gives both
back on every path. Requests that are not model calls (`HEAD /`, `GET
/v1/models`, anything outside `[cache] routes`) take no slot, are not
retried, cached, checkpointed or counted: they pass. A side stage that fails
is a fault (one log line, a `sidecar_fault` event) and the call goes on as if
that stage were off; only `SidecarError`s (decisions such as a replay-mode
miss) change the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable

import aiohttp
from aiohttp import web

from . import intake, replay
from .call import Call
from .capture import Capture
from .convert import form_of, message_of
from .errors import Fault, SidecarError, UpstreamError, answer_for, from_library
from .flight import Flight, Head
from .retry import Attempts
from .routes import route_of
from .state import STATE, ProxyState
from .timing import server_timing
from .upstream import end_body_with_connection, end_to_end, request_headers

CALL = web.RequestKey("call", Call)


# ---- the way of one call ---------------------------------------------------------------------------------


async def handle(request: web.Request) -> web.StreamResponse:
    state: ProxyState = request.app[STATE]
    call = request[CALL] = Call(route_of(request.raw_path, request.headers, state.agent_id), request.method)
    headers = request.headers
    call.model_call = call.method == "POST" and call.route.path in state.cache.routes
    call.accept_encoding = headers.get("accept-encoding", "")
    try:
        # receive
        intake.check_target(request, state.config.proxy.allow_remote)
        await intake.read_body(request, call, state.body_limit)
        if call.model_call:
            side(state, "restore", state.sessions.restore, call)
            side(state, "cache key", state.cache.plan, call, headers)
            # cache lookup: a hit ends the way
            entry = await side_async(state, "cache lookup", state.cache.lookup, call)
            if entry is not None:
                hit = side(state, "cache lookup", replay.prepare, call, entry, state.config.cache.replay_pacing)
                if hit is not None:
                    replay.account(call, entry)
                    if state.sessions.applies(call):
                        answer = side(state, "checkpoint", message_of, entry, call.route.api)
                        await checkpoint(state, call, answer, headers)
                    return await replay.send(request, call, hit)
                state.cache.refuse_in_replay(call)   # stored, but not servable to this request
        # join an identical call in flight, or start one; relay its answer
        return await relay(request, state, call, join_or_start(state, call, headers))
    except SidecarError as exc:
        call.error = exc.kind
        return answer_for(call.route.api, exc)
    except asyncio.CancelledError:
        call.error = "client_disconnected"
        raise
    except Exception as exc:   # a bug before anything was sent: still an answer, in the API's shape
        fault = state.fault("pipeline", exc)
        call.error = fault.kind
        return answer_for(call.route.api, fault)
    finally:
        if call.model_call:   # record, after the answer has gone out (aiohttp writes it before the loop turns)
            asyncio.get_running_loop().call_soon(side, state, "record", state.finish, call)


def join_or_start(state: ProxyState, call: Call, headers) -> Flight:
    """Single flight: an identical cacheable call already in flight is joined, not repeated."""
    key = None
    if call.cache_key is not None and state.config.cache.single_flight:
        # The coding too: a client that did not ask for gzip must not be handed another client's gzip.
        key = (call.cache_key, form_of(call), call.accept_encoding)
        flight = state.flights.find(key)
        if flight is not None:
            call.cache_outcome = "coalesced"
            return flight
    flight = Flight(key)
    if key is not None:
        state.flights.add(flight)
    flight.task = asyncio.get_running_loop().create_task(exchange(state, call, flight, headers))
    return flight


async def relay(request: web.Request, state: ProxyState, call: Call, flight: Flight) -> web.StreamResponse:
    """Relay the flight's answer to this agent: whole for a JSON body, chunk by chunk for a stream."""
    flight.join()
    response: web.StreamResponse | None = None
    try:
        head = await flight.wait_head()
        call.status = head.status
        if not head.incremental:
            body = await flight.body()
            if flight.failed:   # nothing went out yet: the agent gets an error, not half a body
                raise flight.error or UpstreamError("bad_gateway", "sidecar: the upstream answer broke off; "
                                                                   "retry the call")
            await follower_checkpoint(state, call, flight, request.headers)
            return web.Response(status=head.status, reason=head.reason, body=body, headers=head.headers)
        call.streamed = head.sse
        response = web.StreamResponse(status=head.status, reason=head.reason, headers=head.headers)
        await response.prepare(request)
        async for chunk in flight.stream():
            await response.write(chunk)
        if flight.failed:
            cut(request)
            return response
        await follower_checkpoint(state, call, flight, request.headers)
        await response.write_eof()
        return response
    except (asyncio.CancelledError, SidecarError):
        raise
    except Exception as exc:
        fault = state.fault("relay", exc)
        if response is None or not response.prepared:
            raise fault from exc
        cut(request)
        return response
    finally:
        flight.leave()


def cut(request: web.Request) -> None:
    """End the agent's connection mid-answer, as a broken upstream would: it never looks complete."""
    if request.transport is not None:
        request.transport.abort()


# ---- the upstream half: the flight's task ----------------------------------------------------------------


async def exchange(state: ProxyState, call: Call, flight: Flight, headers) -> None:
    """Slot, forward with retries, take the answer into the flight; every path ends the flight."""
    url = state.upstreams.url(call.route)
    forwarded = request_headers(headers)
    attempts = Attempts(state.config.retry, call, state.limiter)
    try:
        while True:
            async with slot(state, call, attempts.retrying):
                try:
                    attempts.sending()
                    upstream = await state.client.send(call.method, url, forwarded, call.body)
                except UpstreamError as exc:
                    delay = attempts.after_error(exc) if call.model_call else None
                    if delay is None:
                        raise
                else:
                    delay = attempts.after_response(upstream) if call.model_call else None
                    if delay is None:
                        await take_answer(state, call, flight, upstream, headers)
                        return
                    upstream.release()
            state.counters["retries"] += 1
            await asyncio.sleep(delay)
    except SidecarError as exc:
        flight.abort(exc)
    except asyncio.CancelledError:
        flight.abort(UpstreamError("bad_gateway", "sidecar: the call was cancelled"))
        raise
    except Exception as exc:
        flight.abort(state.fault("forward", exc))
    finally:
        flight.finish(failed=True)   # a no-op when the answer ended properly
        state.flights.remove(flight)


@contextlib.asynccontextmanager
async def slot(state: ProxyState, call: Call, retrying: bool):
    """One limiter slot for one attempt of a model call, given back however the attempt ends."""
    if not call.model_call:
        yield
        return
    async with state.limiter.slot(call.route.agent, call.model, retrying):
        if not call.t_slot:
            call.t_slot = time.monotonic()
        yield


async def take_answer(state: ProxyState, call: Call, flight: Flight, upstream: aiohttp.ClientResponse,
                      headers) -> None:
    """Head, chunks and end of the upstream answer into the flight, with capture, checkpoint and store."""
    try:
        call.t_first_byte = time.monotonic()
        sse = upstream.content_type == "text/event-stream"
        head = Head(upstream.status, upstream.reason, end_to_end(upstream.headers), sse,
                    incremental=sse or upstream.content_length is None)
        ok = 200 <= head.status < 300
        capture = None
        if call.model_call and ok:
            capture = side(state, "capture", Capture, call, sse, upstream.headers.get("content-encoding", ""),
                           state.cache.should_store(call) and sse)
        flight.start_head(head)
        end_body_with_connection(upstream)
        try:
            async for chunk in upstream.content.iter_any():
                if capture is not None and side(state, "capture", capture.feed, chunk):
                    await checkpoint(state, call, capture.answer, headers)   # before the last byte goes out
                flight.append(chunk)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:   # broke off: cut, never stored
            upstream.close()
            flight.abort(from_library(exc, upstream.url))
            return
        call.t_done = time.monotonic()
        body = flight.chunks[0] if len(flight.chunks) == 1 else b"".join(flight.chunks)
        if capture is not None:
            if side(state, "capture", capture.end, body):
                await checkpoint(state, call, capture.answer, headers)
            if capture.storable:
                flight.answer = capture.answer
                side(state, "store", state.cache.save, call, head, capture, body)
        flight.finish()
    except asyncio.CancelledError:
        upstream.close()   # nobody is listening any more: stop the generation upstream
        raise
    finally:
        upstream.release()


# ---- side stages: fail open ------------------------------------------------------------------------------


async def checkpoint(state: ProxyState, call: Call, answer: dict | None, headers) -> None:
    if answer is not None and state.sessions.applies(call):
        await side_async(state, "checkpoint", state.sessions.checkpoint, call, answer, headers)


async def follower_checkpoint(state: ProxyState, call: Call, flight: Flight, headers) -> None:
    """A coalesced call's conversation is checkpointed like the one that made the upstream call."""
    if call.cache_outcome == "coalesced" and flight.answer is not None:
        await checkpoint(state, call, flight.answer, headers)


def side(state: ProxyState, stage: str, func: Callable[..., Any], *args: Any) -> Any:
    """Run a side stage; its failure is a fault, reported, and the call goes on (None)."""
    try:
        return func(*args)
    except SidecarError:
        raise
    except Exception as exc:
        state.fault(stage, exc)
        return None


async def side_async(state: ProxyState, stage: str, func: Callable[..., Any], *args: Any) -> Any:
    try:
        return await func(*args)
    except SidecarError:
        raise
    except Exception as exc:
        state.fault(stage, exc)
        return None


async def add_sidecar_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every proxied answer says its id, cache outcome and timings."""
    call = request.get(CALL)
    if call is None:
        return
    if call.status == 0:
        call.status = response.status
    headers = response.headers
    headers["x-sidecar-request-id"] = call.id
    if call.cache_outcome:
        headers["x-sidecar-cache"] = call.cache_outcome
    headers["server-timing"] = server_timing(call)
