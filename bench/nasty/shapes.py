"""Real answer shapes of the Anthropic and OpenAI APIs: bodies, SSE events, headers, errors.

Everything here is deterministic (fixed ids, fixed rate-limit figures), so a
test can compare what the agent received with what the upstream sent, byte
for byte, without asking the upstream again.
"""

from __future__ import annotations

import hashlib

import orjson

MODEL = "claude-sonnet-4-5-20250929"
TEXT = "The river bends twice before the sea."
SSE_TYPE = "text/event-stream; charset=utf-8"
JSON_TYPE = "application/json"

# What api.anthropic.com sends beside every answer (values fixed).
ANTHROPIC_HEADERS: tuple[tuple[str, str], ...] = (
    ("request-id", "req_011CNastyAnthropicRequest01"),
    ("anthropic-organization-id", "4f1c2b9e-7a1d-4d7e-9c3a-1b2c3d4e5f60"),
    ("anthropic-ratelimit-requests-limit", "4000"),
    ("anthropic-ratelimit-requests-remaining", "3999"),
    ("anthropic-ratelimit-requests-reset", "2025-01-01T00:00:01Z"),
    ("anthropic-ratelimit-input-tokens-limit", "2000000"),
    ("anthropic-ratelimit-input-tokens-remaining", "1999000"),
    ("anthropic-ratelimit-input-tokens-reset", "2025-01-01T00:00:01Z"),
    ("anthropic-ratelimit-output-tokens-limit", "400000"),
    ("anthropic-ratelimit-output-tokens-remaining", "399990"),
    ("anthropic-ratelimit-output-tokens-reset", "2025-01-01T00:00:01Z"),
    ("anthropic-ratelimit-tokens-limit", "2400000"),
    ("anthropic-ratelimit-tokens-remaining", "2398990"),
    ("anthropic-ratelimit-tokens-reset", "2025-01-01T00:00:01Z"),
    ("via", "1.1 google"),
    ("cf-cache-status", "DYNAMIC"),
    ("x-robots-tag", "none"),
    ("server", "cloudflare"),
    ("cf-ray", "8f1e2d3c4b5a6978-AMS"),
)

# What api.openai.com sends beside every answer (values fixed).
OPENAI_HEADERS: tuple[tuple[str, str], ...] = (
    ("access-control-expose-headers", "X-Request-ID"),
    ("openai-organization", "user-nastyorg"),
    ("openai-processing-ms", "312"),
    ("openai-version", "2020-10-01"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "29999990"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "0s"),
    ("x-request-id", "req_5c8e1f2a3b4d5e6f7a8b9c0d1e2f3a4b"),
    ("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
    ("cf-cache-status", "DYNAMIC"),
    ("server", "cloudflare"),
    ("cf-ray", "8f1e2d3c4b5a6979-AMS"),
    ("alt-svc", 'h3=":443"; ma=86400'),
)

# Headers worth reading on an answer, cached or not (ids, organisation, timing, rate limits).
READABLE = ("request-id", "x-request-id", "anthropic-organization-id", "openai-organization",
            "openai-processing-ms", "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-tokens-limit",
            "x-ratelimit-remaining-requests", "x-ratelimit-limit-tokens")


# What generativelanguage.googleapis.com sends beside every answer (values fixed).
GEMINI_HEADERS: tuple[tuple[str, str], ...] = (
    ("vary", "Origin"), ("vary", "X-Origin"), ("vary", "Referer"), ("server", "scaffolding on HTTPServer2"),
    ("x-xss-protection", "0"), ("x-frame-options", "SAMEORIGIN"), ("x-content-type-options", "nosniff"),
    ("alt-svc", 'h3=":443"; ma=2592000,h3-29=":443"; ma=2592000'),
)


def dumps(value: object) -> bytes:
    return orjson.dumps(value)


def gemini_response(text: str = TEXT, finish: str | None = "STOP", *, usage: bool = True) -> dict:
    """One GenerateContentResponse (or, with finish=None, a stream chunk before the last)."""
    candidate: dict = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish:
        candidate.update(finishReason=finish, index=0)
    out: dict = {"candidates": [candidate], "modelVersion": "gemini-2.5-flash", "responseId": "NastyGeminiResp01"}
    if usage:
        out["usageMetadata"] = {"promptTokenCount": 9, "candidatesTokenCount": 8 if finish else 0,
                                "totalTokenCount": 17 if finish else 9, "cachedContentTokenCount": 4}
    return out


def gemini_chunks(text: str = TEXT, finish: str | None = "STOP") -> list[dict]:
    words = text.split(" ")
    pieces = [w + " " for w in words[:-1]] + words[-1:]
    return [gemini_response(p, finish if i == len(pieces) - 1 else None) for i, p in enumerate(pieces)]


def gemini_sse(items: list[object]) -> bytes:
    """Gemini's stream: `data:` lines framed with CRLF, no end marker."""
    return b"".join(b"data: " + orjson.dumps(item) + b"\r\n\r\n" for item in items)


def gemini_error(status: int, name: str, text: str) -> bytes:
    return orjson.dumps({"error": {"code": status, "message": text, "status": name}})


def message(text: str = TEXT, *, model: str = MODEL, usage: object = ..., msg_id: str = "msg_01NastyFixed0001") -> dict:
    """An Anthropic Messages API answer; `usage` replaces the usage object (None, strings, ...)."""
    body = {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "output_tokens": 9, "service_tier": "standard"}}
    if usage == "missing":
        del body["usage"]
    elif usage is not ...:
        body["usage"] = usage
    return body


