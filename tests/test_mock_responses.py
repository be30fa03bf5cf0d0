"""The mock's Responses API must look like the real one to the openai SDK: every event on the
wire validates as the SDK's own `ResponseStreamEvent` with no unknown field (but two the real API
sends undeclared), `responses.stream()` assembles it, and JSON equals the stream's end."""

import contextlib

import aiohttp
import openai
import orjson
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from agent_sidecar.bench.mock.openai_responses import ResponseStore, frame
from agent_sidecar.bench.mock_upstream import MockUpstream, Profile
from agent_sidecar.proxy.sse import EventParser

MODEL = "gpt-mock-1"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"], "additionalProperties": False}, "strict": True}]
EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
# The real API sends these though the SDK's types leave them out: delta padding, response.store.
SENT_UNDECLARED = {"obfuscation", "store"}


def unknown_fields(model: pydantic.BaseModel, where: str = "") -> list[str]:
    """Fields the SDK's types do not declare, anywhere in a parsed model."""
    found = [f"{where}.{k}" for k in (model.model_extra or {}) if k not in SENT_UNDECLARED]
    for name in type(model).model_fields:
        value = getattr(model, name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, pydantic.BaseModel):
                found += unknown_fields(v, f"{where}.{name}")
    return found


def checked(raw: dict) -> object:
    event = EVENT.validate_python(raw)
    assert not unknown_fields(event), unknown_fields(event)
    return event


@contextlib.asynccontextmanager
async def running(profile: Profile | None = None):
    mock = MockUpstream(profile)
    await mock.start()
    o = openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="test-key", max_retries=0)
    try:
        yield mock, o
    finally:
        await o.close()
        await mock.stop()


async def raw_events(mock: MockUpstream, body: dict) -> tuple[list[dict], object]:
    """The stream as sent on the wire, parsed by the proxy's own SSE parser, and its headers."""
    async with aiohttp.ClientSession() as http:
        async with http.post(mock.url + "/v1/responses", json={**body, "stream": True}) as resp:
            assert resp.status == 200
            events = EventParser().feed(await resp.read())
            headers = resp.headers.copy()
    datas = [orjson.loads(data) for _, data in events]
    assert [name for name, _ in events] == [d["type"] for d in datas]  # event: names its type
    return datas, headers


async def test_text_stream_is_the_real_event_sequence():
    async with running(Profile(output_tokens=5)) as (mock, o):
        events, headers = await raw_events(mock, {"model": MODEL, "input": "hello"})
        plain = await o.responses.with_raw_response.create(model=MODEL, input="hello")
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["x-request-id"].startswith("req_") and "openai-processing-ms" in headers
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * 5,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    parsed = [checked(e) for e in events]
    final = parsed[-1].response
    assert final.status == "completed" and final.usage.output_tokens == 5
    assert "".join(e.delta for e in parsed if e.type == "response.output_text.delta") \
        == final.output_text == parsed[-4].text
    assert parsed[0].response.status == "in_progress" and parsed[0].response.usage is None
    assert all(e.item_id == final.output[0].id for e in parsed[3:-2])
    body = plain.parse()
    assert not unknown_fields(Response.model_validate(plain.http_response.json()))
    assert body.output_text == final.output_text and body.id != final.id
    assert plain.headers["content-type"] == "application/json"


async def test_function_call_json_stream_and_the_sdk_stream_helper():
    ask = "please use a tool"
    async with running() as (mock, o):
        events, _ = await raw_events(mock, {"model": MODEL, "input": ask, "tools": TOOLS})
        parsed = [checked(e) for e in events]
        assert [e.type for e in parsed] == [
            "response.created", "response.in_progress", "response.output_item.added",
            "response.function_call_arguments.delta", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done",
            "response.completed"]
        async with o.responses.stream(model=MODEL, input=ask, tools=TOOLS) as s:
            deltas = [e.delta async for e in s if e.type == "response.function_call_arguments.delta"]
            streamed = await s.get_final_response()
        call = streamed.output[0]
        assert call.type == "function_call" and call.name == "get_weather"
        assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        assert "".join(deltas) == call.arguments and set(call.parsed_arguments) == {"city"}
        r = await o.responses.create(model=MODEL, input=ask, tools=TOOLS)
        assert r.output[0].arguments == call.arguments
        follow = [{"role": "user", "content": ask}, r.output[0].model_dump(exclude_none=True),
                  {"type": "function_call_output", "call_id": r.output[0].call_id,
                   "output": "sunny"}]
        done = await o.responses.create(model=MODEL, input=follow, tools=TOOLS)
        assert done.output[0].type == "message" and done.output_text
        with pytest.raises(openai.BadRequestError, match="No tool call found"):
            await o.responses.create(model=MODEL, input=follow[2:], tools=TOOLS)
        chained = await o.responses.create(model=MODEL, previous_response_id=r.id, tools=TOOLS,
                                           input=follow[2:])
        assert chained.output_text == done.output_text  # the chain is the same conversation


