"""The OpenAI Responses API as the mock serves it: POST /v1/responses (JSON and SSE), GET of a
stored response.  `ResponseStore.turn` gives a request's whole answer (the final response object
and its event list, `sequence_number` on every event), so any transport (HTTP SSE here, a
WebSocket elsewhere) sends the same events."""

from __future__ import annotations

import collections
import hashlib
import time
from dataclasses import dataclass

import orjson
from aiohttp import web

from .common import Fail, deltas, rand, sse, words_of

STORED_MAX = 10_000  # responses kept for GET and previous_response_id (oldest dropped first)
_FILL = {"string": None, "integer": 1, "number": 1, "boolean": True, "object": {}}


@dataclass
class ResponsesTurn:
    response: dict      # the final response object: the JSON answer and response.completed's
    events: list[dict]  # the stream: response.created ... response.completed (or .incomplete)


@dataclass
class _Stored:
    response: dict
    history: list       # the conversation so far, ids left out: what a next reply is a function of
    calls: set          # call_ids of the function calls in the chain
    tokens: int         # input + output tokens of the chain (the next request's cached tokens)


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict)
                    and isinstance(p.get("text"), str))


def _canonical(item: object) -> object:
    """An input item as the model sees it: ids and call ids are per run, not part of the prompt."""
    if not isinstance(item, dict):
        return item
    kind = item.get("type", "message")
    if kind == "message":
        return ["message", item.get("role"), _text(item.get("content"))]
    if kind == "function_call":
        return ["function_call", item.get("name"), item.get("arguments")]
    if kind == "function_call_output":
        return ["function_call_output", item.get("output")]
    if kind == "reasoning":
        return ["reasoning"]  # encrypted content differs per run; the summary is the model's own
    return {k: v for k, v in item.items() if k not in ("id", "call_id")}


