"""Agent-sized requests: Claude-Code-shaped conversations of 76 KB to 4 MB through the proxy in-process.

- test_growing_conversation_misses_then_hits: every turn of a conversation growing to 4 MB is answered and
  stored (a large request's key is hashed off the event loop), the same turns again are all hits, and the
  mock saw each turn once.
- test_a_growing_conversation_is_parsed_by_what_it_adds: from the second turn on the earlier messages are
  not parsed again (body_json.py, counted in the overview), and the checkpoint holds every message exactly.
- test_key_ignores_formatting_not_order: the same JSON with other whitespace is the same request (the key
  is taken from the parsed body); the ignored per-run fields (metadata.user_id) leave the key alone.
"""

from __future__ import annotations

import aiohttp
import orjson

from agent_sidecar.bench.conversation import bodies
from agent_sidecar.bench.mock_upstream import MockUpstream

HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01", "content-type": "application/json"}


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str, bytes]:
    async with http.post(url + "/v1/messages", data=body, headers=HEADERS) as resp:
        return resp.status, resp.headers.get("x-sidecar-cache", ""), await resp.read()


async def test_growing_conversation_misses_then_hits(proxy_url: str, mock: MockUpstream):
    turns = bodies("large", 6, 4096)
    assert len(turns[-1]) > 4 << 20 and len(turns[0]) < 100 << 10
    async with aiohttp.ClientSession() as http:
        first = [await post(http, proxy_url, body) for body in turns]
        assert [(s, c) for s, c, _ in first] == [(200, "miss")] * len(turns)
        assert all(b"message_stop" in answer for _, _, answer in first)
        second = [await post(http, proxy_url, body) for body in turns]
    assert [(s, c) for s, c, _ in second] == [(200, "hit")] * len(turns)
    assert [answer for _, _, answer in second] == [answer for _, _, answer in first]
    assert mock.count("/v1/messages") == len(turns)


async def test_key_ignores_formatting_not_order(proxy_url: str, mock: MockUpstream):
    doc = orjson.loads(bodies("format", 1, 76)[0])
    doc["stream"] = False
    compact = orjson.dumps(doc)
    spaced = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    other_session = orjson.dumps({**doc, "metadata": {"user_id": "user_x_account__session_another"}})
    async with aiohttp.ClientSession() as http:
        outcomes = [(await post(http, proxy_url, body))[:2] for body in (compact, spaced, other_session)]
    assert outcomes == [(200, "miss"), (200, "hit"), (200, "hit")]
    assert mock.count("/v1/messages") == 1


async def test_a_growing_conversation_is_parsed_by_what_it_adds(proxy_url: str, mock: MockUpstream):
    turns = bodies("reused", 5, 1024)
    async with aiohttp.ClientSession() as http:
        assert [(await post(http, proxy_url, body))[:2] for body in turns] == [(200, "miss")] * len(turns)
        async with http.get(proxy_url + "/_sidecar/overview") as resp:
            parsing = (await resp.json())["parsing"]
        async with http.get(proxy_url + "/_sidecar/sessions/last/messages") as resp:
            checkpoint = await resp.json()
    earlier = sum(len(orjson.loads(body)["messages"]) - 1 for body in turns[:-1])   # all but a moved marker
    assert parsing["messages_reused"] >= earlier, parsing
    assert parsing["bodies_kept"] >= 1
    last = orjson.loads(turns[-1])["messages"]
    assert checkpoint["messages"][:len(last)] == last and len(checkpoint["messages"]) == len(last) + 1
