"""The mock's Responses socket must look like the real one: every event it sends validates as the
openai SDK's own `ResponseStreamEvent` (no undeclared field but those the real API sends), in
the order of the HTTP stream, with Codex's warm-up, its code-mode tool call and the socket's chain."""

import aiohttp
import orjson

from agent_sidecar.bench.mock_upstream import MockUpstream
from test_mock_responses import checked

MODEL = "gpt-mock-1"
AUTH = {"authorization": "Bearer test-key"}
CODE_TOOLS = {"type": "additional_tools", "role": "developer", "tools": [
    {"type": "namespace", "name": "functions", "description": "", "tools": [
        {"type": "custom", "name": "exec", "description": "Run JavaScript",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}]}]}


def user(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


async def send(ws, **body) -> list[dict]:
    await ws.send_str(orjson.dumps({"type": "response.create", "model": MODEL, "stream": True, "store": False,
                                    **body}).decode())
    events = []
    while not events or events[-1]["type"] not in ("response.completed", "response.incomplete", "error"):
        events.append(orjson.loads((await ws.receive()).data))
    return events


async def test_socket_events_are_the_sdks_and_chain_on_the_connection():
    mock = MockUpstream()
    await mock.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(mock.url + "/v1/responses", headers=AUTH) as ws:
                warm = await send(ws, input=[], generate=False)
                assert [e["type"] for e in warm] == ["response.created", "response.completed"]
                assert warm[-1]["response"]["output"] == []
                call = await send(ws, input=[CODE_TOOLS, user("Please use a tool.")],
                                  previous_response_id=warm[-1]["response"]["id"])
                item = call[-1]["response"]["output"][0]
                assert item["type"] == "custom_tool_call" and item["name"] == "exec"
                output = {"type": "custom_tool_call_output", "call_id": item["call_id"], "output": "ran"}
                reply = await send(ws, input=[output], previous_response_id=call[-1]["response"]["id"])
                assert reply[-1]["response"]["output"][-1]["type"] == "message"
                lost = await send(ws, input=[user("again")], previous_response_id="resp_unknown")
            for event in warm + call + reply:
                checked(event)
            for events in (warm, call, reply):
                assert [e["sequence_number"] for e in events] == list(range(len(events)))
                assert events[-1]["response"]["store"] is False
            assert lost == [{"type": "error", "status": 400, "error": {
                "type": "invalid_request_error", "code": "previous_response_not_found",
                "message": "Previous response with id 'resp_unknown' not found.", "param": "previous_response_id"}}]
    finally:
        await mock.stop()
