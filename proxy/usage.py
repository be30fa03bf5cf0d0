"""Token usage as each API reports it, read into one shape.

    flavor     where the usage is                   what it says
    anthropic  usage (message_start + message_delta) input_tokens (uncached), cache_read_input_tokens,
                                                     cache_creation_input_tokens (+ cache_creation.
                                                     ephemeral_5m/1h_input_tokens), output_tokens
    chat       usage (last chunk, if asked for)      prompt_tokens (cached included), prompt_tokens_details.
                                                     cached_tokens, completion_tokens (reasoning included),
                                                     completion_tokens_details.reasoning_tokens
    responses  response.usage                        input_tokens, input_tokens_details.cached_tokens,
                                                     output_tokens, output_tokens_details.reasoning_tokens
    gemini     usageMetadata (every chunk, cumulative) promptTokenCount (cached included),
                                                     cachedContentTokenCount, candidatesTokenCount,
                                                     thoughtsTokenCount (billed as output), toolUsePromptTokenCount

`Usage` counts the way OpenTelemetry's gen_ai.usage.* and genai-prices do:
`input_tokens` is every input token, cached reads and cache writes included;
`output_tokens` every output token, reasoning included. The mappings follow
genai-prices' own extractors, so a priced usage is what the provider bills.
The usage block itself is kept too (`raw`), as the API sent it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RAW_LIMIT = 40   # keys of a usage block kept in a record; a block the APIs never send is not kept whole

# flavor -> [(path in the usage block, field of Usage)]; a field named by several paths is their sum.
MAPPINGS: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "anthropic": [(("input_tokens",), "input_tokens"), (("cache_read_input_tokens",), "input_tokens"),
                  (("cache_creation_input_tokens",), "input_tokens"),
                  (("cache_read_input_tokens",), "cache_read_tokens"),
                  (("cache_creation_input_tokens",), "cache_write_tokens"),
                  (("cache_creation", "ephemeral_1h_input_tokens"), "cache_write_1h_tokens"),
                  (("output_tokens",), "output_tokens")],
    "chat": [(("prompt_tokens",), "input_tokens"), (("prompt_tokens_details", "cached_tokens"), "cache_read_tokens"),
             (("completion_tokens",), "output_tokens"),
             (("completion_tokens_details", "reasoning_tokens"), "reasoning_tokens")],
    "responses": [(("input_tokens",), "input_tokens"), (("input_tokens_details", "cached_tokens"), "cache_read_tokens"),
                  (("output_tokens",), "output_tokens"),
                  (("output_tokens_details", "reasoning_tokens"), "reasoning_tokens")],
    "gemini": [(("promptTokenCount",), "input_tokens"), (("toolUsePromptTokenCount",), "input_tokens"),
               (("cachedContentTokenCount",), "cache_read_tokens"), (("candidatesTokenCount",), "output_tokens"),
               (("thoughtsTokenCount",), "output_tokens"), (("thoughtsTokenCount",), "reasoning_tokens")],
}
# Where a JSON answer (or a stream's final event) keeps its usage block.
BLOCK = {"anthropic": "usage", "chat": "usage", "responses": "usage", "gemini": "usageMetadata"}
# The provider each flavor is priced as (genai-prices' provider ids).
PROVIDER = {"anthropic": "anthropic", "chat": "openai", "responses": "openai", "gemini": "google"}
COUNTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens",
          "reasoning_tokens")


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0            # all input, cache reads and writes included
    output_tokens: int = 0           # all output, reasoning included
    cache_read_tokens: int = 0       # input read from the provider's prompt cache
    cache_write_tokens: int = 0      # input written to it (Anthropic: 5 min and 1 h together)
    cache_write_1h_tokens: int = 0   # the part written with a 1 h lifetime
    reasoning_tokens: int = 0        # output spent thinking
    raw: dict | None = None          # the usage block as the API sent it

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def writes_reported(self) -> bool:
        """Whether the API says what it wrote to its cache (Anthropic does; OpenAI and Gemini cache implicitly)."""
        return bool(self.raw) and "cache_creation_input_tokens" in self.raw

    def fields(self) -> dict[str, Any]:
        """The counts and the block, as a call's record keeps them."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cache_read_tokens": self.cache_read_tokens, "cache_write_tokens": self.cache_write_tokens,
                "cache_write_1h_tokens": self.cache_write_1h_tokens, "reasoning_tokens": self.reasoning_tokens,
                "usage": self.raw}


def flavor_of(api: str, path: str) -> str:
    """Which usage shape a route answers with."""
    if api == "gemini" or ":generateContent" in path or ":streamGenerateContent" in path:
        return "gemini"
    if api == "anthropic":
        return "anthropic"
    return "responses" if path.startswith("/v1/responses") else "chat"


def count(value: Any) -> int:
    """A token count as the API reports it; anything else counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_of(flavor: str, block: Any) -> Usage | None:
    """The usage a block of this flavor reports; None when it is not a usage block."""
    if not isinstance(block, dict):
        return None
    totals = dict.fromkeys(COUNTS, 0)
    for path, name in MAPPINGS.get(flavor, ()):
        value: Any = block
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        totals[name] += count(value)
    return Usage(raw=block if len(block) <= RAW_LIMIT else None, **totals)


def merge(block: dict | None, update: Any) -> dict | None:
    """A stream's usage so far and a later event's usage: later counts replace earlier ones (as the SDKs do)."""
    if not isinstance(update, dict):
        return block
    if block is None:
        return dict(update)
    block.update((k, v) for k, v in update.items() if v is not None)
    return block


def of_answer(flavor: str, doc: Any) -> Usage | None:
    """The usage in a complete JSON answer (or a Responses stream's final `response`)."""
    return usage_of(flavor, doc.get(BLOCK[flavor])) if isinstance(doc, dict) else None


def from_meta(meta: dict) -> Usage:
    """The usage a stored entry's original call reported (entries from before the block was kept: in and out)."""
    usage = usage_of(meta.get("flavor", ""), meta.get("usage"))
    if usage is not None and meta.get("flavor"):
        return usage
    return Usage(input_tokens=count(meta.get("input_tokens")), output_tokens=count(meta.get("output_tokens")))
