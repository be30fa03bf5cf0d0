"""WebSockets through the proxy: relayed both ways, and the Responses socket's exchanges cached.

The proxy runs in-process in front of the mock API (its Responses socket,
bench/mock/openai_responses_ws.py) or, for the plain relay, in front of a small
WebSocket server that echoes and closes as told: every frame, header and close
code is checked on the far side.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType, web

from conftest import until
from agent_sidecar.proxy.capture import Capture
from agent_sidecar.proxy.exchange import Chain, Exchanges

AUTH = {"authorization": "Bearer sk-test", "openai-beta": "responses_websockets=2026-02-06"}
MODEL = "gpt-4o-mini"


def create(text: str, **fields) -> dict:
    return {"type": "response.create", "model": MODEL, "stream": True, "store": False,
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}],
            **fields}


async def raw_exchange(ws, message: dict) -> list[str]:
    """Send one request; the messages up to its last one (completed, failed, incomplete or error), as sent
    (text, byte for byte)."""
    await ws.send_str(orjson.dumps(message).decode())
    texts = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == WSMsgType.TEXT, msg
        texts.append(msg.data)
        if orjson.loads(msg.data)["type"] in ("response.completed", "response.failed", "response.incomplete",
                                              "error"):
            return texts


async def exchange(ws, message: dict) -> list[dict]:
    """As `raw_exchange`, each event parsed."""
    return [orjson.loads(text) for text in await raw_exchange(ws, message)]


def final_text(events: list[dict]) -> str:
    done = events[-1]["response"]
    return " ".join(part["text"] for item in done["output"] if item["type"] == "message"
                    for part in item["content"])


# ---- a plain relay -----------------------------------------------------------------------------


@pytest.fixture
async def echo(aiohttp_server):
    """A WebSocket upstream at /v1/realtime: echoes text and binary, records headers and the close it got;
    the text `close NNNN` makes it close with that code."""
    seen: dict = {"headers": None, "close_code": None, "closed": asyncio.Event()}

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path != "/v1/realtime":
            return web.json_response({"error": {"message": "no such socket", "type": "invalid_request_error"}},
                                     status=404)
        seen["headers"] = dict(request.headers)
        ws = web.WebSocketResponse(protocols=("realtime",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT and msg.data.startswith("close "):
                await ws.close(code=int(msg.data.split()[1]), message=b"as asked")
                break
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        seen["close_code"] = ws.close_code
        seen["closed"].set()
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app)
    seen["url"] = f"http://127.0.0.1:{server.port}"
    return seen


async def test_socket_relays_frames_headers_and_both_closes(start_proxy, echo):
    proxy = await start_proxy(echo["url"], echo["url"] + "/v1")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(proxy + "/v1/realtime?model=x", headers=AUTH, protocols=("realtime",)) as ws:
            assert ws.protocol == "realtime"
            await ws.send_str("hello")
            assert (await ws.receive()).data == "hello"
            await ws.send_bytes(b"\x00\x01binary")
            assert (await ws.receive()).data == b"\x00\x01binary"
            await ws.send_str("close 4001")   # the upstream closes: the agent's socket closes with its code
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == WSMsgType.CLOSE and msg.data == 4001 and msg.extra == "as asked"
    assert echo["headers"]["Authorization"] == "Bearer sk-test"
    assert echo["headers"]["openai-beta"] == "responses_websockets=2026-02-06"

    async with aiohttp.ClientSession() as session:   # the agent closes: the upstream gets its code
        async with session.ws_connect(proxy + "/v1/realtime", headers=AUTH) as ws:
            await ws.send_str("ping")
            assert (await ws.receive()).data == "ping"
            echo["closed"].clear()
            await ws.close(code=4002)
    await asyncio.wait_for(echo["closed"].wait(), 10)
    assert echo["close_code"] == 4002


async def test_refused_upgrade_reaches_the_agent_with_its_status(start_proxy, echo):
    proxy = await start_proxy(echo["url"], echo["url"] + "/v1")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(proxy + "/v1/nowhere", headers=AUTH)
    assert refused.value.status == 404


async def test_socket_from_a_web_page_is_refused(start_proxy, echo):
    proxy = await start_proxy(echo["url"], echo["url"] + "/v1")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(proxy + "/v1/realtime", headers=AUTH, origin="https://evil.example")
    assert refused.value.status == 403
    assert echo["headers"] is None   # nothing reached the upstream


# ---- the Responses socket ----------------------------------------------------------------------


async def test_responses_socket_answers_as_the_api_does(proxy_url, mock):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(mock.url + "/v1/responses", headers=AUTH) as ws:
            direct = await exchange(ws, create("Say something about the sea."))
        async with session.ws_connect(proxy_url + "/v1/responses", headers=AUTH) as ws:
            through = await exchange(ws, create("Say something about the sea."))
    assert [e["type"] for e in through] == [e["type"] for e in direct]
    assert [e["sequence_number"] for e in through] == list(range(len(through)))
    assert final_text(through) == final_text(direct)
    assert mock.socket_requests == 2
    sent = mock.received[-1]
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.headers["openai-beta"] == "responses_websockets=2026-02-06"


async def test_refused_upstream_socket_is_the_sockets_error_event_with_its_status(proxy_url, mock):
    async with aiohttp.ClientSession() as session:   # no key: the mock refuses the upgrade with a 401
        async with session.ws_connect(proxy_url + "/v1/responses") as ws:
            events = await exchange(ws, create("who am I?"))
    assert len(events) == 1 and events[0]["type"] == "error"
    assert events[0]["status"] == 401 and events[0]["error"]["message"].startswith("sidecar:")


async def test_unreachable_upstream_is_the_sockets_error_event(start_proxy, unused_tcp_port):
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    proxy = await start_proxy(dead, dead + "/v1")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(proxy + "/v1/responses", headers=AUTH) as ws:
            events = await exchange(ws, create("anyone there?"))
    assert len(events) == 1 and events[0]["type"] == "error"
    assert events[0]["status"] == 502
    assert events[0]["error"]["message"].startswith("sidecar:")


def boom(*args, **kwargs):
    raise RuntimeError("injected failure")


async def aboom(*args, **kwargs):
    raise RuntimeError("injected failure")


BREAKERS = {   # stage name in the fault event -> how to break it on a running proxy's state
    "cache key": lambda state, mp: mp.setattr(state.cache, "plan", boom),
    "cache lookup": lambda state, mp: mp.setattr(state.cache, "lookup", aboom),
    "capture": lambda state, mp: mp.setattr(Capture, "feed", boom),
    "store": lambda state, mp: mp.setattr(state.cache, "save", boom),
    "store (write)": lambda state, mp: mp.setattr(state.cache.store, "put", aboom),
    "record": lambda state, mp: mp.setattr(state.records, "add", boom),
    "websocket": lambda state, mp: mp.setattr(Chain, "answered", boom),
}


@pytest.mark.parametrize("broken", list(BREAKERS))
async def test_a_broken_side_stage_leaves_the_socket_as_it_was(broken, start_app, mock, monkeypatch):
    px = await start_app(mock.url)
    BREAKERS[broken](px.state, monkeypatch)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(mock.url + "/v1/responses", headers=AUTH) as ws:
            direct = await warm_up_then_turn(ws, "Still there?")
        async with session.ws_connect(px.url + "/v1/responses", headers=AUTH) as ws:
            through = await warm_up_then_turn(ws, "Still there?")
            again = await exchange(ws, create("Still there?"))   # the socket goes on
    assert [len(answer) for answer in through] == [len(answer) for answer in direct]
    assert final_text([orjson.loads(through[1][-1])]) == final_text([orjson.loads(direct[1][-1])])
    assert again[-1]["type"] == "response.completed"
    await px.state.cache.drain()
    await px.state.records.drain()
    faults = [e for e in px.events() if e["kind"] == "sidecar_fault"]
    assert faults and {e["stage"] for e in faults} == {broken.split(" (")[0]}, faults


async def warm_up_then_turn(ws, text: str) -> tuple[list[str], list[str]]:
    """Codex's way: a `generate: false` request with no input, then the turn naming its answer."""
    warm = await raw_exchange(ws, create("", generate=False, input=[]))
    warm_id = orjson.loads(warm[-1])["response"]["id"]
    return warm, await raw_exchange(ws, create(text, previous_response_id=warm_id))


