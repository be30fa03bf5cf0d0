"""The W3C trace context of an agent run: the TRACEPARENT `sidecar run` gives the agent.

An agent instrumented with OpenTelemetry reads TRACEPARENT from its environment, so its own spans
join the run's trace; the sidecar makes each call's span a child of the agent's `traceparent`
header, or of the run's context when the call carries none, and exports the run's own span
(`invoke_agent <agent>`) when the agent exits.
"""

from __future__ import annotations

import re
import secrets

TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def valid(value: object) -> bool:
    return isinstance(value, str) and TRACEPARENT.fullmatch(value) is not None


def for_run(inherited: str | None) -> dict:
    """The run's context, as the agent event carries it: the one the launcher itself runs in (it is part
    of a larger trace, whose span is someone else's), else a new trace whose root span is the run
    (`trace_root`: the sidecar exports it, so the agent's spans and the calls' have their parent)."""
    if valid(inherited):
        return {"traceparent": inherited}
    return {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01", "trace_root": True}


def ids_of(traceparent: str) -> tuple[int, int]:
    """The trace id and span id of a valid traceparent, as integers."""
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)
