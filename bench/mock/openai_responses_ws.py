"""The Responses API's WebSocket (`GET /v1/responses` with `Upgrade: websocket`), as Codex uses it.

Each `{"type": "response.create", ...}` text message gets the events the HTTP
stream sends (`ResponseStore.turn`), one text message each. As on the real
socket, `previous_response_id` may name the socket's last response even with
`store: false` (kept on the connection, not stored); any other id is the API's
`previous_response_not_found`, sent as the socket's error event, which carries
the HTTP status (`{"type": "error", "status": 400, "error": {...}}`). A
`generate: false` request (Codex's warm-up) is answered at once with no output.
Codex offers its tools as `custom` tools inside an `additional_tools` input
item; asked to "use a tool", the mock calls its `exec` tool, as a model would.
Injected failures (`MockUpstream.inject`) act per request: `rate_limit` and the
other statuses are error events, `error_mid_stream` ends the answer with the
stream's error event after its first events, `drop_mid_stream` (and `drop`)
closes the socket there without a close frame.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import WSMsgType, web

from .common import Fail, rand
from .openai_responses import ResponsesTurn, _asks_for_tool, _input_items, _shell, error_event

CODE_TOOL = "exec"                      # Codex's code-mode tool (a custom tool, free-form JavaScript)
CODE_INPUT = 'text("the mock tool ran")'


def error_message(status: int, kind: str, message: str, code: str | None = None,
                  param: str | None = None) -> str:
    return orjson.dumps({"type": "error", "status": status, "error": {
        "type": kind, "code": code, "message": message, "param": param}}).decode()


def _as_seen(item: object) -> object:
    """An input item as the model reads it: ids, run metadata and a tool's timing are per run."""
    if not isinstance(item, dict):
        return item
    kind = item.get("type")
    if kind == "custom_tool_call_output":
        return {"type": kind, "call_id": item.get("call_id")}
    return {k: v for k, v in item.items() if k not in ("id", "internal_chat_message_metadata_passthrough")}


def _custom_tool(items: list) -> dict | None:
    """The code-mode tool when an `additional_tools` item (or `tools`) offers it."""
    for item in items:
        if isinstance(item, dict) and item.get("type") == "additional_tools":
            for space in item.get("tools") or ():
                for tool in (space.get("tools") or () if isinstance(space, dict) else ()):
                    if isinstance(tool, dict) and tool.get("type") == "custom" and tool.get("name") == CODE_TOOL:
                        return {"namespace": space.get("name"), "name": CODE_TOOL}
    return None


