"""Versioned state: a store written in the older layout is upgraded in place and read right, never misread.

The format-1 store is written here with plain LMDB calls, row by row as format 1 laid it out (the layout
is written down in proxy/migrations.py): a cache entry for a known request, a conversation, a call record.
Then the proxy opens it (in-process, on a real port) and must serve the entry as a hit, list the
conversation and read the record; the rows of format 2 (creation times, the two indexes) must be there.
- test_store_in_the_older_layout_is_upgraded_and_read_right: with this sidecar's key form (as if it were
  still the form of format 1), the entry is a hit.
- test_entries_keyed_in_an_older_form_are_dropped_and_the_rest_kept: a real format-1 store, keyed in form 1
  (sorted keys, BLAKE2b): its entries could never be hit, so they go; its conversation and record stay.
- test_a_newer_key_form_is_refused_loudly: one line naming data.mdb and the fix.
- test_an_export_of_another_key_form_is_refused: `sidecar cache import`, status 2.
"""

from __future__ import annotations

import base64
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import lmdb
import orjson
import pytest

from agent_sidecar.proxy import store as store_module
from agent_sidecar.proxy.cache_key import KEY_VERSION, KeyMaker, load_secret
from agent_sidecar.proxy.config import CacheSection
from agent_sidecar.proxy.entry import Entry
from agent_sidecar.proxy.store import Lmdb, StoreError

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01", "content-type": "application/json"}
REQUEST = {"model": "claude-old", "max_tokens": 50, "messages": [{"role": "user", "content": "asked before the upgrade"}]}
ANSWER = {"id": "msg_old", "type": "message", "role": "assistant", "model": "claude-old",
          "content": [{"type": "text", "text": "answered by the format-1 store"}], "stop_reason": "end_turn",
          "stop_sequence": None, "usage": {"input_tokens": 7, "output_tokens": 6}}
CREATED = time.time() - 3600
D = struct.Struct(">d").pack


def write_format_1(state: Path) -> bytes:
    """A store exactly as format 1 left it; returns the cache key of REQUEST."""
    settings = CacheSection()
    keys = KeyMaker(load_secret(state), settings.ignore_fields, settings.key_headers)
    request_hash = keys.request_hash(keys.canonical("POST", "/v1/messages", "", HEADERS, REQUEST))
    key = keys.key(request_hash, keys.partition(HEADERS))
    blob = Entry(status=200, headers=[("content-type", "application/json"), ("request-id", "req_old")],
                 body=orjson.dumps(ANSWER), stream=False, created=CREATED,
                 meta={"path": "/v1/messages", "model": "claude-old", "hash": request_hash.hex()}).encode()
    (state / "lmdb").mkdir(parents=True, mode=0o700)
    env = lmdb.open(str(state / "lmdb"), map_size=64 << 20, max_dbs=9)
    db = {name: env.open_db(name.encode()) for name in ("meta", "responses", "access", "lru", "records", "sessions")}
    used = CREATED + 60
    meta = {"id": "conv-old", "agent": "old-agent", "api": "anthropic", "model": "claude-old", "created": CREATED,
            "updated": used, "turns": 1, "messages": 2, "system_digest": "x", "tools_digest": "y"}
    with env.begin(write=True) as txn:
        txn.put(b"format", b"1", db=db["meta"])
        txn.put(b"bytes", struct.pack(">Q", len(blob)), db=db["meta"])
        txn.put(key, blob, db=db["responses"])
        txn.put(key, D(used) + struct.pack(">Q", len(blob)), db=db["access"])   # last use, size: 16 bytes
        txn.put(D(used) + key, b"", db=db["lru"])
        txn.put(b"s:conv-old", orjson.dumps(meta), db=db["sessions"])
        txn.put(b"y:conv-old", orjson.dumps("old system prompt"), db=db["sessions"])
        for index, message in enumerate([REQUEST["messages"][0], {"role": "assistant", "content": ANSWER["content"]}]):
            txn.put(b"m:conv-old:" + index.to_bytes(4, "big"), orjson.dumps(message), db=db["sessions"])
        txn.put(struct.pack(">dI", CREATED, 1) + b"rec-old", orjson.dumps({"id": "rec-old", "ts": CREATED}),
                db=db["records"])
    env.close()
    return key


