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

from proxy import stages

AUTH = {"authorization": "Bearer sk-test", "openai-beta": "responses_websockets=2026-02-06"}
MODEL = "gpt-4o-mini"


def create(text: str, **fields) -> dict:
    return {"type": "response.create", "model": MODEL, "stream": True, "store": False,
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}],
            **fields}


async def exchange(ws, message: dict) -> list[dict]:
    """Send one request; the events up to its last one (completed, failed, incomplete or error)."""
    await ws.send_str(orjson.dumps(message).decode())
    events = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == WSMsgType.TEXT, msg
        events.append(orjson.loads(msg.data))
        if events[-1]["type"] in ("response.completed", "response.failed", "response.incomplete", "error"):
            return events


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
            assert msg.type == WSMsgType.CLOSE and msg.data == 4001
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


async def test_unreachable_upstream_is_the_sockets_error_event(start_proxy, unused_tcp_port):
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    proxy = await start_proxy(dead, dead + "/v1")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(proxy + "/v1/responses", headers=AUTH) as ws:
            events = await exchange(ws, create("anyone there?"))
    assert len(events) == 1 and events[0]["type"] == "error"
    assert events[0]["status"] == 502
    assert events[0]["error"]["message"].startswith("sidecar:")


async def test_a_failing_side_stage_leaves_the_socket_working(proxy_url, mock, monkeypatch):
    def broken(self, call, chunk):
        raise RuntimeError("capture broke")
    monkeypatch.setattr(stages.Capture, "chunk", broken)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(mock.url + "/v1/responses", headers=AUTH) as ws:
            direct = await exchange(ws, create("Still there?"))
        async with session.ws_connect(proxy_url + "/v1/responses", headers=AUTH) as ws:
            through = await exchange(ws, create("Still there?"))
            again = await exchange(ws, create("Still there?"))   # the socket goes on
    assert final_text(through) == final_text(direct) == final_text(again)
    assert mock.socket_requests == 3   # nothing was stored
