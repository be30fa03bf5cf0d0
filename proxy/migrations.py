"""The state store's format history: a version in its meta database, and ordered steps up to this one.

In the manner of simonw/llm's migrations: each step takes a store of the format before it to its own,
and every step runs inside the one write transaction that opens the store, so a store is either wholly
upgraded or left as it was (a kill -9 half way included). A store of a format newer than this sidecar
knows is refused by the caller, never misread.

Formats (meta `format`, ASCII digits):
1. responses (key -> entry), access (key -> last use, size), lru (last use + key -> ""), records,
   sessions (`s:ID` meta, `y:ID` system prompt, `m:ID:N` messages), meta (format, bytes, shared).
2. access rows end with the entry's creation time (key -> last use, size, created) and a `created` index
   (created + key -> "") finds expired entries first; sessions gain a `u:` index (last turn + ID -> agent),
   so the least recently updated conversation is found without reading them all, and a `q:ID:RESPONSE`
   row per `p:RESPONSE` row (a Responses answer's conversation), so those go with their conversation;
   meta gains `key_version`.

The canonical form of the cache key has a version of its own (cache_key.KEY_VERSION, meta `key_version`,
1 when absent): entries keyed in an older form can never be hit again, so they are dropped.
"""

from __future__ import annotations

import struct
from typing import Callable

import lmdb
import orjson

CURRENT = 2
CACHE_DATABASES = ("responses", "access", "lru", "created")
STAMP = struct.Struct(">d")   # times in keys: big-endian doubles sort in time order (all are positive)


def entry_created(blob: bytes) -> float | None:
    """An entry's creation time read from its meta (entry.py's layout: magic, meta length, meta JSON)."""
    try:
        (size,) = struct.unpack_from(">I", blob, 3)
        created = orjson.loads(blob[7:7 + size])["created"]
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return float(created) if isinstance(created, (int, float)) else None


def _to_2(txn: lmdb.Transaction, db: dict) -> None:
    if txn.get(b"key_version", db=db["meta"]) is None:
        txn.put(b"key_version", b"1", db=db["meta"])   # what format 1 stores were keyed with
    for key, access in list(txn.cursor(db=db["access"])):
        blob = txn.get(key, db=db["responses"])
        created = (entry_created(blob) if blob is not None else None) or STAMP.unpack(access[:8])[0]
        txn.put(key, access[:16] + STAMP.pack(created), db=db["access"])
        txn.put(STAMP.pack(created) + key, b"", db=db["created"])
    for sid, value in _rows(txn, db["sessions"], b"s:"):
        try:
            meta = orjson.loads(value)
            updated, agent = float(meta.get("updated") or meta.get("created") or 0.0), str(meta.get("agent", ""))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue   # an unreadable meta row: the session stays as it was, listed by what can be read
        txn.put(b"u:" + STAMP.pack(updated) + sid, agent.encode(), db=db["sessions"])
    # a Responses answer id -> [its conversation, items]: indexed by conversation
    for response, value in _rows(txn, db["sessions"], b"p:"):
        try:
            sid = str(orjson.loads(value)[0])
        except (orjson.JSONDecodeError, IndexError, KeyError, TypeError):
            continue
        txn.put(b"q:" + sid.encode() + b":" + response, b"", db=db["sessions"])


STEPS: dict[int, Callable[[lmdb.Transaction, dict], None]] = {2: _to_2}


def _rows(txn, db, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """(key without the prefix, value) of every row whose key starts with `prefix`, read before any is written."""
    rows = []
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix):
        for key, value in cursor:
            if not key.startswith(prefix):
                break
            rows.append((key[len(prefix):], value))
    return rows


def migrate(txn: lmdb.Transaction, db: dict, found: int) -> list[int]:
    """Upgrade a store of format `found` to CURRENT, step by step; returns the steps run."""
    steps = list(range(found + 1, CURRENT + 1))
    for version in steps:
        STEPS[version](txn, db)
    txn.put(b"format", str(CURRENT).encode(), db=db["meta"])
    return steps


def drop_cache(txn: lmdb.Transaction, db: dict) -> int:
    """Empty the cache (entries keyed in a form this sidecar no longer makes); returns the entries dropped."""
    count = txn.stat(db["responses"])["entries"]
    for name in CACHE_DATABASES:
        txn.drop(db[name], delete=False)
    txn.delete(b"bytes", db=db["meta"])
    txn.delete(b"shared", db=db["meta"])
    return count
