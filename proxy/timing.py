"""A call's phases as times, its record, and its Server-Timing header.

All times are monotonic and reported in milliseconds from the call's arrival.
queue = waiting for a limiter slot; upstream = request sent to last byte;
overhead = what the sidecar itself added: total - upstream - queue.
"""

from __future__ import annotations

import time
from typing import Any

from .call import Call


def _ms(start: float, end: float) -> float | None:
    return round((end - start) * 1000, 3) if end and start else None


def record_of(call: Call) -> dict[str, Any]:
    t0 = call.t_received
    done = call.t_done or time.monotonic()
    total = (done - t0) * 1000
    upstream = (done - call.t_sent) * 1000 if call.t_sent and call.cache_outcome not in ("hit", "coalesced") else 0.0
    queue = (call.t_slot - (call.t_lookup or t0)) * 1000 if call.t_slot else 0.0
    first_token = _ms(t0, call.t_first_token)
    generating = (done - call.t_first_token) if call.t_first_token else 0.0
    return {
        "id": call.id, "ts": round(call.wall_received, 3), "agent": call.route.agent, "api": call.route.api,
        "route": call.route.path, "method": call.method, "model": call.model, "status": call.status,
        "cache": call.cache_outcome, "stream": call.streamed, "error": call.error, "retries": call.retries,
        "input_tokens": call.input_tokens, "output_tokens": call.output_tokens,
        "cached_tokens": call.cached_tokens, "reasoning_tokens": call.reasoning_tokens, "bytes": call.bytes_out,
        "lookup_ms": _ms(t0, call.t_lookup), "slot_ms": _ms(t0, call.t_slot), "sent_ms": _ms(t0, call.t_sent),
        "ttfb_ms": _ms(t0, call.t_first_byte), "ttft_ms": first_token, "total_ms": round(total, 3),
        "queue_ms": round(queue, 3), "upstream_ms": round(upstream, 3),
        "overhead_ms": round(max(0.0, total - upstream - queue), 3),
        "tokens_per_s": round(call.output_tokens / generating, 1) if generating > 0 and call.output_tokens else None,
        "saved_s": call.saved_s,
    }


def server_timing(call: Call) -> str:
    """W3C Server-Timing with what is known when the headers go out."""
    now = time.monotonic()
    parts = [f'cache;desc="{call.cache_outcome or "none"}"']
    if call.t_slot:
        parts.append(f"queue;dur={(call.t_slot - (call.t_lookup or call.t_received)) * 1000:.3f}")
    if call.t_sent and call.t_first_byte and call.cache_outcome not in ("hit", "coalesced"):
        parts.append(f"upstream;dur={(call.t_first_byte - call.t_sent) * 1000:.3f}")
    parts.append(f"total;dur={(now - call.t_received) * 1000:.3f}")
    return ", ".join(parts)
