"""The response cache: hits, either-form replay, partitions, single flight, modes, eviction, corruption,
crash safety, sharing between sidecars, and `sidecar cache ...`.

Driven by the official async SDKs (and raw aiohttp where bytes or headers matter) against the proxy
in-process, whose upstream is the mock API; the crash and sharing tests use real `sidecar` processes.
The mock makes a fresh id per answer, so an equal id means the answer came from the cache.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from agent_sidecar.bench.mock_upstream import MockUpstream
from conftest import AppProxy, until, upstream_env
from agent_sidecar.proxy.app import make_app
from agent_sidecar.proxy.config import load_layers
from agent_sidecar.proxy.entry import Entry
from agent_sidecar.proxy.monitor import relieve_memory
from agent_sidecar.proxy.state import STATE
from agent_sidecar.proxy.response_store import ResponseStore
from agent_sidecar.proxy.store import open_lmdb

MODEL = "claude-mock-1"
OPENAI_MODEL = "gpt-4o-mini"
KEY = "sk-ant-test"
OPENAI_KEY = "sk-test"
PROMPT = [{"role": "user", "content": "Say something about the sea."}]
PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
HEADERS = {"anthropic": {"x-api-key": KEY, "anthropic-version": "2023-06-01"},
           "openai": {"authorization": f"Bearer {OPENAI_KEY}"}}
BODIES = {"anthropic": {"model": MODEL, "max_tokens": 32, "messages": PROMPT},
          "openai": {"model": OPENAI_MODEL, "messages": PROMPT}}
REPLAY_MISS = "sidecar: cache miss in replay mode"


def prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- the proxy in-process, with [cache] settings ---------------------------------------------


class Proxy(AppProxy):
    @property
    def store(self) -> ResponseStore:
        return self.state.cache.store

    async def settle(self) -> None:
        """Wait for the background cache writes (and touches) to commit."""
        await self.state.cache.drain()

    async def close(self) -> None:
        await self.server.close()  # runs the app's cleanup: drains writes, closes LMDB

    def stored(self) -> dict[bytes, Entry]:
        return {key: Entry.decode(blob) for key, blob in self.store.items()}


def config_for(mock: MockUpstream, state_dir: Path, cache: dict[str, Any] | None = None, **sections: dict):
    layer: dict[str, dict[str, Any]] = {"upstream": {"anthropic": mock.url, "openai": mock.url + "/v1"},
                                        "state": {"dir": str(state_dir)}, **sections}
    if cache:
        layer["cache"] = cache
    return load_layers([layer], ["test"])


@pytest.fixture
def start_cache(aiohttp_server, mock: MockUpstream, isolated_env: Path):
    """start_cache(state_dir=None, sections={other sections}, **[cache] settings) -> Proxy; upstreams: the mock."""

    async def start(state_dir: Path | None = None, sections: dict | None = None, **cache: Any) -> Proxy:
        app = make_app(config_for(mock, state_dir or isolated_env, cache, **(sections or {})))
        server = await aiohttp_server(app, access_log=None)
        await app[STATE].settled()   # the price table loaded: a call's record is made the moment it ends
        return Proxy(server, app[STATE].config)

    return start


@pytest.fixture
async def px(start_cache) -> Proxy:
    return await start_cache()


def lmdb_store(state_dir: Path, max_size_mb: float = 1024.0) -> ResponseStore:
    """The store opened the way `sidecar cache` opens it (close with store.lmdb.close())."""
    config = load_layers([{"state": {"dir": str(state_dir)}, "cache": {"max_size_mb": max_size_mb}}], ["test"])
    return ResponseStore(open_lmdb(config), int(max_size_mb * 1024 * 1024))




# ---- SDK calls: (x-sidecar-cache, answer) ------------------------------------------------------


def anthropic_client(base: str, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0, timeout=15)


def openai_client(base: str, key: str = OPENAI_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=15)


def anthropic_params(kw: dict) -> dict:
    return {"model": MODEL, "max_tokens": 32, "messages": PROMPT, **kw}


async def a_json(base: str, key: str = KEY, **kw) -> tuple[str | None, dict]:
    async with anthropic_client(base, key) as client:
        raw = await client.messages.with_raw_response.create(**anthropic_params(kw))
        message = await raw.parse()
    return raw.headers.get("x-sidecar-cache"), message.model_dump()


async def a_stream(base: str, key: str = KEY, **kw) -> tuple[str | None, dict]:
    async with anthropic_client(base, key) as client:
        async with client.messages.stream(**anthropic_params(kw)) as stream:
            message = await stream.get_final_message()
            return stream.response.headers.get("x-sidecar-cache"), message.model_dump()


async def o_json(base: str, key: str = OPENAI_KEY, **kw) -> tuple[str | None, dict]:
    async with openai_client(base, key) as client:
        raw = await client.chat.completions.with_raw_response.create(
            **{"model": OPENAI_MODEL, "messages": PROMPT, **kw})
        completion = raw.parse()
    return raw.headers.get("x-sidecar-cache"), completion.model_dump()


async def o_stream(base: str, include_usage: bool | None = None, key: str = OPENAI_KEY,
                   **kw) -> tuple[str | None, list[dict]]:
    if include_usage is not None:
        kw["stream_options"] = {"include_usage": include_usage}
    async with openai_client(base, key) as client:
        raw = await client.chat.completions.with_raw_response.create(
            **{"model": OPENAI_MODEL, "messages": PROMPT, "stream": True, **kw})
        stream = raw.parse()
        chunks = [chunk.model_dump() async for chunk in stream]
    return raw.headers.get("x-sidecar-cache"), chunks


def completion_summary(completion: dict) -> dict:
    choice = completion["choices"][0]
    return {"id": completion["id"], "created": completion["created"], "model": completion["model"],
            "content": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "usage": completion.get("usage")}


def chunks_summary(chunks: list[dict]) -> dict:
    """What a client assembles from chat.completion.chunk events."""
    assert len({c["id"] for c in chunks}) == 1
    with_choices = [c for c in chunks if c["choices"]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) <= 1
    return {"id": chunks[0]["id"], "created": chunks[0]["created"], "model": chunks[0]["model"],
            "content": "".join(c["choices"][0]["delta"]["content"] or "" for c in with_choices),
            "finish_reason": [c["choices"][0]["finish_reason"] for c in with_choices][-1],
            "usage": usage[0] if usage else None}


async def raw_post(base: str, api: str, body: dict, headers: dict | None = None) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(base + PATHS[api], json=body, headers={**HEADERS[api], **(headers or {})}) as resp:
            return resp.status, resp.headers, await resp.read()


def text_of(message: dict) -> str:
    return message["content"][0]["text"]


# ---- hits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ask", [a_json, a_stream, o_json, o_stream],
                         ids=["anthropic-json", "anthropic-stream", "openai-json", "openai-stream"])
async def test_second_identical_call_is_a_hit(px, mock, ask):
    first_state, first = await ask(px.url)
    await px.settle()
    second_state, second = await ask(px.url)
    assert (first_state, second_state) == ("miss", "hit")
    assert mock.count() == 1
    assert second == first  # the same id too: the mock makes a fresh one per call
    assert len(str(first)) > 100


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_recorded_stream_is_replayed_byte_for_byte(px, mock, api):
    body = {**BODIES[api], "stream": True}
    status1, _, original = await raw_post(px.url, api, body)
    await px.settle()
    status2, headers2, replayed = await raw_post(px.url, api, body)
    assert (status1, status2) == (200, 200)
    assert headers2["x-sidecar-cache"] == "hit"
    assert headers2["content-type"].startswith("text/event-stream")
    assert replayed == original
    assert (b"message_stop" if api == "anthropic" else b"[DONE]") in original
    assert mock.count() == 1


# ---- one answer, either form ----------------------------------------------------------------------


async def test_anthropic_stream_answer_serves_json_request(px, mock):
    state, streamed = await a_stream(px.url)
    await px.settle()
    state2, message = await a_json(px.url)
    assert (state, state2) == ("miss", "hit")
    assert message == streamed
    assert mock.count() == 1
    assert len(text_of(message).split()) == mock.profile.output_tokens
    assert message["usage"]["output_tokens"] == mock.profile.output_tokens
    assert message["stop_reason"] == "end_turn"


async def test_anthropic_json_answer_serves_stream_request(px, mock):
    state, message = await a_json(px.url)
    await px.settle()
    state2, streamed = await a_stream(px.url)
    assert (state, state2) == ("miss", "hit")
    assert streamed == message
    assert mock.count() == 1


async def test_anthropic_tool_use_answer_converts_both_ways(px, mock):
    tools = [{"name": "lookup", "description": "look up a word",
              "input_schema": {"type": "object", "properties": {"word": {"type": "string"}, "n": {"type": "integer"}}}}]
    kw = {"tools": tools, "messages": prompt("Please use a tool now.")}
    _, recorded_stream = await a_stream(px.url, **kw)
    await px.settle()
    _, as_json = await a_json(px.url, **kw)
    assert as_json == recorded_stream
    assert as_json["content"][0]["type"] == "tool_use" and as_json["content"][0]["input"]["n"] == 1
    kw["messages"] = prompt("Please use a tool again.")
    _, recorded_json = await a_json(px.url, **kw)
    await px.settle()
    _, as_stream = await a_stream(px.url, **kw)
    assert as_stream == recorded_json
    assert as_stream["content"][0]["type"] == "tool_use"
    assert mock.count() == 2


@pytest.mark.parametrize("include_usage", [None, False, True])
async def test_openai_json_answer_serves_stream_request(px, mock, include_usage):
    state, completion = await o_json(px.url)
    await px.settle()
    state2, chunks = await o_stream(px.url, include_usage)
    assert (state, state2) == ("miss", "hit")
    expected = completion_summary(completion)
    if not include_usage:
        expected["usage"] = None
    assert chunks_summary(chunks) == expected
    assert expected["content"] and mock.count() == 1


@pytest.mark.parametrize("recorded_usage", [False, True])
async def test_openai_stream_answer_serves_json_request(px, mock, recorded_usage):
    state, chunks = await o_stream(px.url, recorded_usage)
    await px.settle()
    state2, completion = await o_json(px.url)
    assert (state, state2) == ("miss", "hit")
    expected = chunks_summary(chunks)
    assert completion_summary(completion) == expected
    assert (expected["usage"] is not None) == recorded_usage
    assert mock.count() == 1


async def test_openai_stream_with_usage_serves_stream_without_usage(px, mock):
    _, with_usage = await o_stream(px.url, True)
    await px.settle()
    state, without = await o_stream(px.url, False)
    assert state == "hit"
    assert all(c["choices"] and not c.get("usage") for c in without)  # no usage chunk was asked for
    assert chunks_summary(without) == {**chunks_summary(with_usage), "usage": None}
    assert mock.count() == 1


# ---- what the key depends on ----------------------------------------------------------------------


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_different_api_keys_never_share_entries(px, mock, api):
    ask = a_json if api == "anthropic" else o_json
    state_a, answer_a = await ask(px.url, key="sk-key-A")
    await px.settle()
    state_b, answer_b = await ask(px.url, key="sk-key-B")
    await px.settle()
    assert (state_a, state_b) == ("miss", "miss")
    assert answer_a["id"] != answer_b["id"]
    assert mock.count() == 2
    # Each key then hits its own entry.
    assert await ask(px.url, key="sk-key-A") == ("hit", answer_a)
    assert await ask(px.url, key="sk-key-B") == ("hit", answer_b)
    assert mock.count() == 2
    assert len(px.stored()) == 2


IGNORED = {
    "metadata.user_id": ({"metadata": {"user_id": "session-1"}}, {"metadata": {"user_id": "session-2"}}),
    "sdk headers": ({"extra_headers": {"x-stainless-retry-count": "0", "user-agent": "agent/1.0"}},
                    {"extra_headers": {"x-stainless-retry-count": "2", "user-agent": "agent/2.0",
                                       "x-stainless-read-timeout": "99", "x-claude-code-session-id": "abc"}}),
    "stream flag": ({}, {"stream": False}),
}


@pytest.mark.parametrize("first, second", IGNORED.values(), ids=IGNORED.keys())
async def test_ignored_fields_and_headers_hit(px, mock, first, second):
    _, answer = await a_json(px.url, **first)
    await px.settle()
    state, again = await a_json(px.url, **second)
    assert state == "hit" and again == answer
    assert mock.count() == 1


CHANGES = {
    "message": {"messages": prompt("Say something about the mountains.")},
    "max_tokens": {"max_tokens": 31},
    "system": {"system": "You are terse."},
    "anthropic-beta": {"extra_headers": {"anthropic-beta": "tools-2024-04-04"}},
    "anthropic-version": {"extra_headers": {"anthropic-version": "2024-01-01"}},
    "temperature": {"extra_body": {"temperature": 0.5}},
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
async def test_other_changes_miss(px, mock, change):
    _, answer = await a_json(px.url)
    await px.settle()
    state, other = await a_json(px.url, **change)
    assert state == "miss"
    assert other["id"] != answer["id"]
    assert mock.count() == 2
    await px.settle()
    assert len(px.stored()) == 2


# ---- single flight -----------------------------------------------------------------------------------

N = 8


@pytest.mark.parametrize("ask", [a_json, o_json], ids=["anthropic", "openai"])
async def test_concurrent_identical_json_calls_make_one_upstream_call(px, mock, ask):
    mock.profile.ttft = 0.3  # long enough for all N to arrive while the first is upstream
    results = await asyncio.gather(*(ask(px.url) for _ in range(N)))
    assert mock.count() == 1
    states = sorted(state for state, _ in results)
    assert states == ["coalesced"] * (N - 1) + ["miss"]
    assert all(answer == results[0][1] for _, answer in results)
    await px.settle()
    assert await ask(px.url) == ("hit", results[0][1])
    assert mock.count() == 1


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_concurrent_identical_streams_share_one_upstream_stream(px, mock, api):
    hold = mock.hold_after_first_event = asyncio.Event()
    heads: list[str] = []
    all_started = asyncio.Event()
    body = {**BODIES[api], "stream": True}

    async def one(session: aiohttp.ClientSession) -> tuple[int, str, bytes]:
        async with session.post(px.url + PATHS[api], json=body, headers=HEADERS[api]) as resp:
            heads.append(resp.headers.get("x-sidecar-cache"))
            if len(heads) == N:
                all_started.set()
            return resp.status, resp.headers.get("x-sidecar-cache"), await resp.read()

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.ensure_future(one(session)) for _ in range(N)]
        try:
            # Every response has started while the upstream still holds all but its first event.
            await asyncio.wait_for(all_started.wait(), 10)
            assert mock.count() == 1 and mock.in_flight == 1
        finally:
            hold.set()
        results = await asyncio.gather(*tasks)
    assert mock.count() == 1
    assert sorted(state for _, state, _ in results) == ["coalesced"] * (N - 1) + ["miss"]
    bodies = {raw for _, _, raw in results}
    assert len(bodies) == 1  # every follower got exactly the leader's events
    (raw,) = bodies
    assert all(status == 200 for status, _, _ in results)
    assert (b"event: message_stop" if api == "anthropic" else b"data: [DONE]") in raw


async def test_streaming_followers_parse_to_the_same_message(px, mock):
    mock.profile.ttft = 0.3
    mock.profile.tokens_per_second = 200
    results = await asyncio.gather(*(a_stream(px.url) for _ in range(N)))
    assert mock.count() == 1
    assert sorted(s for s, _ in results) == ["coalesced"] * (N - 1) + ["miss"]
    assert all(message == results[0][1] for _, message in results)


# ---- what is never stored -----------------------------------------------------------------------------


NO_RETRIES = {"retry": {"max_attempts": 1}}  # the proxy retries 429/502/529 itself; let the error through


@pytest.mark.parametrize("kind, status", [("server_error", 500), ("bad_gateway", 502), ("overloaded", 529),
                                          ("rate_limit", 429)])
@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_error_answers_are_not_stored(start_cache, mock, api, kind, status):
    px = await start_cache(sections=NO_RETRIES)
    mock.inject(kind)
    got, _, _ = await raw_post(px.url, api, BODIES[api])
    assert got == status
    await px.settle()
    assert px.store.stats()["entries"] == 0
    got, headers, _ = await raw_post(px.url, api, BODIES[api])
    assert (got, headers["x-sidecar-cache"]) == (200, "miss")
    assert mock.count() == 2  # the identical call reached the mock again
    await px.settle()
    got, headers, _ = await raw_post(px.url, api, BODIES[api])
    assert headers["x-sidecar-cache"] == "hit" and mock.count() == 2  # the good answer was stored


async def test_invalid_request_errors_are_not_stored(px, mock):
    bad = {**BODIES["anthropic"], "max_tokens": 0}
    for expected_count in (1, 2):
        status, _, body = await raw_post(px.url, "anthropic", bad)
        assert status == 400, body
        assert mock.count() == expected_count
        await px.settle()
    assert px.store.stats()["entries"] == 0


@pytest.mark.parametrize("kind", ["drop_mid_stream", "error_mid_stream"])
@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_partial_streams_are_not_stored(px, mock, api, kind):
    body = {**BODIES[api], "stream": True}
    end = b"event: message_stop" if api == "anthropic" else b"data: [DONE]"
    mock.inject(kind)
    received = b""
    async with aiohttp.ClientSession() as session:
        async with session.post(px.url + PATHS[api], json=body, headers=HEADERS[api]) as resp:
            try:
                async for chunk in resp.content.iter_any():
                    received += chunk
            except aiohttp.ClientError:
                pass
    assert received and end not in received
    await px.settle()
    assert px.store.stats()["entries"] == 0
    status, headers, full = await raw_post(px.url, api, body)
    assert (status, headers["x-sidecar-cache"]) == (200, "miss")
    assert end in full
    assert mock.count() == 2


async def test_stream_cut_by_its_only_client_is_not_stored(px, mock):
    hold = mock.hold_after_first_event = asyncio.Event()
    body = {**BODIES["anthropic"], "stream": True}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(px.url + "/v1/messages", json=body, headers=HEADERS["anthropic"]) as resp:
                assert b"message_start" in await resp.content.readuntil(b"\n\n")
                resp.close()  # the agent goes away mid-stream
        await until(lambda: len(px.state.flights) == 0, what="the abandoned flight to end")
    finally:
        hold.set()
    await px.settle()
    assert px.store.stats()["entries"] == 0
    status, headers, full = await raw_post(px.url, "anthropic", body)
    assert (status, headers["x-sidecar-cache"]) == (200, "miss")
    assert mock.count() == 2


# ---- modes --------------------------------------------------------------------------------------------


async def record(start_cache, *asks) -> list[dict]:
    """Answers stored by a read-write proxy, which is then closed."""
    proxy = await start_cache()
    answers = []
    for ask in asks:
        state, answer = await ask(proxy.url)
        assert state == "miss"
        answers.append(answer)
    await proxy.close()
    return answers


async def test_read_only_hits_but_does_not_store(start_cache, mock):
    (stored,) = await record(start_cache, a_json)
    ro = await start_cache(mode="read-only")
    assert await a_json(ro.url) == ("hit", stored)
    assert mock.count() == 1
    other = {"messages": prompt("Something new.")}
    for expected in (2, 3):
        state, _ = await a_json(ro.url, **other)
        await ro.settle()
        assert state == "miss"
        assert mock.count() == expected
    assert len(ro.stored()) == 1


async def test_refresh_never_reads_but_writes(start_cache, mock):
    (stored,) = await record(start_cache, a_json)
    refresh = await start_cache(mode="refresh")
    state, fresh = await a_json(refresh.url)
    await refresh.settle()
    assert state == "miss" and fresh["id"] != stored["id"]
    state, fresher = await a_json(refresh.url)
    await refresh.settle()
    assert state == "miss" and fresher["id"] != fresh["id"]
    assert mock.count() == 3
    await refresh.close()
    rw = await start_cache()
    assert await a_json(rw.url) == ("hit", fresher)  # the refreshed answer replaced the old one
    assert mock.count() == 3


async def test_off_neither_reads_nor_stores(start_cache, mock):
    (stored,) = await record(start_cache, a_json)
    off = await start_cache(mode="off")
    for expected in (2, 3):
        state, answer = await a_json(off.url)
        await off.settle()
        assert state in (None, "bypass")
        assert answer["id"] != stored["id"]
        assert mock.count() == expected
    state, _ = await a_json(off.url, messages=prompt("Something new."))
    await off.settle()
    assert state in (None, "bypass") and mock.count() == 4
    assert len(off.stored()) == 1  # only what the read-write proxy stored


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_replay_miss_is_an_api_shaped_404_and_reaches_nobody(start_cache, mock, api):
    replay = await start_cache(mode="replay")
    status, headers, raw = await raw_post(replay.url, api, BODIES[api])
    body = orjson.loads(raw)
    assert status == 404
    if api == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
        message = body["error"]["message"]
    else:
        assert set(body["error"]) >= {"message", "type", "param", "code"}
        message = body["error"]["message"]
    assert message.startswith(REPLAY_MISS)
    # The SDKs see it as a 404 of their API.
    error = anthropic.NotFoundError if api == "anthropic" else openai.NotFoundError
    with pytest.raises(error):
        await (a_stream if api == "anthropic" else o_stream)(replay.url)
    assert mock.count() == 0
    await replay.settle()
    assert len(replay.stored()) == 0


async def test_replay_with_deterministic_only_never_calls_upstream(start_cache, mock):
    replay = await start_cache(mode="replay", deterministic_only=True)
    status, _, raw = await raw_post(replay.url, "anthropic", {**BODIES["anthropic"], "temperature": 0.7})
    assert status == 404, raw
    assert orjson.loads(raw)["error"]["message"].startswith(REPLAY_MISS)
    assert mock.count() == 0


async def test_replay_serves_recorded_answers(start_cache, mock):
    json_answer, stream_answer = await record(
        start_cache, a_json, lambda url: a_stream(url, messages=prompt("Streamed once.")))
    replay = await start_cache(mode="replay")
    assert await a_json(replay.url) == ("hit", json_answer)
    assert await a_stream(replay.url) == ("hit", json_answer)
    assert await a_json(replay.url, messages=prompt("Streamed once.")) == ("hit", stream_answer)
    assert mock.count() == 2


async def test_bypass_header_goes_upstream_and_stores_nothing(px, mock):
    _, stored = await a_json(px.url)
    await px.settle()
    state, bypassed = await a_json(px.url, extra_headers={"x-sidecar-cache": "bypass"})
    assert state == "bypass" and bypassed["id"] != stored["id"]
    assert mock.count() == 2
    assert "x-sidecar-cache" not in mock.received[-1].headers
    await px.settle()
    assert await a_json(px.url) == ("hit", stored)  # the bypassed answer replaced nothing
    # A bypassed new request is not stored either.
    new = {"messages": prompt("Never stored.")}
    await a_json(px.url, extra_headers={"x-sidecar-cache": "bypass"}, **new)
    await px.settle()
    state, _ = await a_json(px.url, **new)
    assert state == "miss" and mock.count() == 4


async def test_refresh_header_goes_upstream_and_replaces_the_entry(px, mock):
    _, stored = await a_json(px.url)
    await px.settle()
    state, refreshed = await a_json(px.url, extra_headers={"x-sidecar-cache": "refresh"})
    assert state == "miss" and refreshed["id"] != stored["id"]
    assert mock.count() == 2
    assert "x-sidecar-cache" not in mock.received[-1].headers
    assert not any(k.startswith("x-sidecar") for k in mock.received[-1].headers)
    await px.settle()
    assert await a_json(px.url) == ("hit", refreshed)
    assert mock.count() == 2
    assert len(px.stored()) == 1


async def test_hits_decode_and_convert_an_entry_once_until_it_changes(px, mock, monkeypatch):
    """A hit keeps the decoded entry and what it made of it (here, a stream from a JSON answer, and the replay
    prepared from it): the next hits decode, convert and prepare nothing; an entry replaced under the same key
    (a refresh) is decoded afresh."""
    from agent_sidecar.proxy import convert, replay
    made = {"decode": 0, "as_stream": 0, "prepared": 0}
    decode, as_stream, prepared = Entry.decode.__func__, convert.as_stream, replay._replay

    def counted_decode(cls, blob):
        made["decode"] += 1
        return decode(cls, blob)

    def counted_as_stream(*args):
        made["as_stream"] += 1
        return as_stream(*args)
    def counted_prepared(*args):
        made["prepared"] += 1
        return prepared(*args)
    monkeypatch.setattr(Entry, "decode", classmethod(counted_decode))
    monkeypatch.setattr(convert, "as_stream", counted_as_stream)
    monkeypatch.setattr(replay, "_replay", counted_prepared)
    state, stored = await a_json(px.url)
    await px.settle()
    hits = [await a_stream(px.url) for _ in range(3)]
    assert [h[0] for h in hits] == ["hit"] * 3 and all(h[1] == stored for h in hits)
    assert made == {"decode": 1, "as_stream": 1, "prepared": 1}
    _, refreshed = await a_json(px.url, extra_headers={"x-sidecar-cache": "refresh"})
    await px.settle()
    assert await a_stream(px.url) == ("hit", refreshed) and refreshed["id"] != stored["id"]
    assert made == {"decode": 2, "as_stream": 2, "prepared": 2}
    from agent_sidecar.proxy import conversation
    assert conversation._DERIVED   # what the checkpoints worked out from the bodies' parts
    relieved = relieve_memory(px.state)   # memory pressure: the decoded entries go, hits decode again
    assert relieved["dropped_recent_records"] >= 1 and not conversation._DERIVED
    assert await a_stream(px.url) == ("hit", refreshed) and made == {"decode": 3, "as_stream": 3, "prepared": 3}


async def test_header_overrides_replay_mode(start_cache, mock):
    replay = await start_cache(mode="replay")
    state, _ = await a_json(replay.url, extra_headers={"x-sidecar-cache": "bypass"})
    assert state == "bypass" and mock.count() == 1
    state, refreshed = await a_json(replay.url, extra_headers={"x-sidecar-cache": "refresh"})
    assert state == "miss" and mock.count() == 2
    await replay.settle()
    assert await a_json(replay.url) == ("hit", refreshed)


async def test_deterministic_only_stores_only_temperature_zero(start_cache, mock):
    proxy = await start_cache(deterministic_only=True)
    zero = {"extra_body": {"temperature": 0}}
    _, cold = await a_json(proxy.url, **zero)
    await proxy.settle()
    assert await a_json(proxy.url, **zero) == ("hit", cold)
    assert mock.count() == 1
    for kw in ({"extra_body": {"temperature": 0.7}}, {}):
        for expected in (mock.count() + 1, mock.count() + 2):
            state, _ = await a_json(proxy.url, **kw)
            await proxy.settle()
            assert state == "bypass" and mock.count() == expected
    assert len(proxy.stored()) == 1


# ---- size limit -------------------------------------------------------------------------------------


async def test_eviction_keeps_size_under_limit_and_drops_least_recently_used(start_cache, mock):
    proxy = await start_cache(max_size_mb=0.01)
    limit = proxy.store.stats()["max_bytes"]
    assert limit == int(0.01 * 1024 * 1024)

    async def call(i: int) -> tuple[str | None, dict]:
        return await a_json(proxy.url, messages=prompt(f"Tell me about river number {i}."))

    ids = []
    for i in range(30):
        ids.append((await call(i))[1]["id"])
    await proxy.settle()

    def present() -> set[int]:
        stored_ids = {orjson.loads(e.body)["id"] for e in proxy.stored().values()}
        return {i for i, answer_id in enumerate(ids) if answer_id in stored_ids}

    def check_size() -> None:
        stats = proxy.store.stats()
        assert stats["bytes"] <= limit
        assert stats["bytes"] == sum(len(blob) for _, blob in proxy.store.items())  # the accounting is exact
        assert stats["entries"] == len(list(proxy.store.items()))

    check_size()
    kept = present()
    oldest = 30 - len(kept)
    assert 2 < len(kept) < 30
    assert kept == set(range(oldest, 30))  # the newest survive, the oldest went first
    assert (await call(29))[0] == "hit"
    count = mock.count()
    # Use the oldest survivor: it becomes recently used and outlives younger ones.
    assert (await call(oldest))[0] == "hit"
    for i in range(30, 33):
        ids.append((await call(i))[1]["id"])
    await proxy.settle()
    check_size()
    after = present()
    assert oldest in after and oldest + 1 not in after
    assert {30, 31, 32} <= after
    assert mock.count() == count + 3
    state, _ = await call(0)  # long evicted: a miss
    assert state == "miss" and mock.count() == count + 4


async def test_answer_larger_than_the_whole_limit_is_not_kept(start_cache, mock):
    proxy = await start_cache(max_size_mb=0.001)
    mock.profile.output_tokens = 400  # an answer of a few KB, over the 1 KB limit
    state, _ = await a_json(proxy.url, max_tokens=500)
    await proxy.settle()
    stats = proxy.store.stats()
    assert stats["bytes"] <= stats["max_bytes"], stats


async def test_expired_entries_are_misses(start_cache, mock):
    proxy = await start_cache(ttl_seconds=60)
    _, first = await a_json(proxy.url)
    await proxy.settle()
    assert await a_json(proxy.url) == ("hit", first)
    [(key, entry)] = proxy.stored().items()
    entry.created -= 61  # recorded a minute ago
    await proxy.store.put(key, entry.encode())
    state, fresh = await a_json(proxy.url)
    assert state == "miss" and fresh["id"] != first["id"]
    assert mock.count() == 2
    await proxy.settle()
    assert await a_json(proxy.url) == ("hit", fresh)


async def test_replay_pacing_follows_the_recorded_timing(start_cache, mock):
    mock.profile.tokens_per_second = 25  # 12 deltas: about half a second
    proxy = await start_cache(replay_pacing=True)
    _, original = await a_stream(proxy.url)
    await proxy.settle()
    [entry] = proxy.stored().values()
    recorded = entry.pacing[-1][0]   # the last chunk's offset as the proxy received it (a load only adds to it)
    assert recorded >= 0.25
    t0 = time.monotonic()
    assert await a_stream(proxy.url) == ("hit", original)
    assert time.monotonic() - t0 >= 0.95 * recorded   # paced: never faster than recorded


# ---- corruption -------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [lambda blob: b"garbage", lambda blob: blob[:20],
                                    lambda blob: b"SC9" + blob[3:]], ids=["garbage", "truncated", "other-version"])
async def test_corrupt_entry_is_a_miss_and_is_removed(start_cache, mock, isolated_env, damage):
    good, other = await record(start_cache, a_json, lambda url: a_json(url, messages=prompt("Other.")))
    store = lmdb_store(isolated_env)
    try:
        [(key, blob)] = [(k, b) for k, b in store.items() if orjson.loads(Entry.decode(b).body)["id"] == good["id"]]
        store.lmdb.write_now(lambda txn: txn.put(key, damage(blob), db=store.lmdb.db["responses"]))
        size_before = store.stats()["bytes"]
    finally:
        store.lmdb.close()

    ro = await start_cache(mode="read-only")
    state, answer = await a_json(ro.url)
    assert state == "miss" and answer["id"] != good["id"]  # served, from upstream
    assert mock.count() == 3
    await ro.settle()
    assert key not in dict(ro.store.items())  # the unreadable entry was removed
    assert ro.store.stats()["bytes"] == size_before - len(blob) == sum(len(b) for _, b in ro.store.items())
    assert await a_json(ro.url, messages=prompt("Other.")) == ("hit", other)  # the rest still serves
    await ro.close()

    rw = await start_cache()
    state, _ = await a_json(rw.url)
    await rw.settle()
    assert state == "miss"
    state, _ = await a_json(rw.url)
    assert state == "hit" and mock.count() == 4


# ---- real processes: crash safety and sharing --------------------------------------------------------


async def serve(sidecar, mock: MockUpstream) -> tuple[Any, str]:
    """`sidecar serve --port 0` with the mock upstream; returns the process and its URL."""
    proc = await sidecar.spawn("serve", "--port", "0", env=upstream_env(mock))
    deadline = time.monotonic() + 20
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), max(0.1, deadline - time.monotonic()))
        assert line, f"sidecar serve exited: {await proc.stderr.read()!r}"
        match = re.search(rb"serving on (http://127\.0\.0\.1:\d+)", line)
        if match:
            return proc, match.group(1).decode()


def distinct(i: int, max_tokens: int = 32) -> dict:
    return {**BODIES["anthropic"], "max_tokens": max_tokens, "messages": prompt(f"Tell me about lake number {i}.")}


async def test_sigkill_mid_burst_leaves_store_readable(sidecar, mock, isolated_env):
    proc, url = await serve(sidecar, mock)
    stored: dict[int, str] = {}
    for i in range(6):
        status, headers, raw = await raw_post(url, "anthropic", distinct(i))
        assert (status, headers["x-sidecar-cache"]) == (200, "miss")
        stored[i] = orjson.loads(raw)["id"]
        # Ask until it is a hit: then the entry is committed (a finished flight may answer meanwhile).
        deadline = time.monotonic() + 10
        while (await raw_post(url, "anthropic", distinct(i)))[1]["x-sidecar-cache"] != "hit":
            assert time.monotonic() < deadline, "entry never became a hit"
    assert mock.count() == 6

    # A burst of streams of staggered lengths (0.02 s to 1.6 s), so answers are being relayed and written
    # when the kill comes.
    mock.profile.tokens_per_second = 50
    mock.profile.output_tokens = 80
    finished = asyncio.Event()
    done = 0

    async def burst(i: int) -> None:
        nonlocal done
        status, _, _ = await raw_post(url, "anthropic", {**distinct(i, max_tokens=1 + 2 * (i - 100)), "stream": True})
        assert status == 200
        done += 1
        if done >= 3:
            finished.set()

    tasks = [asyncio.ensure_future(burst(i)) for i in range(100, 140)]
    try:
        await asyncio.wait_for(finished.wait(), 20)
        assert done < 40, "the burst finished before the kill"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert any(isinstance(o, Exception) for o in outcomes)  # some calls really were cut by the kill
    assert proc.returncode == -signal.SIGKILL

    store = lmdb_store(isolated_env)
    try:
        items = list(store.items())
        entries = [Entry.decode(blob) for _, blob in items]  # every entry decodes
        ids = {orjson.loads(e.body)["id"] for e in entries if not e.stream}
        assert set(stored.values()) <= ids
        for entry in entries:
            assert entry.status == 200
            assert entry.body.rstrip().endswith(b'{"type":"message_stop"}') if entry.stream else entry.body
        stats = store.stats()
        assert stats["entries"] == len(items)
        assert stats["bytes"] == sum(len(blob) for _, blob in items)
    finally:
        store.lmdb.close()

    count = mock.count()
    _, url2 = await serve(sidecar, mock)
    for i, answer_id in stored.items():
        status, headers, raw = await raw_post(url2, "anthropic", distinct(i))
        assert (status, headers["x-sidecar-cache"]) == (200, "hit")
        assert orjson.loads(raw)["id"] == answer_id
    assert mock.count() == count


SHARING_AGENT = r'''
import json, os, sys, time
from pathlib import Path
import anthropic

client = anthropic.Anthropic(max_retries=0, timeout=20)
deadline = time.monotonic() + 15
while True:
    raw = client.messages.with_raw_response.create(
        model="claude-mock-1", max_tokens=32, messages=[{"role": "user", "content": "Shared question."}])
    state = raw.headers.get("x-sidecar-cache")
    print(json.dumps({"cache": state, "id": raw.parse().id}), flush=True)
    if state == "hit" or not os.environ.get("UNTIL_HIT") or time.monotonic() > deadline:
        break
release = os.environ.get("RELEASE")
if release:
    print("waiting", flush=True)
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
'''


async def test_two_sidecars_share_the_cache(sidecar, mock, script, tmp_path):
    agent = script(SHARING_AGENT, "shared_agent.py")
    env = {**upstream_env(mock), "ANTHROPIC_API_KEY": KEY}
    release = tmp_path / "release"
    first = await sidecar.spawn("run", "--quiet", "--", "python", str(agent),
                                env={**env, "UNTIL_HIT": "1", "RELEASE": str(release)})
    lines = []
    while True:
        line = await asyncio.wait_for(first.stdout.readline(), 20)
        assert line, f"first agent ended early: {await first.stderr.read()!r}"
        if line.strip() == b"waiting":
            break
        lines.append(orjson.loads(line))
    assert lines[0]["cache"] == "miss" and lines[-1]["cache"] == "hit"
    assert {line["id"] for line in lines} == {lines[0]["id"]}
    assert mock.count() == 1

    # The first sidecar is still running; the second has its own proxy on the same state dir.
    second = await sidecar.run("run", "--quiet", "--", "python", str(agent), env=env)
    assert second.returncode == 0, second.err
    [answer] = [orjson.loads(line) for line in second.out.splitlines()]
    assert answer == {"cache": "hit", "id": lines[0]["id"]}
    assert mock.count() == 1

    release.touch()
    assert await asyncio.wait_for(first.wait(), 20) == 0


# ---- sidecar cache ... ------------------------------------------------------------------------------


async def populate(start_cache) -> dict[str, dict]:
    """Three entries: Anthropic JSON, Anthropic stream, OpenAI JSON; the proxy is closed after."""
    proxy = await start_cache()
    answers = {"a_json": (await a_json(proxy.url))[1],
               "a_stream": (await a_stream(proxy.url, messages=prompt("A streamed one.")))[1],
               "o_json": (await o_json(proxy.url))[1]}
    await proxy.settle()
    keys = {}
    for key, entry in proxy.stored().items():
        body = orjson.loads(entry.body) if not entry.stream else None
        name = "a_stream" if entry.stream else "o_json" if body["id"].startswith("chatcmpl") else "a_json"
        keys[name] = key
    await proxy.close()
    assert len(keys) == 3
    return {name: {"answer": answers[name], "key": keys[name]} for name in answers}


async def test_cli_stats_list_show(sidecar, start_cache, mock):
    entries = await populate(start_cache)
    stats = await sidecar.run("cache", "stats")
    assert stats.returncode == 0, stats.err
    assert re.search(r"^entries\s+3$", stats.out, re.M)

    listing = await sidecar.run("cache", "list")
    assert listing.returncode == 0, listing.err
    listed = set(re.findall(r"^([0-9a-f]{12})\s", listing.out, re.M))   # a key prefix, enough for show
    assert listed == {e["key"].hex()[:12] for e in entries.values()}
    assert "/v1/chat/completions" in listing.out and "/v1/messages" in listing.out

    for name in ("a_json", "a_stream", "o_json"):
        key = entries[name]["key"].hex()
        shown = await sidecar.run("cache", "show", key[:10])
        assert shown.returncode == 0, shown.err
        doc = orjson.loads(shown.stdout)
        assert doc["key"] == key
        assert doc["stream"] == (name == "a_stream")
        answer = entries[name]["answer"]
        assert doc["answer"]["id"] == answer["id"]
        if name == "o_json":
            assert doc["answer"]["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]
        else:
            assert doc["answer"]["content"][0]["text"] == text_of(answer)  # a stream is assembled
        assert not any(secret in shown.out for secret in (KEY, OPENAI_KEY))

    missing = await sidecar.run("cache", "show", "ffffffffffffffffffffffffffffffff")
    assert missing.returncode == 2 and "no cache entry matches" in missing.err


def printed(out: str, label: str) -> str:
    match = re.search(rf"^{label}\s+([0-9a-f]{{32}})", out, re.M)
    assert match, out
    return match.group(1)


async def test_cli_key_matches_the_proxy_and_ignores_user_id(sidecar, start_cache, mock):
    proxy = await start_cache()
    await a_json(proxy.url, metadata={"user_id": "session-1"})
    await proxy.settle()
    [(stored_key, entry)] = proxy.stored().items()
    await proxy.close()
    seen = mock.received[0]

    exact = await sidecar.run("cache", "key", input=orjson.dumps(
        {"path": seen.path, "headers": seen.headers, "body": seen.json}))
    assert exact.returncode == 0, exact.err
    assert printed(exact.out, "request hash") == entry.meta["hash"]
    assert printed(exact.out, "key") == stored_key.hex()  # same secret, same credential partition
    assert KEY not in exact.out

    def body(user_id: str, text: str = "Say something about the sea.") -> bytes:
        return orjson.dumps({**BODIES["anthropic"], "messages": prompt(text), "metadata": {"user_id": user_id}})

    one, two, other = await asyncio.gather(sidecar.run("cache", "key", input=body("session-1")),
                                           sidecar.run("cache", "key", input=body("session-2")),
                                           sidecar.run("cache", "key", input=body("session-1", "Other.")))
    hashes = [printed(done.out, "request hash") for done in (one, two, other)]
    assert hashes[0] == hashes[1] != hashes[2]
    assert "user_id" not in one.out


async def test_cli_export_import_replays_with_any_key(sidecar, start_cache, mock, tmp_path):
    entries = await populate(start_cache)
    export = tmp_path / "agent.cache.jsonl"
    done = await sidecar.run("cache", "export", str(export))
    assert done.returncode == 0, done.err
    lines = [orjson.loads(line) for line in export.read_bytes().splitlines()]
    assert len(lines) == 3
    text = export.read_text()
    assert KEY not in text and OPENAI_KEY not in text
    assert all(KEY.encode() not in base64.b64decode(line["entry"]) for line in lines)

    fresh = tmp_path / "ci-state"
    done = await sidecar.run("cache", "import", str(export), env={"SIDECAR_STATE_DIR": str(fresh)})
    assert done.returncode == 0, done.err
    assert "imported 3 entries" in done.out
    stats = await sidecar.run("cache", "stats", env={"SIDECAR_STATE_DIR": str(fresh)})
    assert re.search(r"^entries\s+3$", stats.out, re.M)

    count = mock.count()
    replay = await start_cache(state_dir=fresh, mode="replay")
    assert await a_json(replay.url, key="dummy") == ("hit", entries["a_json"]["answer"])
    assert await a_stream(replay.url, key="another", messages=prompt("A streamed one.")) == \
        ("hit", entries["a_stream"]["answer"])
    assert await o_json(replay.url, key="dummy") == ("hit", entries["o_json"]["answer"])
    assert mock.count() == count
    # What was not recorded is still a replay miss, whatever the key.
    with pytest.raises(anthropic.NotFoundError):
        await a_json(replay.url, key="dummy", messages=prompt("Never recorded."))
    assert mock.count() == count


async def test_cli_import_rejects_a_non_export(sidecar, tmp_path):
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"hello": "world"}\n')
    done = await sidecar.run("cache", "import", str(junk))
    assert done.returncode == 2
    assert "not a sidecar cache export" in done.err


async def test_cli_clear(sidecar, start_cache, mock):
    await populate(start_cache)
    done = await sidecar.run("cache", "clear")
    assert done.returncode == 0, done.err
    assert "removed 3 entries" in done.out
    stats = await sidecar.run("cache", "stats")
    assert re.search(r"^entries\s+0$", stats.out, re.M) and re.search(r"^size\s+0 B of", stats.out, re.M)
    proxy = await start_cache()
    state, _ = await a_json(proxy.url)
    assert state == "miss" and mock.count() == 4


async def test_cli_prune(sidecar, start_cache, mock, isolated_env):
    entries = await populate(start_cache)
    store = lmdb_store(isolated_env)
    try:
        victim = entries["o_json"]["key"]
        store.lmdb.write_now(lambda txn: txn.put(victim, b"not an entry", db=store.lmdb.db["responses"]))
    finally:
        store.lmdb.close()

    done = await sidecar.run("cache", "prune")
    assert done.returncode == 0, done.err
    assert "removed 1 unreadable or expired" in done.out

    def check(expected_keys: set[bytes], limit_mb: float = 1024.0) -> None:
        store = lmdb_store(isolated_env, limit_mb)
        try:
            items = dict(store.items())
            assert set(items) == expected_keys
            for blob in items.values():
                Entry.decode(blob)
            stats = store.stats()
            assert stats["bytes"] == sum(map(len, items.values())) <= stats["max_bytes"]
        finally:
            store.lmdb.close()

    check({entries["a_json"]["key"], entries["a_stream"]["key"]})

    # Over a smaller size limit: evicts least recently used first (the Anthropic JSON answer is older).
    store = lmdb_store(isolated_env)
    try:
        sizes = {k: len(b) for k, b in store.items()}
    finally:
        store.lmdb.close()
    limit_mb = (sizes[entries["a_stream"]["key"]] + 1) / (1024 * 1024)
    done = await sidecar.run("cache", "prune", env={"SIDECAR_CACHE_MAX_SIZE_MB": repr(limit_mb)})
    assert done.returncode == 0, done.err
    check({entries["a_stream"]["key"]}, limit_mb)

    # Expired entries go.
    done = await sidecar.run("cache", "prune", env={"SIDECAR_CACHE_TTL_SECONDS": "0.000001"})
    assert done.returncode == 0, done.err
    assert "removed 1 unreadable or expired" in done.out
    check(set())
