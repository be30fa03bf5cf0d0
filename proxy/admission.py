"""Before an attempt goes out: the overload circuit, then the rate-limit pacing; after it, what its answer
tells both. The pipeline's hooks into proxy/circuit.py and proxy/headroom.py, one call each."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from .call import Call
from .circuit import MAX_ERROR_BODY, OVERLOAD, LastError
from .headroom import Ticket
from .retry import Attempts, requested_delay
from .headers import end_to_end


@dataclass(slots=True, eq=False)
class Gate:
    """What one attempt holds until its answer: maybe the circuit's probe slot, and its reservation."""
    wall: str            # the circuit's key: API and model
    probe: bool
    ticket: Ticket
    settled: bool = False


def keys(state, call: Call) -> tuple[str, str]:
    """(circuit key, budget key): an overload hits an API's model; a rate limit is also per credential."""
    wall = f"{call.route.api} {call.model or '-'}"
    return wall, f"{wall} {state.cache.keys.partition(call.headers, call.route.query).hex()[:8]}"


async def admit(state, call: Call, attempts: Attempts) -> Gate:
    """Wait while the circuit is open (unless this is the probe), then while the budget cannot cover it."""
    wall, budget = keys(state, call)
    deadline = state.circuits.deadline(call.t_received, attempts.deadline)
    probe = await state.circuits.admit(wall, deadline)   # raises WallHeld at the deadline
    attempts.in_wall = probe
    try:
        ticket = await state.pacer.hold(budget, call.body, deadline) if state.config.limits.pace else Ticket(budget, {})
    except BaseException:
        state.circuits.unanswered(wall, probe)
        raise
    return Gate(wall, probe, ticket)


async def answered(state, gate: Gate, upstream: aiohttp.ClientResponse, retrying: bool) -> None:
    """The answer's head: its rate-limit reading to the pacing, its status to the circuit."""
    gate.settled = True
    try:   # what an upstream's headers say is untrusted input: a failure here is a fault, never the call's
        await state.pacer.answered(gate.ticket, upstream.headers)
    except Exception as exc:
        state.fault("pacing", exc)
    last = await _kept(upstream) if retrying and upstream.status in OVERLOAD else None
    state.circuits.answered(gate.wall, gate.probe, upstream.status, last,
                           requested_delay(upstream.headers, status=upstream.status))


def settle(state, gate: Gate) -> None:
    """The attempt is over; if no answer was read (a failure, a cancel), its probe slot and reservation go back."""
    if not gate.settled:
        gate.settled = True
        state.pacer.unanswered(gate.ticket)
        state.circuits.unanswered(gate.wall, gate.probe)


async def _kept(upstream: aiohttp.ClientResponse) -> LastError | None:
    """An overload answer about to be retried, read whole (small, bounded) to answer held calls with later."""
    if upstream.content_length is not None and upstream.content_length > MAX_ERROR_BODY:
        return None
    chunks, size = [], 0
    try:
        async with asyncio.timeout(2.0):
            async for chunk in upstream.content.iter_any():
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ERROR_BODY:
                    return None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    return LastError(upstream.status, upstream.reason, end_to_end(upstream.headers), b"".join(chunks))
