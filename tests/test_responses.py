"""The OpenAI Responses API through a real sidecar (in-process, the mock as the API, the openai SDK as
the client): cached in both forms, converted between them into what the SDK's own types and
`responses.stream()` accept, answers that are not complete never kept, usage and first token in
the record, `previous_response_id` chains replayed from the cache, GET of a response passed through."""

from __future__ import annotations

import contextlib

import aiohttp
import openai
import orjson
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

from agent_sidecar.bench.mock_upstream import MockUpstream
from agent_sidecar.proxy.cache_key import EACH, field_path, without
from agent_sidecar.proxy.config import CacheSection, ConfigError, load_layers
from agent_sidecar.proxy.sse import EventParser

MODEL = "gpt-mock-1"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"], "additionalProperties": False}, "strict": True}]
EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


@pytest.fixture
async def px(start_app, mock: MockUpstream):
    return await start_app(mock.url)


@contextlib.asynccontextmanager
async def client(base: str):
    o = openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
    try:
        yield o
    finally:
        await o.close()


async def post(base: str, body: dict) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/v1/responses", json=body,
                             headers={"authorization": "Bearer sk-test"}) as resp:
            return resp.status, resp.headers.copy(), await resp.read()


def events_of(raw: bytes) -> list[dict]:
    parser = EventParser()
    events = parser.feed(raw)
    datas = [orjson.loads(data) for _, data in events]
    assert [name for name, _ in events] == [d["type"] for d in datas]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    for d in datas:
        EVENT.validate_python(d)   # the SDK's own types take every event
    return datas


async def test_json_and_stream_are_cached_and_each_serves_the_other(px, mock):
    body = {"model": MODEL, "input": "hello there"}
    async with client(px.url) as o:
        first = await o.responses.create(**body)
        again = await o.responses.create(**body)
        async with o.responses.stream(**body) as s:
            deltas = [e.delta async for e in s if e.type == "response.output_text.delta"]
            from_json = await s.get_final_response()
    assert mock.count("/v1/responses") == 1
    assert again.model_dump() == first.model_dump()            # the stored answer, ids and all
    assert (from_json.id, from_json.output_text, from_json.usage) == (first.id, first.output_text, first.usage)
    assert "".join(deltas) == first.output_text
    _, headers, raw = await post(px.url, {**body, "stream": True})
    assert headers["x-sidecar-cache"] == "hit" and headers["content-type"].startswith("text/event-stream")
    kinds = [e["type"] for e in events_of(raw)]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]

    streamed = {"model": MODEL, "input": "a streamed question"}
    _, _, recorded = await post(px.url, {**streamed, "stream": True})
    _, headers, replayed = await post(px.url, {**streamed, "stream": True})
    assert headers["x-sidecar-cache"] == "hit" and replayed == recorded   # byte for byte
    _, headers, as_json = await post(px.url, streamed)
    assert headers["x-sidecar-cache"] == "hit" and headers["content-type"] == "application/json"
    assert orjson.loads(as_json) == events_of(recorded)[-1]["response"]   # response.completed's response
    assert mock.count("/v1/responses") == 2


async def test_a_stored_function_call_streams_with_argument_deltas(px, mock):
    body = {"model": MODEL, "input": "please use a tool", "tools": TOOLS}
    async with client(px.url) as o:
        stored = await o.responses.create(**body)
        async with o.responses.stream(**body) as s:
            arguments = [e.delta async for e in s if e.type == "response.function_call_arguments.delta"]
            streamed = await s.get_final_response()
    call = stored.output[0]
    assert call.type == "function_call" and mock.count("/v1/responses") == 1
    assert "".join(arguments) == call.arguments and streamed.output[0].call_id == call.call_id
    assert streamed.output[0].parsed_arguments == orjson.loads(call.arguments)
    _, _, raw = await post(px.url, {**body, "stream": True})
    kinds = [e["type"] for e in events_of(raw)]
    assert kinds[2:-1] == ["response.output_item.added", "response.function_call_arguments.delta",
                           "response.function_call_arguments.done", "response.output_item.done"]


async def test_a_stored_reasoning_answer_streams_every_item_in_order(px, mock):
    body = {"model": MODEL, "input": "think first", "reasoning": {"effort": "low"},
            "include": ["reasoning.encrypted_content"]}
    async with client(px.url) as o:
        stored = await o.responses.create(**body)
        async with o.responses.stream(**body) as s:
            streamed = await s.get_final_response()
    assert [i.type for i in stored.output] == ["reasoning", "message"] and mock.count("/v1/responses") == 1
    assert streamed.output[0].encrypted_content == stored.output[0].encrypted_content
    assert streamed.output_text == stored.output_text
    _, _, raw = await post(px.url, {**body, "stream": True})
    assert [(e["type"], e.get("output_index")) for e in events_of(raw)][2:5] == [
        ("response.output_item.added", 0), ("response.output_item.done", 0), ("response.output_item.added", 1)]


