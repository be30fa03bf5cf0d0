"""The mock upstream must look like the real APIs to the official SDKs.

Each test starts its own MockUpstream on an ephemeral port and drives it with
anthropic.AsyncAnthropic / openai.AsyncOpenAI (no retries), or raw aiohttp where
the SDKs would refuse to send the request.
"""

import asyncio
import base64
import contextlib
import struct
import sys
import time
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from agent_sidecar.bench.mock_upstream import MockUpstream, Profile

ROOT = Path(__file__).resolve().parent.parent
MODEL = "claude-mock-1"  # any name; a real one may trigger the SDK's deprecation warning
HI = [{"role": "user", "content": "hello there"}]
TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}]


@contextlib.asynccontextmanager
async def running(profile: Profile | None = None):
    mock = MockUpstream(profile)
    await mock.start()
    a = anthropic.AsyncAnthropic(base_url=mock.url, api_key="test-key", max_retries=0)
    o = openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="test-key", max_retries=0)
    try:
        yield mock, a, o
    finally:
        await a.close()
        await o.close()
        await mock.stop()


async def test_anthropic_json_is_deterministic_with_fresh_ids():
    async with running(Profile(output_tokens=7)) as (mock, a, _):
        r1 = await a.messages.create(model=MODEL, max_tokens=100, messages=HI)
        r2 = await a.messages.create(model=MODEL, max_tokens=100, messages=HI)
        other = await a.messages.create(model=MODEL, max_tokens=100, system="be brief",
                                        messages=HI)
        capped = await a.messages.create(model=MODEL, max_tokens=3, messages=HI)
        raw = await a.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=HI)
    assert r1.id.startswith("msg_01") and len(r1.id) == 30 and r1.id != r2.id
    assert r1.model == MODEL and r1.stop_reason == "end_turn" and r1.type == "message"
    assert len(r1.content[0].text.split()) == 7 and r1.content[0].text == r2.content[0].text
    assert other.content[0].text != r1.content[0].text
    assert capped.stop_reason == "max_tokens" and len(capped.content[0].text.split()) == 3
    assert r1.usage.output_tokens == 7 and r1.usage.input_tokens > 0
    assert r1.usage.cache_read_input_tokens == 0
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["content-type"] == "application/json"
    assert "anthropic-ratelimit-requests-remaining" in raw.headers
    assert mock.count() == 5 and mock.count("/v1/messages") == 5
    seen = mock.received[0]
    assert seen.method == "POST" and seen.json["model"] == MODEL and seen.body
    assert "anthropic-version" in seen.headers and seen.at <= time.monotonic()


async def test_anthropic_stream_event_sequence_matches_json():
    async with running(Profile(output_tokens=5)) as (mock, a, _):
        plain = await a.messages.create(model=MODEL, max_tokens=100, messages=HI)
        stream = await a.messages.create(model=MODEL, max_tokens=100, messages=HI, stream=True)
        events = [e async for e in stream]
        async with a.messages.stream(model=MODEL, max_tokens=100, messages=HI) as s:
            final = await s.get_final_message()
        # Claude Code calls /v1/messages?beta=true
        beta = await a.messages.create(model=MODEL, max_tokens=100, messages=HI,
                                       extra_query={"beta": "true"})
    types = [e.type for e in events]
    assert types == ["message_start", "content_block_start", *["content_block_delta"] * 5,
                     "content_block_stop", "message_delta", "message_stop"]
    assert events[0].message.usage.output_tokens == 1 and events[0].message.content == []
    assert "".join(e.delta.text for e in events[2:7]) == plain.content[0].text
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens == 5
    assert final.content[0].text == plain.content[0].text and final.id != plain.id
    assert beta.content[0].text == plain.content[0].text
    assert mock.received[-1].query == "beta=true"


async def test_tool_use_round_trip_json_and_stream():
    ask = [{"role": "user", "content": "please use a tool"}]
    async with running() as (_, a, _o):
        r = await a.messages.create(model=MODEL, max_tokens=100, tools=TOOLS, messages=ask)
        async with a.messages.stream(model=MODEL, max_tokens=100, tools=TOOLS,
                                     messages=ask) as s:
            streamed = await s.get_final_message()
        block = r.content[0]
        assert r.stop_reason == "tool_use" and block.type == "tool_use"
        assert block.id.startswith("toolu_01") and block.name == "get_weather"
        assert isinstance(block.input["city"], str)
        assert streamed.stop_reason == "tool_use" and streamed.content[0].input == block.input
        follow = ask + [{"role": "assistant", "content": [block.model_dump(
            include={"type", "id", "name", "input"})]}, {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": block.id, "content": "sunny"}]}]
        done = await a.messages.create(model=MODEL, max_tokens=100, tools=TOOLS, messages=follow)
        assert done.stop_reason == "end_turn" and done.content[0].type == "text"
        with pytest.raises(anthropic.BadRequestError, match="ids were found without"):
            await a.messages.create(model=MODEL, max_tokens=100, tools=TOOLS,
                                    messages=follow[:2] + [{"role": "user", "content": "hm"}])
        with pytest.raises(anthropic.BadRequestError, match="unexpected `tool_use_id`"):
            await a.messages.create(model=MODEL, max_tokens=100, tools=TOOLS, messages=[
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                              "content": "?"}]}])


