"""The request pipeline: the whole way of one call, declared once and in order.

    stage         module              hook       what a failure does
    receive       intake              -          refusal: an API-shaped 4xx, nothing goes upstream
    (websocket)   websocket, exchange -          an upgrade is relayed both ways; each Responses exchange
                                                 on it runs the stages below as its own call
    route         routes              -          -
    restore       stages, restore     request    side: the request goes on unchanged
    cache key     stages, cache       request    side: the call is not cached
    cache lookup  stages, replay      request    side: a miss            (a hit is replayed: the way ends)
    budget        stages, budget      request    side: the call goes on  (past a budget: a 402 refusal)
    join          flight              -          -                       (an identical call in flight is joined)
    admit         admission           -          held through a wall / until headroom (bounded); then the
                  (circuit, headroom)             upstream's last overload answer, or an API-shaped 529
    slot          limits              -          refusal: a 429 the client backs off from
    forward       upstream, retry     -          an API-shaped 502/504 before the head, a cut after it
    capture       stages, capture     head/chunk/end   side: relayed, neither stored nor checkpointed
    store         stages, cache       end        side: the answer is not stored
    checkpoint    stages, sessions    chunk/end  side: the turn is not checkpointed
    relay         (here)              -          a cut, as a broken upstream would cut it
    record        stages, state       done       side: no record, stats or live update
    telemetry     stages, telemetry   done       side: no span or measurements (OTLP export, when on)

The side stages are `STAGES`, run hook by hook in that order by `run`: a stage
that fails is a fault (one log line, a `sidecar_fault` event) and is off for
the rest of that call, which goes on as if it were not there; only a
`SidecarError` (a decision such as a replay-mode miss) changes the way.

`handle` owns the call from its receipt to its last byte. `exchange` is the
flight's task, the upstream half that every identical call shares: it holds
the limiter slot of each attempt and the upstream response, and gives both
back on every path. Requests that are not model calls (`HEAD /`, `GET
/v1/models`, anything outside `[cache] routes`) take no slot and run no side
stage: they pass, uncounted.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import aiohttp
from aiohttp import web

from . import admission, intake, replay, stages, websocket
from .call import Call
from .circuit import WallHeld
from .convert import form_of
from .errors import SidecarError, UpstreamError, answer_for, from_library
from .flight import Flight, Head
from .retry import Attempts
from .routes import route_of
from .state import STATE, ProxyState
from .timing import server_timing
from .headers import end_to_end, request_headers
from .upstream import end_body_with_connection

CALL = web.RequestKey("call", Call)
# The side stages, in the order their hooks run. Store queues the cache entry before Checkpoint queues the
# turn, so at a JSON answer's end both go into one LMDB commit (the store's group commit), awaited once.
STAGES = (stages.Restore, stages.CacheKey, stages.CacheLookup, stages.Budget, stages.Capture, stages.Store,
          stages.Checkpoint, stages.Record, stages.Telemetry)


# ---- the way of one call ---------------------------------------------------------------------------------


async def handle(request: web.Request) -> web.StreamResponse:
    state: ProxyState = request.app[STATE]
    headers = request.headers
    call = request[CALL] = Call(route_of(request.raw_path, headers, state.agent_id), request.method)
    call.headers = headers
    call.model_call = call.method == "POST" and state.cache.is_model_route(call.route.path)
    call.accept_encoding = headers.get("accept-encoding", "")
    try:
        intake.check_target(request, state.config.proxy.allow_remote)   # receive
        if websocket.is_upgrade(request):                               # a socket: its own way (websocket.py)
            return await websocket.relay(request, state, call.route)
        await intake.read_body(request, call, state.body_limit, state.bodies)
        if call.model_call:
            hit = await run(state, "request", call)   # restore, cache key, cache lookup
            if hit is not None:
                await run(state, "end", call)          # the checkpoint of a hit
                return await replay.send(request, call, hit)
        return await relay(request, state, call, join_or_start(state, call))
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
            asyncio.get_running_loop().call_soon(run_done, state, call)


async def run(state: ProxyState, hook: str, call: Call, *args: Any) -> Any:
    """Run one hook of every side stage that has it, in order; the first answer returned ends the run."""
    for name, method in state.stage_hooks[hook]:
        if call.off is not None and name in call.off:
            continue
        try:
            result = method(call, *args)
            if result is not None and hasattr(result, "__await__"):
                result = await result
        except SidecarError:
            raise
        except Exception as exc:
            stage_failed(state, call, name, exc)
            continue
        if result is not None:
            return result
    return None


def run_done(state: ProxyState, call: Call) -> None:
    for name, method in state.stage_hooks["done"]:
        if call.off is None or name not in call.off:
            try:
                method(call)
            except Exception as exc:
                stage_failed(state, call, name, exc)


def stage_failed(state: ProxyState, call: Call, name: str, exc: Exception) -> None:
    state.fault(name, exc)
    if call.off is None:
        call.off = set()
    call.off.add(name)


def stage_hooks(state: ProxyState) -> dict[str, list[tuple[str, Callable]]]:
    """Each hook's (stage name, bound method) in stage order, leaving out stages that do not override it."""
    built = [cls(state) for cls in STAGES]
    return {hook: [(stage.name, getattr(stage, hook)) for stage in built
                   if getattr(type(stage), hook) is not getattr(stages.Stage, hook)]
            for hook in stages.HOOKS}


