"""The state directory's LMDB environment, and the response store on it.

LMDB gives readers in many processes and one writer at a time with atomic
commits: several sidecars share one cache, and a SIGKILL never leaves half an
entry. Reads are memory-mapped lookups done inline (microseconds). Commits
without fsync (the default) are done inline too, on the event loop, in tens
of microseconds. Only with `[state] durable = true` do commits go to a writer
thread (started by the first durable commit), so an fsync never blocks the
event loop. The map is sized well above the cache's size limit and each
store evicts least recently used entries inside its own transaction, so the
map does not fill in normal use; if a commit still hits `MapFullError`, the
map is doubled and the write retried (twice at most, then the error is
raised to the caller). A map grown by another process is adopted on the next
read or write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import lmdb

log = logging.getLogger("sidecar")
T = TypeVar("T")
FORMAT_VERSION = b"1"
MIN_MAP = 256 << 20


class StoreError(Exception):
    """The state directory cannot be opened; the message says what to do."""


def open_state_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


class Lmdb:
    """One environment with named databases; writes commit inline, or on a writer thread when durable."""

    DATABASES = (b"meta", b"responses", b"access", b"lru", b"records", b"sessions", b"events")

    def __init__(self, state_dir: Path, map_size: int, durable: bool = False):
        self.path = open_state_dir(state_dir) / "lmdb"
        self.path.mkdir(exist_ok=True, mode=0o700)
        old_umask = os.umask(0o077)  # data.mdb and lock.mdb: 0600
        try:
            # sync=False: a commit is in the page cache when it returns, safe from any process crash (SIGKILL
            # included); durable=true adds an fsync per commit, for power loss too.
            # writemap: a commit writes into the shared mapping instead of pwrite()-ing each page (half the
            # cost); the kernel owns those pages, so a killed process loses nothing it committed.
            self.env = lmdb.open(str(self.path), map_size=max(map_size, MIN_MAP), max_dbs=len(self.DATABASES) + 2,
                                 max_readers=512, readahead=False, lock=True, sync=durable, metasync=durable,
                                 writemap=True)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the state store at {self.path}: {exc}; check permissions and free "
                             f"disk space, or point [state] dir / SIDECAR_STATE_DIR elsewhere") from None
        finally:
            os.umask(old_umask)
        self.db = {name.decode(): self.env.open_db(name) for name in self.DATABASES}
        self._check_version()
        self.durable = durable
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sidecar-lmdb")
        self._resize = threading.Lock()

    def _check_version(self) -> None:
        with self.env.begin(db=self.db["meta"], write=True) as txn:
            found = txn.get(b"format")
            if found is None:
                txn.put(b"format", FORMAT_VERSION)
            elif found != FORMAT_VERSION:
                raise StoreError(f"the state store at {self.path} has format {found.decode()}, this sidecar reads "
                                 f"{FORMAT_VERSION.decode()}; upgrade the sidecar or move the state directory away")

    def read(self, func: Callable[[lmdb.Transaction], T]) -> T:
        """Run a short read transaction inline."""
        with self._resize:
            try:
                with self.env.begin() as txn:
                    return func(txn)
            except lmdb.MapResizedError:  # another process grew the map
                self.env.set_mapsize(0)
                with self.env.begin() as txn:
                    return func(txn)

    def write_now(self, func: Callable[[lmdb.Transaction], T]) -> T:
        """Run a write transaction in the calling thread: the event loop's (commits without fsync), the
        writer thread (durable commits) or a CLI's. A full map is doubled and the write retried, twice at
        most; a map another process grew is adopted."""
        for attempt in range(3):
            try:
                with self.env.begin(write=True) as txn:
                    return func(txn)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.MapFullError:
                if attempt == 2:
                    raise
                with self._resize:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
                log.warning("grew the LMDB map to %d bytes", self.env.info()["map_size"])
        raise lmdb.MapResizedError("map kept changing size")

    async def write(self, func: Callable[[lmdb.Transaction], T]) -> T:
        """Run a write transaction: inline when commits do not fsync (tens of microseconds, less than a
        thread hop and no GIL contention), on the writer thread when they do (an fsync takes milliseconds)."""
        if not self.durable:
            return self.write_now(func)
        return await asyncio.get_running_loop().run_in_executor(self._writer, self.write_now, func)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.env.sync(True)
        self.env.close()


def open_lmdb(config) -> Lmdb:
    """The state store of a config, with a map comfortably above the cache's size limit."""
    max_bytes = int(config.cache.max_size_mb * 1024 * 1024)
    return Lmdb(config.state_dir, map_size=2 * max_bytes + (256 << 20), durable=config.state.durable)


def _stamp(t: float) -> bytes:
    return struct.pack(">d", t)


