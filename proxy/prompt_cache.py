"""The provider's prompt cache, watched per conversation: a `prompt_cache_regression` when a prefix changed.

A conversation that goes on normally reads from the provider's cache what its
previous call left there and writes only its new turn. When a call instead
writes (or, where the API reports no writes, sends uncached) at least half of
what the previous call left in the cache and reads less than half of it, its
prefix changed: a system prompt edit, a tool list change, a date or git
status line, or the cached prefix expired. The event names what changed in the
request since the previous turn, as the checkpoint's merge found it (tools,
system, the first messages that differ; nothing: it expired), and what the
rewrite cost beyond a read. Where caching is implicit (OpenAI, Gemini), a
conversation must have been read from the cache once before: an upstream that
does not cache a model is not a regression. Kept per conversation and model (an agent's side
calls to a small model have prefixes of their own): one number each.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from .call import Call
from .events import make_event
from .usage import Usage

MIN_PREFIX = 1024     # tokens: the providers cache nothing shorter
MAX_CONVERSATIONS = 10_000
EXPIRED = "nothing in the request: the cached prefix expired (Anthropic keeps it 5 min unless asked for 1 h) or was evicted"


def written(usage: Usage) -> int:
    """What a call put in the cache: Anthropic says; OpenAI and Gemini cache what they did not read."""
    return usage.cache_write_tokens if usage.writes_reported else usage.input_tokens - usage.cache_read_tokens


class PromptCacheWatch:
    def __init__(self, emit: Callable[[dict], None], cost: Callable[[Call, Usage], float | None]):
        self.emit = emit
        self.cost = cost
        # (session, model) -> (what its last call left cached, whether any of its calls read from the cache)
        self._cached: OrderedDict[tuple[str, str], tuple[int, bool]] = OrderedDict()

    def observe(self, call: Call) -> None:
        usage = call.usage
        if usage is None or not call.session or call.cache_outcome in ("hit", "coalesced") or call.status >= 300:
            return
        key = (call.session, call.model)
        before, has_read = self._cached.get(key, (0, False))
        wrote = written(usage)
        self._cached[key] = (usage.cache_read_tokens + wrote, has_read or usage.cache_read_tokens > 0)
        self._cached.move_to_end(key)
        if len(self._cached) > MAX_CONVERSATIONS:
            self._cached.popitem(last=False)
        # Where caching is implicit, only a conversation that was read from the cache before is known to cache.
        if before >= MIN_PREFIX and 2 * usage.cache_read_tokens < before <= 2 * wrote and (
                usage.writes_reported or has_read):
            self.emit(make_event("prompt_cache_regression", "info", session=call.session, agent=call.route.agent,
                                 model=call.model, cached_before=before, cache_read_tokens=usage.cache_read_tokens,
                                 cache_write_tokens=wrote, changed=", ".join(call.prefix_change or ()) or (
                                     EXPIRED if call.prefix_change is not None else "unknown (no checkpoint)"),
                                 extra_cost_usd=self._extra(call, usage, before)))

    def _extra(self, call: Call, usage: Usage, before: int) -> float | None:
        """What the rewrite cost beyond reading the prefix the previous call had cached."""
        lost = min(before, usage.input_tokens) - usage.cache_read_tokens
        if lost <= 0:
            return 0.0
        as_read = Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                        cache_read_tokens=usage.cache_read_tokens + lost,
                        cache_write_tokens=max(0, usage.cache_write_tokens - lost) if usage.writes_reported else 0,
                        cache_write_1h_tokens=usage.cache_write_1h_tokens if usage.writes_reported else 0)
        as_read.cache_write_1h_tokens = min(as_read.cache_write_1h_tokens, as_read.cache_write_tokens)
        paid, would = self.cost(call, usage), self.cost(call, as_read)
        return None if paid is None or would is None else round(paid - would, 6)