@pytest.mark.parametrize("failure", ["error_mid_stream", "drop_mid_stream", "incomplete", "incomplete_json"])
async def test_answers_that_are_not_complete_are_never_stored(px, mock, failure):
    body = {"model": MODEL, "input": f"will it keep {failure}?", "stream": not failure.endswith("json")}
    if failure.startswith("incomplete"):
        mock.profile.output_tokens = 40
        body["max_output_tokens"] = 16
    else:
        mock.inject(failure)
    with contextlib.suppress(aiohttp.ClientPayloadError):
        status, _, raw = await post(px.url, body)
        assert status == 200
        if failure == "incomplete":
            assert events_of(raw)[-1]["type"] == "response.incomplete"
    await px.state.cache.drain()
    status, headers, _ = await post(px.url, body)
    assert status == 200 and headers["x-sidecar-cache"] == "miss"
    assert mock.count("/v1/responses") == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_record_has_usage_cached_and_reasoning_tokens_and_first_token(px, mock, stream):
    async with client(px.url) as o:
        first = await o.responses.create(model=MODEL, input="hi", reasoning={"effort": "low"})
        second = await o.responses.create(model=MODEL, input="and?", previous_response_id=first.id,
                                          reasoning={"effort": "low"}, stream=stream)
        if stream:
            second = [e async for e in second][-1].response
    usage = second.usage
    assert usage.input_tokens_details.cached_tokens > 0 and usage.output_tokens_details.reasoning_tokens > 0
    records = await px.records()
    record = records[-1]
    assert (record["input_tokens"], record["output_tokens"], record["cache_read_tokens"],
            record["reasoning_tokens"]) == (usage.input_tokens, usage.output_tokens,
                                            usage.input_tokens_details.cached_tokens,
                                            usage.output_tokens_details.reasoning_tokens)
    assert record["route"] == "/v1/responses" and record["cache"] == "miss"
    assert (record["ttft_ms"] is not None) == stream
    async with client(px.url) as o:   # a hit reports what the original call cost
        await o.responses.create(model=MODEL, input="hi", reasoning={"effort": "low"})
    hit = (await px.records())[-1]
    assert hit["cache"] == "hit" and hit["reasoning_tokens"] == first.usage.output_tokens_details.reasoning_tokens


async def chain(base: str, stream: bool) -> list[str]:
    """Three turns linked by previous_response_id, the way the Agents SDK and others chain them."""
    texts, previous = [], None
    async with client(base) as o:
        for question in ("first question", "second question", "third question"):
            extra = {"previous_response_id": previous} if previous else {}
            if stream:
                async with o.responses.stream(model=MODEL, input=question, **extra) as s:
                    answer = await s.get_final_response()
            else:
                answer = await o.responses.create(model=MODEL, input=question, **extra)
            texts.append(answer.output_text)
            previous = answer.id
    return texts


@pytest.mark.parametrize("stream", [False, True])
async def test_a_previous_response_id_chain_replays_from_the_cache(px, mock, stream):
    recorded = await chain(px.url, stream)
    assert mock.count("/v1/responses") == 3
    assert await chain(px.url, stream) == recorded
    assert mock.count("/v1/responses") == 3   # each cached answer carries the id the next turn names


async def test_get_of_a_response_passes_through_uncached(px, mock):
    async with client(px.url) as o:
        made = await o.responses.create(model=MODEL, input="keep me")
        got = await o.responses.retrieve(made.id)
        again = await o.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            await o.responses.retrieve("resp_unknown")
    assert got.model_dump() == again.model_dump() == made.model_dump()
    assert mock.count(f"/v1/responses/{made.id}") == 2
    assert [r["route"] for r in await px.records()] == ["/v1/responses"]   # a GET is not a model call


# ---- keys that ignore per-run noise --------------------------------------------------------------------


def test_field_paths_take_list_wildcards():
    assert field_path("input[*].id") == ("input", EACH, "id")
    assert field_path("a[*][*].b.c") == ("a", EACH, EACH, "b", "c")
    for bad in ("input[*]", "a..b", "a[0].b", "[*].id", "a[*x].b", ""):
        with pytest.raises(ValueError, match="e.g. input"):
            field_path(bad)
    body = {"input": [{"id": "msg_1", "role": "user", "content": [{"type": "input_text", "text": "hi", "id": "x"}]},
                      "plain", {"type": "function_call_output", "output": "ok"}], "model": "m"}
    before = orjson.dumps(body)
    assert without(body, [field_path("input[*].id"), field_path("input[*].content[*].id"),
                          field_path("model.nothing"), field_path("absent[*].id")]) == {
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                  "plain", {"type": "function_call_output", "output": "ok"}], "model": "m"}
    assert orjson.dumps(body) == before   # the request itself is never changed


def test_a_field_path_that_names_no_field_is_refused_at_start(tmp_path):
    with pytest.raises(ConfigError, match=r"\[cache\] ignore_fields: 'input\[\*\]' ends with \[\*\]"):
        load_layers([{"cache": {"ignore_fields": ["input[*]"]}}], ["config.toml"])


