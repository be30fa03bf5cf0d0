"""Server-sent events of both APIs: parse incrementally, assemble, re-emit.

One answer has two forms, a JSON body and an SSE stream. The cache stores
whichever form the upstream gave and serves the other on demand: `assemble`
turns a recorded stream into the JSON body the same request would have got
without streaming, `synthesize` turns a JSON body into the standard event
sequence the official SDKs parse.

Assembling is total: input that breaks its API's event grammar (data that is
not JSON, wrong types, block indexes out of range) raises MalformedStream and
nothing else, so a caller relays such an answer as it came and stores nothing.
It is incremental: an assembly takes each event as the stream brings it
(`add`) and joins the pieces once the stream has ended (`result`), so a long
answer's work is spread over its chunks, never done at once at its end, and
no event is kept after it was taken. `assemble_*(events)` do both for a
recorded stream.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import orjson

ANTHROPIC_END = "message_stop"
OPENAI_END = b"[DONE]"
BOM = b"\xef\xbb\xbf"


class MalformedStream(ValueError):
    """A recorded stream that does not follow its API's event grammar: relayed as it came, never stored."""


class EventParser:
    """Splits a byte stream into (event name, data bytes) as events complete, per the WHATWG SSE rules.

    Each chunk is scanned once: only the unfinished last line is carried over, as a list of pieces
    joined when its line ends, so a 1 MB event in 4 KB chunks costs no more than the same event whole.
    An event still open when the stream ends is never returned.
    """

    __slots__ = ("_line", "_data", "_name", "_after_cr", "_at_start")

    def __init__(self) -> None:
        self._line: list[bytes] = []      # pieces of the line not yet ended
        self._data: list[bytes] = []      # data lines of the event not yet dispatched
        self._name = b""
        self._after_cr = False            # the last chunk ended in \r: a \n starting the next one ends nothing
        self._at_start = True

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        if not chunk:
            return []
        if self._after_cr and chunk[0] == 0x0A:
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        last = lines.pop()
        if not lines:
            if last:
                self._line.append(last)
            return []
        if self._line:
            self._line.append(lines[0])
            lines[0] = b"".join(self._line)
            self._line = []
        if last:
            self._line.append(last)
        if self._at_start:
            self._at_start = False
            lines[0] = lines[0].removeprefix(BOM)
        events = []
        data = self._data
        name = self._name
        for line in lines:
            if not line:
                if data:
                    events.append((name.decode("utf-8", "replace") or "message", b"\n".join(data)))
                    data.clear()
                name = b""
            elif line.startswith(b"data: "):
                data.append(line[6:])
            elif line.startswith(b"event: "):
                name = line[7:]
            else:   # the general form; a comment (no field name), id, retry and unknown fields are skipped
                field, _, value = line.partition(b":")
                if value.startswith(b" "):
                    value = value[1:]
                if field == b"data":
                    data.append(value)
                elif field == b"event":
                    name = value
        self._name = name
        return events


# What hostile input raises as it is decoded and looked into: any of them makes a stream malformed
# (`assembled` raises MalformedStream for them, a capture marks its stream so).
MALFORMED = (ValueError, LookupError, TypeError, AttributeError)


class Assembly:
    """An answer built event by event (`add`), finished once its stream has ended (`result`); either may
    raise one of MALFORMED for input that breaks the API's grammar."""

    __slots__ = ()

    def add(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, Any] | None:
        raise NotImplementedError


def assembled(assembly: Assembly, events: list[tuple[str, bytes]]) -> dict[str, Any] | None:
    """A recorded stream's events, all taken by `assembly`: the answer they make (or MalformedStream)."""
    try:
        for name, data in events:
            assembly.add(name, data)
        return assembly.result()
    except MalformedStream:
        raise
    except MALFORMED as exc:
        raise MalformedStream(f"{type(assembly).__name__}: {type(exc).__name__}: {exc}") from exc


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise MalformedStream(f"{what} is {type(value).__name__}, not an object")
    return value


def _index(holder: dict, what: str, below: float = math.inf) -> int:
    """holder["index"] as a position: an int from 0, below `below` (len + 1 where a list grows by one)."""
    index = holder["index"]
    if type(index) is not int or not 0 <= index < below:
        raise MalformedStream(f"{what} index {index!r} is out of range")
    return index


