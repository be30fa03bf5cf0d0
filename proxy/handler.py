"""The request pipeline, declared once and in order.

receive -> identify agent and route -> (cache lookup) -> (single-flight or
limiter slot) -> forward -> relay while recording -> finish. Each step lives in
its own module; this one only composes them and turns refusals into API-shaped
errors in one place.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from . import intake
from .call import Call, Refusal
from .errors import api_error
from .relay import relay
from .routes import route_of
from .state import STATE, ProxyState
from .upstream import UpstreamError, end_to_end


async def handle(request: web.Request) -> web.StreamResponse:
    state: ProxyState = request.app[STATE]
    route = route_of(request.path, request.query_string, request.headers, state.agent_id)
    call = Call(route, request.method)
    try:
        intake.check_target(request, state.config.proxy.allow_remote)
        await intake.read_body(request, call, state.body_limit)
        return await forward(request, call, state)
    except Refusal as refusal:
        call.status = 0
        call.error = refusal.kind
        return api_error(route.api, refusal.kind, refusal.message, retry_after=refusal.retry_after)
    except UpstreamError as exc:
        call.error = exc.kind
        return api_error(route.api, exc.kind, str(exc))


async def forward(request: web.Request, call: Call, state: ProxyState) -> web.StreamResponse:
    url = state.upstreams.url(call.route)
    call.t_sent = time.monotonic()
    upstream = await state.client.send(call.method, url, end_to_end(request.headers), call.body)
    try:
        call.t_first_byte = time.monotonic()
        return await relay(request, call, upstream, None)
    except asyncio.CancelledError:
        # The agent went away: drop the upstream connection so the answer stops being generated.
        upstream.close()
        raise
    finally:
        upstream.release()