async def test_store_in_the_older_layout_is_upgraded_and_read_right(start_app, mock, tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "KEY_VERSION", 1)   # the entry's key is in this sidecar's own form
    state = tmp_path / "old-state"
    key = write_format_1(state)
    px = await start_app(mock.url, state={"dir": str(state)})
    async with aiohttp.ClientSession() as http:
        async with http.post(px.url + "/v1/messages", data=orjson.dumps(REQUEST), headers=HEADERS) as resp:
            assert resp.status == 200
            assert resp.headers["x-sidecar-cache"] == "hit"
            assert orjson.loads(await resp.read()) == ANSWER
    assert mock.received == []   # answered from the upgraded store: the upstream never saw it
    sessions = px.state.sessions
    old = [(m["agent"], m["turns"], m["messages"]) for m in sessions.list() if m["id"] == "conv-old"]
    assert old == [("old-agent", 1, 2)]
    assert sessions.find("conv-old")["system"] == "old system prompt"
    assert [m["role"] for m in sessions.messages("conv-old")] == ["user", "assistant"]
    assert [r["id"] for r in await px.records()][:1] == ["rec-old"]

    lmdb_env = px.state.lmdb
    def rows(txn):
        return {"format": txn.get(b"format", db=lmdb_env.db["meta"]),
                "key_version": txn.get(b"key_version", db=lmdb_env.db["meta"]),
                "access": txn.get(key, db=lmdb_env.db["access"]),
                "created": list(txn.cursor(db=lmdb_env.db["created"]).iternext(values=False)),
                "index": [k for k in txn.cursor(db=lmdb_env.db["sessions"]).iternext(values=False)
                          if k.startswith(b"u:")]}
    found = lmdb_env.read(rows)
    assert found["format"] == b"2" and found["key_version"] == b"1"
    assert len(found["access"]) == 24 and found["access"][16:] == D(CREATED)   # the entry's own creation time
    assert D(CREATED) + key in found["created"]
    assert b"u:" + D(CREATED + 60) + b"conv-old" in found["index"]


async def test_entries_keyed_in_an_older_form_are_dropped_and_the_rest_kept(start_app, mock, tmp_path, caplog):
    assert KEY_VERSION > 1   # format-1 stores were keyed in form 1
    state = tmp_path / "old-state"
    write_format_1(state)
    px = await start_app(mock.url, state={"dir": str(state)})
    assert "dropped 1 cache entries keyed in form 1" in caplog.text
    lmdb_env = px.state.lmdb
    assert px.state.cache.store.stats() == {"entries": 0, "bytes": 0, "max_bytes": px.state.cache.store.max_size}
    assert lmdb_env.read(lambda txn: txn.get(b"key_version", db=lmdb_env.db["meta"])) == str(KEY_VERSION).encode()
    assert [m["id"] for m in px.state.sessions.list()] == ["conv-old"]
    assert [r["id"] for r in await px.records()] == ["rec-old"]
    async with aiohttp.ClientSession() as http:   # answered by the upstream, and kept in the new form
        for outcome in ("miss", "hit"):
            async with http.post(px.url + "/v1/messages", data=orjson.dumps(REQUEST), headers=HEADERS) as resp:
                assert resp.status == 200 and resp.headers["x-sidecar-cache"] == outcome


def test_a_newer_key_form_is_refused_loudly(tmp_path):
    state = tmp_path / "state"
    Lmdb(state, 1 << 20).close()
    env = lmdb.open(str(state / "lmdb"), max_dbs=9)
    with env.begin(write=True) as txn:
        txn.put(b"key_version", b"7", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(StoreError) as refused:
        Lmdb(state, 1 << 20)
    message = str(refused.value)
    assert str(state / "lmdb" / "data.mdb") in message and "form 7" in message and "sidecar cache clear" in message


def test_an_export_of_another_key_form_is_refused(tmp_path):
    export = tmp_path / "other.jsonl"
    blob = Entry(status=200, headers=[], body=b"{}", stream=False).encode()
    export.write_text(orjson.dumps({"hash": "00" * 16, "key_version": 9,
                                    "entry": base64.b64encode(blob).decode()}).decode() + "\n")
    done = subprocess.run([sys.executable, "-m", "agent_sidecar.launcher", "cache", "import", str(export)], cwd=ROOT,
                          capture_output=True, timeout=60)
    assert done.returncode == 2, done
    err = done.stderr.decode()
    assert err.startswith("sidecar: ") and err.count("\n") == 1 and "keyed in form 9" in err, err
