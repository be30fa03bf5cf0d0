"""Rate-limit headroom: the upstream's own headers read, shown, and calls paced so they never run into a 429.

The mock models each API's token bucket with its real headers (remaining and
reset moving per call, a 429 with retry-after once it is empty). Agents are
the official SDKs with their default retries; the proxy runs in-process.
"""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import openai
import pytest

from agent_sidecar.bench.mock_upstream import MockUpstream, Profile
from agent_sidecar.proxy import headroom
from agent_sidecar.proxy.headroom import LocalBudget, Pacer, Ticket

KEY = "sk-ant-test"
MODEL = "claude-mock-1"
CALLS = 8
PROMPT = "Summarise this build log line by line. " * 20     # ~200 input tokens a call
BUCKET = {"rate_input_tokens": 1000, "rate_window": 2.0}     # the bucket covers about four calls at once


def ask(sdk: anthropic.AsyncAnthropic, n: int):
    return sdk.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": f"{n} {PROMPT}"}])


async def run_agents(base_url: str, tag: str) -> list:
    """One warm-up call, then CALLS agents at once, each its own SDK client with its default retries."""
    clients = [anthropic.AsyncAnthropic(base_url=base_url, api_key=KEY, timeout=60) for _ in range(CALLS)]
    try:
        await ask(clients[0], f"{tag} warm-up")
        return await asyncio.gather(*(ask(c, f"{tag} {i}") for i, c in enumerate(clients)), return_exceptions=True)
    finally:
        for c in clients:
            await c.close()


# ---- reading the headers -----------------------------------------------------------------------------------


def test_anthropic_and_openai_headers_are_read():
    now = 1_700_000_000.0
    anthropic_headers = {"anthropic-ratelimit-input-tokens-limit": "2000000",
                         "anthropic-ratelimit-input-tokens-remaining": "1999000",
                         "anthropic-ratelimit-input-tokens-reset": "2023-11-14T22:13:30Z",
                         "anthropic-ratelimit-requests-limit": "4000", "anthropic-ratelimit-requests-remaining": "3999",
                         "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:21.5Z"}
    got = headroom.reading(anthropic_headers, now)
    assert got["input_tokens"] == (2000000, 1999000, 1_700_000_010.0)
    assert got["requests"] == (4000, 3999, 1_700_000_001.5)
    openai_headers = {"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999",
                      "x-ratelimit-reset-requests": "6ms", "x-ratelimit-limit-tokens": "30000",
                      "x-ratelimit-remaining-tokens": "29000", "x-ratelimit-reset-tokens": "1m30s"}
    got = headroom.reading(openai_headers, now)
    assert got["requests"] == (10000, 9999, now + 0.006)
    assert got["tokens"] == (30000, 29000, now + 90)
    assert headroom.reading({"x-ratelimit-limit-tokens": "x", "anthropic-ratelimit-tokens-limit": "0"}, now) == {}
    assert [headroom.duration(v) for v in ("0s", "1.5s", "2h0m5s", "1m", "soon")] == [0.0, 1.5, 7205.0, 60.0, None]


async def test_an_older_reading_arriving_late_does_not_undo_a_newer_one():
    budget = LocalBudget()
    now = time.time()
    await budget.report(Ticket("k", {}), {"input_tokens": (1000, 200, now + 5)})    # the newer answer, first
    await budget.report(Ticket("k", {}), {"input_tokens": (1000, 900, now + 1)})    # an older one, late
    assert budget.budgets["k"]["input_tokens"].remaining == 200


async def test_a_hold_ends_at_the_reset_or_at_a_report_and_never_after_the_deadline():
    pacer = Pacer()
    now = time.time()
    await pacer.budget.report(Ticket("k", {}), {"requests": (10, 0, now + 3600)})
    # The reset lies beyond the deadline: holding would not help, the call goes at once.
    ticket = await pacer.hold("k", b"{}", deadline=time.monotonic() + 5)
    assert pacer.held == 1 and pacer.holding == 0 and ticket.needs["requests"] == 1
    # A near reset: held until it, woken early by a report of headroom.
    await pacer.budget.report(Ticket("k2", {}), {"requests": (10, 0, time.time() + 30)})
    held = asyncio.create_task(pacer.hold("k2", b"{}", deadline=time.monotonic() + 60))
    await asyncio.sleep(0.05)
    assert not held.done() and pacer.holding == 1
    await pacer.answered(Ticket("k2", {}), {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "5",
                                           "x-ratelimit-reset-requests": "40s"})
    await asyncio.wait_for(held, 5)
    assert pacer.holding == 0 and pacer.held == 2


# ---- pacing, end to end ---------------------------------------------------------------------------------------


