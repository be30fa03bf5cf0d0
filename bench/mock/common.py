"""What every emulated API shares: reply words, ids, SSE framing, the profile, a request seen."""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field

import orjson

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
    "mike november oscar papa quebec romeo sierra tango uniform victor whiskey "
    "xray yankee zulu amber birch cedar dune ember fjord glade harbor island "
    "jasper kernel lantern meadow nectar orchid pebble quartz river saffron "
    "timber umbra velvet willow xenon yarrow zephyr anchor beacon canyon "
    "drift eclipse falcon granite horizon ivory jungle koala lotus"
).split()
assert len(WORDS) == 64  # a byte & 63 picks a word
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


def rand(n: int) -> str:
    return "".join(random.choices(ALNUM, k=n))


def sse(event: str, data: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def words_of(material: bytes, n: int) -> list[str]:
    """n words chosen by a hash of the request: same request, same text."""
    return [WORDS[b & 63] for b in hashlib.shake_256(material).digest(n)] if n > 0 else []


def deltas(words: list[str]) -> list[str]:
    """Stream pieces whose concatenation equals ' '.join(words)."""
    return [w + " " for w in words[:-1]] + words[-1:]


@dataclass
class Profile:
    ttft: float = 0.0               # seconds before the first byte of an answer (JSON or stream)
    tokens_per_second: float = 0.0  # streaming pace between deltas; 0 = no delay
    output_tokens: int = 12         # words in a generated reply (each word one token / one delta)
    max_concurrency: int = 0        # 0 = unlimited; beyond it answer 429 with retry-after
    retry_after: float = 1.0        # seconds sent in retry-after on 429/529 (also retry-after-ms)
    validate: bool = True           # validate Anthropic message structure as the real API does
    rate_requests: int = 0          # requests per rate_window (token bucket); 0 = the mock's large default
    rate_input_tokens: int = 0      # input tokens per rate_window; beyond them a 429 with retry-after
    rate_window: float = 60.0       # seconds an empty bucket takes to refill
    wall_latency: float = 0.05      # seconds an overload wall takes to answer each call


@dataclass
class Received:
    """One request as the mock saw it."""
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: object | None
    at: float = field(default_factory=time.monotonic)


class Fail(Exception):
    """An error answer decided before the response starts (status + body)."""
    def __init__(self, status: int, kind: str, message: str, **kw):
        self.status, self.kind, self.message, self.kw = status, kind, message, kw

