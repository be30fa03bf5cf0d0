"""Upstream attempts: retry what the API says is temporary, before the agent sees anything.

429, 529, 502, 503, 504 and connection failures are retried with exponential
backoff and full jitter, or after the delay the API asks for (`retry-after-ms`,
`retry-after`, for a 429 the reset of its exhausted rate-limit bucket), within a bounded
number of attempts and a bounded total time. The pipeline gives the slot back
while waiting, so the concurrency limit (lowered by a 429) also governs the
retries.
What still fails goes to the agent unchanged: status, body and headers.
"""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

import aiohttp

from . import headroom
from .call import Call
from .config import RetrySection
from .errors import UpstreamError

RETRY_STATUSES = frozenset({429, 502, 503, 504, 529})
RATE_LIMITED = frozenset({429, 529})


def requested_delay(headers, now: float | None = None, status: int = 429) -> float | None:
    """The wait the upstream asked for, in seconds, if it asked; for a 429 without retry-after, until the
    reset of the exhausted rate-limit bucket."""
    now = time.time() if now is None else now
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                pass
    if status != 429:
        return None
    buckets = headroom.reading(headers, now)
    exhausted = [reset - now for _, remaining, reset in buckets.values() if remaining == 0 and reset > now]
    future = [reset - now for _, _, reset in buckets.values() if reset > now]
    return max(exhausted) if exhausted else min(future) if future else None


def backoff(settings: RetrySection, attempt: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(settings.max_delay, settings.base_delay * 2 ** attempt))


class Attempts:
    """The retry policy of one call: after each attempt, the delay before the next, or None (final).

    The pipeline owns the loop and the limiter slot of each attempt; this says only when to try again."""

    __slots__ = ("settings", "call", "limiter", "attempt", "deadline", "sent_at", "in_wall")

    def __init__(self, settings: RetrySection, call: Call, limiter):
        self.settings = settings
        self.call = call
        self.limiter = limiter
        self.attempt = 0
        self.deadline = time.monotonic() + settings.max_total
        self.sent_at = 0.0
        self.in_wall = False   # this attempt is an overload circuit's probe (proxy/circuit.py)

    @property
    def retrying(self) -> bool:
        return self.attempt > 0

    def sending(self) -> None:
        self.sent_at = self.call.t_sent = time.monotonic()

    def after_error(self, exc: UpstreamError) -> float | None:
        """A connection failure: retried with backoff; a timeout is not (the wait was already long)."""
        return self._next(backoff(self.settings, self.attempt)) if exc.kind == "bad_gateway" else None

    def after_response(self, response: aiohttp.ClientResponse) -> float | None:
        if response.status not in RETRY_STATUSES:
            self.limiter.upstream_ok()
            return None
        if response.status in RATE_LIMITED:
            self.call.rate_limited = True
            if not self.in_wall:   # a wall says nothing about our concurrency: keep what was learned
                self.limiter.upstream_limited(self.sent_at)
        delay = requested_delay(response.headers, status=response.status)
        return self._next(backoff(self.settings, self.attempt) if delay is None else delay)

    def _next(self, delay: float) -> float | None:
        last = self.attempt + 1 >= self.settings.max_attempts
        if last or time.monotonic() + delay > self.deadline:
            return None      # the agent gets the upstream's own answer (or error)
        self.attempt += 1
        self.call.retries += 1
        return delay
