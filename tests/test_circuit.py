"""Overload walls: while the upstream answers 529 to everything, one probe at a time, the rest held, all bounded.

The mock's wall answers every model call 529 (after a short latency, as the
real API takes a moment to say so) for a while and then recovers; it counts
how many of its requests were at the upstream at once. Agents are the
official anthropic SDK; the proxy runs in-process with fast backoffs.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import anthropic
import orjson
import pytest
from conftest import unique_prompt

from agent_sidecar.bench.mock_upstream import MockUpstream, Profile

KEY = "sk-ant-test"
MODEL = "claude-mock-1"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
FAST = {"base_delay": 0.05, "max_delay": 0.4, "max_total": 60.0, "max_attempts": 50}
AGENTS = 8


def ask(sdk: anthropic.AsyncAnthropic, tag: str):
    return sdk.messages.create(model=MODEL, max_tokens=16, messages=unique_prompt(tag))


async def agents(base_url: str, n: int = AGENTS, max_retries: int = 0) -> list:
    clients = [anthropic.AsyncAnthropic(base_url=base_url, api_key=KEY, max_retries=max_retries, timeout=120)
               for _ in range(n)]
    try:
        return await asyncio.gather(*(ask(c, f"agent {i}") for i, c in enumerate(clients)), return_exceptions=True)
    finally:
        for c in clients:
            await c.close()


async def test_one_probe_at_a_time_through_a_wall_and_every_held_call_completes(start_app, mock: MockUpstream):
    mock.profile = Profile(ttft=0.05, retry_after=0.1, wall_latency=0.05)
    px = await start_app(mock.url, retry=FAST)
    mock.wall(2.0)
    results = await agents(px.url)   # no SDK retries: whatever fails here, the agent saw
    assert [r for r in results if isinstance(r, BaseException)] == []
    wall = mock.stats()["wall"]
    assert wall["requests"] >= AGENTS                # every agent's first call met the wall
    assert wall["peak_in_flight_after_first"] <= 1   # once the upstream said "overloaded": one probe at a time
    overload = px.state.circuits.snapshot()
    assert overload["open"] == [] and overload["held"] >= AGENTS - 1 and overload["holding"] == 0
    kinds = [(e["kind"], e["state"]) for e in px.events() if e["kind"] == "upstream_overloaded"]
    assert kinds == [("upstream_overloaded", "raised"), ("upstream_overloaded", "cleared")]
    # The failed probes said nothing about our concurrency: the limit learned before the wall still holds,
    # and the held calls went out side by side after it.
    [circuit] = px.state.circuits.circuits.values()
    assert circuit.probes >= 3 and px.state.limiter.decreases <= 2
    assert mock.peak_in_flight >= 2


def test_a_hold_never_reaches_the_clients_own_timeout():
    from agent_sidecar.proxy.circuit import CLIENT_TIMEOUT, Circuits
    from agent_sidecar.proxy.config import RetrySection
    circuits = Circuits(RetrySection(max_total=3600.0))
    assert circuits.deadline(100.0, 100.0 + 3600.0) == 100.0 + CLIENT_TIMEOUT * 0.9
    assert circuits.deadline(100.0, 100.0 + 120.0) == 220.0


async def test_a_wall_lasting_past_max_total_ends_held_calls_with_the_upstreams_own_error(start_app, mock: MockUpstream):
    mock.profile = Profile(retry_after=0.1, wall_latency=0.02)
    px = await start_app(mock.url, retry={**FAST, "max_total": 1.5})
    mock.wall(60.0)

    async def one(i: int):
        async with aiohttp.ClientSession() as http:
            body = orjson.dumps({"model": MODEL, "max_tokens": 16, "messages": unique_prompt(f"held {i}")})
            async with http.post(px.url + "/v1/messages", data=body, headers=HEADERS) as resp:
                return resp.status, resp.headers, orjson.loads(await resp.read())

    answers = await asyncio.gather(*(one(i) for i in range(AGENTS)))
    assert mock.stats()["wall"]["active"], "the held calls must end within max_total, not with the wall"
    for status, headers, doc in answers:
        assert status == 529 and doc["error"]["type"] == "overloaded_error"
        assert not doc["error"]["message"].startswith("sidecar:")   # the upstream's own answer
        assert doc["request_id"] == headers["request-id"] and "x-sidecar-error" not in headers
    assert mock.stats()["wall"]["peak_in_flight_after_first"] <= 1
    assert px.state.circuits.snapshot()["holding"] == 0 and px.state.circuits.timed_out >= 1
    doc = json.loads((await px.get("/_sidecar/overview"))[2])
    [wall] = doc["overload"]["open"]   # the wall is still on: the live view says so
    assert wall["upstream"] == f"anthropic {MODEL}" and wall["status"] == 529
    assert "upstream_overloaded" in doc["active_events"]


async def test_a_held_call_whose_client_leaves_leaves_the_line(start_app, mock: MockUpstream):
    mock.profile = Profile(retry_after=0.1, wall_latency=0.02)
    px = await start_app(mock.url, retry={**FAST, "max_total": 30.0})
    mock.wall(30.0)
    async with anthropic.AsyncAnthropic(base_url=px.url, api_key=KEY, max_retries=0, timeout=1.0) as sdk:
        results = await asyncio.gather(*(ask(sdk, f"leaver {i}") for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, anthropic.APITimeoutError) for r in results)
    for _ in range(200):   # the proxy notices the disconnects on its next loop turns
        if px.state.circuits.snapshot()["holding"] == 0:
            break
        await asyncio.sleep(0.01)
    assert px.state.circuits.snapshot()["holding"] == 0


async def test_sporadic_overloads_do_not_open_the_circuit(start_app, mock: MockUpstream):
    mock.profile = Profile(retry_after=0.05)
    px = await start_app(mock.url, retry=FAST)
    mock.inject("overloaded", times=2)
    async with anthropic.AsyncAnthropic(base_url=px.url, api_key=KEY, max_retries=0) as sdk:
        await ask(sdk, "sporadic")
    assert px.state.circuits.held == 0
    assert not [e for e in px.events() if e["kind"] == "upstream_overloaded"]


@pytest.mark.parametrize("status", [503, 429])
async def test_a_wall_of_503s_or_429s_is_a_wall_too(start_app, mock: MockUpstream, status):
    mock.profile = Profile(retry_after=0.1, wall_latency=0.02)
    px = await start_app(mock.url, retry=FAST)
    mock.wall(1.0, status=status)
    results = await agents(px.url, n=4)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert mock.stats()["wall"]["peak_in_flight_after_first"] <= 1
    assert px.state.circuits.held >= 1


async def test_the_live_page_says_the_upstream_is_overloaded_and_shows_its_headroom(start_app, mock: MockUpstream,
                                                                                     tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_dashboard import chromium
    driver = await asyncio.to_thread(chromium, tmp_path)
    mock.profile = Profile(retry_after=0.1, wall_latency=0.02)
    px = await start_app(mock.url, retry={**FAST, "max_total": 30.0})
    held = []
    try:
        async with anthropic.AsyncAnthropic(base_url=px.url, api_key=KEY, max_retries=0) as sdk:
            await ask(sdk, "before the wall")   # an answer that reports the rate-limit headroom
            mock.wall(30.0)
            held = [asyncio.create_task(ask(sdk, f"held {i}")) for i in range(4)]
            await asyncio.to_thread(driver.get, px.url + "/_sidecar/")

            def shown():
                banner = driver.find_element(By.ID, "overloaded")
                return banner.is_displayed() and f"anthropic {MODEL}" in banner.text and "529" in banner.text
            await asyncio.to_thread(WebDriverWait(driver, 15).until, lambda _: shown(), "the overload banner")
            assert "input_tokens" in driver.find_element(By.ID, "headroom").text
            assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        await asyncio.to_thread(driver.quit)


async def test_the_circuit_can_be_switched_off(start_app, mock: MockUpstream):
    mock.profile = Profile(retry_after=0.1, wall_latency=0.02)
    px = await start_app(mock.url, retry={**FAST, "overload_circuit": False})
    mock.wall(1.0)
    results = await agents(px.url, n=4)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert px.state.circuits.held == 0 and mock.stats()["wall"]["peak_in_flight_after_first"] > 1
