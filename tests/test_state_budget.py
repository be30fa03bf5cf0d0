"""The state's byte budget and the cache's TTL: what goes first, what goes last, and what is said.

Real LMDB in tmp_path; the proxy in-process on a real port with the mock upstream. (The budget holding over
a long run in a real `sidecar serve` is in test_state_store.py.)
- test_an_expired_entry_goes_before_a_less_recently_used_one: the cache's own size limit, and the budget.
- test_an_expired_entry_is_not_served_nor_touched_and_the_next_write_drops_it
- test_running_conversations_go_last_and_each_one_dropped_is_named: two running agents whose conversations
  outgrow their half of the budget: the older conversation goes with a `checkpoint_evicted` event naming
  it, the cache keeps working; its next turn checkpoints it whole again.
"""

from __future__ import annotations

import os
import time

import aiohttp
import orjson
import pytest

from agent_sidecar.bench.mock_upstream import Profile
from conftest import until
from agent_sidecar.proxy.state_budget import StateBudget
from agent_sidecar.proxy.entry import Entry
from agent_sidecar.proxy.records import RecordLog
from agent_sidecar.proxy.sessions import Sessions
from agent_sidecar.proxy.response_store import ResponseStore
from agent_sidecar.proxy.store import Lmdb

pytestmark = pytest.mark.timeout(120)
HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01", "content-type": "application/json"}


def blob(created: float, size: int = 10_000) -> bytes:
    return Entry(status=200, headers=[], body=b"x" * size, stream=False, created=created).encode()


def keys(store: ResponseStore) -> set[bytes]:
    return {key for key, _ in store.items()}


@pytest.fixture
def env(tmp_path):
    lmdb_env = Lmdb(tmp_path / "state", 1 << 20)
    yield lmdb_env
    lmdb_env.close()


async def test_an_expired_entry_goes_before_a_less_recently_used_one(env):
    store = ResponseStore(env, max_size=25_000, ttl=60)
    await store.put(b"fresh-but-older-use", blob(time.time()))
    store.import_now([(b"expired-but-recent-use", blob(time.time() - 120))])   # created 2 minutes ago
    await store.put(b"new", blob(time.time()))                                   # one must go: the expired one
    assert keys(store) == {b"fresh-but-older-use", b"new"}

    # the same order under the whole state's budget (the cache's own limit far away)
    store.max_size = 1 << 30
    env.budget = StateBudget(env, 1 << 20, store)
    store.import_now([(b"expired", blob(time.time() - 120, 100_000))])
    for n in range(12):
        await store.put(b"fresh-%d" % n, blob(time.time(), 100_000))
        if b"expired" not in keys(store):
            break
    assert b"expired" not in keys(store)
    assert b"fresh-but-older-use" in keys(store)   # the least recently used fresh entry outlived it


async def test_an_expired_entry_is_not_served_nor_touched_and_the_next_write_drops_it(env):
    store = ResponseStore(env, max_size=1 << 30, ttl=60)
    store.import_now([(b"expired", blob(time.time() - 120))])
    fresh = blob(time.time())
    await store.put(b"fresh", fresh)
    assert await store.get(b"expired") is None
    assert b"expired" not in store._touched        # not moved to the front of the LRU
    assert await store.get(b"fresh") is not None
    await store.flush_touches()
    assert keys(store) == {b"fresh"}
    assert store.stats()["bytes"] == len(fresh)