async def test_anthropic_validation_like_the_real_api():
    async with running() as (mock, a, _):
        with pytest.raises(anthropic.BadRequestError) as e:
            await a.messages.create(model=MODEL, max_tokens=10, messages=HI + HI)
        assert e.value.body["error"]["type"] == "invalid_request_error"
        assert "multiple \"user\" roles" in e.value.body["error"]["message"]
        with pytest.raises(anthropic.BadRequestError, match='first message must use the "user"'):
            await a.messages.create(model=MODEL, max_tokens=10,
                                    messages=[{"role": "assistant", "content": "hi"}])
        async with aiohttp.ClientSession(mock.url) as http:
            async with http.post("/v1/messages", data=b"{not json") as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["type"] == "invalid_request_error"
            async with http.post("/v1/messages", json={"model": MODEL, "messages": HI}) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["message"] == "max_tokens: Field required"
            mock.profile.validate = False
            async with http.post("/v1/messages", json={"model": MODEL, "messages": HI + HI}) as r:
                assert r.status == 200
        assert mock.count("/v1/messages") == 5  # rejected requests are recorded too


async def test_openai_chat_json_stream_and_embeddings():
    msgs = [{"role": "user", "content": "hello"}]
    async with running(Profile(output_tokens=4)) as (mock, _, o):
        c = await o.chat.completions.create(model="gpt-4o-mini", messages=msgs)
        raw = await o.chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                                messages=msgs)
        chunks = [ch async for ch in await o.chat.completions.create(
            model="gpt-4o-mini", messages=msgs, stream=True,
            stream_options={"include_usage": True})]
        plain_chunks = [ch async for ch in await o.chat.completions.create(
            model="gpt-4o-mini", messages=msgs, stream=True)]
        e64 = await o.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        ef = await o.embeddings.create(model="text-embedding-3-small", input="a",
                                       encoding_format="float")
        wire = mock.received[-2].json
    assert c.id.startswith("chatcmpl-") and c.object == "chat.completion"
    assert c.choices[0].finish_reason == "stop" and len(c.choices[0].message.content.split()) == 4
    assert c.usage.completion_tokens == 4 and c.system_fingerprint == "fp_mock"
    assert raw.headers["x-request-id"] and "x-ratelimit-limit-requests" in raw.headers
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        c.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(ch.choices for ch in plain_chunks) and len(plain_chunks) == 6
    assert wire["encoding_format"] == "base64"  # the SDK's default; it decodes it itself
    assert len(e64.data) == 2 and len(e64.data[0].embedding) == 8
    assert e64.data[0].embedding == ef.data[0].embedding != e64.data[1].embedding


async def test_embeddings_base64_wire_format():
    async with running() as (mock, _, _o):
        async with aiohttp.ClientSession(mock.url) as http:
            body = {"model": "m", "input": "x", "encoding_format": "base64"}
            async with http.post("/v1/embeddings", json=body) as resp:
                got = (await resp.json())["data"][0]["embedding"]
    floats = struct.unpack("<8f", base64.b64decode(got))
    assert abs(sum(v * v for v in floats) - 1.0) < 1e-5


@pytest.mark.parametrize("kind, anthropic_error, status", [
    ("rate_limit", anthropic.RateLimitError, 429),
    ("overloaded", anthropic.OverloadedError, 529),
    ("server_error", anthropic.InternalServerError, 500),
    ("bad_gateway", anthropic.InternalServerError, 502),
])
async def test_injected_status_errors(kind, anthropic_error, status):
    async with running(Profile(retry_after=1.5)) as (mock, a, o):
        mock.inject(kind, times=2)
        with pytest.raises(anthropic_error) as e:
            await a.messages.create(model=MODEL, max_tokens=10, messages=HI)
        assert e.value.status_code == status and e.value.body["type"] == "error"
        with pytest.raises(openai.APIStatusError) as oe:
            await o.chat.completions.create(model="gpt-4o-mini", messages=HI)
        assert oe.value.status_code == status and "message" in oe.value.body
        if status in (429, 529):
            assert e.value.response.headers["retry-after"] == "2"
            assert e.value.response.headers["retry-after-ms"] == "1500"
        if status == 429:
            assert "anthropic-ratelimit-requests-reset" in e.value.response.headers
            assert oe.value.code == "rate_limit_exceeded"
        ok = await a.messages.create(model=MODEL, max_tokens=10, messages=HI)  # queue drained
        assert ok.content and mock.count() == 3


