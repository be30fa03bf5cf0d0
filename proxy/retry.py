"""Upstream attempts: retry what the API says is temporary, before the agent sees anything.

429, 529, 502, 503, 504 and connection failures are retried with exponential
backoff and full jitter, or after the delay the API asks for (`retry-after-ms`,
`retry-after`, Anthropic's `anthropic-ratelimit-*-reset`), within a bounded
number of attempts and a bounded total time. The slot is given back while
waiting, so the concurrency limit (lowered by a 429) also governs the retries.
What still fails goes to the agent unchanged: status, body and headers.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import aiohttp

from .call import Call
from .config import RetrySection
from .upstream import UpstreamError

RETRY_STATUSES = frozenset({429, 502, 503, 504, 529})
RATE_LIMITED = frozenset({429, 529})
RESET_HEADERS = ("anthropic-ratelimit-requests-reset", "anthropic-ratelimit-tokens-reset",
                 "anthropic-ratelimit-input-tokens-reset", "anthropic-ratelimit-output-tokens-reset")


def requested_delay(headers, now: float | None = None) -> float | None:
    """The wait the upstream asked for, in seconds, if it asked."""
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
    resets = [_rfc3339(headers.get(name)) for name in RESET_HEADERS]
    future = [t - now for t in resets if t is not None and t > now]
    return min(future) if future else None


def _rfc3339(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def backoff(settings: RetrySection, attempt: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(settings.max_delay, settings.base_delay * 2 ** attempt))


async def send_with_retries(state, call: Call, url, headers) -> aiohttp.ClientResponse:
    """The final upstream response, holding a limiter slot that the caller must release."""
    settings: RetrySection = state.config.retry
    limiter = state.limiter
    agent, model = call.route.agent, call.model
    deadline = time.monotonic() + settings.max_total
    for attempt in range(max(1, settings.max_attempts)):
        call.slot_token = await limiter.acquire(agent, model, retrying=attempt > 0)
        if not call.t_slot:
            call.t_slot = time.monotonic()
        last = attempt + 1 >= settings.max_attempts
        sent_at = call.t_sent = time.monotonic()
        try:
            response = await state.client.send(call.method, url, headers, call.body)
        except UpstreamError as exc:
            limiter.release(agent, model, call.slot_token)
            delay = backoff(settings, attempt)
            if exc.kind != "bad_gateway" or last or time.monotonic() + delay > deadline:
                raise
        except BaseException:
            limiter.release(agent, model, call.slot_token)
            raise
        else:
            if response.status not in RETRY_STATUSES:
                limiter.upstream_ok()
                return response
            if response.status in RATE_LIMITED:
                call.rate_limited = True
                limiter.upstream_limited(sent_at)
            delay = requested_delay(response.headers)
            delay = backoff(settings, attempt) if delay is None else delay
            if last or time.monotonic() + delay > deadline:
                return response          # the agent gets the upstream's own answer
            response.release()
            limiter.release(agent, model, call.slot_token)
        call.retries += 1
        state.counters["retries"] += 1
        await asyncio.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")