def _input_items(data: dict) -> list:
    value = data.get("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return value if isinstance(value, list) else []


def _problem(data: object) -> Fail | None:
    """The real API's answer to a request it refuses, or None."""
    if not isinstance(data, dict) or "model" not in data:
        return Fail(400, "invalid_request_error", "Missing required parameter: 'model'.",
                    param="model", code="missing_required_parameter")
    value = data.get("input")
    if value is not None and not isinstance(value, (str, list)):
        return Fail(400, "invalid_request_error",
                    "Invalid type for 'input': expected one of a string or array of input "
                    "items, but got an object instead.", param="input", code="invalid_type")
    for i, item in enumerate(value if isinstance(value, list) else []):
        if not isinstance(item, dict):
            return Fail(400, "invalid_request_error",
                        f"Invalid type for 'input[{i}]': expected an object.",
                        param=f"input[{i}]", code="invalid_type")
    mot = data.get("max_output_tokens")
    if mot is not None and (not isinstance(mot, int) or isinstance(mot, bool) or mot < 16):
        return Fail(400, "invalid_request_error",
                    "Invalid 'max_output_tokens': integer below minimum value. Expected a value "
                    f">= 16, but got {mot} instead.", param="max_output_tokens",
                    code="integer_below_min_value")
    return None


def _function_tool(data: dict) -> dict | None:
    tools = data.get("tools")
    if not isinstance(tools, list):
        return None
    return next((t for t in tools if isinstance(t, dict) and t.get("type") == "function"
                 and isinstance(t.get("name"), str)), None)


def _tool_arguments(tool: dict, words: list[str]) -> str:
    props = (tool.get("parameters") or {}).get("properties") or {}
    word = words[0] if words else "x"
    args = {}
    for name, schema in props.items():
        kind = schema.get("type") if isinstance(schema, dict) else None
        if kind == "array":
            args[name] = [word]
        elif kind in _FILL:
            args[name] = word if kind == "string" else _FILL[kind]
    return orjson.dumps(args).decode()


def _asks_for_tool(items: list) -> bool:
    """The mock's rule for a function call (as for Anthropic): tools offered and the last input
    item a user message saying 'use a tool' (a function_call_output last gets a text reply)."""
    last = items[-1] if items else None
    return (isinstance(last, dict) and last.get("type", "message") == "message"
            and last.get("role") == "user" and "use a tool" in _text(last.get("content")).lower())


def _tools_echo(data: dict) -> list:
    tools = data.get("tools") if isinstance(data.get("tools"), list) else []
    return [{"description": None, "strict": True, **t}
            if isinstance(t, dict) and t.get("type") == "function" else t for t in tools]


def _effort(data: dict) -> str | None:
    reasoning = data.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    return effort if effort not in (None, "none") else None


def _shell(data: dict, rid: str, created: int, model: object) -> dict:
    """The response object as the real API writes it, before its output and usage are known."""
    reasoning = data.get("reasoning") if isinstance(data.get("reasoning"), dict) else {}
    text = data.get("text") if isinstance(data.get("text"), dict) else {}
    return {"id": rid, "object": "response", "created_at": created, "status": "in_progress",
            "background": bool(data.get("background", False)), "error": None,
            "incomplete_details": None, "instructions": data.get("instructions"),
            "max_output_tokens": data.get("max_output_tokens"),
            "max_tool_calls": data.get("max_tool_calls"), "model": model, "output": [],
            "parallel_tool_calls": data.get("parallel_tool_calls", True),
            "previous_response_id": data.get("previous_response_id"),
            "prompt_cache_key": data.get("prompt_cache_key"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "safety_identifier": data.get("safety_identifier"), "service_tier": "default",
            "store": data.get("store", True) is not False,
            "temperature": data.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium", **text},
            "tool_choice": data.get("tool_choice", "auto"), "tools": _tools_echo(data),
            "top_logprobs": data.get("top_logprobs", 0), "top_p": data.get("top_p", 1.0),
            "truncation": data.get("truncation", "disabled"), "usage": None,
            "user": data.get("user"), "metadata": data.get("metadata") or {}}


def _obfuscation(delta: str) -> str:
    """The real API pads each delta event with random characters (a side-channel defence)."""
    return rand(max(1, 16 - len(delta)))


class ResponseStore:
    """Stored responses (store is true by default, as in the real API) and how to answer."""

    def __init__(self) -> None:
        self.stored: collections.OrderedDict[str, _Stored] = collections.OrderedDict()

    def get(self, rid: str) -> dict | None:
        s = self.stored.get(rid)
        return s.response if s else None

    def turn(self, data: object, output_tokens: int) -> ResponsesTurn:
        """The answer to one request (raises Fail for a request the real API refuses): reply
        words a function of the model, the instructions and the whole chain's items."""
        if (problem := _problem(data)) is not None:
            raise problem
        items = _input_items(data)
        prev_id = data.get("previous_response_id")
        prev = self.stored.get(prev_id) if prev_id is not None else None
        if prev_id is not None and prev is None:
            raise Fail(400, "invalid_request_error",
                       f"Previous response with id '{prev_id}' not found.",
                       param="previous_response_id", code="previous_response_not_found")
        calls = set(prev.calls) if prev else set()
        for i, item in enumerate(items):
            if item.get("type") == "function_call":
                calls.add(item.get("call_id"))
            elif item.get("type") == "function_call_output" and item.get("call_id") not in calls:
                raise Fail(400, "invalid_request_error",
                           "No tool call found for function call output with call_id "
                           f"{item.get('call_id')}.", param="input")
        history = (prev.history if prev else []) + [_canonical(i) for i in items]
        material = orjson.dumps([data["model"], data.get("instructions"), history],
                                option=orjson.OPT_SORT_KEYS)
        input_tokens = len(material) // 4 + 1
        cached = min(prev.tokens, input_tokens) if prev else 0
        effort = _effort(data)
        reasoning_tokens = max(output_tokens // 2, 1) if effort else 0
        limit = data.get("max_output_tokens") or 1 << 30
        n = max(min(output_tokens, limit - reasoning_tokens), 0)
        words = words_of(material, n)
        tool = _function_tool(data) if _asks_for_tool(items) else None

        rid = "resp_" + rand(48).lower()
        response = _shell(data, rid, int(time.time()), data["model"])
        events: list[dict] = []

        def emit(kind: str, **fields) -> None:
            events.append({"type": kind, "sequence_number": len(events), **fields})

        emit("response.created", response=response)
        emit("response.in_progress", response=response)
        output: list[dict] = []
        if effort:
            item = {"id": "rs_" + rand(48).lower(), "type": "reasoning", "summary": []}
            if "reasoning.encrypted_content" in (data.get("include") or []):
                item["encrypted_content"] = "gAAAAA" + hashlib.sha256(material).hexdigest()
            emit("response.output_item.added", output_index=0, item=item)
            emit("response.output_item.done", output_index=0, item=item)
            output.append(item)
        index = len(output)
        if tool is not None:
            args = _tool_arguments(tool, words)
            fc_id, call_id = "fc_" + rand(48).lower(), "call_" + rand(24)
            item = {"id": fc_id, "type": "function_call", "status": "in_progress",
                    "arguments": "", "call_id": call_id, "name": tool["name"]}
            emit("response.output_item.added", output_index=index, item=item)
            for part in (args[:len(args) // 2], args[len(args) // 2:]):
                emit("response.function_call_arguments.delta", item_id=fc_id, output_index=index,
                     delta=part, obfuscation=_obfuscation(part))
            emit("response.function_call_arguments.done", item_id=fc_id, output_index=index,
                 arguments=args)
            item = {**item, "status": "completed", "arguments": args}
            emit("response.output_item.done", output_index=index, item=item)
            output.append(item)
            history = history + [["function_call", tool["name"], args]]
            calls.add(call_id)
            n = len(words)
        else:
            text = " ".join(words)
            msg_id = "msg_" + rand(48).lower()
            item = {"id": msg_id, "type": "message", "status": "in_progress", "content": [],
                    "role": "assistant"}
            where = {"item_id": msg_id, "output_index": index, "content_index": 0}
            emit("response.output_item.added", output_index=index, item=item)
            emit("response.content_part.added", **where,
                 part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""})
            for d in deltas(words):
                emit("response.output_text.delta", **where, delta=d, logprobs=[],
                     obfuscation=_obfuscation(d))
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
            emit("response.output_text.done", **where, text=text, logprobs=[])
            emit("response.content_part.done", **where, part=part)
            item = {**item, "status": "completed" if n == output_tokens else "incomplete",
                    "content": [part]}
            emit("response.output_item.done", output_index=index, item=item)
            output.append(item)
            history = history + [["message", "assistant", text]]
        status = "completed" if tool is not None or n == output_tokens else "incomplete"
        usage = {"input_tokens": input_tokens,
                 "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                 "output_tokens": n + reasoning_tokens,
                 "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                 "total_tokens": input_tokens + n + reasoning_tokens}
        final = {**response, "status": status, "output": output, "usage": usage}
        if status == "incomplete":
            final["incomplete_details"] = {"reason": "max_output_tokens"}
        emit("response." + status, response=final)
        if final["store"]:
            self.stored[rid] = _Stored(final, history, calls, input_tokens + n + reasoning_tokens)
            while len(self.stored) > STORED_MAX:
                self.stored.popitem(last=False)
        return ResponsesTurn(final, events)


def error_event(sequence_number: int) -> dict:
    """The in-band error a Responses stream ends with when the server fails mid-answer."""
    return {"type": "error", "sequence_number": sequence_number, "code": "server_error",
            "message": "The server had an error while processing your request. Sorry about "
                       "that!", "param": None}


def frame(event: dict) -> bytes:
    return sse(event["type"], event)


_DELTAS = ("response.output_text.delta", "response.function_call_arguments.delta")


class OpenAIResponsesAPI:
    """The Responses routes; mixed into MockUpstream, which gives profile, in_flight, _json,
    _stream and _openai_headers (from OpenAIChatAPI)."""

    ROUTES = {("POST", "/v1/responses"): "_responses",
              ("GET", "/v1/responses/*"): "_get_response"}

    @property
    def responses(self) -> ResponseStore:
        store = self.__dict__.get("_response_store")
        if store is None:
            store = self.__dict__["_response_store"] = ResponseStore()
        return store

    async def _get_response(self, request, data, kind, start) -> web.Response:
        rid = request.path.rsplit("/", 1)[1]
        found = self.responses.get(rid)
        if found is None:
            raise Fail(404, "invalid_request_error", f"Response with id '{rid}' not found.")
        return self._json(found, self._openai_headers(start))

    async def _responses(self, request, data, kind, start) -> web.StreamResponse:
        turn = self.responses.turn(data, self.profile.output_tokens)
        headers = self._openai_headers(start)
        if data.get("stream") is not True:
            return await self._slow_json(turn.response, headers)
        framed = [frame(e) for e in turn.events]
        at = [i for i, e in enumerate(turn.events) if e["type"] in _DELTAS]
        first, end = (at[0], at[-1] + 1) if at else (len(framed) - 1,) * 2
        return await self._stream(request, headers, framed[0], framed[1:first],
                                  framed[first:end], framed[end:],
                                  frame(error_event(first + 2)), kind)
