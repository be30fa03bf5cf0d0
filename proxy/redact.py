"""Secret redaction: mask what looks like an API key or a credential in bytes about to leave the sidecar.

An agent's command line (shown by the monitor) may carry a key; the pattern
replaces only token characters, so a redacted JSON document stays valid JSON.
"""

from __future__ import annotations

import re

SECRETS = re.compile(rb"(?<![A-Za-z0-9])(sk-[A-Za-z0-9]{0,12})[A-Za-z0-9_\-]{8,}"           # sk-ant-..., sk-proj-...
                     rb"|(?<![A-Za-z0-9])(AIza)[A-Za-z0-9_\-]{30,}"                            # a Google API key
                     rb"|(?i:((?:(?:api|access|auth|secret)[_-]?(?:key|token)|password|bearer)"  # name=, name: , name
                     rb"(?:\"?\s*[:=]\s*\"?|\s+)))[A-Za-z0-9._~+/=\-]{4,}")   # only token characters: JSON stays valid


# What any match contains, in lower case: a document with none of these has nothing to mask (a scan in C per
# literal is tens of times faster than the pattern's, which tries its alternatives at every byte).
TRIGGERS = (b"sk-", b"aiza", b"password", b"bearer",
            *(name + sep + kind for name in (b"api", b"access", b"auth", b"secret") for sep in (b"", b"_", b"-")
              for kind in (b"key", b"token")))


def redact(data: bytes) -> bytes:
    """Mask what looks like a credential (an agent's command line may carry one)."""
    lowered = data.lower()
    if not any(trigger in lowered for trigger in TRIGGERS):
        return data
    return SECRETS.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + b"***", data)
