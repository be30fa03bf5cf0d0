"""The Anthropic Messages API as the mock serves it: messages (JSON and SSE), count_tokens, models."""

from __future__ import annotations

import orjson
from aiohttp import web

from .common import WORDS, Fail, deltas, rand, sse, words_of

MODELS = [("claude-sonnet-4-5", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
          ("claude-opus-4-1", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
          ("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-01T00:00:00Z")]


def _material(data: dict) -> bytes:
    """What an Anthropic reply is a function of: identical requests, identical text."""
    return orjson.dumps([data.get("model"), data.get("system"), data.get("messages")],
                        option=orjson.OPT_SORT_KEYS)


def _block_delta(delta: dict) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})


# Anthropic events that never change, computed once.
_PING = sse("ping", {"type": "ping"})
_BLOCK_STOP = sse("content_block_stop", {"type": "content_block_stop", "index": 0})
_MESSAGE_STOP = sse("message_stop", {"type": "message_stop"})
_TEXT_START = sse("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
_TEXT_DELTA = {d: _block_delta({"type": "text_delta", "text": d})
               for w in WORDS for d in (w, w + " ")}
_OVERLOADED_EVENT = sse("error", {"type": "error", "error": {"type": "overloaded_error",
                                                              "message": "Overloaded"}})


def _text_of(content: object) -> str:
    if not isinstance(content, list):
        return content if isinstance(content, str) else ""
    return " ".join(b.get("text", "") for b in content if isinstance(b, dict)
                    and b.get("type") == "text")


def _tool_call(data: dict, words: list[str]) -> dict | None:
    """A tool_use block when tools are offered and the user asks to 'use a tool'."""
    tools, msgs = data.get("tools"), data.get("messages")
    if not tools or not isinstance(tools, list) or not isinstance(tools[0], dict):
        return None
    last_user = next((m for m in reversed(msgs) if isinstance(m, dict)
                      and m.get("role") == "user"), None) if isinstance(msgs, list) else None
    if last_user is None or "use a tool" not in _text_of(last_user.get("content")).lower():
        return None
    props = (tools[0].get("input_schema") or {}).get("properties") or {}
    fill = {"string": words[0] if words else "x", "integer": 1, "number": 1, "boolean": True}
    args = {k: fill[v.get("type")] for k, v in props.items()
            if isinstance(v, dict) and v.get("type") in fill}
    return {"type": "tool_use", "id": "toolu_01" + rand(22),
            "name": tools[0].get("name", "tool"), "input": args}


def anthropic_problem(body: object, need_max_tokens: bool = True,
                      strict: bool = True) -> str | None:
    """The message the real API gives for a malformed Messages request, or None.
    Not strict: only what the mock itself needs to answer (a dict with model, messages)."""
    if not isinstance(body, dict):
        return "Input should be a valid dictionary"
    for name in ("model", "max_tokens", "messages"):
        if name not in body and (name != "max_tokens" or need_max_tokens and strict):
            return f"{name}: Field required"
    if not strict:
        return None
    if not isinstance(body["model"], str):
        return "model: Input should be a valid string"
    mt = body.get("max_tokens", 1)
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        return "max_tokens: Input should be a valid integer greater than or equal to 1"
    msgs = body["messages"]
    if not isinstance(msgs, list):
        return "messages: Input should be a valid list"
    if not msgs:
        return "messages: at least one message is required"
    pending: list[str] = []  # tool_use ids of the previous assistant message
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages.{i}: Input should be a valid dictionary"
        role = m.get("role")
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if "content" not in m:
            return f"messages.{i}.content: Field required"
        blocks = [] if isinstance(m["content"], str) else m["content"]
        if not isinstance(blocks, list):
            return f"messages.{i}.content: Input should be a valid list"
        if role != ("user" if i % 2 == 0 else "assistant"):  # strict alternation from user
            if i == 0:
                return 'messages: first message must use the "user" role'
            return ('messages: roles must alternate between "user" and "assistant", '
                    f'but found multiple "{role}" roles in a row')
        for j, b in enumerate(blocks):
            if not isinstance(b, dict) or not isinstance(b.get("type"), str):
                return f"messages.{i}.content.{j}.type: Field required"
        if role == "user":
            answered = set()
            for j, b in enumerate(blocks):
                if b["type"] == "tool_result":
                    tid = b.get("tool_use_id")
                    if tid not in pending:
                        return (f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                                f"`tool_result` blocks: {tid}. Each `tool_result` block must have "
                                "a corresponding `tool_use` block in the previous message.")
                    answered.add(tid)
            missing = [t for t in pending if t not in answered]
            if missing:
                return _missing_results(i, missing)
            pending = []
        else:
            pending = [b.get("id") for b in blocks if b["type"] == "tool_use"]
    if pending:
        return _missing_results(len(msgs) - 1, pending)
    return None


def _missing_results(i: int, ids: list) -> str:
    return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
            f"after: {', '.join(map(str, ids))}. Each `tool_use` block must have a "
            "corresponding `tool_result` block in the next message.")