async def test_codex_run_noise_is_not_in_the_key_and_wildcards_take_item_ids(start_app, mock):
    px = await start_app(mock.url, cache={"ignore_fields": [*CacheSection.ignore_fields, "input[*].id"]})

    def codex_like(run: int, text: str = "fix the bug") -> dict:
        return {"model": MODEL, "prompt_cache_key": f"thread-{run}", "stream": True,
                "client_metadata": {"thread_id": f"thread-{run}", "turn_id": f"turn-{run}", "ts": 1000 + run},
                "input": [{"type": "message", "id": f"item-{run}", "role": "user",
                           "content": [{"type": "input_text", "text": text}]}]}

    _, first, recorded = await post(px.url, codex_like(1))
    await px.state.cache.drain()
    _, again, replayed = await post(px.url, codex_like(2))
    _, other, _ = await post(px.url, codex_like(3, "fix another bug"))
    assert (first["x-sidecar-cache"], again["x-sidecar-cache"], other["x-sidecar-cache"]) == ("miss", "hit", "miss")
    assert replayed == recorded and mock.count("/v1/responses") == 2


# ---- checkpoints and restore of Responses conversations ------------------------------------------------


async def test_a_chain_is_checkpointed_as_one_conversation_and_restored_into_its_continuation(px, mock, sidecar):
    instructions = "You are a helpful agent. Today is Monday."
    async with client(px.url) as o:
        first = await o.responses.create(model=MODEL, instructions=instructions, tools=TOOLS,
                                         input="Remember the word PELICAN.")
        call = await o.responses.create(model=MODEL, instructions=instructions, tools=TOOLS,
                                        input="Now use a tool to check.", previous_response_id=first.id)
        output = {"type": "function_call_output", "call_id": call.output[0].call_id, "output": "a water bird"}
        async with o.responses.stream(model=MODEL, instructions=instructions, tools=TOOLS, input=[output],
                                      previous_response_id=call.id) as s:
            done = await s.get_final_response()
        pending = await o.responses.create(model=MODEL, instructions=instructions, tools=TOOLS,
                                           input="And use a tool again.", previous_response_id=done.id)
    [session] = px.state.sessions.list()
    items = px.state.sessions.messages(session["id"])
    assert [i.get("type", "message") for i in items] == [
        "message", "message", "message", "function_call", "function_call_output", "message", "message",
        "function_call"]
    assert items[0] == {"role": "user", "content": "Remember the word PELICAN."}
    assert items[1]["id"] == first.output[0].id and items[5]["id"] == done.output[0].id
    assert items[-1]["call_id"] == pending.output[0].call_id and session["messages"] == 8
    assert px.state.sessions.find(session["id"])["system"] == instructions
    env = {"SIDECAR_STATE_DIR": str(px.state_dir)}
    shown = await sidecar.run("sessions", "show", session["id"], env=env)
    assert "[function_call]\n" in shown.out and '"name":"get_weather"' in shown.out and "PELICAN" in shown.out
    exported = await sidecar.run("sessions", "export", session["id"], "--format", "messages", env=env)
    doc = orjson.loads(exported.out)
    assert doc["instructions"] == instructions and doc["input"] == items[:6]   # up to the last complete answer
    async with client(mock.url) as o:   # as the SDK takes it, and the API accepts it
        await o.responses.create(**doc, tools=TOOLS)

    # The agent died with a call unanswered; its next life opens a new conversation, which takes the
    # history up to the last complete answer. A title call with other instructions does not.
    assert px.state.sessions.arm("last") is not None
    async with client(px.url) as o:
        await o.responses.create(model=MODEL, instructions="Write a title.", input="What word was it?")
        assert mock.received[-1].json["input"] == "What word was it?"
        later = "You are a helpful agent. Today is Tuesday."
        answer = await o.responses.create(model=MODEL, instructions=later, tools=TOOLS, input="What word was it?")
        sent = mock.received[-1].json["input"]
        assert sent[:6] == items[:6] and sent[6] == {"role": "user", "content": "What word was it?"}
        # Its next turn names the answer's id: the upstream holds the history, nothing is put in front.
        await o.responses.create(model=MODEL, instructions=later, tools=TOOLS, input="Thanks.",
                                 previous_response_id=answer.id)
        assert mock.received[-1].json["input"] == "Thanks."   # the mock accepted every history it was sent


async def test_a_chain_branching_from_an_earlier_answer_replaces_the_later_turns(px, mock):
    async with client(px.url) as o:
        one = await o.responses.create(model=MODEL, input="one")
        two = await o.responses.create(model=MODEL, input="two", previous_response_id=one.id)
        await o.responses.create(model=MODEL, input="three", previous_response_id=two.id)
        other = await o.responses.create(model=MODEL, input="two, again", previous_response_id=one.id)
        await o.responses.create(model=MODEL, input="four", previous_response_id=other.id)
    [session] = px.state.sessions.list()
    texts = [i["content"] if isinstance(i["content"], str) else i["content"][0]["text"]
             for i in px.state.sessions.messages(session["id"])]
    assert texts[::2] == ["one", "two, again", "four"] and len(texts) == 6