def _usage(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _tool_turn(data: dict, tool: dict) -> ResponsesTurn:
    """A response whose one output item is a call of the custom tool, with its input deltas."""
    rid = "resp_" + rand(48).lower()
    response = _shell(data, rid, int(time.time()), data["model"])
    events: list[dict] = []

    def emit(kind: str, **fields) -> None:
        events.append({"type": kind, "sequence_number": len(events), **fields})

    item_id, call_id = "ctc_" + rand(48).lower(), "call_" + rand(24)
    item = {"id": item_id, "type": "custom_tool_call", "call_id": call_id, **tool, "input": ""}
    emit("response.created", response=response)
    emit("response.in_progress", response=response)
    emit("response.output_item.added", output_index=0, item=item)
    emit("response.custom_tool_call_input.delta", item_id=item_id, output_index=0, delta=CODE_INPUT)
    emit("response.custom_tool_call_input.done", item_id=item_id, output_index=0, input=CODE_INPUT)
    item = {**item, "input": CODE_INPUT}
    emit("response.output_item.done", output_index=0, item=item)
    final = {**response, "status": "completed", "output": [item], "usage": _usage(10, 8)}
    emit("response.completed", response=final)
    return ResponsesTurn(final, events)


def _warm_up(data: dict) -> ResponsesTurn:
    rid = "resp_" + rand(48).lower()
    response = _shell(data, rid, int(time.time()), data.get("model"))
    final = {**response, "status": "completed", "usage": _usage(0, 0)}
    return ResponsesTurn(final, [{"type": "response.created", "sequence_number": 0, "response": response},
                                 {"type": "response.completed", "sequence_number": 1, "response": final}])


class ResponsesSocket:
    """One socket's state: the last response, which the next request may name."""

    def __init__(self, mock) -> None:
        self.mock = mock
        self.last: tuple[str, list] | None = None   # (response id, the whole conversation it ends)

    def answer(self, data: dict) -> ResponsesTurn:
        items = _input_items(data)
        prev = data.get("previous_response_id")
        if prev is not None:
            if self.last is None or self.last[0] != prev:
                raise Fail(400, "invalid_request_error", f"Previous response with id '{prev}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
            items = [*self.last[1], *items]
        whole = {**data, "input": [_as_seen(i) for i in items], "store": False}
        whole.pop("previous_response_id", None)
        tool = _custom_tool(items) if _asks_for_tool(items) else None
        if data.get("generate") is False:
            turn = _warm_up(whole)
        elif tool is not None:
            turn = _tool_turn(whole, tool)
        else:
            turn = self.mock.responses.turn(whole, self.mock.profile.output_tokens)
        for event in turn.events:   # as sent: this request's own chain and store setting
            if isinstance(event.get("response"), dict):
                event["response"]["previous_response_id"] = prev
                event["response"]["store"] = data.get("store", True) is not False
        if turn.response["status"] == "completed":
            self.last = (turn.response["id"], [*items, *turn.response["output"]])
        return turn


# injected kind -> (status, -, error type, code, message), as the HTTP mock's failures
_STATUS_FAILURES = {
    "rate_limit": (429, None, "requests", "rate_limit_exceeded",
                   "Number of requests has exceeded your rate limit. Please try again later."),
    "overloaded": (529, None, "server_error", None, "Overloaded"),
    "server_error": (500, None, "server_error", None, "Internal server error"),
    "bad_gateway": (502, None, "server_error", None, "Bad gateway"),
}


class OpenAIResponsesSocketAPI:
    """The socket route; mixed into MockUpstream (profile, responses, _openai_headers, counters)."""

    async def _responses_socket(self, request: web.Request, start: float) -> web.StreamResponse:
        if "authorization" not in request.headers:
            return self._error(True, 401, "invalid_request_error",
                               "You didn't provide an API key. You need to provide your API key in an "
                               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        ws = web.WebSocketResponse(compress=True, max_msg_size=64 * 1024 * 1024)
        headers = self._openai_headers(start)
        ws.headers["x-request-id"] = headers["x-request-id"]
        await ws.prepare(request)
        socket = ResponsesSocket(self)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                data = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                await ws.send_str(error_message(400, "invalid_request_error", "Invalid JSON in the message."))
                continue
            self.socket_messages.append(data)
            kind = data.get("type") if isinstance(data, dict) else None
            if kind == "response.processed":
                continue
            if kind != "response.create":
                await ws.send_str(error_message(400, "invalid_request_error",
                                                f"Unsupported message type: {kind!r}.", param="type"))
                continue
            self.socket_requests += 1
            try:
                turn = socket.answer({k: v for k, v in data.items() if k != "type"})
            except Fail as f:
                await ws.send_str(error_message(f.status, f.kind, f.message, f.kw.get("code"), f.kw.get("param")))
                continue
            kind, kw = self._injected.popleft() if self._injected else (None, {})
            if kind in _STATUS_FAILURES:
                status, _, kind_name, code, message = _STATUS_FAILURES[kind]
                await ws.send_str(error_message(status, kind_name, message, code))
                continue
            events = turn.events
            if kind in ("error_mid_stream", "drop_mid_stream", "drop"):
                events = events[:3]
            for event in events:
                await ws.send_str(orjson.dumps(event).decode())
            if kind == "error_mid_stream":
                await ws.send_str(orjson.dumps(error_event(len(events))).decode())
            elif kind in ("drop_mid_stream", "drop"):
                request.transport.abort()   # no close frame: the connection is just gone
                break
        return ws
