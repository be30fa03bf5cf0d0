"""Agent-sized requests: Claude-Code-shaped conversations of 76 KB to 4 MB through the proxy in-process.

- test_growing_conversation_misses_then_hits: every turn of a conversation growing to 4 MB is answered and
  stored (a large request's key is hashed off the event loop), the same turns again are all hits, and the
  mock saw each turn once, byte for byte and framed by its length (a large body goes up in pieces).
- test_a_growing_conversation_is_parsed_by_what_it_adds: from the second turn on the earlier messages are
  not parsed again (body_json.py, counted in the overview), and the checkpoint holds every message exactly.
- test_a_turn_compares_only_what_it_adds: the checkpoint of a growing conversation compares only the rows
  a turn adds (the messages it repeats from the previous request are known equal), and stays exact when
  the agent rewrites a middle message or another writer changed the checkpoint in between.
- test_the_last_miss_of_a_large_request_is_its_canonical_request: the canonical form of a 4 MB request is
  hashed and noted as its parts, never joined: the note holds the very bytes `canonical` makes, and the
  key is their hash.
- test_a_large_body_is_sent_whole_again_on_a_retry: a 2 MB request rate-limited once reaches the upstream
  twice, the same bytes both times.
- test_a_finished_call_is_freed_at_once: nothing of a call (its body, its parse, its answer) waits for the
  cyclic collector: a collection over calls of every kind finds none of them (it would be a stall, and the
  4 MB bodies would stay in memory until it ran).
- test_serve_freezes_what_start_up_left: `sidecar serve`, once its price table is in, has frozen the start-up
  heap (no collection traverses it again) and says so, with the collector's pauses, in the overview.
- test_key_ignores_formatting_not_order: the same JSON with other whitespace is the same request (the key
  is taken from the parsed body); the ignored per-run fields (metadata.user_id) leave the key alone.
"""

from __future__ import annotations

import asyncio
import gc

import aiohttp
import orjson

from agent_sidecar.bench.conversation import bodies
from conftest import upstream_env
from agent_sidecar.bench.mock_upstream import MockUpstream
from agent_sidecar.proxy.call import Call

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
    last = mock.received[-1]   # sent upstream piece by piece: the same bytes, framed by their length
    assert last.body == turns[-1] and last.headers.get("content-length") == str(len(turns[-1]))
    assert "transfer-encoding" not in last.headers


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


async def test_a_finished_call_is_freed_at_once(proxy_url: str, mock: MockUpstream):
    turns = bodies("freed", 3, 1024)
    json_turn = orjson.dumps({**orjson.loads(turns[0]), "stream": False})
    chat = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    async with aiohttp.ClientSession() as http:
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)   # what a collection finds is kept in gc.garbage, to be looked at
        try:
            for body in (*turns, json_turn, turns[0], json_turn):   # streamed and JSON misses, then hits
                assert (await post(http, proxy_url, body))[0] == 200
            async with http.post(proxy_url + "/v1/chat/completions", data=chat, headers=HEADERS) as resp:
                assert resp.status == 200 and b"[DONE]" in await resp.read()
            await asyncio.sleep(0.05)   # the records, after the last byte
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, Call)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert left == [], f"{len(left)} calls were freed only by the cyclic collector"


async def test_serve_freezes_what_start_up_left(sidecar, mock: MockUpstream):
    url = await sidecar.serve(env=upstream_env(mock))
    async with aiohttp.ClientSession() as http:
        assert (await post(http, url, bodies("frozen", 1, 76)[0]))[0] == 200
        for _ in range(400):   # the price table loads in a thread, a second or so after start
            async with http.get(url + "/_sidecar/overview") as resp:
                collector = (await resp.json())["collector"]
            if collector["frozen"] > 10_000:   # the modules and the price table: tens of thousands of objects
                break
            await asyncio.sleep(0.05)
    assert collector["frozen"] > 10_000, collector
    assert len(collector["collections"]) == len(collector["longest_ms"]) == 3 and collector["collections"][0] > 0


async def messages_of(http: aiohttp.ClientSession, url: str) -> list:
    async with http.get(url + "/_sidecar/sessions/last/messages") as resp:
        return (await resp.json())["messages"]


async def test_a_turn_compares_only_what_it_adds(start_app, mock: MockUpstream):
    px = await start_app(mock.url)
    turns = bodies("lineage", 6, 1024)
    docs = [orjson.loads(body) for body in turns]
    sessions = px.state.sessions
    async with aiohttp.ClientSession() as http:
        for body in turns[:4]:
            assert (await post(http, px.url, body))[:2] == (200, "miss")
        stored = sum(len(doc["messages"]) for doc in docs[:3])   # what turns 2-4 found stored before them
        assert sessions.rows_known >= stored - 3, sessions.snapshot()   # all but each moved cache marker
        assert sessions.rows_compared <= 3 * 4, sessions.snapshot()     # a few per turn, not the conversation
        assert (await messages_of(http, px.url))[:len(docs[3]["messages"])] == docs[3]["messages"]

        # Another writer changed the first stored message (and so the checkpoint's stamp): compared again.
        sid = sessions.latest(1)[0]["id"]
        key = sessions._message_key(sid, 0)

        def tamper(txn) -> None:
            txn.put(key, b'{"role":"user","content":"tampered"}', db=sessions._db)
            meta = orjson.loads(txn.get(f"s:{sid}".encode(), db=sessions._db))
            txn.put(f"s:{sid}".encode(), orjson.dumps({**meta, "updated": meta["updated"] + 1}), db=sessions._db)
        sessions.lmdb.write_now(tamper)
        assert (await post(http, px.url, turns[4]))[:2] == (200, "miss")
        assert (await messages_of(http, px.url))[:len(docs[4]["messages"])] == docs[4]["messages"]

        # The agent rewrote a middle message (compacted it): the stored one is replaced.
        edited = {**docs[5], "messages": [*docs[5]["messages"]]}
        middle = edited["messages"][3]   # an assistant turn: its text shortened, its tool call kept
        edited["messages"][3] = {**middle, "content": [{"type": "text", "text": "compacted"}, *middle["content"][1:]]}
        assert (await post(http, px.url, orjson.dumps(edited)))[:2] == (200, "miss")
        assert (await messages_of(http, px.url))[:len(edited["messages"])] == edited["messages"]


async def test_the_last_miss_of_a_large_request_is_its_canonical_request(start_app, mock: MockUpstream):
    from agent_sidecar.proxy import last_miss
    px = await start_app(mock.url)
    turns = bodies("noted", 4, 2048)
    async with aiohttp.ClientSession() as http:
        for body in turns:
            assert (await post(http, px.url, body))[:2] == (200, "miss")
    cache = px.state.cache
    await cache.drain()
    head, noted = last_miss.read(px.state.lmdb, px.state_dir)
    canonical = cache.keys.canonical("POST", "/v1/messages", "", HEADERS, orjson.loads(turns[-1]))
    assert len(canonical) > 2 << 20 and noted == canonical
    assert head["hash"] == cache.keys.request_hash(canonical).hex()


async def test_a_large_body_is_sent_whole_again_on_a_retry(start_app, mock: MockUpstream):
    px = await start_app(mock.url, retry={"base_delay": 0.01, "max_delay": 0.05})
    body = bodies("retried", 3, 2048)[-1]
    mock.inject("rate_limit", times=1, retry_after=0.01)
    async with aiohttp.ClientSession() as http:
        status, outcome, _ = await post(http, px.url, body)
    assert (status, outcome) == (200, "miss") and mock.count("/v1/messages") == 2
    assert [r.body for r in mock.received] == [body, body]