async def test_previous_response_id_retrieve_and_cached_tokens():
    async with running() as (mock, o):
        first = await o.responses.create(model=MODEL, input="hello", instructions="be brief")
        again = await o.responses.create(model=MODEL, input="hello", instructions="be brief")
        other = await o.responses.create(model=MODEL, input="hello")
        nxt = await o.responses.create(model=MODEL, input="and then?", previous_response_id=first.id)
        nxt2 = await o.responses.create(model=MODEL, input="and then?", previous_response_id=again.id)
        got = await o.responses.retrieve(nxt.id)
        with pytest.raises(openai.NotFoundError, match="not found") as e:
            await o.responses.retrieve("resp_missing")
        assert e.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError) as e:
            await o.responses.create(model=MODEL, input="x", previous_response_id="resp_gone")
        assert e.value.code == "previous_response_not_found"
        unstored = await o.responses.create(model=MODEL, input="hello", store=False)
        with pytest.raises(openai.NotFoundError):
            await o.responses.retrieve(unstored.id)
    assert first.output_text == again.output_text != other.output_text
    assert first.id != again.id and nxt.output_text == nxt2.output_text != first.output_text
    assert nxt.previous_response_id == first.id and got.model_dump() == nxt.model_dump()
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert 0 < nxt.usage.input_tokens_details.cached_tokens <= nxt.usage.input_tokens
    assert mock.count("/v1/responses") == 7  # the GETs count under their own paths


async def test_reasoning_incomplete_and_validation():
    async with running(Profile(output_tokens=40)) as (mock, o):
        r = await o.responses.create(model=MODEL, input="hi", reasoning={"effort": "low"},
                                     include=["reasoning.encrypted_content"])
        cut = await o.responses.create(model=MODEL, input="hi", max_output_tokens=16)
        events, _ = await raw_events(mock, {"model": MODEL, "input": "hi",
                                            "max_output_tokens": 16})
        with pytest.raises(openai.BadRequestError) as e:
            await o.responses.create(model=MODEL, input="hi", max_output_tokens=3)
        assert e.value.code == "integer_below_min_value" and e.value.param == "max_output_tokens"
        async with aiohttp.ClientSession() as http:
            async with http.post(mock.url + "/v1/responses", json={"input": "x"}) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["code"] == "missing_required_parameter"
    assert r.output[0].type == "reasoning" and r.output[0].encrypted_content
    assert r.usage.output_tokens_details.reasoning_tokens == 20 and r.usage.output_tokens == 60
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert len(cut.output_text.split()) == 16
    assert events[-1]["type"] == "response.incomplete" and checked(events[-1])


async def test_injected_mid_stream_error_is_an_error_event():
    async with running() as (mock, o):
        mock.inject("error_mid_stream")
        events, _ = await raw_events(mock, {"model": MODEL, "input": "hello"})
        mock.inject("drop_mid_stream")
        with pytest.raises(openai.APIConnectionError):
            async with o.responses.stream(model=MODEL, input="hello") as s:
                async for _ in s:
                    pass
    assert events[-1]["type"] == "error" and checked(events[-1])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_the_event_list_is_transport_free():
    """A WebSocket transport sends ResponseStore.turn's events as they are."""
    turn = ResponseStore().turn({"model": MODEL, "input": "hi", "stream": True}, 3)
    assert turn.events[-1]["response"] == turn.response
    assert frame(turn.events[0]).startswith(b"event: response.created\ndata: {")
