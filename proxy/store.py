"""The state directory's LMDB environment (the cache's entries on it: response_store.py).

LMDB gives readers in many processes and one writer at a time with atomic
commits: several sidecars share one cache, and a SIGKILL never leaves half an
entry. Reads are memory-mapped lookups done inline (microseconds), every one
through `Lmdb.read` or `Lmdb.scan`, which adopt a map another process grew.
The proxy's writes are group-committed: all those queued in one turn of the
event loop share one transaction. Commits without fsync (the default) are
done inline, on the event loop, in microseconds. Only with `[state] durable =
true` do commits go to a writer thread (started by the first durable commit),
so an fsync never blocks the event loop. Each store evicts least recently
used entries inside its own transaction; a commit that finds the map full
(`MapFullError`) grows it and is retried (twice at most, then the error is
raised to the caller).

The proxy's store is written through its map (`writemap`: a commit is a memory
copy, no pwrite() per page) where the file system rewrites blocks in place, with
every byte of the map allocated before it is used (reserve.py): a full disk is
then a failed commit (an error), never a SIGBUS on a sparse mapping. Its map
starts small, is held within the state budget while the data fits, and grows
(allocated first) when a commit finds it full. Elsewhere, with `[state] durable`,
and for the CLI, pages are written with pwrite().

The proxy's writes (`Lmdb.submit`, `Lmdb.write`) fail open: a failing store is
reported once through `report` (the `store_unavailable` event) and cleared by
the next commit that succeeds with RESUME_FREE bytes free on its file system,
or the room the failed one needed (on a nearly full disk small commits still
pass between failing large ones: the event does not flap). A store that cannot be
opened raises `StoreError` naming the file and the fix; the proxy then runs
on `Lmdb.unavailable`, where reads find nothing and writes keep nothing,
until the store can be opened again: a read or write tries once the file
changed (`sidecar cache clear` set it aside, say) or REOPEN_GAP seconds
after the last try (space or permissions came back). A store found broken by
a read is closed and treated the same way.

Formats are versioned (migrations.py): an older store is upgraded as it is
opened, a newer one refused. A `budget` (state_budget.py) set on the environment
runs at the end of every write transaction, so the state stays within
`[state] max_mb`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import lmdb

from . import migrations
from .cache_key import KEY_VERSION
from .reserve import MB, Space, in_place

log = logging.getLogger("sidecar")
T = TypeVar("T")
MIN_MAP = 256 << 20
START_MAP = 16 << 20   # a writemap store's first map (allocated on disk): grown as the data needs
NO_LOCK = nullcontext()   # a writemap store's commits take no flock (reusable: it holds nothing)
RESUME_FREE = 1 << 20   # bytes free the file system needs before a failing store counts as written again
REOPEN_GAP = 30.0   # seconds between tries to open a store that could not be opened, unless its file changed
# What a broken file raises: the store is not readable (as opposed to a full disk or a busy reader table).
BROKEN = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.IncompatibleError,
          lmdb.VersionMismatchError, lmdb.BadValsizeError)


class StoreError(Exception):
    """The state store cannot be opened or read; the message names the file and says what to do."""

    short = 0   # free bytes a write needed and did not find, when that was why: the room its store waits for


FIX = ("run 'sidecar cache clear' (it sets the broken store aside and starts afresh: cache, sessions and call "
       "records) or move {dir} aside")
STORE_ERRORS = (lmdb.Error, OSError, StoreError)   # what a failing disk or a broken store raises from a transaction


def open_state_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def broken(path: Path, why: str) -> StoreError:
    return StoreError(f"the state store {path / 'data.mdb'} {why}; " + FIX.format(dir=path))


def set_aside(state_dir: Path) -> Path | None:
    """Move a store that cannot be opened out of the way (lmdb -> lmdb.broken-TIME); returns where it went."""
    path = state_dir / "lmdb"
    if not path.exists():
        return None
    aside = path.with_name(f"lmdb.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside


class Lmdb:
    """One environment with named databases; writes commit inline, or on a writer thread when durable."""

    DATABASES = (b"meta", b"responses", b"access", b"lru", b"records", b"sessions", b"events", b"created")

    def __init__(self, state_dir: Path, map_size: int, durable: bool = False, writemap_within: int | None = None):
        self.path = open_state_dir(state_dir) / "lmdb"
        # Write through the map where the disk allows it, the map (all of it allocated) held within this many
        # bytes (the state budget) while the data fits; None: pwrite() (the CLI's, and tests' default).
        self.writemap_within = writemap_within
        self.space: Space | None = None   # data.mdb's locks, and a writemap store's map and reservation (reserve.py)
        self.writemap = False              # whether this store is written through its map
        self.env = None
        self.db: dict = dict.fromkeys((name.decode() for name in self.DATABASES), None)
        self.report: Callable[[BaseException | None], None] | None = None   # the proxy's store_unavailable
        self.failing: BaseException | None = None   # the last write's error, until a write succeeds
        self.budget = None   # a budget.Budget: run at the end of every write transaction
        self.durable = durable
        self.map_size = max(map_size, MIN_MAP)
        self._resize = threading.RLock()
        self._swap = threading.Lock()   # held by a write transaction; taken to close a broken store under it
        self._writer: ThreadPoolExecutor | None = None
        self._queued: list[tuple[Callable, asyncio.Future, int | None]] = []   # this turn's writes (func, its future, size)
        # Writes that go with whichever commit comes next, in its transaction (the last miss's note): each has
        # `pending`, `pending_size()` and `ride(txn)`.
        self.riders: list = []
        self._last_try = (0.0, None)    # when the store was last found unopenable, and its file then
        self._closed = False
        self._open(self.map_size, durable)

    def _open(self, map_size: int, durable: bool) -> None:
        self.path.mkdir(exist_ok=True, mode=0o700)
        data = self.path / "data.mdb"
        if data.exists() and not data.is_file():
            raise broken(self.path, "is not a file")
        old_umask = os.umask(0o077)  # data.mdb and lock.mdb: 0600
        try:
            # sync=False: a commit is in the page cache when it returns, safe from any process crash (SIGKILL
            # included); durable=true adds an fsync per commit, for power loss too.
            options = dict(max_dbs=len(self.DATABASES) + 2, max_readers=512, readahead=False, lock=True,
                           sync=durable, metasync=durable)
            self.space = self._space_of(data)
            if self.space is not None and self.writemap_within is not None and not durable and in_place(self.path):
                self._open_writemap(options)
            if not self.writemap:
                self.env = lmdb.open(str(self.path), map_size=map_size, **options)
            try:
                self._ready()
            except lmdb.MapFullError:
                if not self.writemap:
                    raise
                # an upgrade that outgrows the first map: done with pwrite (no more room than it takes), the
                # map then written through from the next start on
                self.env.close()
                self.writemap, self.env = False, lmdb.open(str(self.path), map_size=map_size, **options)
                self._ready()
        except BROKEN as exc:
            self._discard()
            raise broken(self.path, f"is not a readable sidecar store ({exc})") from None
        except StoreError:
            self._discard()
            raise
        except (lmdb.Error, OSError) as exc:
            self._discard()
            raise StoreError(f"cannot open the state store at {self.path}: {exc}; check permissions and free "
                             f"disk space, or point [state] dir / SIDECAR_STATE_DIR elsewhere") from None
        except BaseException:
            self._discard()
            raise
        finally:
            os.umask(old_umask)

    def _space_of(self, data: Path) -> Space | None:
        """data.mdb's descriptor for the locks and the reservation; None where it cannot be opened so (the
        open that follows then says why)."""
        try:
            return Space(data)
        except OSError:
            return None

    def _open_writemap(self, options: dict) -> None:
        """Open with writemap, the whole map allocated on disk, where it can be (else nothing is open)."""
        env = self.space.open_mapped(self.path, min(START_MAP, self.writemap_within), options)
        if env is not None:
            self.env, self.writemap = env, True
            return
        if not self.space.is_file():   # moved aside meanwhile: pwrite, its lock no longer this file's
            self.space.close()
            self.space = None
        log.info("sidecar: could not reserve the map of the state store at %s on its disk: it is written "
                 "with pwrite()", self.path)

    def _ready(self) -> None:
        """The databases opened, the format checked (upgraded, stamped)."""
        self.db = {name.decode(): self.env.open_db(name) for name in self.DATABASES}
        with self._pwrite_lock():
            self._check_version()

    def _discard(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        if self.space is not None:
            self.space.close()
            self.space = None
        self.writemap = False
        self.db = dict.fromkeys(self.db, None)

    @classmethod
    def unavailable(cls, state_dir: Path, map_size: int = MIN_MAP, durable: bool = False,
                    writemap_within: int | None = None) -> "Lmdb":
        """A stand-in for a store that could not be opened: reads find nothing, writes keep nothing, until
        the store can be opened again (`reopen`)."""
        self = cls.__new__(cls)
        self.path, self.env, self.report, self.failing, self.budget = state_dir / "lmdb", None, None, None, None
        self.db = dict.fromkeys((name.decode() for name in cls.DATABASES), None)
        self.durable, self.map_size = durable, max(map_size, MIN_MAP)
        self.writemap_within, self.space, self.writemap = writemap_within, None, False
        self._resize, self._swap, self._writer, self._queued = threading.RLock(), threading.Lock(), None, []
        self.riders = []
        self._last_try, self._closed = (time.monotonic(), self._file_id()), False
        return self

    @property
    def available(self) -> bool:
        return self.env is not None

    def _file_id(self) -> tuple | None:
        """What identifies the store's file now: it changes when the file is replaced, moved, grown or chmod-ed."""
        try:
            st = os.stat(self.path / "data.mdb")
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def reopen(self) -> bool:
        """For a store that could not be opened: try again if its file changed or REOPEN_GAP seconds passed
        (a stat call otherwise). Returns whether the store is open; its recovery is reported once."""
        if self.env is not None or self._closed:
            return self.env is not None
        when, file_id = self._last_try
        now, current = time.monotonic(), self._file_id()
        if current == file_id and now - when < REOPEN_GAP:
            return False
        self._last_try = (now, current)
        try:
            self._open(self.map_size, self.durable)
        except StoreError:
            return False
        log.warning("sidecar: the state store at %s is open again; caching resumes", self.path)
        self.failing = None
        if self.report is not None:
            self.report(None)
        return True

    def _check_version(self) -> None:
        """Upgrade an older format in place (one transaction), refuse a newer one; stamp a new store."""
        meta = self.db["meta"]
        with self.env.begin(write=True) as txn:
            found = txn.get(b"format", db=meta)
            keys_found = txn.get(b"key_version", db=meta)
            if found is None:
                if txn.stat(self.db["responses"])["entries"] or txn.stat(self.db["sessions"])["entries"]:
                    raise broken(self.path, "holds data but no format version (not written by a sidecar)")
                txn.put(b"format", str(migrations.CURRENT).encode(), db=meta)
                txn.put(b"key_version", str(KEY_VERSION).encode(), db=meta)
                return
            version = int(found) if found.isdigit() else None
            keys = int(keys_found) if keys_found is not None and keys_found.isdigit() else 1
            if version is None or version > migrations.CURRENT or keys > KEY_VERSION:
                shown = found.decode(errors="replace")[:20]
                raise StoreError(f"the state store {self.path / 'data.mdb'} has format {shown!r} (cache keys of "
                                 f"form {keys}), this sidecar reads format {migrations.CURRENT} (keys of form "
                                 f"{KEY_VERSION}); upgrade the sidecar, or " + FIX.format(dir=self.path))
            if version < migrations.CURRENT:
                migrations.migrate(txn, self.db, version)
                log.warning("sidecar: upgraded the state store at %s from format %d to %d", self.path, version,
                            migrations.CURRENT)
            if keys < KEY_VERSION:
                dropped = migrations.drop_cache(txn, self.db)
                txn.put(b"key_version", str(KEY_VERSION).encode(), db=meta)
                log.warning("sidecar: dropped %d cache entries keyed in form %d (this sidecar makes form %d, so "
                            "they could never be hit); sessions and call records are kept", dropped, keys,
                            KEY_VERSION)

    def _begin(self) -> lmdb.Transaction:
        """A read transaction; a map another process grew is adopted (MapResizedError comes at begin)."""
        with self._resize:
            for _ in range(3):
                try:
                    return self.env.begin()
                except lmdb.MapResizedError:
                    self._adopt()
        raise lmdb.MapResizedError("the map kept changing size")

    def read(self, func: Callable[[lmdb.Transaction], T], default: T = None) -> T:
        """Run a short read transaction inline: the one way to read. `default` when the store is unavailable."""
        if self.env is None and not self.reopen():
            return default
        try:
            with self._resize, self._begin() as txn:   # no map growth in this process while it reads
                return func(txn)
        except lmdb.Error as exc:
            self._read_failed(exc)
            return default

    def scan(self, func: Callable[[lmdb.Transaction], Iterator[T]]) -> Iterator[T]:
        """`read` for a walk: yields what func(txn) yields, in one read transaction; nothing when unavailable."""
        if self.env is None and not self.reopen():
            return
        try:
            with self._begin() as txn:
                yield from func(txn)
        except lmdb.Error as exc:
            self._read_failed(exc)

    def _read_failed(self, exc: lmdb.Error) -> None:
        """A CLI stops with the one-line error; the proxy (a `report`) reports it once and reads nothing."""
        error = broken(self.path, f"cannot be read ({exc})")
        if self.report is None:
            raise error from None
        if self.failing is None:
            log.error("sidecar: %s", error)
            self.report(error)
        self.failing = error
        if isinstance(exc, BROKEN):
            self._close_broken()

    def _close_broken(self) -> None:
        """A store found broken is closed (after any write in flight), to be opened again once its file changes:
        `sidecar cache clear` sets it aside while the proxy runs."""
        with self._swap:
            self._discard()
        self._last_try = (time.monotonic(), self._file_id())

    def write_now(self, func: Callable[[lmdb.Transaction], T], size: int | None = None) -> T:
        """Run a write transaction in the calling thread: the event loop's (commits without fsync), the
        writer thread (durable commits) or a CLI's. A full map is doubled and the write retried, twice at
        most; a map another process grew is adopted."""
        for attempt in range(3):
            try:
                with self._swap:
                    if self.env is None:
                        raise StoreError(f"the state store at {self.path} is unavailable")
                    if self.writemap and not self.space.covered():
                        raise self._no_room(self.space.lacking)   # a map adopted while the disk was full
                    with self._pwrite_lock(), self.env.begin(write=True) as txn:
                        result = func(txn)
                        evicted = self.budget.enforce(txn, size) if self.budget is not None else None
                if evicted:   # committed: now it can be said
                    self.budget.report(evicted)
                return result
            except lmdb.MapResizedError:
                with self._resize:
                    self._adopt()
            except lmdb.MapFullError:
                if attempt == 2:
                    raise
                with self._resize:
                    self._grow(size)
        raise lmdb.MapResizedError("map kept changing size")

    def _pwrite_lock(self):
        """pwrite() lengthens the file: its commits hold the shared flock, so no writemap store's map change
        (under the exclusive one) cuts them short."""
        return self.space.locked(shared=True) if self.space is not None and not self.writemap else NO_LOCK

    def _adopt(self) -> None:
        """Take on the map another process grew (MapResizedError)."""
        if self.writemap:
            self.space.adopt(self.env)
        else:
            self.env.set_mapsize(0)

    def _grow(self, size: int | None) -> None:
        """A commit found the map full: double it (pwrite), or grow a writemap store's, allocated first."""
        if not self.writemap:
            self.env.set_mapsize(self.env.info()["map_size"] * 2)
        elif not self.space.grow(self.env, size, self.writemap_within):
            raise self._no_room(self.space.lacking)
        log.warning("sidecar: grew the state store's map to %d bytes", self.env.info()["map_size"])

    def _no_room(self, short: int) -> StoreError:
        error = StoreError(f"the state store at {self.path} is full and its disk has no {max(1, short // MB)} MB "
                           f"to grow it by; free disk space there (caching resumes by itself) or lower "
                           f"[state] max_mb")
        error.short = short
        return error

    def submit(self, func: Callable[[lmdb.Transaction], T], size: int | None = None) -> asyncio.Future:
        """Queue one of the proxy's writes; its future gives func's result once committed. Every write
        queued in one turn of the event loop commits in one transaction (group commit): a call's
        checkpoint, its cache entry, other calls' records and touches share one commit, inline when
        commits do not fsync (microseconds, less than a thread hop), on the writer thread when they do.
        The writes fail open: a failing store (full disk, broken file) is reported once through `report`
        and the futures give None; the next commit that succeeds reports the recovery. `size`: at most how
        many bytes func writes, if known (the byte budget then skips its count while far under it)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if self.env is None and not self.reopen():
            done.set_result(None)
            return done
        if not self._queued:
            loop.call_soon(self._commit_queued)
        self._queued.append((func, done, size))
        return done

    async def write(self, func: Callable[[lmdb.Transaction], T], size: int | None = None) -> T | None:
        return await self.submit(func, size)

    def _commit_queued(self) -> None:
        batch, self._queued = self._queued, []
        if not batch:
            return
        if not self.durable:
            self._settle(batch, self._commit(batch))
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="sidecar-lmdb")
        committing = asyncio.get_running_loop().run_in_executor(self._writer, self._commit, batch)
        committing.add_done_callback(lambda f: self._settle(batch, f.result()))

    def _commit(self, batch: list) -> BaseException | list:
        """One transaction for the batch; a store failure is returned for all. A write that raises for
        another reason (a defect) fails alone: the batch is then committed write by write."""
        funcs = [func for func, _, _ in batch]
        sizes = [size for _, _, size in batch]
        riders = [rider for rider in self.riders if rider.pending]
        written = None if None in sizes else sum(sizes) + sum(rider.pending_size() for rider in riders)

        def write_all(txn: lmdb.Transaction) -> list:
            done = [func(txn) for func in funcs]
            for rider in riders:
                rider.ride(txn)
            return done
        try:
            return [(True, value) for value in self.write_now(write_all, written)]
        except STORE_ERRORS as exc:
            return exc
        except Exception:
            pass
        outcomes = []
        for func in funcs:
            try:
                outcomes.append((True, self.write_now(func)))
            except Exception as exc:   # a store failure here fails this write only
                outcomes.append((False, exc))
        return outcomes

    def _settle(self, batch: list, outcome: BaseException | list) -> None:
        if isinstance(outcome, BaseException):
            if self.report is None:
                outcomes = [(False, outcome)] * len(batch)
            else:
                if self.failing is None:
                    log.error("the state store at %s cannot be written: %s; calls go on uncached", self.path, outcome)
                    self.report(outcome)
                self.failing = outcome
                outcomes = [(True, None)] * len(batch)
                if isinstance(outcome, BROKEN):
                    self._close_broken()
        else:
            outcomes = outcome
            if self.failing is not None and self._has_room():   # not a small write squeezed into the last pages
                self.failing = None
                log.warning("the state store at %s is written again", self.path)
                if self.report is not None:
                    self.report(None)
        for (_, done, _), (ok, value) in zip(batch, outcomes):
            if done.cancelled():
                continue
            if ok:
                done.set_result(value)
            else:
                done.set_exception(value)

    def _has_room(self) -> bool:
        """Whether the file system of the store has RESUME_FREE bytes free, or the room the failed write
        needed (a writemap store's commits pass within its map on a full disk): a recovery, not a flap."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return True
        return st.f_bavail * st.f_frsize >= max(RESUME_FREE, getattr(self.failing, "short", 0))

    def close(self) -> None:
        self._closed = True
        if self._queued or any(rider.pending for rider in self.riders):   # the loop's last turn's writes
            batch, self._queued = self._queued, []
            outcome = self._commit(batch)
            if isinstance(outcome, BaseException):
                log.warning("could not commit %d writes at close: %s", len(batch), outcome)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self.env is None:
            return
        try:
            self.env.sync(True)
        except lmdb.Error as exc:   # a full disk: what is committed is in the page cache all the same
            log.warning("could not sync the state store at %s: %s", self.path, exc)
        self._discard()


def budget_of(config) -> int:
    """The bytes the state may take: its budget, or the cache's limit."""
    return int((config.state.max_mb or config.cache.max_size_mb) * 1024 * 1024)


def map_size_of(config) -> int:
    """A map comfortably above the state's budget (or the cache's limit): address space, not disk."""
    return 2 * budget_of(config) + (256 << 20)


def open_lmdb(config, writemap: bool = False) -> Lmdb:
    """The state store of a config; `writemap` for the proxy's own (the CLI's writes are few: pwrite)."""
    return Lmdb(config.state_dir, map_size=map_size_of(config), durable=config.state.durable,
                writemap_within=budget_of(config) if writemap else None)