def sse(events: list[tuple[str, object]], eol: bytes = b"\n") -> bytes:
    """Anthropic-style events (`event:` + `data:` lines); data that is bytes is sent as it is."""
    out = []
    for name, data in events:
        raw = data if isinstance(data, bytes) else dumps(data)
        out.append(b"event: " + name.encode() + eol + b"data: " + raw + eol + eol)
    return b"".join(out)


def message_events(text: str = TEXT, *, model: str = MODEL, start: object = ..., delta_usage: object = ...,
                   pieces: list[str] | None = None) -> list[tuple[str, object]]:
    """The standard event sequence of one streamed text answer."""
    head = message("", model=model)
    head["content"], head["stop_reason"] = [], None
    head["usage"] = {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                     "output_tokens": 1, "service_tier": "standard"}
    pieces = pieces if pieces is not None else [text[:9], text[9:21], text[21:]]
    events: list[tuple[str, object]] = [
        ("message_start", {"type": "message_start", "message": head if start is ... else start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": p}}) for p in pieces]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                  "usage": {"output_tokens": 9} if delta_usage is ... else delta_usage}),
               ("message_stop", {"type": "message_stop"})]
    return events


def anthropic_error(kind: str, text: str) -> bytes:
    return dumps({"type": "error", "error": {"type": kind, "message": text},
                  "request_id": "req_011CNastyAnthropicError01"})


def completion(text: str = TEXT, *, model: str = "gpt-4o-mini-2024-07-18", usage: object = ...,
               choices: object = ...) -> dict:
    """An OpenAI chat completion."""
    body = {"id": "chatcmpl-NastyFixed0001", "object": "chat.completion", "created": 1735689600, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                                 "annotations": []},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21,
                      "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                    "accepted_prediction_tokens": 0,
                                                    "rejected_prediction_tokens": 0}},
            "service_tier": "default", "system_fingerprint": "fp_nasty0001"}
    if usage is not ...:
        body["usage"] = usage
    if choices is not ...:
        body["choices"] = choices
    return body


def chunk(delta: dict, finish: str | None = None, *, choices: object = ..., usage: object = None) -> dict:
    out = {"id": "chatcmpl-NastyFixed0002", "object": "chat.completion.chunk", "created": 1735689600,
           "model": "gpt-4o-mini-2024-07-18", "service_tier": "default", "system_fingerprint": "fp_nasty0001",
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
           if choices is ... else choices}
    if usage is not None:
        out["usage"] = usage
    return out


def chat_chunks(text: str = TEXT, *, usage: object = None) -> list[object]:
    """The chunks of one streamed chat answer (a usage chunk when `usage` is given), without [DONE]."""
    out: list[object] = [chunk({"role": "assistant", "content": "", "refusal": None})]
    out += [chunk({"content": p}) for p in (text[:9], text[9:21], text[21:])]
    out.append(chunk({}, "stop"))
    if usage is not None:
        out.append(chunk({}, choices=[], usage=usage))
    return out