async def test_injected_connection_failures():
    async with running(Profile(output_tokens=6)) as (mock, a, o):
        mock.inject("drop")
        with pytest.raises(anthropic.APIConnectionError):
            await a.messages.create(model=MODEL, max_tokens=10, messages=HI)
        mock.inject("drop_mid_stream")
        got = []
        with pytest.raises(Exception):  # httpx's RemoteProtocolError, not wrapped by the SDK
            async for ev in await a.messages.create(model=MODEL, max_tokens=10, messages=HI,
                                                    stream=True):
                got.append(ev.type)
        assert got[:2] == ["message_start", "content_block_start"] and "message_stop" not in got
        mock.inject("error_mid_stream")
        with pytest.raises(anthropic.APIStatusError) as e:
            async for _ in await a.messages.create(model=MODEL, max_tokens=10, messages=HI,
                                                   stream=True):
                pass
        assert e.value.body["error"]["type"] == "overloaded_error"
        mock.inject("error_mid_stream")
        with pytest.raises(openai.APIError, match="overloaded"):
            async for _ in await o.chat.completions.create(model="m", messages=HI, stream=True):
                pass
        mock.inject("drop_mid_stream")
        with pytest.raises(openai.APIConnectionError):
            async for _ in await o.chat.completions.create(model="m", messages=HI, stream=True):
                pass
        assert mock.in_flight == 0 and mock.count() == 5


async def test_concurrency_cap_answers_429_at_once():
    async with running(Profile(ttft=0.3, max_concurrency=2, retry_after=0.2)) as (mock, a, _):
        results = await asyncio.gather(
            *[a.messages.create(model=MODEL, max_tokens=10, messages=HI) for _ in range(5)],
            return_exceptions=True)
        limited = [r for r in results if isinstance(r, anthropic.RateLimitError)]
        assert len(limited) == 3 and mock.rate_limited == 3
        assert limited[0].response.headers["retry-after-ms"] == "200"
        assert mock.peak_in_flight == 2 and mock.in_flight == 0 and mock.count() == 5


async def test_hold_after_first_event_and_pacing():
    async with running(Profile(ttft=0.05, tokens_per_second=50, output_tokens=6)) as (mock, a, _):
        mock.hold_after_first_event = asyncio.Event()
        t0 = time.monotonic()
        stream = await a.messages.create(model=MODEL, max_tokens=100, messages=HI, stream=True)
        it = stream.__aiter__()
        first = await it.__anext__()
        assert first.type == "message_start" and time.monotonic() - t0 >= 0.05
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(nxt := asyncio.ensure_future(it.__anext__())),
                                   0.2)
        assert mock.in_flight == 1
        t1 = time.monotonic()
        mock.hold_after_first_event.set()
        rest = [(await nxt).type] + [e.type async for e in it]
        assert rest[-1] == "message_stop" and time.monotonic() - t1 >= 5 / 50 * 0.9


async def test_misc_routes_and_http_control():
    async with running() as (mock, a, o):
        models = await a.models.list()
        assert models.data[0].id == "claude-sonnet-4-5" and models.has_more is False
        assert (await a.messages.count_tokens(model=MODEL, messages=HI)).input_tokens > 0
        async with aiohttp.ClientSession(mock.url) as http:
            async with http.head("/") as r:
                assert r.status == 200
            async with http.post("/v1/nope") as r:
                assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
            async with http.post("/v1/chat/nope") as r:
                assert r.status == 404 and "error" in await r.json()
            async with http.post("/_mock/inject", json={"kind": "overloaded", "times": 1}) as r:
                assert r.status == 200
            async with http.post("/_mock/inject", json={"kind": "bogus"}) as r:
                assert r.status == 400
            async with http.post("/_mock/profile", json={"output_tokens": 3}) as r:
                assert (await r.json())["output_tokens"] == 3 and mock.profile.output_tokens == 3
            with pytest.raises(anthropic.OverloadedError):
                await a.messages.create(model=MODEL, max_tokens=10, messages=HI)
            r3 = await a.messages.create(model=MODEL, max_tokens=10, messages=HI)
            assert len(r3.content[0].text.split()) == 3
            async with http.get("/_mock/stats") as r:
                stats = await r.json()
            assert stats["count"] == 7 and stats["paths"]["/v1/messages"] == 2
            async with http.post("/_mock/reset") as r:
                assert r.status == 200
            assert mock.count() == 0 and mock.received == []


async def test_cli_process_serves_and_logs():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent_sidecar.bench.mock_upstream", "--port", "0", "--output-tokens", "2",
        "--log", cwd=ROOT, stderr=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
        url = line.split()[-1]
        a = anthropic.AsyncAnthropic(base_url=url, api_key="test-key", max_retries=0)
        r = await a.messages.create(model=MODEL, max_tokens=10, messages=HI)
        await a.close()
        assert len(r.content[0].text.split()) == 2
        log = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
        assert log.startswith("POST /v1/messages -> 200")
    finally:
        proc.terminate()
        await proc.wait()