# -- Anthropic ---------------------------------------------------------------

# delta type -> (the key that carries its piece, the block field the pieces build)
ANTHROPIC_DELTAS = {
    "text_delta": ("text", "text"),
    "thinking_delta": ("thinking", "thinking"),
    "signature_delta": ("signature", "signature"),
    "input_json_delta": ("partial_json", "input"),
    "citations_delta": ("citation", "citations"),
}


class AnthropicAssembly(Assembly):
    """The Message a non-streaming call returns, built from a complete event sequence."""

    __slots__ = ("message", "content", "pieces")

    def __init__(self) -> None:
        self.message: dict[str, Any] | None = None
        self.content: list[dict] = []
        self.pieces: list[dict[str, list]] = []    # per block: field -> its deltas, joined once at the end

    def add(self, name: str, data: bytes) -> None:
        if name in ("ping", "error"):
            return
        event = _object(orjson.loads(data), f"{name} event")
        kind = event.get("type", name)
        message, content = self.message, self.content
        if kind == "content_block_delta" and message is not None:   # the most frequent event, first
            delta = _object(event["delta"], "delta")
            known = ANTHROPIC_DELTAS.get(delta.get("type"))
            if known is not None:
                key, field = known
                self.pieces[_index(event, "content_block_delta", below=len(content))].setdefault(field, []) \
                    .append(delta[key])
        elif kind == "message_start":
            self.message = dict(_object(event["message"], "message_start.message"))
            self.message["content"] = self.content = []
            self.pieces = []
        elif message is None:
            return
        elif kind == "content_block_start":
            if _index(event, "content_block_start", below=len(content) + 1) < len(content):
                raise MalformedStream(f"content_block_start repeats index {event['index']}")
            block = dict(_object(event["content_block"], "content_block"))
            content.append(block)
            self.pieces.append({"input": []} if block.get("type") in ("tool_use", "server_tool_use") else {})
        elif kind == "content_block_stop":
            _index(event, "content_block_stop", below=len(content))
        elif kind == "message_delta":
            message.update(_object(event.get("delta", {}), "message_delta.delta"))
            message["usage"] = {**message.get("usage", {}), **event.get("usage", {})}

    def result(self) -> dict[str, Any] | None:
        if self.message is None:
            return None
        for block, fields in zip(self.content, self.pieces):
            for field, parts in fields.items():
                block[field] = _joined(block, field, parts)
        return self.message


def assemble_anthropic(events: list[tuple[str, bytes]]) -> dict[str, Any] | None:
    """The Message a non-streaming call returns, built from a complete event sequence."""
    return assembled(AnthropicAssembly(), events)


def _joined(block: dict, field: str, parts: list) -> Any:
    """The block's field once all its delta pieces are in."""
    if field == "input":
        text = "".join(parts)
        return _object(orjson.loads(text), "tool input") if text else {}
    if field == "signature":
        return parts[-1]
    if field == "citations":
        return [*(block.get("citations") or []), *parts]
    return "".join([block.get(field, ""), *parts])


def _event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def synthesize_anthropic(message: dict[str, Any]) -> Iterator[bytes]:
    """The standard event sequence for a complete Message."""
    usage = dict(message.get("usage") or {})
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": min(1, usage.get("output_tokens", 1))}}
    yield _event("message_start", {"type": "message_start", "message": start})
    for index, block in enumerate(message.get("content") or []):
        kind = block.get("type")
        empty = {"text": {**block, "text": ""}, "thinking": {**block, "thinking": "", "signature": ""}}.get(kind)
        if kind in ("tool_use", "server_tool_use"):
            empty = {**block, "input": {}}
        yield _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": empty or block})
        if index == 0:
            yield _event("ping", {"type": "ping"})
        for delta in _deltas_of(block):
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _event("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": message.get("stop_reason"),
                                             "stop_sequence": message.get("stop_sequence")},
                                   "usage": {"output_tokens": usage.get("output_tokens", 0)}})
    yield _event("message_stop", {"type": "message_stop"})


