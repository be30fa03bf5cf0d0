"""Every call's record, kept in the state directory for `sidecar stats`.

Records go to LMDB in batches: a call only appends to a list, and one write
transaction takes up to a batch at a time, when the batch is full or a second
after the first pending record (the one timer, armed only while records wait),
so the cost per call stays small and nothing runs while nothing happens. A
reader (`/_sidecar/stats`, shutdown) flushes first. The log is bounded:
beyond `max_records` the oldest are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import Iterator

import lmdb
import orjson

from .store import Lmdb

log = logging.getLogger("sidecar")
BATCH = 64          # records per write transaction at most
FLUSH_DELAY = 1.0   # seconds a record may wait for its batch to fill


def record_key(record: dict, seq: int) -> bytes:
    return struct.pack(">dI", record["ts"], seq & 0xFFFFFFFF) + record["id"].encode()


class RecordLog:
    def __init__(self, lmdb_env: Lmdb, max_records: int):
        self.lmdb = lmdb_env
        self.max_records = max_records
        self._pending: list[dict] = []
        self._flushing: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._seq = 0

    @property
    def _db(self):
        return self.lmdb.db["records"]   # looked up per use: a store that could not be opened reopens

    def add(self, record: dict) -> None:
        self._pending.append(record)
        if len(self._pending) >= BATCH:
            self._start_flush()
        elif self._timer is None and self._flushing is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._start_flush)

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is None and self._pending:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self.lmdb.write(lambda txn: self._write(txn, batch))
        except Exception as exc:  # a full disk must not stop the proxy; the records are lost, the calls are not
            log.error("could not store %d call records: %s", len(self._pending), exc)
        finally:
            self._flushing = None

    def _write(self, txn: lmdb.Transaction, batch: list[dict]) -> None:
        for record in batch:
            self._seq += 1
            txn.put(record_key(record, self._seq), orjson.dumps(record), db=self._db)
        excess = txn.stat(self._db)["entries"] - self.max_records
        if excess > 0:
            with txn.cursor(db=self._db) as cursor:
                cursor.first()
                for _ in range(excess):
                    if not cursor.delete():
                        break

    def least_recent(self, txn: lmdb.Transaction) -> bytes | None:
        """The key of the oldest record (its time first), for the state's byte budget."""
        cursor = txn.cursor(db=self._db)
        return cursor.key() if cursor.first() else None

    def evict_one(self, txn: lmdb.Transaction, key: bytes) -> int:
        value = txn.get(key, db=self._db)
        txn.delete(key, db=self._db)
        return len(key) + len(value or b"")

    async def drain(self) -> None:
        """Write every pending record now."""
        self._start_flush()
        while self._flushing is not None:
            await self._flushing

    def read(self, since: float = 0.0) -> Iterator[dict]:
        """Records from `since` (epoch seconds) on, oldest first."""
        return self.lmdb.scan(lambda txn: self._walk(txn, since))

    def _walk(self, txn: lmdb.Transaction, since: float) -> Iterator[dict]:
        cursor = txn.cursor(db=self._db)
        if not cursor.set_range(struct.pack(">d", since)):
            return
        for _, value in cursor:
            try:
                yield orjson.loads(value)
            except orjson.JSONDecodeError:
                continue


def since_seconds(text: str) -> float:
    """'90s', '15m', '1h', '2d' -> an epoch time that far back; '' -> 0 (everything)."""
    if not text:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        amount, unit = (float(text[:-1]), units[text[-1]]) if text[-1] in units else (float(text), 1)
    except (ValueError, KeyError):
        raise ValueError(f"--since takes a duration like 90s, 15m, 1h or 2d, not {text!r}") from None
    return time.time() - amount * unit
