"""Concurrency limits, fair queueing and upstream retries.

The proxy runs in-process (its upstream the mock API, or a tiny purpose-built
upstream where the mock cannot say something); agents are the official async
SDKs, or raw aiohttp where bytes, headers or disconnects matter. Each test
starts its own proxy with the [limits]/[retry] settings it is about.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import anthropic
import orjson

try:  # the transport the installed SDKs use
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import pytest
from aiohttp import web

from agent_sidecar.bench.mock_upstream import MockUpstream, Profile
from conftest import AppProxy, until, unique_prompt
from agent_sidecar.proxy.retry import requested_delay

MODEL = "claude-mock-1"
KEY = "sk-ant-test"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}




# ---- the proxy in-process with chosen settings ----------------------------------------------


Proxy = AppProxy


@pytest.fixture
def start(start_app):
    """start(upstream_url, limits={...}, retry={...}, ...) -> a proxy in front of `upstream_url`."""
    return start_app




def client(base: str, max_retries: int = 0, timeout: float = 30) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key=KEY, max_retries=max_retries, timeout=timeout)


async def ask(sdk: anthropic.AsyncAnthropic, model: str = MODEL, tag: str = "") -> str:
    message = await sdk.messages.create(model=model, max_tokens=16, messages=unique_prompt(tag))
    return message.content[0].text


async def gather_errors(coros) -> list[BaseException]:
    results = await asyncio.gather(*coros, return_exceptions=True)
    return [r for r in results if isinstance(r, BaseException)]


def body(stream: bool = False, tag: str = "", model: str = MODEL) -> bytes:
    return orjson.dumps({"model": model, "max_tokens": 64, "messages": unique_prompt(tag), "stream": stream})


# ---- concurrency limits ----------------------------------------------------------------------


async def test_limit_keeps_upstream_under_its_cap(start, mock: MockUpstream):
    mock.profile = Profile(ttft=0.1, max_concurrency=4)
    px = await start(mock.url, limits={"max_concurrency": 4})
    async with client(px.url) as sdk:
        errors = await gather_errors(ask(sdk) for _ in range(32))
    assert errors == []
    assert mock.count() == 32
    assert mock.peak_in_flight <= 4
    assert mock.rate_limited == 0
    snap = await px.limits()
    assert snap["waited"] > 0 and snap["in_flight"] == 0 and snap["queued"] == 0


async def test_retries_and_adaptive_limit_absorb_upstream_cap(start, mock: MockUpstream):
    """No limit configured: the upstream's 429s are retried and the limit is learnt."""
    mock.profile = Profile(ttft=0.1, max_concurrency=4, retry_after=0.2)
    px = await start(mock.url)
    async with client(px.url, max_retries=0) as sdk:
        errors = await gather_errors(ask(sdk) for _ in range(32))
    assert errors == []
    assert mock.rate_limited > 0          # the cap was hit ...
    snap = await px.limits()
    assert snap["retries"] > 0            # ... and absorbed by the sidecar's retries
    assert snap["adaptive_decreases"] >= 1
    assert snap["effective_limit"] is not None and 1 <= snap["effective_limit"] <= 16


async def test_fair_queue_serves_second_agent_promptly(start, mock: MockUpstream):
    mock.profile = Profile(ttft=0.05)
    px = await start(mock.url, limits={"max_concurrency": 2}, cache={"mode": "off"})
    done: list[str] = []

    async def one(sdk, agent: str) -> None:
        await ask(sdk, tag=agent)
        done.append(agent)

    async with client(px.agent("agent-a")) as a, client(px.agent("agent-b")) as b:
        a_calls = [asyncio.create_task(one(a, "a")) for _ in range(30)]
        await until(lambda: px.state.limiter.queued == 28, what="agent-a's calls to queue")
        b_calls = [asyncio.create_task(one(b, "b")) for _ in range(3)]
        await until(lambda: px.state.limiter.queued == 31, what="agent-b's calls to queue")
        assert await gather_errors(a_calls + b_calls) == []
    assert done.count("b") == 3
    a_completions = [i for i, agent in enumerate(done) if agent == "a"]
    last_b = max(i for i, agent in enumerate(done) if agent == "b")
    assert last_b < a_completions[9], f"agent-b starved: completion order {''.join(done)}"


