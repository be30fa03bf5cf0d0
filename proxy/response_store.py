"""The cache's answers in the state's LMDB environment (store.py): entries by key, with size accounting,
expiry and least-recently-used eviction, each write inside the environment's group commit."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Awaitable, Iterator

import lmdb

from . import migrations
from .store import Lmdb


_stamp = migrations.STAMP.pack
SIZE = struct.Struct(">Q")


def _unstamp(raw: bytes) -> float:
    return migrations.STAMP.unpack(raw[:8])[0]


class ResponseStore:
    """Cached answers by key, with size accounting, expiry and least-recently-used eviction.

    Rows (format 2): responses key -> entry; access key -> last use + size + created; lru last use + key;
    created created + key. An entry older than `ttl` is never served nor touched: it is the first to go,
    dropped by the next write."""

    _responses = property(lambda self: self.lmdb.db["responses"])   # looked up per use: a store reopens
    _access = property(lambda self: self.lmdb.db["access"])
    _lru = property(lambda self: self.lmdb.db["lru"])
    _created = property(lambda self: self.lmdb.db["created"])
    _meta = property(lambda self: self.lmdb.db["meta"])

    def __init__(self, lmdb_env: Lmdb, max_size: int, ttl: float = 0.0):
        self.lmdb = lmdb_env
        self.max_size = max_size
        self.ttl = ttl
        self._touched: dict[bytes, float] = {}
        self._expired: set[bytes] = set()   # read past their TTL: dropped by the next write

    async def get(self, key: bytes) -> bytes | None:
        """A memory-mapped read, done inline: microseconds, never a thread hop."""
        if self.ttl:   # the access row says when the entry was made
            blob, access = self.lmdb.read(lambda txn: (txn.get(key, db=self._responses),
                                                       txn.get(key, db=self._access)), (None, None))
        else:
            blob, access = self.lmdb.read(lambda txn: txn.get(key, db=self._responses)), None
        if blob is None:
            return None
        now = time.time()
        if access is not None and len(access) >= 24 and now - _unstamp(access[16:]) > self.ttl:
            self._expired.add(key)
            return None
        self._touched[key] = now
        return blob

    def put(self, key: bytes, blob: bytes) -> Awaitable[None]:
        """Queued for this loop turn's commit (no task per entry); await the result to know it is stored."""
        if len(blob) > self.max_size:   # an answer larger than the whole cache would only evict everything else
            return asyncio.sleep(0)
        touched, self._touched = self._touched, {}
        return self.lmdb.submit(lambda txn: self._put(txn, key, blob, touched), len(blob) + 256 * (len(touched) + 1))

    def _put(self, txn: lmdb.Transaction, key: bytes, blob: bytes, touched: dict[bytes, float],
             created: float | None = None) -> None:
        for old_key, when in touched.items():
            self._touch(txn, old_key, when)
        total = self._total(txn) - self._drop_expired(txn) - self._remove(txn, key) + len(blob)
        total -= self._evict(txn, total - self.max_size)
        now = time.time()
        created = created or now
        txn.put(key, blob, db=self._responses)
        txn.put(key, _stamp(now) + SIZE.pack(len(blob)) + _stamp(created), db=self._access)
        txn.put(_stamp(now) + key, b"", db=self._lru)
        txn.put(_stamp(created) + key, b"", db=self._created)
        txn.put(b"bytes", SIZE.pack(max(0, total)), db=self._meta)

    async def flush_touches(self) -> None:
        if self._touched or self._expired:
            touched, self._touched = self._touched, {}
            await self.lmdb.write(lambda txn: self._flush(txn, touched))

    def _flush(self, txn: lmdb.Transaction, touched: dict[bytes, float]) -> None:
        for key, when in touched.items():
            self._touch(txn, key, when)
        freed = self._drop_expired(txn)
        if freed:
            txn.put(b"bytes", SIZE.pack(max(0, self._total(txn) - freed)), db=self._meta)

    def _touch(self, txn: lmdb.Transaction, key: bytes, when: float) -> None:
        access = txn.get(key, db=self._access)
        if access is None:
            return
        txn.delete(access[:8] + key, db=self._lru)
        txn.put(key, _stamp(when) + access[8:], db=self._access)
        txn.put(_stamp(when) + key, b"", db=self._lru)

    def _drop_expired(self, txn: lmdb.Transaction) -> int:
        """Remove the entries reads found expired; returns the bytes freed (the caller accounts them)."""
        expired, self._expired = self._expired, set()
        return sum(self._remove(txn, key) for key in expired)

    def _total(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"bytes", db=self._meta)
        return SIZE.unpack(raw)[0] if raw else 0

    def _remove(self, txn: lmdb.Transaction, key: bytes) -> int:
        """Delete one entry and its index rows; returns the bytes freed."""
        access = txn.get(key, db=self._access)
        if access is None:
            return 0
        txn.delete(key, db=self._responses)
        txn.delete(key, db=self._access)
        txn.delete(access[:8] + key, db=self._lru)
        if len(access) >= 24:   # an entry written by a format-1 sidecar since the upgrade has no created row
            txn.delete(access[16:24] + key, db=self._created)
        return SIZE.unpack(access[8:16])[0]

    def oldest_expired(self, txn: lmdb.Transaction) -> bytes | None:
        """The `created` row (created + key) of the entry created longest ago, if it is past its TTL."""
        if not self.ttl:
            return None
        cursor = txn.cursor(db=self._created)
        if not cursor.first() or time.time() - _unstamp(cursor.key()) <= self.ttl:
            return None
        return cursor.key()

    def least_recent(self, txn: lmdb.Transaction) -> bytes | None:
        """The `lru` row (last use + key) of the least recently used entry."""
        cursor = txn.cursor(db=self._lru)
        return cursor.key() if cursor.first() else None

    def evict_row(self, txn: lmdb.Transaction, row: bytes, expired: bool) -> int:
        """Remove the entry of an index row (the row itself even if the entry is gone: progress is sure);
        returns the bytes freed. The caller keeps the size accounting."""
        txn.delete(row, db=self._created if expired else self._lru)
        return self._remove(txn, row[8:])

    def evict_one(self, txn: lmdb.Transaction, row: bytes, expired: bool) -> int:
        """`evict_row` for the state's budget, keeping the size accounting."""
        freed = self.evict_row(txn, row, expired)
        txn.put(b"bytes", SIZE.pack(max(0, self._total(txn) - freed)), db=self._meta)
        return freed + 2 * len(row) + 40

    def _evict(self, txn: lmdb.Transaction, excess: int) -> int:
        """Drop expired entries, then least recently used ones, until `excess` bytes are freed."""
        freed = 0
        while freed < excess:
            row = self.oldest_expired(txn)
            expired = row is not None
            row = row or self.least_recent(txn)
            if row is None:
                break
            freed += self.evict_row(txn, row, expired)
        return freed

    async def delete(self, key: bytes) -> None:
        def remove(txn: lmdb.Transaction) -> None:
            freed = self._remove(txn, key)
            if freed:
                txn.put(b"bytes", SIZE.pack(max(0, self._total(txn) - freed)), db=self._meta)
        await self.lmdb.write(remove)

    def delete_now(self, keys: list[bytes]) -> int:
        def remove(txn: lmdb.Transaction) -> int:
            freed = sum(self._remove(txn, k) for k in keys)
            txn.put(b"bytes", SIZE.pack(max(0, self._total(txn) - freed)), db=self._meta)
            return freed
        return self.lmdb.write_now(remove)

    def import_now(self, items: list[tuple[bytes, bytes]]) -> None:
        """Store entries any key may read, in one transaction (for `sidecar cache import`)."""
        def put_all(txn: lmdb.Transaction) -> None:
            for key, blob in items:
                self._put(txn, key, blob, {}, created=migrations.entry_created(blob))
            txn.put(b"shared", b"1", db=self._meta)
        self.lmdb.write_now(put_all)

    def evict_now(self) -> int:
        def evict(txn: lmdb.Transaction) -> int:
            total = self._total(txn)
            freed = self._evict(txn, total - self.max_size)
            txn.put(b"bytes", SIZE.pack(max(0, total - freed)), db=self._meta)
            return freed
        return self.lmdb.write_now(evict)

    def shared_entries(self) -> bool:
        return self.lmdb.read(lambda txn: txn.get(b"shared", db=self._meta)) is not None

    def stats(self) -> dict[str, int]:
        def read(txn: lmdb.Transaction) -> dict[str, int]:
            return {"entries": txn.stat(self._responses)["entries"], "bytes": self._total(txn),
                    "max_bytes": self.max_size}
        return self.lmdb.read(read, {"entries": 0, "bytes": 0, "max_bytes": self.max_size})

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, blob), for list/export; a snapshot."""
        return self.lmdb.scan(lambda txn: iter(txn.cursor(db=self._responses)))