class AnthropicAPI:
    """The Anthropic routes; mixed into MockUpstream, which gives profile, in_flight, _json, _stream."""

    ROUTES = {("POST", "/v1/messages"): "_messages",
              ("POST", "/v1/messages/count_tokens"): "_count_tokens",
              ("GET", "/v1/models"): "_models"}

    def _anthropic_headers(self) -> dict[str, str]:
        return {"request-id": "req_011C" + rand(20), **self.rate_limits().anthropic_headers()}

    @staticmethod
    def anthropic_input_tokens(data: object) -> int:
        """What a Messages call counts against the input-token limit: its usage.input_tokens."""
        return len(_material(data)) // 4 + 1 if isinstance(data, dict) else 1

    def _check(self, data, need_max_tokens: bool) -> None:
        if problem := anthropic_problem(data, need_max_tokens, strict=self.profile.validate):
            raise Fail(400, "invalid_request_error", problem)

    async def _count_tokens(self, request, data, kind, start) -> web.Response:
        self._check(data, need_max_tokens=False)
        n = len(_material(data)) // 4 + 1
        return self._json({"input_tokens": n}, self._anthropic_headers())

    async def _models(self, request, data, kind, start) -> web.Response:
        items = [{"type": "model", "id": i, "display_name": d, "created_at": c}
                 for i, d, c in MODELS]
        return self._json({"data": items, "has_more": False, "first_id": items[0]["id"],
                           "last_id": items[-1]["id"]}, self._anthropic_headers())

    async def _messages(self, request, data, kind, start) -> web.StreamResponse:
        self._check(data, need_max_tokens=True)
        material = _material(data)
        max_tokens = data.get("max_tokens")
        n = min(self.profile.output_tokens, max_tokens if isinstance(max_tokens, int) else 4096)
        words = words_of(material, n)
        tool = _tool_call(data, words)
        stop = ("tool_use" if tool else "end_turn" if n == self.profile.output_tokens
                else "max_tokens")
        message = {"id": "msg_01" + rand(24), "type": "message", "role": "assistant",
                   "model": data["model"], "content": [], "stop_reason": None,
                   "stop_sequence": None,
                   "usage": {"input_tokens": len(material) // 4 + 1, "output_tokens": 1,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
        headers = self._anthropic_headers()
        if data.get("stream") is not True:
            message["content"] = [tool or {"type": "text", "text": " ".join(words)}]
            message["stop_reason"] = stop
            message["usage"]["output_tokens"] = len(words)
            return await self._slow_json(message, headers)
        if tool is None:
            start_block = _TEXT_START
            pieces = [_TEXT_DELTA.get(d) or _block_delta({"type": "text_delta", "text": d})
                      for d in deltas(words)]
        else:
            start_block = sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                       "content_block": {**tool, "input": {}}})
            js = orjson.dumps(tool["input"]).decode()
            pieces = [_block_delta({"type": "input_json_delta", "partial_json": part})
                      for part in ("", js[:len(js) // 2], js[len(js) // 2:])]
        message_delta = sse("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": len(words)}})
        return await self._stream(
            request, headers, sse("message_start", {"type": "message_start", "message": message}),
            [start_block, _PING], pieces, [_BLOCK_STOP, message_delta, _MESSAGE_STOP],
            _OVERLOADED_EVENT, kind)