def _deltas_of(block: dict) -> list[dict]:
    kind = block.get("type")
    if kind == "text":
        return [{"type": "text_delta", "text": block.get("text", "")}]
    if kind in ("tool_use", "server_tool_use"):
        return [{"type": "input_json_delta", "partial_json": orjson.dumps(block.get("input", {})).decode()}]
    if kind == "thinking":
        return [{"type": "thinking_delta", "thinking": block.get("thinking", "")},
                {"type": "signature_delta", "signature": block.get("signature", "")}]
    return []


# -- OpenAI ------------------------------------------------------------------

class OpenAIAssembly(Assembly):
    """The chat.completion a non-streaming call returns, built from its chunks (up to `[DONE]`)."""

    __slots__ = ("completion", "choices", "done")

    def __init__(self) -> None:
        self.completion: dict[str, Any] | None = None
        self.choices: dict[int, _Choice] = {}
        self.done = False

    def add(self, name: str, data: bytes) -> None:
        if self.done or data == OPENAI_END:
            self.done = True
            return
        chunk = _object(orjson.loads(data), "chunk")
        completion = self.completion
        if completion is None:
            completion = self.completion = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
            completion["object"] = "chat.completion"
            completion["system_fingerprint"] = chunk.get("system_fingerprint")
        if chunk.get("usage"):
            completion["usage"] = _object(chunk["usage"], "usage")
        pieces = chunk.get("choices", [])
        if not isinstance(pieces, list):   # the API always sends a list, empty on a usage chunk
            raise MalformedStream(f"choices is {type(pieces).__name__}, not a list")
        for piece in pieces:
            index = _index(_object(piece, "choice"), "choice")
            self.choices.setdefault(index, _Choice()).add(piece)

    def result(self) -> dict[str, Any] | None:
        if self.completion is None:
            return None
        self.completion["choices"] = [self.choices[i].built(i) for i in sorted(self.choices)]
        return self.completion


def assemble_openai(events: list[tuple[str, bytes]]) -> dict[str, Any] | None:
    """The chat.completion a non-streaming call returns, built from its chunks."""
    return assembled(OpenAIAssembly(), events)


class _Choice:
    """One choice's deltas, kept as pieces and joined once when the completion is built."""

    __slots__ = ("texts", "calls", "finish_reason")

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {"content": [], "refusal": []}
        self.calls: list[dict[str, Any]] = []     # {"id": str, "name": [pieces], "arguments": [pieces]}
        self.finish_reason = None

    def add(self, piece: dict) -> None:
        delta = _object(piece.get("delta") or {}, "delta")
        for field, parts in self.texts.items():
            if delta.get(field) is not None:
                parts.append(delta[field])
        for call in delta.get("tool_calls") or []:
            index = _index(_object(call, "tool call"), "tool call", below=len(self.calls) + 1)
            if index == len(self.calls):
                self.calls.append({"id": "", "name": [], "arguments": []})
            target = self.calls[index]
            target["id"] = call.get("id") or target["id"]
            function = _object(call.get("function") or {}, "function")
            target["name"].append(function.get("name") or "")
            target["arguments"].append(function.get("arguments") or "")
        if piece.get("finish_reason"):
            self.finish_reason = piece["finish_reason"]

    def built(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant",
                                   **{field: "".join(parts) if parts else None for field, parts in self.texts.items()}}
        if self.calls:
            message["tool_calls"] = [{"id": call["id"], "type": "function",
                                      "function": {"name": "".join(call["name"]), "arguments": "".join(call["arguments"])}}
                                     for call in self.calls]
        return {"index": index, "message": message, "logprobs": None, "finish_reason": self.finish_reason}


def synthesize_openai(completion: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """chat.completion.chunk events for a complete chat.completion, ending in [DONE]."""
    base = {"id": completion.get("id"), "object": "chat.completion.chunk", "created": completion.get("created"),
            "model": completion.get("model"), "system_fingerprint": completion.get("system_fingerprint")}

    def chunk(choices: list, **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    for choice in completion.get("choices") or []:
        message = choice.get("message") or {}
        index = choice.get("index", 0)
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("refusal") is not None:
            delta["refusal"] = message["refusal"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        yield chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])
        yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}])
    if include_usage and completion.get("usage"):
        yield chunk([], usage=completion["usage"])
    yield b"data: [DONE]\n\n"
