"""The W3C trace context of an agent run: the TRACEPARENT `sidecar run` gives the agent.

An agent instrumented with OpenTelemetry reads TRACEPARENT from its environment, so its own spans
join the run's trace; the sidecar makes each call's span a child of the agent's `traceparent`
header, or of the run's context when the call carries none.
"""

from __future__ import annotations

import re
import secrets

TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def valid(value: object) -> bool:
    return isinstance(value, str) and TRACEPARENT.fullmatch(value) is not None


def for_run(inherited: str | None) -> str:
    """The run's context: the one the launcher itself runs in (it is part of a larger trace), else a new
    trace, sampled."""
    if valid(inherited):
        return inherited
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
