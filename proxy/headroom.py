"""Rate-limit headroom: what the upstream says is left, and pacing calls so they do not run into a 429.

Every upstream answer reports its buckets: Anthropic's `anthropic-ratelimit-
{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}` (reset
an RFC 3339 time), OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,
tokens}` (reset a duration: "6ms", "1m30s"). They are kept per budget: API,
credential (the cache's keyed partition hash, never the key) and model.

Before an attempt goes out, its need (one request and its input tokens,
estimated from the body's size) is reserved against what the last answer
said remains, less what calls sent since have reserved. A call the budget
cannot cover is held until the bucket's reset, or until a later answer
reports headroom, whichever comes first: a timer and a wake-up, never a poll.
A hold is bounded by the call's deadline ([retry] max_total); a call that
never fits the bucket, or whose reset lies beyond its deadline, goes out at
once (the upstream decides, as it would without the sidecar). Until the first
answer of a budget reports its buckets, calls go out as they come.

The arithmetic is a `LocalBudget` (one process: every agent of a shared
sidecar shares it) or, with the Redis backend, `redis_backend.RedisBudget`:
one budget for the fleet.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .call import new_request_id

BUCKETS = ("requests", "tokens", "input_tokens", "output_tokens")
MAX_BUDGETS = 256            # budgets (API, credential, model) remembered; the oldest are forgotten
BYTES_PER_TOKEN = 4          # a JSON request body has at least this many bytes per input token
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?")


@functools.lru_cache(maxsize=256)   # the same reset times come back on answer after answer
def rfc3339(value: str | None) -> float | None:
    """An RFC 3339 time as epoch seconds, or None."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


@functools.lru_cache(maxsize=256)
def duration(value: str | None) -> float | None:
    """OpenAI's reset durations ("6ms", "0s", "1.5s", "1m30s", "2h0m5s") in seconds, or None."""
    if not value:
        return None
    match = _DURATION.fullmatch(value.strip())
    if match is None or not any(match.groups()):
        return None
    h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except (ValueError, OverflowError):   # "x", "nan", "inf": no reading
        return None


def reading(headers, now: float | None = None) -> dict[str, tuple[int, int, float]]:
    """The buckets an answer reports: name -> (limit, remaining, reset as epoch seconds)."""
    now = time.time() if now is None else now
    found = {}
    for name, limit_header, remaining_header, reset_header, absolute in _HEADERS:
        limit = headers.get(limit_header)
        if limit is None:
            continue
        limit, remaining = _int(limit), _int(headers.get(remaining_header))
        if absolute:
            reset = rfc3339(headers.get(reset_header))
        else:
            delay = duration(headers.get(reset_header))
            reset = None if delay is None else now + delay
        if limit is not None and remaining is not None and limit > 0:
            found[name] = (limit, max(0, remaining), reset if reset is not None else now)
    return found


# (bucket, limit, remaining and reset headers, whether the reset is a time or a duration), Anthropic's then OpenAI's
_HEADERS = [(name, f"anthropic-ratelimit-{name.replace('_', '-')}-limit",
             f"anthropic-ratelimit-{name.replace('_', '-')}-remaining",
             f"anthropic-ratelimit-{name.replace('_', '-')}-reset", True) for name in BUCKETS] + \
           [(name, f"x-ratelimit-limit-{name}", f"x-ratelimit-remaining-{name}", f"x-ratelimit-reset-{name}", False)
            for name in ("requests", "tokens")]


def needs_of(body: bytes) -> dict[str, int]:
    """What one attempt takes from the buckets: one request, and its input tokens (from its size), from
    Anthropic's input-token bucket and from the tokens bucket (OpenAI's, Anthropic's most restrictive one)."""
    tokens = len(body) // BYTES_PER_TOKEN + 1
    return {"requests": 1, "input_tokens": tokens, "tokens": tokens}


@dataclass(slots=True)
class Bucket:
    limit: int
    remaining: int
    reset: float         # epoch seconds when the upstream says it is full again
    reserved: int = 0    # taken by calls sent since, whose answers have not reported yet


@dataclass(slots=True, eq=False)
class Ticket:
    """One attempt's reservation, given back when its answer (or its failure) is known."""
    key: str
    needs: dict[str, int]
    id: str = field(default_factory=new_request_id)   # unique in the fleet: the Redis budget's lease name
    open: bool = True