async def test_per_agent_limit(start, mock: MockUpstream):
    mock.profile = Profile(ttft=0.1)
    px = await start(mock.url, limits={"per_agent": 2})
    async with client(px.agent("solo")) as sdk:
        assert await gather_errors(ask(sdk) for _ in range(8)) == []
    assert mock.peak_in_flight == 2
    mock.reset()
    # The limit is per agent: a second agent is not held back by the first one's queue.
    mock.profile.ttft = 0.3
    limiter = px.state.limiter
    waited = limiter.waited
    async with client(px.agent("one")) as one, client(px.agent("two")) as two:
        busy = [asyncio.create_task(ask(one)) for _ in range(6)]
        await until(lambda: limiter.queued == 4, what="agent one's calls to queue")
        assert limiter.waited == waited + 4
        other = [asyncio.create_task(ask(two)) for _ in range(2)]
        await until(lambda: limiter.by_agent["two"] == 2 or limiter.queued > 4, what="agent two's calls")
        seen = limiter.snapshot()
        assert await gather_errors(busy + other) == []
    assert seen["in_flight_by_agent"].get("two") == 2, f"agent two waits behind agent one: {seen}"
    assert limiter.waited == waited + 4
    assert mock.peak_in_flight == 4


async def test_per_model_limit(start, mock: MockUpstream):
    mock.profile = Profile(ttft=0.1)
    px = await start(mock.url, limits={"per_model": ["claude-mock-1=2", "claude-mock-2 = 3"]})
    assert (await px.limits())["per_model"] == {"claude-mock-1": 2, "claude-mock-2": 3}
    async with client(px.url) as sdk:
        assert await gather_errors(ask(sdk, "claude-mock-1") for _ in range(8)) == []
        assert mock.peak_in_flight == 2
        mock.reset()
        assert await gather_errors(ask(sdk, "claude-mock-2") for _ in range(8)) == []
        assert mock.peak_in_flight == 3
        mock.reset()
        # Calls to a model with room are not held back by another model's queue (same agent).
        mock.profile.ttft = 0.3
        limiter = px.state.limiter
        limited = [asyncio.create_task(ask(sdk, "claude-mock-1")) for _ in range(6)]
        await until(lambda: limiter.queued == 4, what="claude-mock-1's calls to queue")
        free = [asyncio.create_task(ask(sdk, "claude-mock-3")) for _ in range(4)]
        await until(lambda: limiter.by_model["claude-mock-3"] == 4 or limiter.queued > 4, what="claude-mock-3")
        seen = {"claude-mock-3 in flight": limiter.by_model["claude-mock-3"], **limiter.snapshot()}
        assert await gather_errors(limited + free) == []
    assert seen["claude-mock-3 in flight"] == 4, f"claude-mock-3 waits behind claude-mock-1: {seen}"
    assert mock.peak_in_flight == 2 + 4


# ---- queue bounds ----------------------------------------------------------------------------


async def test_full_queue_refuses_with_429(start, mock: MockUpstream):
    mock.profile = Profile(ttft=0.5)
    px = await start(mock.url, limits={"max_concurrency": 1, "max_queue": 1})
    limiter = px.state.limiter
    async with aiohttp.ClientSession() as session:
        async def post() -> tuple[int, Any, dict]:
            async with session.post(px.url + "/v1/messages", data=body(), headers=HEADERS) as resp:
                return resp.status, resp.headers, await resp.json()

        first = asyncio.create_task(post())
        await until(lambda: limiter.in_flight == 1, what="the first call to take the slot")
        second = asyncio.create_task(post())
        await until(lambda: limiter.queued == 1, what="the second call to queue")
        status, headers, doc = await post()
        assert status == 429
        assert headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1
        assert doc["type"] == "error" and doc["error"]["type"] == "rate_limit_error"
        assert doc["error"]["message"].startswith("sidecar:")
        assert "limits.max_queue" in doc["error"]["message"]
        assert [(await first)[0], (await second)[0]] == [200, 200]
    assert mock.count() == 2
    assert limiter.refused == 1