async def test_a_stored_chain_is_replayed_on_a_new_socket_without_the_upstream(proxy_url, mock):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(proxy_url + "/v1/responses", headers=AUTH) as ws:
            first = await warm_up_then_turn(ws, "Tell me about rivers.")
        sent, upgrades = mock.socket_requests, mock.count()
        assert sent == 2 and upgrades == 1
        async with session.ws_connect(proxy_url + "/v1/responses", headers=AUTH) as ws:
            again = await warm_up_then_turn(ws, "Tell me about rivers.")
    assert again == first                                     # the same messages, byte for byte, in order
    assert (mock.socket_requests, mock.count()) == (sent, upgrades)   # not even a handshake upstream


async def test_a_miss_after_hits_goes_up_whole(proxy_url, mock):
    """The upstream never saw the answers the cache gave: a request naming one is sent with all it builds on."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(proxy_url + "/v1/responses", headers=AUTH) as ws:
            await warm_up_then_turn(ws, "Tell me about lakes.")
        async with session.ws_connect(proxy_url + "/v1/responses", headers=AUTH) as ws:
            _, turn = await warm_up_then_turn(ws, "Tell me about lakes.")   # hits
            turn_id = orjson.loads(turn[-1])["response"]["id"]
            follow = await exchange(ws, create("And about seas?", previous_response_id=turn_id))
    assert follow[-1]["type"] == "response.completed", follow[-1]
    sent = mock.socket_messages[-1]
    assert "previous_response_id" not in sent
    texts = [part.get("text") for item in sent["input"] for part in item.get("content") or ()]
    assert "Tell me about lakes." in texts and "And about seas?" in texts
    assert any(item.get("role") == "assistant" for item in sent["input"])   # the cached answer's output

    async with aiohttp.ClientSession() as session:   # and on the socket that made them, ids go up as sent
        async with session.ws_connect(proxy_url + "/v1/responses", headers=AUTH) as ws:
            _, turn = await warm_up_then_turn(ws, "Tell me about ponds.")
            turn_id = orjson.loads(turn[-1])["response"]["id"]
            await exchange(ws, create("And puddles?", previous_response_id=turn_id))
    assert mock.socket_messages[-1]["previous_response_id"] == turn_id


async def test_an_answer_stored_over_http_serves_the_socket(proxy_url, mock):
    body = {k: v for k, v in create("Name a colour.").items() if k != "type"}
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy_url + "/v1/responses", json=body, headers=AUTH) as resp:
            assert resp.status == 200
            await resp.read()
        count = mock.count()
        async with session.ws_connect(proxy_url + "/v1/responses", headers=AUTH) as ws:
            events = await exchange(ws, create("Name a colour."))
    assert events[-1]["type"] == "response.completed" and final_text(events)
    assert mock.count() == count and mock.socket_requests == 0


@pytest.mark.parametrize("kind", ["error_mid_stream", "rate_limit", "drop_mid_stream"])
async def test_a_failed_answer_is_relayed_and_never_stored(proxy_url, mock, kind):
    mock.inject(kind)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(proxy_url + "/v1/responses", headers=AUTH) as ws:
            await ws.send_str(orjson.dumps(create("Will this work?")).decode())
            last = None
            while True:
                msg = await asyncio.wait_for(ws.receive(), 10)
                if msg.type != WSMsgType.TEXT:
                    break   # the upstream's socket went away: so did the agent's
                last = orjson.loads(msg.data)
                if last["type"] in ("response.completed", "error"):
                    break
        if kind == "drop_mid_stream":
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED) and last["type"] != "response.completed"
        else:
            assert last["type"] == "error"
            assert kind != "rate_limit" or last["status"] == 429
        async with session.ws_connect(proxy_url + "/v1/responses", headers=AUTH) as ws:
            events = await exchange(ws, create("Will this work?"))
    assert events[-1]["type"] == "response.completed"
    assert mock.socket_requests == 2   # the failed one was not kept: asked again


async def test_replay_mode_miss_is_the_sockets_error_event(start_proxy, mock):
    proxy = await start_proxy(mock.url, mock.url + "/v1", cache={"mode": "replay"})
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(proxy + "/v1/responses", headers=AUTH) as ws:
            events = await exchange(ws, create("Never recorded."))
    assert events[0]["type"] == "error" and events[0]["status"] == 404
    assert events[0]["error"]["code"] == "cache_miss"
    assert events[0]["error"]["message"].startswith("sidecar:")
    assert mock.count() == 0


async def test_a_bug_after_the_upgrade_closes_the_socket_with_1011(start_app, mock, monkeypatch):
    px = await start_app(mock.url)
    monkeypatch.setattr(Exchanges, "from_client", aboom)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(px.url + "/v1/responses", headers=AUTH) as ws:
            await ws.send_str(orjson.dumps(create("Hello?")).decode())
            msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type == WSMsgType.CLOSE and msg.data == 1011
    assert any(e["kind"] == "sidecar_fault" and e["stage"] == "websocket" for e in px.events())


async def test_a_hit_whose_agent_leaves_during_its_end_stages_is_still_recorded(start_app, mock):
    """The agent has the whole replayed answer and closes the socket while a side stage of the hit's end is
    still at work (aiohttp then cancels the handler): the call is recorded all the same, as a hit."""
    px = await start_app(mock.url)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(px.url + "/v1/responses", headers=AUTH) as ws:
            await warm_up_then_turn(ws, "Tell me about lakes.")
        await px.state.cache.drain()
        stuck = asyncio.Event()

        async def slow_end_stage(call):
            stuck.set()
            await asyncio.Event().wait()   # a checkpoint that has not committed when the agent leaves
        px.state.stage_hooks["end"].insert(0, ("checkpoint", slow_end_stage))
        # the agent closes and goes: no waiting for a close handshake the stuck handler cannot answer
        async with session.ws_connect(px.url + "/v1/responses", headers=AUTH,
                                      timeout=aiohttp.ClientWSTimeout(ws_close=0.2)) as ws:
            events = await exchange(ws, create("", generate=False, input=[]))   # a hit: the warm-up again
            assert events[-1]["type"] == "response.completed"
            await asyncio.wait_for(stuck.wait(), 10)
    # the agent is gone; the handler was cancelled in the end stages
    hits = lambda: [r for r in px.state.stats.recent if r["route"] == "/v1/responses" and r["cache"] == "hit"]
    await until(lambda: hits(), 10, "the hit's record")
    assert hits()[0]["status"] == 200 and not hits()[0]["error"]