class LocalBudget:
    """The budgets of this process, the buckets of each as last reported."""

    shared = False

    def __init__(self):
        self.budgets: dict[str, dict[str, Bucket]] = {}

    async def take(self, ticket: Ticket, now: float, force: bool = False) -> float | None:
        """Reserve the ticket's needs (None), or say until when to wait: an epoch time, or inf (until a report)."""
        return take(self.budgets.get(ticket.key), ticket.needs, now, force)

    async def report(self, ticket: Ticket, buckets: dict[str, tuple[int, int, float]]) -> None:
        """An answer arrived: its reading replaces the last one, and its call's reservation is given back."""
        self.remember(ticket.key, buckets)
        self.give_back(ticket)

    def remember(self, key: str, buckets: dict[str, tuple[int, int, float]], now: float | None = None) -> None:
        if not buckets:
            return
        now = time.time() if now is None else now
        if key not in self.budgets and len(self.budgets) >= MAX_BUDGETS:
            del self.budgets[next(iter(self.budgets))]   # the oldest budget goes: memory stays bounded
        budget = self.budgets.setdefault(key, {})
        for name, (limit, remaining, reset) in buckets.items():
            bucket = budget.get(name)
            if bucket is None:
                budget[name] = Bucket(limit, remaining, reset)
            elif bucket.limit != limit:   # a new limit (a new tier): a new bucket
                bucket.limit, bucket.remaining, bucket.reset = limit, remaining, reset
            else:
                bucket.remaining, bucket.reset = newer(bucket.remaining, bucket.reset, remaining, reset, now)

    def give_back(self, ticket: Ticket) -> None:
        budget = self.budgets.get(ticket.key)
        for name, need in ticket.needs.items():
            bucket = budget.get(name) if budget else None
            if bucket is not None:
                bucket.reserved = max(0, bucket.reserved - need)

    async def close(self) -> None:
        pass


def newer(remaining: int, reset: float, new_remaining: int, new_reset: float, now: float) -> tuple[int, float]:
    """Of two readings of one bucket, the later one. Answers can arrive out of order; a bucket's reset only
    moves later as calls consume it (refilling alone keeps it), so an earlier reset is an older reading."""
    if new_reset > reset or reset <= now:
        return new_remaining, new_reset
    if new_reset == reset:
        return min(remaining, new_remaining), reset
    return remaining, reset


def take(budget: dict[str, Bucket] | None, needs: dict[str, int], now: float, force: bool = False) -> float | None:
    if not budget:
        return None   # nothing reported yet: the call goes out, unreserved
    until = 0.0
    for name, need in needs.items():
        bucket = budget.get(name)
        if bucket is None or force:
            continue
        left = (bucket.limit if bucket.reset <= now else bucket.remaining) - bucket.reserved
        if need <= left or need > bucket.limit:   # it fits, or it never will (the upstream decides)
            continue
        until = max(until, bucket.reset if bucket.reset > now else math.inf)
    if until:
        return until
    for name, need in needs.items():
        bucket = budget.get(name)
        if bucket is not None:
            if bucket.reset <= now and bucket.remaining < bucket.limit:   # the reset has passed: full again
                bucket.remaining = bucket.limit
            bucket.reserved += need
    return None


class Pacer:
    """Holds the calls their budget cannot cover, until it can, or their deadline."""

    def __init__(self, budget=None):
        self.budget = budget or LocalBudget()
        self._wakers: set[asyncio.Future] = set()
        self.holding = 0     # calls held right now
        self.held = 0        # calls ever held
        self.held_s = 0.0    # seconds they were held, in all

    async def hold(self, key: str, body: bytes, deadline: float) -> Ticket:
        """Return once this attempt's need is reserved: at once, at a reset, a report, or the deadline
        (monotonic), whichever comes first."""
        ticket = Ticket(key, needs_of(body))
        now = time.time()
        until = await self.budget.take(ticket, now)
        if until is None:
            return ticket
        started = time.monotonic()
        self.holding += 1
        self.held += 1
        try:
            while until is not None:
                left = deadline - time.monotonic()
                # At the deadline, or a reset beyond it (holding would not help): out it goes, reserved.
                if left <= 0 or math.isfinite(until) and until - now >= left:
                    await self.budget.take(ticket, now, force=True)
                    break
                await self._wait(min(until - now, left))   # inf: until an answer reports (or the deadline)
                now = time.time()
                until = await self.budget.take(ticket, now)
        finally:
            self.holding -= 1
            self.held_s += time.monotonic() - started
        return ticket

    async def _wait(self, seconds: float) -> None:
        """Until `seconds` pass or some answer reports headroom."""
        loop = asyncio.get_running_loop()
        waker = loop.create_future()
        timer = loop.call_later(seconds, _wake, waker)
        self._wakers.add(waker)
        try:
            await waker
        finally:
            timer.cancel()
            self._wakers.discard(waker)

    async def answered(self, ticket: Ticket, headers) -> None:
        """The attempt's answer head arrived: its reading and its reservation go to the budget."""
        if not ticket.open:
            return
        ticket.open = False
        await self.budget.report(ticket, reading(headers))
        self.wake()

    def unanswered(self, ticket: Ticket) -> None:
        """The attempt ended without an answer: its reservation is given back."""
        if ticket.open:
            ticket.open = False
            self.budget.give_back(ticket)
            self.wake()

    def wake(self) -> None:
        """Headroom may have changed (here, or reported by another sidecar of the fleet): held calls look again."""
        for waker in list(self._wakers):
            _wake(waker)

    def snapshot(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        budgets = {key: {name: {"limit": b.limit, "remaining": b.remaining, "reserved": b.reserved,
                                "reset_in_s": round(max(0.0, b.reset - now), 3)}
                         for name, b in buckets.items()}
                   for key, buckets in list(self.budget.budgets.items())[-8:]}
        return {"holding": self.holding, "held": self.held, "held_s": round(self.held_s, 3),
                "fleet": self.budget.shared, "budgets": budgets}


def _wake(waker: asyncio.Future) -> None:
    if not waker.done():
        waker.set_result(None)
