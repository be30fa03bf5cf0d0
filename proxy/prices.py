"""What a call cost in dollars, from genai-prices' price table (its data ships in the package).

The table is imported once, in a worker thread while the proxy already
serves (it takes a few hundred milliseconds; state.py records the calls that
end before it once it is there); a model's price is then matched once, the
first time the model is seen (well under a millisecond), and kept. A cost is
genai-prices' own calculation (a fraction of a millisecond), remembered per
model and usage: a cache hit replayed again costs a dictionary lookup. A model the table does not know costs None, shown as
"unknown": never $0. The prompt cache is priced as the provider bills it:
reads and writes (5 min and 1 h) apart from plain input, long-context tiers
by the whole input.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import datetime, timezone
from typing import Any

from .usage import PROVIDER, Usage

log = logging.getLogger("sidecar")
UNKNOWN = None       # the table has no price for this model
MAX_MODELS = 1000    # models remembered; a client inventing names cannot grow this without bound
MAX_COSTS = 20_000   # priced usages remembered
GEMINI_MODEL = re.compile(r"/models/([^/:]+):")


class Prices:
    def __init__(self):
        self._table: Any = None                        # genai-prices' snapshot, once loaded
        self._billed: Any = None                       # its Usage class
        self._known: dict[tuple[str, str], Any] = {}   # (provider, model) -> (model info, provider) | UNKNOWN
        # (provider, model, day, counts) -> dollars: a hit replayed again, or calls of one shape, priced once
        self._costs: dict[tuple, float | None] = {}

    async def load(self) -> None:
        """Import the table off the loop; without it every cost is unknown (and the proxy says why)."""
        try:
            self._table, self._billed = await asyncio.get_running_loop().run_in_executor(None, _load)
        except Exception as exc:
            log.warning("sidecar: no price table (%r): costs are 'unknown' and budgets cannot be enforced; "
                        "pip install genai-prices==0.2.3", exc)

    def cost(self, flavor: str, model: str, usage: Usage | None, when: float) -> float | None:
        """Dollars for this usage; 0 for none; None when the price is unknown."""
        if usage is None or not usage.tokens:
            return 0.0
        provider_id = PROVIDER.get(flavor, "")
        key = (provider_id, model, int(when // 86400), usage.input_tokens, usage.output_tokens,
               usage.cache_read_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens)
        if key in self._costs:
            return self._costs[key]
        if len(self._costs) >= MAX_COSTS:
            self._costs.clear()
        cost = self._costs[key] = self._price(self._find(provider_id, model), usage, when)
        return cost

    def _price(self, found: Any, usage: Usage, when: float) -> float | None:
        """genai-prices' own calculation (a fraction of a millisecond: its unit decomposition is generic)."""
        if found is UNKNOWN:
            return None
        info, provider = found
        billed = self._billed(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                              cache_read_tokens=usage.cache_read_tokens, cache_write_tokens=usage.cache_write_tokens,
                              cache_write_1h_tokens=usage.cache_write_1h_tokens)
        try:
            price = info.calc_price(billed, provider, genai_request_timestamp=datetime.fromtimestamp(when, timezone.utc))
        except ValueError:   # counts the table cannot price (more cached than input): unknown, not a guess
            return None
        return float(price.total_price)

    def _find(self, provider: str, model: str) -> Any:
        key = (provider, model)
        if key in self._known:
            return self._known[key]
        found = UNKNOWN
        if self._table is not None and model:
            try:
                found_provider, info = self._table.find_provider_model(model, None, provider or None, None)
                found = (info, found_provider)
            except LookupError:
                log.info("sidecar: genai-prices has no price for %s %r: its calls cost 'unknown'", provider, model)
        if len(self._known) >= MAX_MODELS:
            self._known.clear()
        self._known[key] = found
        return found


def _load() -> tuple[Any, Any]:
    """In a worker thread: the bundled table, warmed by one priced call (its first builds the unit registry)."""
    from genai_prices import Usage as Billed
    from genai_prices.data_snapshot import get_snapshot
    table = get_snapshot()
    provider, info = table.find_provider_model("claude-sonnet-4-5", None, "anthropic", None)
    info.calc_price(Billed(input_tokens=1, output_tokens=1), provider)
    return table, Billed


def model_of(call) -> str:
    """The model a call asked for: its body's `model`, or (Gemini) the one its path names."""
    if call.model:
        return call.model
    found = GEMINI_MODEL.search(call.route.path)
    return found.group(1) if found else ""
