"""The providers' prompt caches as the mock keeps them, so its usage blocks carry real cache counts.

Anthropic (explicit): a request is a sequence of blocks, in the order the API
caches them: tools, system blocks, then each message's content blocks. A block
with `cache_control` is a breakpoint: the prefix up to it is written to the
cache (5 min, or 1 h with `"ttl": "1h"`) if it is at least the model's minimum
(1024 tokens; 2048 for Haiku 3/3.5, 4096 for Haiku 4.5 and Opus 4.5). The
longest prefix, ending at any block boundary up to the last breakpoint, that
an earlier request cached is read; what lies between it and the last
breakpoint is written, split by the TTL of the breakpoint that ends each part;
the rest is plain input. Claude Code's first system block, its
`x-anthropic-billing-header:` line (which changes per prompt), is attribution
the API reads as a header: it is neither prompt nor cached.

OpenAI (automatic): a prompt of 1024 tokens or more is cached in 128-token
steps; `cached_tokens` is the prefix it shares with the latest prompt that
began with the same 1024 tokens (OpenAI routes prompts by their head).

A token is 4 bytes of the block's JSON here, as everywhere in the mock.
"""

from __future__ import annotations

import hashlib
import time

import orjson

TTL = {"5m": 300.0, "1h": 3600.0}
MAX_ENTRIES = 200_000   # prefixes remembered; beyond, the cache starts afresh (as an eviction would)
MAX_PROMPTS = 256       # OpenAI prompts remembered (one per head)
OPENAI_MIN, OPENAI_STEP = 1024, 128
BILLING_LINE = "x-anthropic-billing-header:"   # Claude Code's attribution line: read as a header, not as prompt
FRAMING = 4             # input tokens a request has beyond its blocks (the model, the roles' framing)


def tokens(data: bytes) -> int:
    return len(data) // 4


def minimum(model: str) -> int:
    model = str(model)
    if "haiku-4-5" in model or "opus-4-5" in model:
        return 4096
    if "haiku-3" in model or "3-haiku" in model or "3-5-haiku" in model:
        return 2048
    return 1024


def blocks_of(data: dict) -> list[tuple[bytes, str | None]]:
    """The request's blocks in cache order: (its bytes without the marker, the TTL of its marker or None)."""
    out: list[tuple[bytes, str | None]] = []

    def add(block, role: str = "") -> None:
        marker = block.get("cache_control") if isinstance(block, dict) else None
        if isinstance(block, dict) and "cache_control" in block:
            block = {k: v for k, v in block.items() if k != "cache_control"}
        ttl = (marker.get("ttl") or "5m") if isinstance(marker, dict) else None
        out.append((role.encode() + orjson.dumps(block, option=orjson.OPT_SORT_KEYS), ttl if ttl in TTL else None))

    for tool in data.get("tools") or ():
        add(tool)
    system = data.get("system")
    for block in ([{"type": "text", "text": system}] if isinstance(system, str) else system or ()):
        if not (isinstance(block, dict) and str(block.get("text", "")).startswith(BILLING_LINE)):
            add(block)
    for message in data.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        role = str(message.get("role"))
        for block in ([{"type": "text", "text": content}] if isinstance(content, str) else
                      content if isinstance(content, list) else [content]):
            add(block, role)
            role = ""
    return out


def common_prefix(a: bytes, b: bytes, step: int = 65536) -> int:
    """The length of the prefix two byte strings share: block by block, then by halves inside the first block
    that differs (a few C-speed comparisons, no byte loop)."""
    limit = min(len(a), len(b))
    start = 0
    while start < limit and a[start:start + step] == b[start:start + step]:
        start += step
    low, high = start, min(start + step, limit)
    while low < high:
        mid = (low + high + 1) // 2
        if a[start:mid] == b[start:mid]:
            low = mid
        else:
            high = mid - 1
    return min(low, limit)


class PromptCache:
    def __init__(self):
        self.entries: dict[bytes, float] = {}   # prefix digest -> when it expires
        self.prompts: dict[bytes, tuple[bytes, float]] = {}   # OpenAI: digest of a head -> (latest prompt, expiry)

    def _live(self, digest: bytes, now: float) -> bool:
        return self.entries.get(digest, 0.0) > now

    def _keep(self, digest: bytes, until: float) -> None:
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        self.entries[digest] = max(until, self.entries.get(digest, 0.0))

    def anthropic(self, data: dict, write: bool = True) -> dict:
        """The input side of an Anthropic usage block for this request (`write` False: count only)."""
        blocks = blocks_of(data)
        now = time.time()
        digest, ends, digests = hashlib.blake2b(digest_size=16), [], []
        at = 0
        for raw, _ in blocks:
            digest.update(raw)
            at += tokens(raw)
            ends.append(at)
            digests.append(digest.copy().digest())
        total = at + FRAMING
        breaks = [i for i, (_, ttl) in enumerate(blocks) if ttl] if write else []
        read = wrote = write_1h = 0
        least = minimum(data.get("model", ""))
        if breaks:
            last = breaks[-1]
            hit = next((i for i in range(last, -1, -1) if ends[i] >= least and self._live(digests[i], now)), None)
            read = ends[hit] if hit is not None else 0
            if hit is not None:
                self._keep(digests[hit], now + TTL["5m"])   # a read refreshes the entry
            if ends[last] >= least:
                start = read
                for i in breaks:
                    if ends[i] > start:
                        part = ends[i] - start
                        wrote += part
                        write_1h += part if blocks[i][1] == "1h" else 0
                        start = ends[i]
                    if ends[i] >= least:
                        self._keep(digests[i], now + TTL[blocks[i][1]])
        return {"input_tokens": total - read - wrote, "cache_creation_input_tokens": wrote,
                "cache_read_input_tokens": read,
                "cache_creation": {"ephemeral_5m_input_tokens": wrote - write_1h, "ephemeral_1h_input_tokens": write_1h}}

    def openai(self, prompt: bytes) -> int:
        """The cached tokens of an OpenAI prompt: its common prefix with the latest prompt that began the same
        way (OpenAI routes a prompt by its head, so that is the cache it meets), floored to 1024 + 128k tokens."""
        now = time.time()
        head = hashlib.blake2b(prompt[:OPENAI_MIN * 4], digest_size=16).digest()
        before, expires = self.prompts.get(head, (b"", 0.0))
        if len(prompt) >= OPENAI_MIN * 4:
            if len(self.prompts) >= MAX_PROMPTS:
                self.prompts.clear()
            self.prompts[head] = (prompt, now + TTL["5m"])
        if expires <= now:
            return 0
        shared = common_prefix(before, prompt) // 4   # tokens, at 4 bytes each
        return 0 if shared < OPENAI_MIN else OPENAI_MIN + (shared - OPENAI_MIN) // OPENAI_STEP * OPENAI_STEP
