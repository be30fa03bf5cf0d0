"""Server-sent events of both APIs: parse incrementally, assemble, re-emit.

One answer has two forms, a JSON body and an SSE stream. The cache stores
whichever form the upstream gave and serves the other on demand: `assemble`
turns a recorded stream into the JSON body the same request would have got
without streaming, `synthesize` turns a JSON body into the standard event
sequence the official SDKs parse.
"""

from __future__ import annotations

from typing import Any, Iterator

import orjson

ANTHROPIC_END = "message_stop"
OPENAI_END = b"[DONE]"


class EventParser:
    """Splits a byte stream into (event name, data bytes) as events complete."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *complete, self._buffer = buffer.split(b"\n\n")
        return [parsed for block in complete if (parsed := parse_event(block)) is not None]


def parse_event(block: bytes) -> tuple[str, bytes] | None:
    name, data = "message", []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    if not data:
        return None
    return name, b"\n".join(data)


# -- Anthropic ---------------------------------------------------------------

def assemble_anthropic(events: list[tuple[str, bytes]]) -> dict[str, Any] | None:
    """The Message a non-streaming call returns, built from a complete event sequence."""
    message: dict[str, Any] | None = None
    partial_json: dict[int, str] = {}
    for name, data in events:
        if name in ("ping", "error"):
            continue
        event = orjson.loads(data)
        kind = event.get("type", name)
        if kind == "message_start":
            message = dict(event["message"])
            message["content"] = []
        elif message is None:
            continue
        elif kind == "content_block_start":
            block = dict(event["content_block"])
            _fill(message["content"], event["index"], block)
            if block.get("type") in ("tool_use", "server_tool_use"):
                partial_json[event["index"]] = ""
        elif kind == "content_block_delta":
            _apply_delta(message["content"][event["index"]], event["delta"], partial_json, event["index"])
        elif kind == "content_block_stop":
            text = partial_json.pop(event["index"], None)
            if text is not None:
                message["content"][event["index"]]["input"] = orjson.loads(text) if text else {}
        elif kind == "message_delta":
            message.update(event.get("delta", {}))
            message["usage"] = {**message.get("usage", {}), **event.get("usage", {})}
    return message


def _fill(content: list, index: int, block: dict) -> None:
    while len(content) <= index:
        content.append(None)
    content[index] = block


def _apply_delta(block: dict, delta: dict, partial_json: dict[int, str], index: int) -> None:
    kind = delta.get("type")
    if kind == "text_delta":
        block["text"] = block.get("text", "") + delta["text"]
    elif kind == "input_json_delta":
        partial_json[index] = partial_json.get(index, "") + delta.get("partial_json", "")
    elif kind == "thinking_delta":
        block["thinking"] = block.get("thinking", "") + delta["thinking"]
    elif kind == "signature_delta":
        block["signature"] = delta["signature"]
    elif kind == "citations_delta":
        block.setdefault("citations", []).append(delta["citation"])


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

def assemble_openai(events: list[tuple[str, bytes]]) -> dict[str, Any] | None:
    """The chat.completion a non-streaming call returns, built from its chunks."""
    completion: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    for _, data in events:
        if data == OPENAI_END:
            break
        chunk = orjson.loads(data)
        if completion is None:
            completion = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
            completion["object"] = "chat.completion"
            completion["system_fingerprint"] = chunk.get("system_fingerprint")
        if chunk.get("usage"):
            completion["usage"] = chunk["usage"]
        for piece in chunk.get("choices") or []:
            choice = choices.setdefault(piece["index"], {"index": piece["index"], "message": {"role": "assistant", "content": None,
                                                                                              "refusal": None},
                                                         "logprobs": None, "finish_reason": None})
            _apply_openai_delta(choice, piece)
    if completion is None:
        return None
    completion["choices"] = [choices[i] for i in sorted(choices)]
    return completion


def _apply_openai_delta(choice: dict, piece: dict) -> None:
    delta = piece.get("delta") or {}
    message = choice["message"]
    if delta.get("content") is not None:
        message["content"] = (message["content"] or "") + delta["content"]
    if delta.get("refusal") is not None:
        message["refusal"] = (message["refusal"] or "") + delta["refusal"]
    for call in delta.get("tool_calls") or []:
        calls = message.setdefault("tool_calls", [])
        while len(calls) <= call["index"]:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        target = calls[call["index"]]
        target["id"] = call.get("id") or target["id"]
        function = call.get("function") or {}
        target["function"]["name"] += function.get("name") or ""
        target["function"]["arguments"] += function.get("arguments") or ""
    if piece.get("finish_reason"):
        choice["finish_reason"] = piece["finish_reason"]


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
