"""Watch one upstream answer go by: its end, whether it is well formed, its usage, its first token.

The capture sees every chunk the agent receives, in order, and never changes
one. It knows when an answer has ended properly (`message_stop`, `[DONE]`, a
Gemini stream that ended with a `finishReason`, a complete JSON body), which is
the only kind worth storing or checkpointing;
anything malformed (an event that is not JSON, a shape the API never sends,
an `error` event, bytes after the end) is relayed as it came and marked so.
It notes the first content token and the token counts for the call's record.
A stream's answer is built event by event as its chunks pass (sse.py's
assemblies), so the chunk that ends a long answer costs what its own events do.
It is handed the call with each chunk and keeps no reference to it: a call
holding its capture holding the call would be a cycle, which only the cyclic
collector frees (a stall, and the request's body kept until it runs).
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import orjson

from . import gemini_api, responses_api
from .call import Call
from .convert import ASSEMBLY
from .encoding import STORABLE, decoded
from .sse import ANTHROPIC_END, MALFORMED, OPENAI_END, Assembly, EventParser
from .usage import flavor_of, merge, of_answer, usage_of


WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def well_formed(path: str, doc: Any) -> bool:
    """A JSON answer of the shape its route returns (an error body sent with 200 is not)."""
    if path == responses_api.PATH:
        return responses_api.well_formed(doc)
    if not isinstance(doc, dict) or "error" in doc:
        return False
    if gemini_api.method_of(path) is not None:
        return gemini_api.well_formed(path, doc)
    if path == "/v1/messages":
        return doc.get("type") == "message" and isinstance(doc.get("content"), list)
    if path == "/v1/chat/completions":
        return isinstance(doc.get("choices"), list)
    return True


class Capture:
    __slots__ = ("api", "path", "sse", "encoding", "pacing", "complete", "malformed", "answer", "responses", "_parser",
                 "_inflate", "_assembly", "_t0", "_flavor", "_usage_block")

    def __init__(self, call: Call, sse: bool, encoding: str, keep_pacing: bool):
        self.api, self.path = call.route.api, call.route.path
        self.sse = sse
        self.encoding = encoding.strip().lower()
        self.pacing: list[tuple[float, int]] | None = [] if keep_pacing else None   # (s after first chunk, length)
        self.complete = False            # ended properly
        self.malformed = self.encoding not in STORABLE
        self.answer: dict | None = None  # the answer as the JSON body of a non-streaming call
        self.responses = responses_api.handles(call.route.api, call.route.path)
        # A compressed stream is read through a decompressor; what is relayed stays compressed.
        self._parser = EventParser() if sse and not self.malformed else None
        self._inflate = zlib.decompressobj(WBITS[self.encoding]) if self._parser and self.encoding in WBITS else None
        # The answer a stream makes, built event by event as it goes by (the Responses API's: by on_event).
        self._assembly: Assembly | None = None if self._parser is None or self.responses else ASSEMBLY[self.api]()
        self._t0 = 0.0
        self._flavor = flavor_of(call.route.api, call.route.path)
        self._usage_block: dict | None = None   # a stream's usage so far

    @property
    def storable(self) -> bool:
        return self.complete and not self.malformed and self.answer is not None

    def feed(self, call: Call, chunk: bytes) -> bool:
        """Take one chunk of `call`'s answer; True exactly once: when this chunk completes a stream."""
        if self.pacing is not None:
            now = time.monotonic()
            if not self.pacing:
                self._t0 = now
            self.pacing.append((round(now - self._t0, 4), len(chunk)))
        if self._parser is None:
            return False
        if self._inflate is not None:
            try:
                chunk = self._inflate.decompress(chunk)
            except zlib.error:
                self.malformed, self._parser = True, None
                return False
        if self.complete:
            if chunk.strip(b"\r\n"):   # anything but blank lines after the end: relayed, not an answer to keep
                self.malformed = True
            return False
        for name, data in self._parser.feed(chunk):
            if self.complete:        # anything after the end: relayed, but not an answer to keep
                self.malformed = True
                continue
            try:
                self._on_event(call, name, data)
                if self._assembly is not None and not self.malformed:
                    self._assembly.add(name, data)
            except MALFORMED:
                self.malformed = True
        if self.complete:
            tail = chunk.rstrip(b"\r\n")   # this chunk must end with the final event's data
            last = b"}" if self.api == "anthropic" or self.responses else OPENAI_END
            if tail and not tail.endswith(last):
                self.malformed = True
            self._assemble()
            return True
        return False

    def end(self, call: Call, body: bytes) -> bool:
        """`call`'s upstream body is over (`body`, for a JSON answer); True when that completes the answer."""
        if self.sse:
            return self._end_of_stream()
        try:
            doc = orjson.loads(decoded(body, self.encoding))
        except ValueError:
            self.malformed = True
            return False
        if not well_formed(self.path, doc):
            self.malformed = True
            return False
        self.complete = True
        self.answer = doc
        usage = of_answer(self._flavor, doc)
        if usage is not None:
            call.usage = usage
        return True

    def _end_of_stream(self) -> bool:
        """A Gemini stream has no end event: it is complete when it ends with no event left open."""
        if self.api != "gemini" or self._parser is None or self.complete:
            return False
        if self._inflate is not None and (not self._inflate.eof or self._inflate.unused_data):
            self.malformed = True
        if self._parser.feed(b"\n\n"):   # an event still open: the stream stopped in the middle of it
            self.malformed = True
        self.complete = True
        self._assemble()
        return self.storable

    def _on_event(self, call: Call, name: str, data: bytes) -> None:
        if self.responses:
            self.answer = responses_api.on_event(call, data)
            if self.answer is not None:
                self.complete = True
                self._usage(call, self.answer.get("usage"))
        elif self.api == "anthropic":
            if name == "content_block_delta":
                if not call.t_first_token:
                    call.t_first_token = time.monotonic()
            elif name == "message_start":
                message = orjson.loads(data).get("message")
                self._usage(call, message.get("usage") if isinstance(message, dict) else None)
            elif name == "message_delta":
                self._usage(call, orjson.loads(data).get("usage"))
            elif name == "error":
                self.malformed = True
            elif name == ANTHROPIC_END:
                self.complete = True
        elif self.api == "gemini":
            if not call.t_first_token and b'"text"' in data:
                call.t_first_token = time.monotonic()
            if gemini_api.error_in(data):
                self.malformed = True
            elif b'"usageMetadata"' in data:
                self._usage(call, orjson.loads(data).get("usageMetadata"))
        elif data == OPENAI_END:
            self.complete = True
        elif not call.t_first_token or b'"usage"' in data:
            chunk = orjson.loads(data)
            if not call.t_first_token and any(isinstance(c, dict) and (c.get("delta") or {}).get("content")
                                              for c in chunk.get("choices") or ()):
                call.t_first_token = time.monotonic()
            self._usage(call, chunk.get("usage"))

    def _usage(self, call: Call, block: Any) -> None:
        """A stream event's usage: merged into what earlier events said (Anthropic splits it in two)."""
        if isinstance(block, dict):
            self._usage_block = merge(self._usage_block, block)
            call.usage = usage_of(self._flavor, self._usage_block)

    def _assemble(self) -> None:
        assembly, self._assembly = self._assembly, None
        if self.malformed:
            return
        try:
            answer = self.answer if assembly is None else assembly.result()
        except MALFORMED:
            answer = None
        if not well_formed(self.path, answer):
            self.malformed = True
        self.answer = answer
