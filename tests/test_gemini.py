"""The Gemini API through the proxy, driven by the google-genai SDK against the mock.

The mock's shapes are checked against google-genai's own types (pydantic models
with extra="forbid": an unknown or misnamed field fails). Through the proxy:
both forms cached across each other, usage from usageMetadata, `contents`
checkpointed and restored, the sidecar's own errors in Google's shape, and the
key never on disk.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from conftest import until
from google import genai
from google.genai import errors, types
from multidict import CIMultiDict

from agent_sidecar.proxy.cache_key import KeyMaker
from agent_sidecar.proxy.usage import usage_of

# The SDK's async client subclasses aiohttp.ClientSession, which aiohttp deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
MODEL = "gemini-2.5-flash"
KEY = "AIzaSyTestGeminiKeyNotReal0123456789abcd"


def client(url: str, key: str = KEY) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=url, retry_options=types.HttpRetryOptions(attempts=1)))


async def text_of_stream(c: genai.Client, contents, **config) -> tuple[str, list]:
    chunks = [chunk async for chunk in await c.aio.models.generate_content_stream(
        model=MODEL, contents=contents, config=types.GenerateContentConfig(**config) if config else None)]
    return "".join(chunk.text or "" for chunk in chunks), chunks


async def raw(url: str, path: str, body: dict, key: str = KEY) -> tuple[int, CIMultiDict, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json=body, headers={"x-goog-api-key": key}) as resp:
            return resp.status, CIMultiDict(resp.headers), await resp.read()


def events_of(body: bytes) -> list[dict]:
    assert body.endswith(b"\r\n\r\n")
    return [orjson.loads(line[6:]) for line in body.split(b"\r\n\r\n") if line]


# ---- the mock, against the SDK's own types ---------------------------------------------------------------


async def test_mock_answers_parse_as_the_sdks_types(mock):
    ask = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
    status, headers, body = await raw(mock.url, f"/v1beta/models/{MODEL}:generateContent", ask)
    assert status == 200 and headers["server"] == "scaffolding on HTTPServer2"
    answer = types.GenerateContentResponse.model_validate(orjson.loads(body))
    assert answer.candidates[0].finish_reason == types.FinishReason.STOP and answer.text
    assert answer.usage_metadata.total_token_count == (answer.usage_metadata.prompt_token_count
                                                       + answer.usage_metadata.candidates_token_count)
    status, headers, body = await raw(mock.url, f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse", ask)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    chunks = [types.GenerateContentResponse.model_validate(event) for event in events_of(body)]
    assert "".join(c.text for c in chunks) == answer.text
    assert [c.candidates[0].finish_reason for c in chunks][-1] == types.FinishReason.STOP
    assert all(c.candidates[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage_metadata.candidates_token_count == answer.usage_metadata.candidates_token_count
    thinking = {**ask, "cachedContent": "cachedContents/abc",
                "generationConfig": {"thinkingConfig": {"includeThoughts": True, "thinkingBudget": 64}}}
    status, _, body = await raw(mock.url, f"/v1beta/models/{MODEL}:generateContent", thinking)
    usage = types.GenerateContentResponse.model_validate(orjson.loads(body)).usage_metadata
    assert usage.cached_content_token_count > 0 and usage.thoughts_token_count > 0
    status, _, body = await raw(mock.url, f"/v1beta/models/{MODEL}:countTokens", ask)
    assert types.CountTokensResponse.model_validate(orjson.loads(body)).total_tokens > 0
    status, _, body = await raw(mock.url, f"/v1beta/models/{MODEL}:generateContent", {"contents": []})
    error = orjson.loads(body)["error"]
    assert status == 400 and error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"


async def test_mock_function_calls_json_and_stream_through_the_sdk(mock):
    c = client(mock.url)

    async def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    tools = types.GenerateContentConfig(tools=[get_weather], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
    answer = await c.aio.models.generate_content(model=MODEL, contents="please use a tool", config=tools)
    call = answer.function_calls[0]
    assert call.name == "get_weather" and isinstance(call.args["city"], str)
    _, chunks = await text_of_stream(c, "please use a tool", tools=[get_weather],
                                     automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
    assert chunks[-1].function_calls[0].args == call.args
    # The SDK's own loop: it runs the function and sends its response; the mock answers in text.
    done = await c.aio.models.generate_content(model=MODEL, contents="please use a tool",
                                               config=types.GenerateContentConfig(tools=[get_weather]))
    assert done.text and len(done.automatic_function_calling_history) == 3
    with pytest.raises(errors.ClientError, match="function response turn"):
        await c.aio.models.generate_content(model=MODEL, contents=[
            types.Content(role="user", parts=[types.Part(text="please use a tool")]),
            types.Content(role="model", parts=[types.Part(function_call=call)]),
            types.Content(role="user", parts=[types.Part(text="never mind")])], config=tools)


async def test_mock_models_and_errors_through_the_sdk(mock):
    c = client(mock.url)
    names = [m.name async for m in await c.aio.models.list(config={"query_base": True})]
    assert names and all(n.startswith("models/gemini-") for n in names)
    mock.inject("rate_limit")
    with pytest.raises(errors.ClientError) as caught:
        await c.aio.models.generate_content(model=MODEL, contents="hello")
    assert caught.value.code == 429 and caught.value.status == "RESOURCE_EXHAUSTED"
    assert caught.value.details["error"]["details"][0]["retryDelay"].endswith("s")
    mock.inject("error_mid_stream")
    with pytest.raises(errors.ServerError) as caught:
        await text_of_stream(c, "hello")
    assert caught.value.status == "UNAVAILABLE"


# ---- through the proxy -------------------------------------------------------------------------------------


async def test_both_forms_are_cached_across_each_other(start_app, mock):
    app = await start_app(mock.url)
    c = client(app.url)
    first = await c.aio.models.generate_content(model=MODEL, contents="hello river")
    as_stream, chunks = await text_of_stream(c, "hello river")          # the stored JSON, served as a stream
    again = await c.aio.models.generate_content(model=MODEL, contents="hello river")
    assert as_stream == first.text == again.text
    assert chunks[-1].usage_metadata.candidates_token_count == first.usage_metadata.candidates_token_count
    streamed, _ = await text_of_stream(c, "hello sea")                   # a stream stored, served as JSON
    as_json = await c.aio.models.generate_content(model=MODEL, contents="hello sea")
    replayed, _ = await text_of_stream(c, "hello sea")
    assert as_json.text == streamed == replayed
    assert as_json.candidates[0].finish_reason == types.FinishReason.STOP
    assert mock.count() == 2
    records = await app.records()
    assert [(r["cache"], r["stream"]) for r in records] == [("miss", False), ("hit", True), ("hit", False),
                                                            ("miss", True), ("hit", False), ("hit", True)]
    assert {r["model"] for r in records} == {MODEL} and {r["api"] for r in records} == {"gemini"}
    assert records[0]["input_tokens"] == first.usage_metadata.prompt_token_count
    assert records[0]["output_tokens"] == first.usage_metadata.candidates_token_count
    assert records[3]["ttft_ms"] is not None and records[3]["output_tokens"] > 0


async def test_count_tokens_and_models_pass(start_app, mock):
    app = await start_app(mock.url)
    c = client(app.url)
    counted = [await c.aio.models.count_tokens(model=MODEL, contents="hello") for _ in range(2)]
    assert counted[0].total_tokens == counted[1].total_tokens > 0
    assert mock.count("/v1/models/gemini-2.5-flash:countTokens") == 1      # cached too
    assert [m.name async for m in await c.aio.models.list(config={"query_base": True})]


def test_usage_counts_cached_and_thought_tokens():
    meta = {"promptTokenCount": 100, "candidatesTokenCount": 7, "thoughtsTokenCount": 30,
            "cachedContentTokenCount": 64, "toolUsePromptTokenCount": 5, "totalTokenCount": 142}
    usage = usage_of("gemini", meta)
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.reasoning_tokens) == (105, 37, 64, 30)
    usage = usage_of("gemini", {"promptTokenCount": "9"})
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.reasoning_tokens) == (0, 0, 0, 0)


async def test_thinking_usage_reaches_the_record(start_app, mock):
    app = await start_app(mock.url)
    c = client(app.url)   # kept: a client that is garbage collected closes its session mid-call
    answer = await c.aio.models.generate_content(
        model=MODEL, contents="think", config=types.GenerateContentConfig(
            thinking_config=types.ThinkingConfig(thinking_budget=64, include_thoughts=True)))
    usage = answer.usage_metadata
    (record,) = await app.records()
    assert record["output_tokens"] == usage.candidates_token_count + usage.thoughts_token_count


def test_a_stream_is_keyed_as_its_json_method_and_client_made_call_ids_are_ignored():
    keys = KeyMaker(b"s" * 32, ["contents[*].parts[*].functionCall.id", "contents[*].parts[*].functionResponse.id"], [])

    def body(call_id: str) -> dict:
        return {"contents": [{"role": "user", "parts": [{"text": "use a tool"}]},
                             {"role": "model", "parts": [{"functionCall": {"name": "glob", "args": {}, "id": call_id}}]},
                             {"role": "user", "parts": [{"functionResponse": {"name": "glob", "id": call_id,
                                                                               "response": {"output": "none"}}}]}]}
    json_form = keys.canonical("POST", f"/v1beta/models/{MODEL}:generateContent", "", {}, body("glob_1_0"))
    assert keys.canonical("POST", f"/v1beta/models/{MODEL}:streamGenerateContent", "alt=sse", {},
                          body("glob_2_0")) == json_form
    # Without alt=sse the API streams a JSON array: another form, never served from the JSON answer.
    assert keys.canonical("POST", f"/v1beta/models/{MODEL}:streamGenerateContent", "", {}, body("x")) != json_form
    assert keys.canonical("POST", f"/v1beta/models/{MODEL}:generateContent", f"key={KEY}", {},
                          body("y")) == json_form


async def test_contents_checkpointed_and_restored(start_app, mock):
    app = await start_app(mock.url)
    c = client(app.url)
    system = types.GenerateContentConfig(system_instruction="You are a river guide.")
    chat = c.aio.chats.create(model=MODEL, config=system)
    first = await chat.send_message("name a river")
    await chat.send_message("and another")
    (session,) = app.state.sessions.list()
    assert session["api"] == "gemini" and session["model"] == MODEL and session["messages"] == 4
    stored = app.state.sessions.messages(session["id"])
    assert stored[0] == {"role": "user", "parts": [{"text": "name a river"}]}
    assert stored[1] == {"role": "model", "parts": [{"text": first.text}]}
    assert app.state.sessions.find(session["id"])["system"]["parts"] == [{"text": "You are a river guide."}]
    # A restarted agent's new conversation of the same shape gets the checkpointed turns in front.
    assert app.state.sessions.arm(session["id"])
    await c.aio.models.generate_content(model=MODEL, contents="where was I?", config=system)
    sent = mock.received[-1].json["contents"]
    assert [t["role"] for t in sent] == ["user", "model", "user", "model", "user"]
    assert sent[0] == stored[0] and sent[-1]["parts"] == [{"text": "where was I?"}]


async def test_sidecar_errors_are_in_googles_shape(start_app, mock):
    app = await start_app(mock.url, cache={"mode": "replay"})
    c = client(app.url)
    with pytest.raises(errors.ClientError) as caught:
        await c.aio.models.generate_content(model=MODEL, contents="never recorded")
    assert caught.value.code == 404 and caught.value.status == "NOT_FOUND"
    assert caught.value.message.startswith("sidecar: cache miss in replay mode")
    limited = await start_app(mock.url, limits={"max_concurrency": 1, "max_queue": 0})
    mock.hold_after_first_event = hold = asyncio.Event()
    c = client(limited.url)
    busy = asyncio.ensure_future(text_of_stream(c, "hold the slot"))
    await until(lambda: mock.in_flight == 1, what="a stream in flight")
    with pytest.raises(errors.ClientError) as caught:
        await c.aio.models.generate_content(model=MODEL, contents="one too many")
    hold.set()
    await busy
    assert caught.value.code == 429 and caught.value.status == "RESOURCE_EXHAUSTED"
    assert caught.value.message.startswith("sidecar:")
    assert caught.value.details["error"]["details"][0]["@type"] == "type.googleapis.com/google.rpc.RetryInfo"


async def test_the_key_partitions_the_cache_and_never_reaches_disk(start_app, mock, caplog):
    app = await start_app(mock.url)
    other = "AIzaSyOtherGeminiKeyNotReal9876543210zyxw"
    ask = {"contents": [{"role": "user", "parts": [{"text": "secret test"}]}]}
    path = f"/v1beta/models/{MODEL}:generateContent"
    for key in (KEY, other, KEY):
        status, headers, _ = await raw(app.url, path, ask, key)
        assert status == 200
    assert headers["x-sidecar-cache"] == "hit" and mock.count() == 2
    async with aiohttp.ClientSession() as session:   # the key in the query, as ?key= clients send it
        for _ in range(2):
            async with session.post(f"{app.url}{path}?key={other}x", json=ask) as resp:
                assert resp.status == 200
    assert resp.headers["x-sidecar-cache"] == "hit" and mock.count() == 3
    assert mock.received[-1].query == f"key={other}x"          # forwarded as it came
    await app.records()
    await app.state.cache.drain()
    for file in app.state_dir.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert KEY.encode() not in data and other.encode() not in data, file
    assert KEY not in caplog.text and other not in caplog.text
