"""Aggregates over call records: summaries with percentiles, and Prometheus metrics.

`summarize` is shared by `GET /_sidecar/stats` (recent calls in memory) and
`sidecar stats` (records read back from the state directory), so both say the
same thing. `Stats` keeps counters and histograms updated per call in O(1).
Its label sets stay bounded in a long-lived shared sidecar: at most
`max_agents` agents and `max_models` models (any client may send any model
name) have series of their own; when a new one comes, the one seen least
recently is folded into `agent="other"` / `model="other"` (its counts added
there, so every total stays monotonic) and its series leave the exposition.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter, OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import Any, Iterable

# LLM calls take from a millisecond (a hit) to minutes (a long generation).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
HISTOGRAMS = {  # record field -> (metric, help, buckets)
    "total_ms": ("sidecar_call_duration_seconds", "Time from request to last byte.", LATENCY_BUCKETS),
    "ttft_ms": ("sidecar_time_to_first_token_seconds", "Time from request to the first content token.", LATENCY_BUCKETS),
    "queue_ms": ("sidecar_queue_wait_seconds", "Time waiting for a concurrency slot.", LATENCY_BUCKETS),
    "overhead_ms": ("sidecar_overhead_seconds", "Time the sidecar itself added.", OVERHEAD_BUCKETS),
}
PHASES = ("total_ms", "ttft_ms", "queue_ms", "overhead_ms")
# Token counts a record carries beside input and output (proxy/usage.py).
TOKEN_KINDS = ("cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens", "reasoning_tokens")
MAX_AGENT_LABELS = 100   # agents with series of their own in /_sidecar/metrics; the rest are agent="other"
MAX_MODEL_LABELS = 50    # models with series of their own; the rest are model="other"
OTHER = "other"


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); values need not be sorted."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def is_error(record: dict) -> bool:
    return bool(record.get("error")) or record.get("status", 0) >= 400


def day_of(record: dict) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(record.get("ts", 0)))


def summarize(records: Iterable[dict], by: str | None = None) -> dict[str, Any]:
    """Totals, and per group when `by` names a record field (model, agent, route, session) or is "day"."""
    groups: dict[str, list[dict]] = defaultdict(list)
    everything: list[dict] = []
    for record in records:
        everything.append(record)
        if by:
            groups[(day_of(record) if by == "day" else record.get(by)) or "-"].append(record)
    result = {"all": _summary(everything)}
    if by:
        result["by"] = by
        result["groups"] = {name: _summary(rows) for name, rows in sorted(groups.items())}
    return result


def _summary(records: list[dict]) -> dict[str, Any]:
    cacheable = [r for r in records if r.get("cache") in ("hit", "miss", "coalesced")]
    hits = [r for r in records if r.get("cache") in ("hit", "coalesced")]
    errors = Counter(r.get("error") or f"http_{r.get('status')}" for r in records if is_error(r))
    out: dict[str, Any] = {
        "calls": len(records), "hits": len(hits),
        "hit_rate": round(len(hits) / len(cacheable), 4) if cacheable else None,
        "input_tokens": sum(r.get("input_tokens", 0) for r in records),
        "output_tokens": sum(r.get("output_tokens", 0) for r in records),
        "saved_tokens": sum(r.get("input_tokens", 0) + r.get("output_tokens", 0) for r in hits),
        "saved_upstream_s": round(exact_sum(r.get("saved_s") for r in hits), 3),
        "errors": dict(errors), "retries": sum(r.get("retries", 0) for r in records),
        **_money(records, hits),
    }
    for phase in PHASES:
        values = [r[phase] for r in records if r.get(phase) is not None]
        out[phase.removesuffix("_ms")] = {f"p{q}": _round(percentile(values, q)) for q in (50, 90, 95, 99)}
    return out


def _money(records: list[dict], hits: list[dict]) -> dict[str, Any]:
    """Tokens by kind, dollars spent and saved (with how many calls had no known price), and the provider's
    prompt-cache hit ratio over the calls that went upstream."""
    out: dict[str, Any] = {k: sum(r.get(k) or 0 for r in records) for k in TOKEN_KINDS}
    upstream = [r for r in records if r.get("cache") not in ("hit", "coalesced")]
    spent = [r.get("cost_usd", 0.0) for r in records]
    saved = [r.get("saved_usd", 0.0) for r in hits]
    sent = sum(r.get("input_tokens") or 0 for r in upstream)
    out.update(cost_usd=round(exact_sum(spent), 8), cost_unknown=spent.count(None),
               saved_usd=round(exact_sum(saved), 8), saved_unknown=saved.count(None),
               prompt_cache_ratio=round(sum(r.get("cache_read_tokens") or 0 for r in upstream) / sent, 4)
               if sent else None)
    return out


def exact_sum(values) -> float:
    """The correctly rounded sum of the finite values (None and inf count as nothing): the same whatever the
    order, so figures kept as records come and go (rolling.py) equal the ones summed from the records."""
    return math.fsum(v for v in values if v is not None and math.isfinite(v))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# Per-agent counter families beside calls and tokens: metric -> help.
MONEY = {
    "sidecar_prompt_cache_tokens_total": "Input tokens read from (kind=read) or written to (kind=write) the "
                                         "provider's prompt cache; part of direction=input.",
    "sidecar_reasoning_tokens_total": "Output tokens spent reasoning; part of direction=output.",
    "sidecar_cost_usd_total": "Dollars spent upstream (genai-prices), by agent and model; calls with no known price "
                              "are counted in sidecar_unpriced_calls_total instead.",
    "sidecar_unpriced_calls_total": "Calls whose model has no known price: their cost is unknown, not 0.",
}
MAX_SESSIONS = 1000   # sessions whose totals the live page shows; the least recently active are dropped
MAX_SHAPES = 4096     # remembered series keys (agent, route, model, cache, status); past it they are made anew


@dataclass(frozen=True, slots=True)
class SeriesKeys:
    """The label tuples one kind of call counts under."""
    call: tuple
    tokens_in: tuple
    tokens_out: tuple
    by_model: tuple
    cache_read: tuple
    cache_write: tuple
    model_only: tuple


class Stats:
    """Live counters and histograms, plus the most recent records for summaries."""

    def __init__(self, window: int = 5000, max_agents: int = MAX_AGENT_LABELS, max_models: int = MAX_MODEL_LABELS):
        self.recent: deque[dict] = deque(maxlen=window)
        self.max_agents = max_agents
        self.max_models = max_models
        # label -> value -> the series carrying it, as (family, key); least recently seen first
        self.series: dict[str, OrderedDict[str, set[tuple]]] = {"agent": OrderedDict(), "model": OrderedDict()}
        self.calls: Counter[tuple] = Counter()
        self.tokens: Counter[tuple] = Counter()
        self.money: dict[str, Counter[tuple]] = {name: Counter() for name in MONEY}
        self.saved_tokens = 0
        self.saved_seconds = 0.0
        self.saved_usd = 0.0
        self.errors: Counter[str] = Counter()
        self.histograms: dict[str, dict[tuple, list]] = {field: {} for field in HISTOGRAMS}
        # session -> [calls, dollars, unpriced calls, input tokens upstream, cache reads upstream]
        self.sessions: OrderedDict[str, list] = OrderedDict()
        self._keys: dict[tuple, SeriesKeys] = {}   # (agent, route, model, cache, status) -> its series keys

    def observe(self, record: dict) -> None:
        self.recent.append(record)
        agent = self._label("agent", record["agent"], self.max_agents)
        model = self._label("model", record["model"] or "-", self.max_models)
        shape = (agent, record["route"], model, record["cache"] or "none", record["status"])
        keys = self._keys.get(shape) or self._keys_of(shape)
        self.calls[keys.call] += 1
        self.tokens[keys.tokens_in] += record["input_tokens"]
        self.tokens[keys.tokens_out] += record["output_tokens"]
        hit = record["cache"] in ("hit", "coalesced")
        if not hit:
            cost = record.get("cost_usd")
            money, by_model = self.money, keys.by_model
            money["sidecar_prompt_cache_tokens_total"][keys.cache_read] += record["cache_read_tokens"]
            money["sidecar_prompt_cache_tokens_total"][keys.cache_write] += record["cache_write_tokens"]
            money["sidecar_reasoning_tokens_total"][by_model] += record["reasoning_tokens"]
            money["sidecar_cost_usd_total"][by_model] += cost or 0.0
            money["sidecar_unpriced_calls_total"][by_model] += 1 if cost is None else 0
        else:
            self.saved_tokens += record["input_tokens"] + record["output_tokens"]
            self.saved_seconds += record.get("saved_s") or 0.0
            self.saved_usd += record.get("saved_usd") or 0.0
        if record.get("session"):
            self._session(record, hit)
        if is_error(record):
            self.errors[record["error"] or f"http_{record['status']}"] += 1
        for field, (_, _, buckets) in HISTOGRAMS.items():
            value = record.get(field)
            if value is None:
                continue
            series = self.histograms[field].get(keys.model_only)
            if series is None:
                series = self.histograms[field][keys.model_only] = [0] * (len(buckets) + 1) + [0.0]
            series[bisect.bisect_left(buckets, value / 1000)] += 1
            series[-1] += value / 1000

    def _keys_of(self, shape: tuple) -> "SeriesKeys":
        """The series keys of one (agent, route, model, cache, status), made once and remembered: the label
        tuples are the same call after call. Each key is filed under its agent's and model's series here,
        so folding that agent or model into "other" finds it (and forgets every remembered shape)."""
        agent, route, model, cache, status = shape
        labels = (("agent", agent), ("route", route), ("model", model))
        by_model = labels[:1] + labels[2:]
        keys = SeriesKeys(call=labels + (("cache", cache), ("status", str(status))),
                          tokens_in=by_model + (("direction", "input"),),
                          tokens_out=by_model + (("direction", "output"),),
                          by_model=by_model, cache_read=by_model + (("kind", "read"),),
                          cache_write=by_model + (("kind", "write"),), model_only=labels[2:])
        counters = [("calls", keys.call), ("tokens", keys.tokens_in), ("tokens", keys.tokens_out)]
        if cache not in ("hit", "coalesced"):
            counters += [("sidecar_prompt_cache_tokens_total", keys.cache_read),
                         ("sidecar_prompt_cache_tokens_total", keys.cache_write),
                         *((name, by_model) for name in MONEY if name != "sidecar_prompt_cache_tokens_total")]
        if agent != OTHER:
            self.series["agent"][agent].update(counters)
        if model != OTHER:
            self.series["model"][model].update(counters + [(field, keys.model_only) for field in HISTOGRAMS])
        if len(self._keys) >= MAX_SHAPES:
            self._keys.clear()
        self._keys[shape] = keys
        return keys

    def _session(self, record: dict, hit: bool) -> None:
        totals = self.sessions.get(record["session"])
        if totals is None:
            totals = self.sessions[record["session"]] = [0, 0.0, 0, 0, 0]
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        else:
            self.sessions.move_to_end(record["session"])
        totals[0] += 1
        if not hit:
            cost = record.get("cost_usd")
            totals[1] += cost or 0.0
            totals[2] += cost is None
            totals[3] += record["input_tokens"]
            totals[4] += record["cache_read_tokens"]

    def session_view(self, sid: str) -> dict[str, Any]:
        """A session's calls, dollars (None: unknown), and its prompt-cache hit ratio, as this sidecar saw them."""
        calls, cost, unpriced, sent, read = self.sessions.get(sid) or (0, 0.0, 0, 0, 0)
        return {"calls": calls, "cost_usd": None if unpriced and not cost else round(cost, 8),
                "cost_unknown": unpriced, "prompt_cache_ratio": round(read / sent, 4) if sent else None}

    def _label(self, name: str, value: str, limit: int) -> str:
        """The value's own label, or "other" once `limit` others were seen more recently. O(1) per call;
        folding a value costs its own series, once."""
        seen = self.series[name]
        if value == OTHER or value in seen:
            if value != OTHER:
                seen.move_to_end(value)
            return value
        if limit <= 0:
            return OTHER
        if len(seen) >= limit:
            _, series = seen.popitem(last=False)
            for family, key in series:
                self._fold(name, family, key)
            self._keys.clear()   # remembered keys may carry the folded value
        seen[value] = set()
        return value

    def _fold(self, name: str, family: str, key: tuple) -> None:
        """Add one series into its `name="other"` twin; the twin stays known under its other label."""
        store = self.calls if family == "calls" else self.tokens if family == "tokens" else \
            self.money[family] if family in self.money else self.histograms[family]
        if key not in store:
            return
        twin = tuple((k, OTHER if k == name else v) for k, v in key)
        if isinstance(store, Counter):
            store[twin] += store.pop(key)
        else:
            moved = store.pop(key)
            store[twin] = [a + b for a, b in zip(store[twin], moved)] if twin in store else moved
        for label, value in key:
            if label != name and label in self.series and value in self.series[label]:
                self.series[label][value].discard((family, key))
                self.series[label][value].add((family, twin))

    def prometheus(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("sidecar_calls_total", "counter", "API calls by agent, route, model, cache outcome and status.")
        lines += [f"sidecar_calls_total{_labels(k)} {v}" for k, v in sorted(self.calls.items())]
        family("sidecar_tokens_total", "counter", "Tokens in and out, as reported by the API's usage.")
        lines += [f"sidecar_tokens_total{_labels(k)} {v}" for k, v in sorted(self.tokens.items())]
        family("sidecar_cache_saved_tokens_total", "counter", "Tokens not spent thanks to cache hits.")
        lines.append(f"sidecar_cache_saved_tokens_total {self.saved_tokens}")
        family("sidecar_cache_saved_seconds_total", "counter", "Upstream seconds not waited thanks to cache hits.")
        lines.append(f"sidecar_cache_saved_seconds_total {self.saved_seconds:.6f}")
        family("sidecar_cache_saved_usd_total", "counter", "Dollars not spent thanks to the sidecar's cache hits.")
        lines.append(f"sidecar_cache_saved_usd_total {self.saved_usd:.8f}")
        for name, help_text in MONEY.items():
            family(name, "counter", help_text)
            lines += [f"{name}{_labels(k)} {v:.8f}" if isinstance(v, float) else f"{name}{_labels(k)} {v}"
                      for k, v in sorted(self.money[name].items())]
        family("sidecar_errors_total", "counter", "Failed calls by error type.")
        lines += [f"sidecar_errors_total{_labels([('type', k)])} {v}" for k, v in sorted(self.errors.items())]
        for field, (name, help_text, buckets) in HISTOGRAMS.items():
            family(name, "histogram", help_text)
            for labels, series in sorted(self.histograms[field].items()):
                running = 0
                for bound, count in zip([*buckets, "+Inf"], series[:-1]):
                    running += count
                    lines.append(f"{name}_bucket{_labels([*labels, ('le', str(bound))])} {running}")
                lines.append(f"{name}_sum{_labels(labels)} {series[-1]:.6f}")
                lines.append(f"{name}_count{_labels(labels)} {running}")
        for name, (help_text, value) in gauges.items():
            family(name, "gauge", help_text)
            lines.append(f"{name} {value}")
        return "\n".join(lines) + "\n"
