"""The request pipeline, declared once and in order.

receive -> identify agent and route -> cache lookup (a hit is replayed: done)
-> join an identical call in flight, or start one (forward.fetch) -> relay the
flight's answer to the agent. Each step lives in its own module; this one only
composes them and turns refusals into API-shaped errors in one place.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from . import intake
from .cache import form_of, replay
from .call import Call, Refusal
from .errors import api_error
from .flight import Flight
from .forward import fetch
from .routes import route_of
from .state import STATE, ProxyState
from .timing import server_timing
from .upstream import UpstreamError

CALL = web.RequestKey("call", Call)


async def handle(request: web.Request) -> web.StreamResponse:
    state: ProxyState = request.app[STATE]
    route = route_of(request.path, request.query_string, request.headers, state.agent_id)
    call = request[CALL] = Call(route, request.method)
    try:
        intake.check_target(request, state.config.proxy.allow_remote)
        await intake.read_body(request, call, state.body_limit)
        state.sessions.restore(call)
        state.cache.plan(call, request.headers)
        entry = await state.cache.lookup(call)
        if entry is not None:
            return await replay(request, call, entry, state.config.cache.replay_pacing)
        return await deliver(request, call, join_or_start(state, call, request.headers))
    except Refusal as refusal:
        call.error = refusal.kind
        return api_error(route.api, refusal.kind, refusal.message, retry_after=refusal.retry_after)
    except UpstreamError as exc:
        call.error = exc.kind
        return api_error(route.api, exc.kind, str(exc))
    except asyncio.CancelledError:
        call.error = "client_disconnected"
        raise
    finally:
        # After the answer has gone out: aiohttp writes a returned response before the loop turns.
        asyncio.get_running_loop().call_soon(state.finish, call)


async def add_sidecar_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every proxied answer says its id, cache outcome and timings."""
    call = request.get(CALL)
    if call is None:
        return
    if call.status == 0:
        call.status = response.status
    headers = response.headers
    headers["x-sidecar-request-id"] = call.id
    if call.cache:
        headers["x-sidecar-cache"] = call.cache
    headers["server-timing"] = server_timing(call)


def join_or_start(state: ProxyState, call: Call, headers) -> Flight:
    """Single-flight: an identical cacheable call already in flight is joined, not repeated."""
    key = (call.cache_key, form_of(call)) if call.cache_key is not None and state.config.cache.single_flight else None
    flight = state.flights.find(key) if key is not None else None
    if flight is not None:
        call.cache = "coalesced"
        return flight
    flight = Flight(key)
    if key is not None:
        state.flights.add(flight)
    flight.task = asyncio.get_running_loop().create_task(fetch(state, call, flight, headers))
    return flight


async def deliver(request: web.Request, call: Call, flight: Flight) -> web.StreamResponse:
    """Relay the flight's answer to this agent: whole for JSON, chunk by chunk for streams."""
    flight.join()
    try:
        head = await flight.wait_head()
        call.status = head.status
        headers = head.headers
        if not head.stream:
            body = await flight.body()
            if flight.failed:
                raise UpstreamError("bad_gateway", "sidecar: the upstream answer broke off; retry the call")
            return web.Response(status=head.status, reason=head.reason, body=body, headers=headers)
        call.streamed = True
        response = web.StreamResponse(status=head.status, reason=head.reason, headers=headers)
        await response.prepare(request)
        async for chunk in flight.stream():
            await response.write(chunk)
        if flight.failed:
            # Mirror the upstream: a broken stream stays broken for the agent, never looks complete.
            request.transport.abort() if request.transport else None
            return response
        await response.write_eof()
        return response
    finally:
        flight.leave()
