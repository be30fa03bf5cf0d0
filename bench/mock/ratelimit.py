"""The mock's rate limits and overload walls, as the real APIs meter and fail.

Rate limits are token buckets that refill continuously (requests, input
tokens and output tokens per window), reported on every answer with the
APIs' own headers: Anthropic's `anthropic-ratelimit-{requests,tokens,
input-tokens,output-tokens}-{limit,remaining,reset}` (reset: RFC 3339, when
the bucket is full again), OpenAI's `x-ratelimit-{limit,remaining,reset}-
{requests,tokens}` (reset: a duration such as "6ms" or "1m30s"). A request
the buckets cannot cover is answered 429 with `retry-after`. By default the
buckets are far larger than any test needs; `Profile.rate_requests` /
`rate_input_tokens` make them bind.

A wall answers every model call with 529 (or the status given) for a while
from the first call it meets, each after `Profile.wall_latency`, then the
upstream recovers; it counts the
requests it answered and how many were in flight at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

# Far above what a benchmark sends (1M requests a minute): the buckets bind only when a test asks.
DEFAULT_REQUESTS, DEFAULT_INPUT, DEFAULT_OUTPUT = 1_000_000, 2_000_000_000, 400_000_000


def rfc3339_ceil(t: float) -> str:
    """The moment `t`, rounded up to the second (a reset is never announced early)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(t)))


def duration(seconds: float) -> str:
    """OpenAI's reset format: "6ms", "0s", "1.5s", "1m30s", "2h0m5s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{sec:.3f}".rstrip("0").rstrip(".") + "s"
    return (f"{hours}h{minutes}m" if hours else f"{minutes}m" if minutes else "") + text


class Bucket:
    """A token bucket of `capacity` that refills from empty to full in `window` seconds."""

    def __init__(self, capacity: int, window: float):
        self.capacity = capacity
        self.rate = capacity / window
        self.level = float(capacity)
        self.at = time.monotonic()

    def now(self) -> float:
        t = time.monotonic()
        self.level = min(self.capacity, self.level + (t - self.at) * self.rate)
        self.at = t
        return self.level

    def wait_for(self, n: int) -> float:
        """Seconds until `n` are available (0 if they are)."""
        return max(0.0, (n - self.now()) / self.rate)

    def take(self, n: int) -> None:
        self.level = self.now() - n

    def until_full(self) -> float:
        return (self.capacity - self.now()) / self.rate


class RateLimits:
    """The buckets of one organization: requests, input tokens, output tokens."""

    def __init__(self, requests: int = 0, input_tokens: int = 0, window: float = 60.0):
        self.requests = Bucket(requests or DEFAULT_REQUESTS, window)
        self.input = Bucket(input_tokens or DEFAULT_INPUT, window)
        self.output = Bucket(DEFAULT_OUTPUT, window)

    def admit(self, input_tokens: int) -> float:
        """0.0 and the request is taken from the buckets, or the seconds to wait before it would fit."""
        wait = max(self.requests.wait_for(1), self.input.wait_for(input_tokens))
        if wait > 0:
            return wait
        self.requests.take(1)
        self.input.take(input_tokens)
        return 0.0

    def used_output(self, tokens: int) -> None:
        self.output.take(tokens)

    def anthropic_headers(self) -> dict[str, str]:
        now, headers = time.time(), {}
        for name, bucket in (("requests", self.requests), ("input-tokens", self.input),
                             ("output-tokens", self.output), ("tokens", self.input)):
            headers[f"anthropic-ratelimit-{name}-limit"] = str(bucket.capacity)
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(max(0, int(bucket.now())))
            headers[f"anthropic-ratelimit-{name}-reset"] = rfc3339_ceil(now + bucket.until_full())
        return headers

    def openai_headers(self) -> dict[str, str]:
        headers = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.input)):
            headers[f"x-ratelimit-limit-{name}"] = str(bucket.capacity)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, int(bucket.now())))
            headers[f"x-ratelimit-reset-{name}"] = duration(bucket.until_full())
        return headers


@dataclass
class Wall:
    """An overload wall: every model call answered `status` for `seconds`, counted from the first call it meets
    (so a slow-starting client still meets all of it)."""
    seconds: float = 0.0
    status: int = 529
    until: float = 0.0           # monotonic; set by the first call
    requests: int = 0            # answered by the wall
    in_flight: int = 0
    peak_in_flight: int = 0      # wall requests at the upstream at once
    first_answered: float = 0.0  # when the first wall answer went out (monotonic)
    late_in_flight: int = 0      # in flight, of those that arrived after the first answer went out
    peak_late_in_flight: int = 0

    @property
    def active(self) -> bool:
        return time.monotonic() < self.until or self.seconds > 0 and not self.until

    def meet(self) -> bool:
        """A model call arrives: whether the wall answers it (the first one starts the wall's clock)."""
        if self.seconds > 0 and not self.until:
            self.until = time.monotonic() + self.seconds
        return time.monotonic() < self.until

    def stats(self) -> dict:
        return {"active": self.active, "status": self.status, "requests": self.requests,
                "peak_in_flight": self.peak_in_flight, "peak_in_flight_after_first": self.peak_late_in_flight,
                "left_s": round(max(0.0, self.until - time.monotonic()) if self.until else self.seconds, 3)}
