"""The store's group commit: every write queued in one turn of the event loop shares one LMDB transaction.

Driven alone, on a real LMDB environment in a temp dir:
- test_one_commit_per_loop_turn: a cache entry and a checkpoint-like write queued together commit once,
  and both are readable when either future resolves; a write queued a turn later commits apart.
- test_a_failing_write_fails_alone: a write that raises (a defect, not the store) gets its exception;
  the others queued with it are committed all the same.
- test_store_failure_fails_open: a store error is reported once, every future gives None, and the next
  commit that succeeds reports the recovery.
- test_close_commits_queued_writes: writes queued in the loop's last turn are committed at close.
- test_durable_commits_on_the_writer_thread: with durable = true the batch commits off the event loop.
"""

from __future__ import annotations

import asyncio
import threading

import lmdb
import pytest

from agent_sidecar.proxy.store import Lmdb


@pytest.fixture
def env(tmp_path):
    store = Lmdb(tmp_path, map_size=1 << 20)
    yield store
    store.close()


def counting(store: Lmdb) -> list[int]:
    sizes: list[int] = []
    commit = store._commit

    def counted(batch):
        sizes.append(len(batch))
        return commit(batch)
    store._commit = counted
    return sizes


def put(db, key: bytes, value: bytes):
    def write(txn):
        txn.put(key, value, db=db)
        return key
    return write


def get(store: Lmdb, key: bytes) -> bytes | None:
    return store.read(lambda txn: txn.get(key, db=store.db["responses"]))


async def test_one_commit_per_loop_turn(env):
    sizes = counting(env)
    db = env.db["responses"]
    entry, turn = env.submit(put(db, b"entry", b"1")), env.submit(put(db, b"turn", b"2"))
    assert await entry == b"entry"
    assert get(env, b"turn") == b"2"   # committed with the entry, though its future was not awaited yet
    assert await turn == b"turn"
    assert sizes == [2]
    await env.write(put(db, b"later", b"3"))
    assert sizes == [2, 1]


async def test_a_failing_write_fails_alone(env):
    db = env.db["responses"]

    def broken(txn):
        txn.put(b"half", b"x", db=db)
        raise KeyError("a defect in one writer")
    first, bad, last = env.submit(put(db, b"a", b"1")), env.submit(broken), env.submit(put(db, b"b", b"2"))
    assert await first == b"a" and await last == b"b"
    with pytest.raises(KeyError):
        await bad
    assert get(env, b"a") == b"1" and get(env, b"b") == b"2"
    assert get(env, b"half") is None   # the failing write left nothing behind


async def test_store_failure_fails_open(env):
    reports: list[BaseException | None] = []
    env.report = reports.append
    db = env.db["responses"]

    def full(txn):
        raise lmdb.DiskError("No space left on device")
    results = await asyncio.gather(env.submit(full), env.submit(put(db, b"k", b"v")), env.submit(full))
    assert results == [None, None, None]
    assert len(reports) == 1 and isinstance(reports[0], lmdb.DiskError)
    assert get(env, b"k") is None   # one transaction: nothing of the failed batch is kept
    assert await env.write(put(db, b"k", b"v")) == b"k"
    assert reports[-1] is None and env.failing is None


async def test_close_commits_queued_writes(tmp_path):
    store = Lmdb(tmp_path, map_size=1 << 20)
    store.submit(put(store.db["responses"], b"last", b"words"))
    store.close()   # before the loop turned
    reopened = Lmdb(tmp_path, map_size=1 << 20)
    try:
        assert get(reopened, b"last") == b"words"
    finally:
        reopened.close()


async def test_durable_commits_on_the_writer_thread(tmp_path):
    store = Lmdb(tmp_path, map_size=1 << 20, durable=True)
    try:
        where: list[str] = []

        def write(txn):
            where.append(threading.current_thread().name)
            txn.put(b"k", b"v", db=store.db["responses"])
        await asyncio.gather(store.submit(write), store.submit(write))
        assert len(where) == 2 and all(name.startswith("sidecar-lmdb") for name in where)
        assert get(store, b"k") == b"v"
    finally:
        store.close()
