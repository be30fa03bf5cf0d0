"""The OpenAI Responses API (`POST /v1/responses`): its end, its two forms, its usage, its conversation.

A stream is typed events, each with a `sequence_number`, and no `[DONE]`: it is complete at
`response.completed`, whose `response` is the very JSON body the same request gets without
streaming. `response.failed`, `response.incomplete` and `error` end an answer that is relayed
and never kept, and so does a JSON body whose status is not `completed`. A stream made from a
stored JSON body is the event sequence the real API sends (the openai SDK's `responses.stream()`
assembles it), items and parts in order, each text or argument string as one delta.

A conversation is the request's `input` items after its `instructions`; the answer's `output`
items are what the next request sends back (or refers to with `previous_response_id`).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import orjson

PATH = "/v1/responses"
END = "response.completed"
NOT_AN_ANSWER = frozenset({"response.failed", "response.incomplete", "error"})
FIRST_TOKEN = "response.output_text.delta"


def handles(api: str, path: str) -> bool:
    return path == PATH and api == "openai"


# -- watching an answer ------------------------------------------------------------------------------


def well_formed(doc: Any) -> bool:
    """A complete response object (`error` is a field of every one: null when it went well)."""
    return isinstance(doc, dict) and doc.get("object") == "response" and doc.get("status") == "completed" \
        and doc.get("error") is None and isinstance(doc.get("output"), list)


def on_event(call, data: bytes) -> dict | None:
    """One event of a stream going by: the final response at its end, else None. ValueError for an
    event that spoils the answer (not a typed JSON object, or one that ends it without an answer)."""
    event = orjson.loads(data)
    kind = event.get("type") if isinstance(event, dict) else None
    if not isinstance(kind, str):
        raise ValueError("a Responses event without a type")
    if kind == FIRST_TOKEN:
        if not call.t_first_token:
            call.t_first_token = time.monotonic()
    elif kind == END:
        response = event.get("response")
        if not well_formed(response):
            raise ValueError("response.completed without a completed response")
        return response
    elif kind in NOT_AN_ANSWER:
        raise ValueError(f"{kind}: an answer not to keep")
    return None


def usage_of(usage: Any) -> tuple[int, int, int, int]:
    """(input, output, cached input, reasoning) tokens of a response's `usage`; 0 for what is missing."""
    if not isinstance(usage, dict):
        return 0, 0, 0, 0
    details_in = usage.get("input_tokens_details")
    details_out = usage.get("output_tokens_details")
    return (_count(usage.get("input_tokens")), _count(usage.get("output_tokens")),
            _count(details_in.get("cached_tokens")) if isinstance(details_in, dict) else 0,
            _count(details_out.get("reasoning_tokens")) if isinstance(details_out, dict) else 0)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# -- the two forms -----------------------------------------------------------------------------------


def assemble(events: list[tuple[str, bytes]]) -> dict | None:
    """The JSON body of a recorded stream: the response of its response.completed (None without one)."""
    for _, data in reversed(events):
        if b'"response.completed"' in data:
            event = orjson.loads(data)
            if isinstance(event, dict) and event.get("type") == END:
                return event.get("response")
    return None


class _Events:
    """Events numbered as they are made."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}


def synthesize(response: dict) -> Iterator[bytes]:
    """The stream the real API sends for a complete response object, as SSE."""
    for event in events_of(response):
        yield b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def events_of(response: dict) -> Iterator[dict]:
    """The events of that stream, for any transport (SSE, or a WebSocket's messages)."""
    event = _Events()
    start = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    for index, item in enumerate(response["output"]):
        yield from _item_events(event, index, item)
    yield event(END, response=response)


def _item_events(event: _Events, index: int, item: dict) -> Iterator[dict]:
    kind, item_id = item.get("type"), item.get("id") or ""
    at = {"item_id": item_id, "output_index": index}
    if kind == "message":
        yield event("response.output_item.added", output_index=index,
                    item={**item, "status": "in_progress", "content": []})
        for content_index, part in enumerate(item.get("content") or []):
            yield from _part_events(event, {**at, "content_index": content_index}, part)
    elif kind == "function_call":
        arguments = item.get("arguments") or ""
        yield event("response.output_item.added", output_index=index,
                    item={**item, "status": "in_progress", "arguments": ""})
        yield event("response.function_call_arguments.delta", **at, delta=arguments)
        yield event("response.function_call_arguments.done", **at, arguments=arguments)
    elif kind == "custom_tool_call":
        text = item.get("input") or ""
        yield event("response.output_item.added", output_index=index, item={**item, "input": ""})
        yield event("response.custom_tool_call_input.delta", **at, delta=text)
        yield event("response.custom_tool_call_input.done", **at, input=text)
    elif kind == "reasoning":
        yield event("response.output_item.added", output_index=index, item={**item, "summary": []})
        for summary_index, part in enumerate(item.get("summary") or []):
            where = {**at, "summary_index": summary_index}
            text = part.get("text", "")
            yield event("response.reasoning_summary_part.added", **where, part={**part, "text": ""})
            yield event("response.reasoning_summary_text.delta", **where, delta=text)
            yield event("response.reasoning_summary_text.done", **where, text=text)
            yield event("response.reasoning_summary_part.done", **where, part=part)
    else:   # a hosted tool's call (web search, file search...): its item whole
        yield event("response.output_item.added", output_index=index, item=item)
    yield event("response.output_item.done", output_index=index, item=item)


def _part_events(event: _Events, at: dict, part: dict) -> Iterator[dict]:
    kind = part.get("type")
    field = "refusal" if kind == "refusal" else "text"
    text = part.get(field, "")
    yield event("response.content_part.added", **at,
                part={**part, field: "", **({"annotations": []} if "annotations" in part else {})})
    if kind == "output_text":
        yield event("response.output_text.delta", **at, delta=text, logprobs=[])
        yield event("response.output_text.done", **at, text=text, logprobs=part.get("logprobs") or [])
    elif kind == "refusal":
        yield event("response.refusal.delta", **at, delta=text)
        yield event("response.refusal.done", **at, refusal=text)
    yield event("response.content_part.done", **at, part=part)


# -- the conversation --------------------------------------------------------------------------------


def input_items(body: dict) -> list | None:
    """The request's input as a list of items (a string is one user message), None if it has none."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return value if isinstance(value, list) else None


def with_input(body: dict, items: list) -> dict:
    return {**body, "input": items}


def answer_items(answer: dict | None) -> list:
    """The answer's output items: what the next request sends back as input."""
    output = answer.get("output") if isinstance(answer, dict) else None
    return [item for item in output if isinstance(item, dict)] if isinstance(output, list) else []