class ResponseStore:
    """Cached answers by key, with size accounting and least-recently-used eviction."""

    def __init__(self, lmdb_env: Lmdb, max_size: int):
        self.lmdb = lmdb_env
        self.max_size = max_size
        self._responses, self._access, self._lru, self._meta = (lmdb_env.db.get(n) for n in
                                                                 ("responses", "access", "lru", "meta"))
        self._touched: dict[bytes, float] = {}

    async def get(self, key: bytes) -> bytes | None:
        """A memory-mapped read, done inline: microseconds, never a thread hop."""
        blob = self.lmdb.read(lambda txn: txn.get(key, db=self._responses))
        if blob is not None:
            self._touched[key] = time.time()
        return blob

    async def put(self, key: bytes, blob: bytes) -> None:
        if len(blob) > self.max_size:
            return   # an answer larger than the whole cache would only evict everything else
        touched, self._touched = self._touched, {}
        await self.lmdb.write(lambda txn: self._put(txn, key, blob, touched))

    def _put(self, txn: lmdb.Transaction, key: bytes, blob: bytes, touched: dict[bytes, float]) -> None:
        for old_key, when in touched.items():
            self._touch(txn, old_key, when)
        total = self._total(txn) - self._remove(txn, key) + len(blob)
        total -= self._evict(txn, total - self.max_size)
        txn.put(key, blob, db=self._responses)
        now = time.time()
        txn.put(key, _stamp(now) + struct.pack(">Q", len(blob)), db=self._access)
        txn.put(_stamp(now) + key, b"", db=self._lru)
        txn.put(b"bytes", struct.pack(">Q", total), db=self._meta)

    async def flush_touches(self) -> None:
        if self._touched:
            touched, self._touched = self._touched, {}
            await self.lmdb.write(lambda txn: [self._touch(txn, k, t) for k, t in touched.items()])

    def _touch(self, txn: lmdb.Transaction, key: bytes, when: float) -> None:
        access = txn.get(key, db=self._access)
        if access is None:
            return
        txn.delete(access[:8] + key, db=self._lru)
        txn.put(key, _stamp(when) + access[8:], db=self._access)
        txn.put(_stamp(when) + key, b"", db=self._lru)

    def _total(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"bytes", db=self._meta)
        return struct.unpack(">Q", raw)[0] if raw else 0

    def _remove(self, txn: lmdb.Transaction, key: bytes) -> int:
        """Delete one entry and its index rows; returns the bytes freed."""
        access = txn.get(key, db=self._access)
        if access is None:
            return 0
        txn.delete(key, db=self._responses)
        txn.delete(key, db=self._access)
        txn.delete(access[:8] + key, db=self._lru)
        return struct.unpack(">Q", access[8:16])[0]

    def _evict(self, txn: lmdb.Transaction, excess: int) -> int:
        """Drop least recently used entries until `excess` bytes are freed."""
        freed = 0
        if excess <= 0:
            return 0
        victims = []
        with txn.cursor(db=self._lru) as cursor:
            for lru_key, _ in cursor:
                victims.append(lru_key[8:])
                access = txn.get(lru_key[8:], db=self._access)
                freed += struct.unpack(">Q", access[8:16])[0] if access else 0
                if freed >= excess:
                    break
        for key in victims:
            self._remove(txn, key)
        return freed

    async def delete(self, key: bytes) -> None:
        def remove(txn: lmdb.Transaction) -> None:
            freed = self._remove(txn, key)
            if freed:
                txn.put(b"bytes", struct.pack(">Q", max(0, self._total(txn) - freed)), db=self._meta)
        await self.lmdb.write(remove)

    def delete_now(self, keys: list[bytes]) -> int:
        def remove(txn: lmdb.Transaction) -> int:
            freed = sum(self._remove(txn, k) for k in keys)
            txn.put(b"bytes", struct.pack(">Q", max(0, self._total(txn) - freed)), db=self._meta)
            return freed
        return self.lmdb.write_now(remove)

    def import_now(self, items: list[tuple[bytes, bytes]]) -> None:
        """Store entries any key may read, in one transaction (for `sidecar cache import`)."""
        def put_all(txn: lmdb.Transaction) -> None:
            for key, blob in items:
                self._put(txn, key, blob, {})
            txn.put(b"shared", b"1", db=self._meta)
        self.lmdb.write_now(put_all)

    def evict_now(self) -> int:
        def evict(txn: lmdb.Transaction) -> int:
            total = self._total(txn)
            freed = self._evict(txn, total - self.max_size)
            txn.put(b"bytes", struct.pack(">Q", total - freed), db=self._meta)
            return freed
        return self.lmdb.write_now(evict)

    def shared_entries(self) -> bool:
        return self.lmdb.read(lambda txn: txn.get(b"shared", db=self._meta)) is not None

    def stats(self) -> dict[str, int]:
        def read(txn: lmdb.Transaction) -> dict[str, int]:
            return {"entries": txn.stat(self._responses)["entries"], "bytes": self._total(txn),
                    "max_bytes": self.max_size}
        return self.lmdb.read(read)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, blob), for list/export; a snapshot."""
        with self.lmdb.env.begin() as txn:
            yield from txn.cursor(db=self._responses)
