"""The pipeline's own promises, through a real in-process proxy and the mock API.

A turn is checkpointed exactly once, whether its answer came from the
upstream, the cache, or an identical call in flight; calls that are not model
calls take no slot and are not counted.
"""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import orjson

from tests.conftest import unique_prompt

HEADERS = {"x-api-key": "sk-test", "anthropic-version": "2023-06-01", "content-type": "application/json"}


def claude_code_body(messages: list[dict], *, stream: bool) -> dict:
    """Claude Code's shape: its own session id inside metadata.user_id (left out of the cache key)."""
    user_id = orjson.dumps({"device_id": "d", "account_uuid": "", "session_id": str(uuid.uuid4())}).decode()
    return {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream, "messages": messages,
            "metadata": {"user_id": user_id}}


async def post(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[str, bytes]:
    async with http.post(url + "/v1/messages", data=orjson.dumps(body), headers=HEADERS) as resp:
        assert resp.status == 200
        return resp.headers["x-sidecar-cache"], await resp.read()


def count_checkpoints(px, monkeypatch) -> list[str]:
    seen: list[str] = []
    original = px.state.sessions.checkpoint

    async def counted(call, answer, headers):
        seen.append(call.cache_outcome)
        await original(call, answer, headers)
    monkeypatch.setattr(px.state.sessions, "checkpoint", counted)
    return seen


async def test_a_streamed_turn_is_checkpointed_once(start_app, mock, monkeypatch):
    px = await start_app(mock.url)
    seen = count_checkpoints(px, monkeypatch)
    async with aiohttp.ClientSession() as http:
        for stream in (True, False):
            outcome, _ = await post(http, px.url, claude_code_body(unique_prompt(), stream=stream))
            assert outcome == "miss"
    assert seen == ["miss", "miss"]
    assert [s["turns"] for s in px.state.sessions.list()] == [1, 1]


async def test_a_hit_is_checkpointed_into_its_own_conversation(start_app, mock, monkeypatch):
    px = await start_app(mock.url)
    seen = count_checkpoints(px, monkeypatch)
    messages = unique_prompt("hit")
    async with aiohttp.ClientSession() as http:
        first = await post(http, px.url, claude_code_body(messages, stream=True))
        await px.state.cache.drain()
        second = await post(http, px.url, claude_code_body(messages, stream=False))   # another run, another id
    assert (first[0], second[0]) == ("miss", "hit") and mock.count("/v1/messages") == 1
    assert seen == ["miss", "hit"]
    sessions = px.state.sessions.list()
    assert len(sessions) == 2 and {s["messages"] for s in sessions} == {2}
    replies = [px.state.sessions.messages(s["id"])[-1] for s in sessions]
    assert replies[0] == replies[1] and replies[0]["role"] == "assistant" and replies[0]["content"]


async def test_coalesced_calls_are_checkpointed_each_into_its_conversation(start_app, mock, monkeypatch):
    px = await start_app(mock.url)
    seen = count_checkpoints(px, monkeypatch)
    hold = mock.hold_after_first_event = asyncio.Event()
    messages = unique_prompt("coalesced")
    async with aiohttp.ClientSession() as http:
        leader = asyncio.ensure_future(post(http, px.url, claude_code_body(messages, stream=True)))
        while mock.in_flight == 0:
            await asyncio.sleep(0.005)
        follower = asyncio.ensure_future(post(http, px.url, claude_code_body(messages, stream=True)))
        while len(px.state.flights) and not any(f.subscribers > 1 for f in px.state.flights._by_key.values()):
            await asyncio.sleep(0.005)
        hold.set()
        outcomes = sorted([(await leader)[0], (await follower)[0]])
    assert outcomes == ["coalesced", "miss"] and mock.count("/v1/messages") == 1
    assert sorted(seen) == ["coalesced", "miss"]
    assert len(px.state.sessions.list()) == 2


async def test_calls_that_are_not_model_calls_take_no_slot_and_are_not_counted(start_app, mock):
    px = await start_app(mock.url, limits={"max_concurrency": 1})
    hold = mock.hold_after_first_event = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        generation = asyncio.ensure_future(post(http, px.url, claude_code_body(unique_prompt(), stream=True)))
        while mock.in_flight == 0:
            await asyncio.sleep(0.005)
        assert (await px.limits())["in_flight"] == 1           # the only slot is taken
        async with http.head(px.url + "/") as resp:             # Claude Code's preflight: answered at once
            preflight = resp.status
        async with http.get(px.url + "/v1/models", headers=HEADERS) as resp:
            models = resp.status
        hold.set()
        await generation
    assert models == 200 and preflight in (200, 404)
    records = await px.records()
    assert [r["route"] for r in records] == ["/v1/messages"]
    assert px.state.stats.errors == {} and (await px.limits())["in_flight"] == 0