async def test_pacing_turns_429s_direct_into_none_through_the_sidecar(start_app, mock: MockUpstream):
    mock.profile = Profile(ttft=0.05, **BUCKET)
    direct = await run_agents(mock.url, "direct")
    direct_429s = mock.rate_limited
    assert direct_429s >= 3, f"the bucket should bind directly (got {direct_429s} 429s)"

    mock.reset()   # full buckets again
    px = await start_app(mock.url)
    paced = await run_agents(px.url, "sidecar")
    assert [r for r in paced if isinstance(r, BaseException)] == []
    assert mock.rate_limited == 0, "a paced call ran into the upstream's 429"
    assert px.state.pacer.held >= 1 and px.state.pacer.holding == 0
    assert mock.count("/v1/messages") == CALLS + 1   # nothing retried: nothing failed
    doc = json.loads((await px.get("/_sidecar/overview"))[2])
    [(name, buckets)] = doc["headroom"]["budgets"].items()
    assert name.startswith(f"anthropic {MODEL} ")
    assert buckets["input_tokens"]["limit"] == 1000 and buckets["input_tokens"]["reserved"] == 0
    del direct


async def test_openai_tokens_bucket_paces_too(start_app, mock: MockUpstream):
    mock.profile = Profile(ttft=0.05, **BUCKET)
    px = await start_app(mock.url)
    async with openai.AsyncOpenAI(base_url=px.url + "/v1", api_key="sk-test", timeout=60) as sdk:
        def chat(i):
            return sdk.chat.completions.create(model="gpt-mock", messages=[{"role": "user", "content": f"{i} {PROMPT}"}])
        await chat("warm-up")
        results = await asyncio.gather(*(chat(i) for i in range(CALLS)), return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert mock.rate_limited == 0 and px.state.pacer.held >= 1


async def test_headroom_is_shown_in_metrics_and_top(start_app, mock: MockUpstream):
    from agent_sidecar.launcher.top import render
    mock.profile = Profile(**BUCKET)
    px = await start_app(mock.url)
    async with anthropic.AsyncAnthropic(base_url=px.url, api_key=KEY) as sdk:
        await ask(sdk, "shown")
    status, _, body = await px.get("/_sidecar/metrics")
    assert status == 200
    text = body.decode()
    assert 'sidecar_ratelimit_remaining{budget="anthropic claude-mock-1 ' in text
    assert 'bucket="input_tokens"' in text and "sidecar_ratelimit_limit" in text
    doc = json.loads((await px.get("/_sidecar/overview"))[2])
    lines = "\n".join(render(doc, px.url, 200))
    assert "HEADROOM" in lines and "input_tokens" in lines


@pytest.mark.parametrize("reset", ["2025-01-01T00:00:01Z", "garbage"])
async def test_a_reset_in_the_past_or_unreadable_never_holds_a_call(start_app, aiohttp_server, reset):
    """A stale or broken header (an odd gateway) must not hold anyone: the call goes out as it would directly."""
    from aiohttp import web

    async def messages(request):
        return web.json_response({"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                                  "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                                  "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}},
                                 headers={"anthropic-ratelimit-requests-limit": "10",
                                          "anthropic-ratelimit-requests-remaining": "0",
                                          "anthropic-ratelimit-requests-reset": reset})
    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    upstream = await aiohttp_server(app)
    px = await start_app(f"http://127.0.0.1:{upstream.port}")
    async with anthropic.AsyncAnthropic(base_url=px.url, api_key=KEY, max_retries=0) as sdk:
        for i in range(3):
            await ask(sdk, f"stale {i}")
    assert px.state.pacer.held == 0


async def test_pacing_can_be_switched_off(start_app, mock: MockUpstream):
    mock.profile = Profile(ttft=0.05, **BUCKET)
    px = await start_app(mock.url, limits={"pace": False})
    results = await run_agents(px.url, "unpaced")
    assert [r for r in results if isinstance(r, BaseException)] == []   # the sidecar's retries still cover them
    assert mock.rate_limited > 0 and px.state.pacer.held == 0


async def test_a_failing_headroom_reading_is_a_fault_and_the_call_goes_on(start_app, mock: MockUpstream):
    px = await start_app(mock.url)

    async def broken(ticket, buckets):
        raise RuntimeError("headroom bug")
    px.state.pacer.budget.report = broken
    async with anthropic.AsyncAnthropic(base_url=px.url, api_key=KEY, max_retries=0) as sdk:
        await ask(sdk, "fault")
    faults = [e for e in px.events() if e["kind"] == "sidecar_fault"]
    assert faults and faults[0]["stage"] == "pacing"