def join_or_start(state: ProxyState, call: Call) -> Flight:
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
    flight.task = asyncio.get_running_loop().create_task(exchange(state, call, flight))
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
            await follower_end(state, call, flight)
            return web.Response(status=head.status, reason=head.reason, body=body, headers=head.headers)
        call.streamed = head.sse
        response = web.StreamResponse(status=head.status, reason=head.reason, headers=head.headers)
        await response.prepare(request)
        async for chunk in flight.stream():
            await response.write(chunk)
        if flight.failed:
            cut(request)
            return response
        await follower_end(state, call, flight)
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


async def exchange(state: ProxyState, call: Call, flight: Flight) -> None:
    """Slot, forward with retries, take the answer into the flight; every path ends the flight."""
    try:
        url = state.upstreams.url(call.route)
        forwarded = request_headers(call.headers)
        attempts = Attempts(state.config.retry, call, state.limiter)
        while True:
            # An overload wall's circuit, then the rate-limit pacing: either may hold the attempt (bounded).
            gate = await admission.admit(state, call, attempts) if call.model_call else None
            try:
                token = await take_slot(state, call, attempts.retrying)
                try:
                    attempts.sending()
                    upstream = await state.client.send(call.method, url, forwarded, call.body, call.route.api)
                except UpstreamError as exc:
                    delay = attempts.after_error(exc) if call.model_call else None
                    if delay is None:
                        raise
                else:
                    delay = attempts.after_response(upstream) if call.model_call else None
                    if gate is not None:
                        await admission.answered(state, gate, upstream, retrying=delay is not None)
                    if delay is None:
                        await take_answer(state, call, flight, upstream)
                        return
                    upstream.release()
                finally:   # the slot of this attempt, given back however it ended
                    if call.model_call:
                        state.limiter.release(call.route.agent, call.model, token)
            finally:
                if gate is not None:
                    admission.settle(state, gate)
            state.counters["retries"] += 1
            await asyncio.sleep(delay)
    except WallHeld as held:   # held through an overload wall until its deadline: the upstream's last word
        answer_with(flight, held)
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


def answer_with(flight: Flight, held: WallHeld) -> None:
    """A call that waited out its deadline in a wall gets the upstream's own last overload answer."""
    last = held.last
    if last is None:
        flight.abort(held.error)
        return
    flight.start_head(Head(last.status, last.reason, last.headers, sse=False, incremental=False))
    flight.append(last.body)
    flight.finish()


async def take_slot(state: ProxyState, call: Call, retrying: bool):
    """One limiter slot for one attempt of a model call; the caller gives it back (its token)."""
    if not call.model_call:
        return None
    token = await state.limiter.acquire(call.route.agent, call.model, retrying)
    if not call.t_slot:
        call.t_slot = time.monotonic()
    return token


async def take_answer(state: ProxyState, call: Call, flight: Flight, upstream: aiohttp.ClientResponse) -> None:
    """Head, chunks and end of the upstream answer into the flight, through the side stages' hooks."""
    try:
        call.t_first_byte = time.monotonic()
        sse = upstream.content_type == "text/event-stream"
        head = call.head = Head(upstream.status, upstream.reason, end_to_end(upstream.headers), sse,
                                incremental=sse or upstream.content_length is None)
        watched = call.model_call
        if watched:
            await run(state, "head", call, head)
        flight.start_head(head)
        if upstream.content_length is None:   # chunked framing: the case aiohttp can leave waiting
            end_body_with_connection(upstream)
        try:
            async for chunk in upstream.content.iter_any():
                if watched:
                    await run(state, "chunk", call, chunk)   # a completed turn is checkpointed before it goes out
                flight.append(chunk)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:   # broke off: cut, never stored
            upstream.close()
            flight.abort(from_library(exc, upstream.url))
            return
        call.t_done = time.monotonic()
        if watched:
            call.body_out = flight.chunks[0] if len(flight.chunks) == 1 else b"".join(flight.chunks)
            if not head.incremental:   # nobody relays it yet: subscribers take this one joined body
                flight.chunks[:] = [call.body_out]
            await run(state, "end", call)   # capture, store, checkpoint
            flight.answer = call.answer
        flight.finish()
    except asyncio.CancelledError:
        upstream.close()   # nobody is listening any more: stop the generation upstream
        raise
    finally:
        upstream.release()


async def follower_end(state: ProxyState, call: Call, flight: Flight) -> None:
    """A coalesced call's answer is over: its conversation is checkpointed like the leader's."""
    if call.cache_outcome == "coalesced" and flight.answer is not None:
        call.answer = flight.answer
        await run(state, "end", call)


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