async def test_the_budget_counts_every_kind_and_evicts_the_oldest_first(env):
    store, records, sessions = ResponseStore(env, 1 << 30), RecordLog(env, 10 ** 6), Sessions(env)
    env.budget = StateBudget(env, 2 << 20, store, records, sessions)
    for n in range(200):   # a cache entry and a record per round, 10 KB each
        await store.put(b"entry-%03d" % n, blob(time.time()))
        records.add({"id": f"record-{n:03d}", "ts": time.time(), "pad": "r" * 10_000})
        await records.drain()
    used = env.read(env.budget.used)
    assert used <= 2 << 20
    assert (env.path / "data.mdb").stat().st_size <= 2 << 20
    kept_entries = sorted(keys(store))
    kept_records = [r["id"] for r in records.read()]
    assert 0 < len(kept_entries) < 200 and 0 < len(kept_records) < 200
    # oldest first in each kind: what is left is the most recent run of each
    assert kept_entries == [b"entry-%03d" % n for n in range(200 - len(kept_entries), 200)]
    assert kept_records == [f"record-{n:03d}" for n in range(200 - len(kept_records), 200)]
    assert abs(len(kept_entries) - len(kept_records)) <= 3   # one LRU across kinds: their times interleave


def test_a_conversation_evicted_takes_its_responses_chain_rows_along(env):
    sessions = Sessions(env)
    meta = {"id": "conv", "agent": "a", "api": "openai", "model": "m", "client_session": None, "tools_digest": "t"}
    rows = [orjson.dumps({"role": "user", "content": "hi"}), orjson.dumps({"role": "assistant", "content": "yo"})]
    env.write_now(lambda txn: sessions._merge(txn, "conv", rows, meta, None, 0, "resp_1"))
    assert env.read(lambda txn: txn.get(b"p:resp_1", db=env.db["sessions"])) is not None
    row = env.read(lambda txn: sessions.least_recent(txn))
    env.write_now(lambda txn: sessions.evict_one(txn, row))
    assert env.read(lambda txn: list(txn.cursor(db=env.db["sessions"]).iternext(values=False))) == []


async def test_running_conversations_go_last_and_each_one_dropped_is_named(start_app, mock, tmp_path):
    mock.profile = Profile(output_tokens=14_000)   # answers of about 100 KB
    px = await start_app(mock.url, state={"dir": str(tmp_path / "budget-state"), "max_mb": 2.0})
    for agent in ("alpha", "beta"):
        px.state.monitor.on_agent({"id": agent, "event": "started", "pid": os.getpid()})
    history: dict[str, list] = {"alpha": [], "beta": []}

    async def turn(http: aiohttp.ClientSession, agent: str) -> None:
        history[agent].append({"role": "user", "content": f"{agent}, turn {len(history[agent]) // 2}"})
        doc = {"model": "claude-mock-1", "max_tokens": 20_000, "messages": history[agent]}
        async with http.post(px.agent(agent) + "/v1/messages", data=orjson.dumps(doc), headers=HEADERS) as resp:
            assert resp.status == 200
            answer = await resp.json()
        history[agent].append({"role": "assistant", "content": answer["content"]})

    def evicted() -> list[dict]:
        return [e for e in px.state.monitor.recent_events if e["kind"] == "checkpoint_evicted"]

    sessions = px.state.sessions
    async with aiohttp.ClientSession() as http:
        for _ in range(6):
            await turn(http, "alpha")
        alpha = sessions.find("agent:alpha")["id"]
        for _ in range(20):   # beta grows until both conversations no longer fit
            await turn(http, "beta")
            if evicted():
                break
        await until(lambda: evicted(), what="a checkpoint_evicted event")
        beta = sessions.find("agent:beta")["id"]
        event = evicted()[0]
        assert event["sessions"] == [alpha] and event["agents"] == ["alpha"], event
        assert "raise [state] max_mb" in event["fix"]
        assert sessions.find(alpha) is None                                 # the older one went
        assert len(sessions.messages(beta)) == len(history["beta"])        # the newer one is whole
        assert px.state.cache.store.stats()["entries"] > 0                 # and the cache still works

        await turn(http, "alpha")                                          # its next turn: whole again
        assert len(sessions.messages(alpha)) == len(history["alpha"])
        await until(lambda: len(evicted()) == 2, what="the second event")
        assert evicted()[1]["sessions"] == [beta]
    lmdb_env = px.state.lmdb
    assert lmdb_env.read(lmdb_env.budget.used) <= 2 << 20   # (the file: see the long run in test_state_store.py)