async def test_queue_timeout_refuses_and_sdk_retries(start, mock: MockUpstream):
    mock.hold_after_first_event = asyncio.Event()
    px = await start(mock.url, limits={"max_concurrency": 1, "queue_timeout": 0.2})
    limiter = px.state.limiter
    async with aiohttp.ClientSession() as session:
        async with session.post(px.url + "/v1/messages", data=body(stream=True), headers=HEADERS) as held:
            assert held.status == 200                  # holds the only slot until released
            assert limiter.in_flight == 1
            async with client(px.url, max_retries=0) as sdk:
                with pytest.raises(anthropic.RateLimitError) as refused:
                    await ask(sdk)
            message = refused.value.body["error"]["message"]
            assert message.startswith("sidecar:") and "limits.queue_timeout" in message
            assert refused.value.response.headers["retry-after"]
            assert limiter.refused == 1
            # The SDK's default retries: it retries the 429 (after retry-after), twice.
            async with client(px.url, max_retries=2) as sdk:
                raw = sdk.messages.with_raw_response
                with pytest.raises(anthropic.RateLimitError) as refused:
                    await raw.create(model=MODEL, max_tokens=16, messages=unique_prompt())
            assert refused.value.response.request.headers["x-stainless-retry-count"] == "2"
            assert limiter.refused == 1 + 3
            mock.hold_after_first_event.set()
            assert b"message_stop" in await held.read()
    assert mock.count() == 1   # none of the refused calls reached the upstream


# ---- disconnects -----------------------------------------------------------------------------


async def test_disconnect_mid_stream_frees_slot_and_cancels_upstream(start, mock: MockUpstream):
    mock.profile = Profile(tokens_per_second=5, output_tokens=60)   # a 12 s stream
    px = await start(mock.url, limits={"max_concurrency": 1})
    limiter = px.state.limiter
    async with aiohttp.ClientSession() as session:
        resp = await session.post(px.url + "/v1/messages", data=body(stream=True), headers=HEADERS)
        assert resp.status == 200
        assert b"message_start" in await resp.content.readany()
        assert limiter.in_flight == 1 and mock.in_flight == 1
        resp.close()      # the agent goes away mid-stream
        await until(lambda: limiter.in_flight == 0, timeout=2, what="the slot to be given back")
        await until(lambda: mock.in_flight == 0, timeout=2, what="the upstream call to be cancelled")
        assert (await px.limits())["in_flight"] == 0
    async with client(px.url) as sdk:   # the next call gets the slot at once
        assert await asyncio.wait_for(ask(sdk), 3)


async def test_disconnect_while_queued_leaves_queue(start, mock: MockUpstream):
    mock.hold_after_first_event = asyncio.Event()
    px = await start(mock.url, limits={"max_concurrency": 1})
    limiter = px.state.limiter
    async with aiohttp.ClientSession() as holder:
        held = await holder.post(px.url + "/v1/messages", data=body(stream=True, tag="held"), headers=HEADERS)
        assert held.status == 200

        async def queued_call() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.post(px.url + "/v1/messages", data=body(tag="gone-away"), headers=HEADERS) as r:
                    await r.read()

        waiting = asyncio.create_task(queued_call())
        await until(lambda: limiter.queued == 1, what="the call to queue")
        waiting.cancel()     # closes its connection while it waits for a slot
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await until(lambda: limiter.queued == 0, timeout=2, what="the queue to empty")
        assert (await px.limits())["queued"] == 0
        mock.hold_after_first_event.set()
        assert b"message_stop" in await held.read()
        held.release()
    async with client(px.url) as sdk:
        await asyncio.wait_for(ask(sdk, tag="after"), 3)
    sent = [str(r.json["messages"][0]["content"]) for r in mock.received]
    assert len(sent) == 2 and not any("gone-away" in s for s in sent)
    assert limiter.in_flight == 0


# ---- retries ---------------------------------------------------------------------------------


def gaps(mock: MockUpstream) -> list[float]:
    times = [r.at for r in mock.received]
    return [b - a for a, b in zip(times, times[1:])]


FAST_BACKOFF = {"base_delay": 0.001, "max_delay": 0.005}   # backoff alone would retry at once


async def test_retry_honours_retry_after_ms(start, mock: MockUpstream):
    """The mock says retry-after: 1 and retry-after-ms: 300; the finer one wins."""
    px = await start(mock.url, retry=FAST_BACKOFF)
    mock.inject("rate_limit", times=2, retry_after=0.3)
    async with client(px.url) as sdk:
        assert await ask(sdk)
    assert mock.count() == 3
    assert all(gap >= 0.25 for gap in gaps(mock)), gaps(mock)   # waited as asked (a load only makes it later)
    assert (await px.limits())["retries"] == 2
    assert requested_delay({"retry-after": "1", "retry-after-ms": "300"}) == 0.3   # the finer one wins


