"""Side stages fail open: whichever of them breaks, the agent gets the upstream's answer byte for byte.

Each test breaks one side stage of a real in-process proxy (restore, cache key,
cache lookup, capture, checkpoint, the Redis mirror, store, record, stats,
monitor, live page, telemetry), sends a streamed and a JSON call through it to the hostile
upstream's well-formed cases (fixed bytes), and checks the answer against the
same case fetched directly, a `sidecar_fault` event naming the stage, and that
the proxy keeps serving.
"""

from __future__ import annotations

import itertools

import aiohttp
import orjson
import pytest

from agent_sidecar.bench.nasty_upstream import NastyUpstream
from agent_sidecar.proxy.capture import Capture

_texts = itertools.count()


@pytest.fixture
async def nasty():
    upstream = NastyUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


def body_of(case: str, stream: bool) -> bytes:
    return orjson.dumps({"model": f"nasty-{case}", "max_tokens": 64, "stream": stream,
                         "messages": [{"role": "user", "content": f"fail open {next(_texts)}"}]})


async def post(base: str, body: bytes) -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders]:
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": "sk-test"}
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.post(base + "/v1/messages", data=body, headers=headers) as resp:
            return resp.status, await resp.read(), resp.headers


def boom(*args, **kwargs):
    raise RuntimeError("injected failure")


async def aboom(*args, **kwargs):
    raise RuntimeError("injected failure")


class BrokenMirror:
    async def append(self, *args):
        raise RuntimeError("injected failure")


class BrokenExporter:
    def export(self, *args):
        raise RuntimeError("injected failure")


# stage name in the fault event -> how to break it on a running proxy's state
BREAKERS = {
    "restore": lambda state, mp: mp.setattr(state.sessions, "restore", boom),
    "cache key": lambda state, mp: mp.setattr(state.cache, "plan", boom),
    "cache lookup": lambda state, mp: mp.setattr(state.cache, "lookup", aboom),
    "capture": lambda state, mp: mp.setattr(Capture, "feed", boom) or mp.setattr(Capture, "end", boom),
    "checkpoint": lambda state, mp: mp.setattr(state.sessions, "checkpoint", aboom),
    "checkpoint (redis mirror)": lambda state, mp: mp.setattr(state.sessions, "mirror", BrokenMirror()),
    "store": lambda state, mp: mp.setattr(state.cache, "save", boom),
    "store (write)": lambda state, mp: mp.setattr(state.cache.store, "put", aboom),
    "record": lambda state, mp: mp.setattr(state.records, "add", boom),
    "record (stats)": lambda state, mp: mp.setattr(state.stats, "observe", boom),
    "record (monitor)": lambda state, mp: mp.setattr(state.monitor, "on_call", boom),
    "record (live page)": lambda state, mp: mp.setattr(state, "after_call", boom),
    "live figures": lambda state, mp: mp.setattr(state.rolling, "add", boom),
    "telemetry": lambda state, mp: mp.setattr(state, "telemetry", BrokenExporter()),
}


@pytest.mark.parametrize("broken", list(BREAKERS))
async def test_a_broken_side_stage_never_changes_the_answer(broken, nasty, start_app, monkeypatch):
    px = await start_app(nasty.url)
    BREAKERS[broken](px.state, monkeypatch)
    for case, stream in (("sse_ok", True), ("json_ok", False)):
        body = body_of(case, stream)
        direct = await post(nasty.url, body)
        through = await post(px.url, body)
        assert through[:2] == direct[:2], f"{broken}: the answer changed"
    await px.state.cache.drain()
    await px.state.records.drain()
    stage = broken.split(" (")[0]
    faults = [e for e in px.events() if e["kind"] == "sidecar_fault"]
    assert faults and {e["stage"] for e in faults} == {stage}, faults
    assert "injected failure" in faults[0]["error"]
    monkeypatch.undo()                       # mended: the same proxy serves, and caches, as before
    body = body_of("json_ok", False)
    assert (await post(px.url, body))[0] == 200
    await px.state.cache.drain()
    assert (await post(px.url, body))[2]["x-sidecar-cache"] == "hit"


async def test_a_bug_in_the_core_is_an_api_shaped_502_and_the_proxy_keeps_serving(nasty, start_app, monkeypatch):
    px = await start_app(nasty.url)
    monkeypatch.setattr(px.state.upstreams, "url", boom)
    status, body, headers = await post(px.url, body_of("json_ok", False))
    error = orjson.loads(body)
    assert status == 502 and error["type"] == "error" and error["error"]["message"].startswith("sidecar:")
    assert headers["content-type"].startswith("application/json")
    monkeypatch.undo()
    assert (await post(px.url, body_of("json_ok", False)))[0] == 200
    assert any(e["kind"] == "sidecar_fault" and e["stage"] == "forward" for e in px.events())
