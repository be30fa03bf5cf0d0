"""Watch one upstream answer go by: its bytes, pacing, end, tokens, first token.

The recorder sees every chunk the agent receives. It knows when a stream has
ended properly (`message_stop`, `[DONE]`), which is the only kind of stream
worth storing; it notes the first content token and the token counts for the
call's record; and it keeps what the cache needs to replay the answer.
"""

from __future__ import annotations

import gzip
import time
import zlib
from typing import Any

import orjson

from .call import Call
from .sse import ANTHROPIC_END, OPENAI_END, EventParser, assemble_anthropic, assemble_openai


def decoded(body: bytes, encoding: str) -> bytes:
    """A body without its content-encoding, for reading; what is relayed stays as it came."""
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding in ("", "identity"):
        return body
    raise ValueError(f"unsupported content-encoding {encoding!r}")


class Recorder:
    __slots__ = ("call", "api", "stream", "encoding", "keep", "chunks", "offsets", "events",
                 "complete", "_parser", "_t0", "_parsed")

    def __init__(self, call: Call, stream: bool, encoding: str, keep: bool):
        self.call = call
        self.api = call.route.api
        self.stream = stream
        self.encoding = encoding
        self.keep = keep                 # keep the bytes (the answer may be stored)
        self.chunks: list[bytes] = []
        self.offsets: list[tuple[float, int]] = []
        self.events: list[tuple[str, bytes]] = []
        self.complete = False
        self._parsed: dict | None = None   # a JSON answer, parsed once for tokens and checkpoint
        self._parser = EventParser() if stream and not encoding else None
        self._t0 = 0.0

    def feed(self, chunk: bytes) -> bool:
        """Take one chunk; True when it ends the answer."""
        now = time.monotonic()
        if self.keep:
            if not self.chunks:
                self._t0 = now
            self.chunks.append(chunk)
            self.offsets.append((round(now - self._t0, 4), len(chunk)))
        if not self.stream:
            self.complete = True
            self._json_usage(chunk)
            return True
        if self._parser is None:
            return False
        for name, data in self._parser.feed(chunk):
            self.events.append((name, data))
            self._on_event(name, data, now)
        return self.complete

    def _on_event(self, name: str, data: bytes, now: float) -> None:
        call = self.call
        if self.api == "anthropic":
            if name == "content_block_delta":
                if not call.t_first_token:
                    call.t_first_token = now
            elif name == "message_start":
                usage = orjson.loads(data).get("message", {}).get("usage") or {}
                call.input_tokens = usage.get("input_tokens", 0) or 0
            elif name == "message_delta":
                usage = orjson.loads(data).get("usage") or {}
                call.output_tokens = usage.get("output_tokens", call.output_tokens) or 0
            elif name == ANTHROPIC_END:
                self.complete = True
        elif data == OPENAI_END:
            self.complete = True
        else:
            chunk = orjson.loads(data)
            if not call.t_first_token and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                call.t_first_token = now
            if chunk.get("usage"):
                self._openai_usage(chunk["usage"])

    def _json_usage(self, body: bytes) -> None:
        try:
            parsed = orjson.loads(decoded(body, self.encoding))
            usage = parsed.get("usage") or {}
        except (ValueError, AttributeError, OSError, zlib.error):
            return
        self._parsed = parsed
        if self.api == "anthropic":
            self.call.input_tokens = usage.get("input_tokens", 0) or 0
            self.call.output_tokens = usage.get("output_tokens", 0) or 0
        else:
            self._openai_usage(usage)

    def _openai_usage(self, usage: dict) -> None:
        self.call.input_tokens = usage.get("prompt_tokens", 0) or 0
        self.call.output_tokens = usage.get("completion_tokens", 0) or 0

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def message(self) -> dict[str, Any] | None:
        """The answer as the JSON body of a non-streaming call."""
        if not self.complete:
            return None
        if self.stream:
            return assemble_anthropic(self.events) if self.api == "anthropic" else assemble_openai(self.events)
        if self._parsed is not None:
            return self._parsed
        try:
            return orjson.loads(decoded(self.body, self.encoding))
        except (ValueError, OSError, zlib.error):
            return None