@pytest.fixture
async def scripted(aiohttp_server):
    """An upstream that answers from a script: a list of (status, headers), then 200s."""

    class Scripted:
        def __init__(self):
            self.script: list[tuple[int, dict]] = []
            self.times: list[float] = []
            self.url = ""

    upstream = Scripted()

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        upstream.times.append(time.monotonic())
        if upstream.script:
            status, headers = upstream.script.pop(0)
            return web.json_response({"type": "error", "error": {"type": "api_error", "message": f"scripted {status}"}},
                                     status=status, headers=headers)
        return web.json_response({"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                                  "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                                  "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}})

    app = web.Application()
    app.router.add_post("/v1/messages", handler)
    server = await aiohttp_server(app)
    upstream.url = f"http://127.0.0.1:{server.port}"
    return upstream


async def test_retry_honours_retry_after_seconds(start, scripted):
    px = await start(scripted.url, retry=FAST_BACKOFF)
    scripted.script = [(429, {"retry-after": "1"})]
    async with client(px.url) as sdk:
        assert await ask(sdk) == "ok"
    assert len(scripted.times) == 2
    assert scripted.times[1] - scripted.times[0] >= 0.95


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_gateway_errors_are_retried(start, scripted, status):
    px = await start(scripted.url, retry=FAST_BACKOFF)
    scripted.script = [(status, {}), (status, {})]
    async with client(px.url) as sdk:
        assert await ask(sdk) == "ok"
    assert len(scripted.times) == 3


@pytest.mark.parametrize("kind", ["overloaded", "bad_gateway", "drop"])
async def test_mock_failures_are_retried(start, mock: MockUpstream, kind):
    px = await start(mock.url, retry=FAST_BACKOFF)
    mock.inject(kind, times=2, retry_after=0.01)
    async with client(px.url) as sdk:
        assert await ask(sdk)
    assert mock.count() == 3
    assert (await px.limits())["retries"] == 2


@pytest.mark.parametrize("kind, status, times, attempts", [
    ("rate_limit", 429, 5, 3),      # retried until max_attempts, then passed on
    ("overloaded", 529, 5, 3),
    ("bad_gateway", 502, 5, 3),
    ("server_error", 500, 1, 1),    # not a temporary failure: passed on at once
])
async def test_persisting_failure_reaches_client_unchanged(start, mock: MockUpstream, kind, status, times, attempts):
    px = await start(mock.url, retry={**FAST_BACKOFF, "max_attempts": 3})
    mock.inject(kind, times=times, retry_after=0.01)
    async with aiohttp.ClientSession() as session:
        async with session.post(px.url + "/v1/messages", data=body(), headers=HEADERS) as resp:
            got_status, headers, raw = resp.status, resp.headers, await resp.read()
    assert got_status == status
    assert mock.count() == attempts
    doc = orjson.loads(raw)
    assert doc["type"] == "error" and not doc["error"]["message"].startswith("sidecar:")
    assert doc["request_id"] == headers["request-id"]   # the upstream's own body and headers
    assert "x-sidecar-error" not in headers
    if status in (429, 529):
        assert headers["retry-after"] == "1" and headers["retry-after-ms"] == "10"


async def test_retry_budget_max_total(start, mock: MockUpstream):
    """A requested wait beyond retry.max_total is not waited: the answer is passed on."""
    px = await start(mock.url, retry={"max_total": 0.5})
    mock.inject("rate_limit", times=1, retry_after=600)
    async with client(px.url) as sdk:
        with pytest.raises(anthropic.RateLimitError):
            await asyncio.wait_for(ask(sdk), 60)   # a wait of 600 s would have been taken: bounded far below it
    assert mock.count() == 1


# ---- nothing sent twice once bytes went out ------------------------------------------------------


async def test_no_retry_after_first_byte(start, mock: MockUpstream):
    px = await start(mock.url, retry=FAST_BACKOFF)
    mock.inject("drop_mid_stream")
    async with client(px.url) as sdk:
        with pytest.raises((anthropic.APIError, httpx.HTTPError)):
            async with sdk.messages.stream(model=MODEL, max_tokens=64, messages=unique_prompt()) as stream:
                await stream.get_final_message()
    assert mock.count() == 1
    # the raw client sees the same: a body that breaks off, not a complete one
    mock.inject("drop_mid_stream")
    async with aiohttp.ClientSession() as session:
        async with session.post(px.url + "/v1/messages", data=body(stream=True), headers=HEADERS) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    assert mock.count() == 2