def data_lines(items: list[object], done: bool = True, eol: bytes = b"\n") -> bytes:
    """OpenAI-style `data:` events; bytes items are sent as they are; `[DONE]` last when `done`."""
    out = [b"data: " + (i if isinstance(i, bytes) else dumps(i)) + eol + eol for i in items]
    if done:
        out.append(b"data: [DONE]" + eol + eol)
    return b"".join(out)


def openai_error(status_type: str, text: str, code: str | None) -> bytes:
    return dumps({"error": {"message": text, "type": status_type, "param": None, "code": code}})


def nested(depth: int) -> bytes:
    """A JSON array nested `depth` levels deep."""
    return b"[" * depth + b"]" * depth


def echo_text(body: bytes) -> str:
    """The default answers' text: a function of the request, so identical requests get identical answers."""
    return "echo " + hashlib.sha256(body).hexdigest()[:16]


# ---- the OpenAI Responses API ----

RESPONSE_USAGE = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 21}


def response(text: str = TEXT, *, status: str = "completed", output: list | None = None, **fields) -> dict:
    """A Responses API response object (as POST /v1/responses returns and response.completed carries)."""
    body = {"id": "resp_NastyFixed0001", "object": "response", "created_at": 1735689600, "status": status,
            "background": False, "error": None, "incomplete_details": None, "instructions": None,
            "max_output_tokens": None, "model": "gpt-4.1-2025-04-14",
            "output": output if output is not None else [
                {"id": "msg_NastyFixed0001", "type": "message", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]}],
            "parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": True, "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "usage": RESPONSE_USAGE, "user": None, "metadata": {}}
    body.update(fields)
    return body


def response_events(text: str = TEXT, *, end: str = "response.completed",
                    final: dict | None = None) -> list[tuple[str, object]]:
    """A streamed text answer: the real event sequence, sequence_number on each, ending with `end`."""
    start = response(status="in_progress", output=[], usage=None)
    item = {"id": "msg_NastyFixed0001", "type": "message", "status": "in_progress", "content": [],
            "role": "assistant"}
    at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    events = [("response.created", {"response": start}), ("response.in_progress", {"response": start}),
              ("response.output_item.added", {"output_index": 0, "item": item}),
              ("response.content_part.added", {**at, "part": {**part, "text": ""}})]
    events += [("response.output_text.delta", {**at, "delta": p, "logprobs": []})
               for p in (text[:9], text[9:21], text[21:])]
    events += [("response.output_text.done", {**at, "text": text, "logprobs": []}),
               ("response.content_part.done", {**at, "part": part}),
               ("response.output_item.done", {"output_index": 0, "item": {**item, "status": "completed",
                                                                          "content": [part]}}),
               (end, {"response": final or response(text)})]
    return numbered(events)


def function_call_events() -> list[tuple[str, object]]:
    """A streamed function call: its item, the argument deltas, the completed response."""
    item = {"id": "fc_NastyFixed0001", "type": "function_call", "status": "in_progress", "arguments": "",
            "call_id": "call_NastyFixed0001", "name": "get_weather"}
    arguments = '{"city":"Paris"}'
    done = {**item, "status": "completed", "arguments": arguments}
    start = response(status="in_progress", output=[], usage=None)
    at = {"item_id": item["id"], "output_index": 0}
    return numbered([("response.created", {"response": start}), ("response.in_progress", {"response": start}),
                     ("response.output_item.added", {"output_index": 0, "item": item}),
                     ("response.function_call_arguments.delta", {**at, "delta": arguments[:8]}),
                     ("response.function_call_arguments.delta", {**at, "delta": arguments[8:]}),
                     ("response.function_call_arguments.done", {**at, "arguments": arguments}),
                     ("response.output_item.done", {"output_index": 0, "item": done}),
                     ("response.completed", {"response": response(output=[done])})])


def numbered(events: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """Each event's data with its type and sequence_number first, as the API writes them."""
    return [(name, {"type": name, "sequence_number": i, **data} if isinstance(data, dict) else data)
            for i, (name, data) in enumerate(events)]
