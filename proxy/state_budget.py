"""The state's byte budget (`[state] max_mb`): everything in the store counted, the oldest evicted first.

Counted are the pages the store's databases use in data.mdb: cache entries and their indexes,
conversation checkpoints, call records. `enforce` ends every write transaction of the proxy, inside it
(so even a kill -9 leaves the state within budget). While the pages in use exceed TARGET of the budget
it drops, in order (the rest of the budget is room for LMDB to find runs of free pages for large values:
its file never shrinks, and grows when freed pages are too scattered; should the file still pass the
budget, the target is lowered by as much, so the data fits in the file as it is and it stops growing):
1. cache entries past `[cache] ttl_seconds`, created longest ago first;
2. while checkpoints take more than RUNNING_SHARE of the budget: conversations, least recently updated
   first, those not running before those running (so running ones never starve the cache);
3. the least recently used of: a cache entry (by its last hit), a call record (by its time), a
   conversation that is not running (by its last turn);
4. only then conversations still running, least recently updated first.
A running conversation evicted (in 2 or 4) is named in a `checkpoint_evicted` event: its agent goes on
untouched, and its next turn checkpoints the whole conversation again (every request carries it), so
only a restore before that turn would miss it.
A conversation is running while its agent runs: an agent attached to this sidecar until it exits; an
agent this sidecar does not know (another sidecar's on the same state directory, a client that never
registered) for RUNNING_SECONDS after the conversation's last turn.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import lmdb

from .migrations import STAMP
from .reserve import extent

log = logging.getLogger("sidecar")
TARGET = 0.8              # share of the budget the pages in use are kept under (measured: the file then stays within)
RUNNING_SECONDS = 300.0   # a conversation of an agent not attached here runs this long after its last turn
RUNNING_SHARE = 0.5       # share of the budget checkpoints may hold before running ones go too (the cache works on)


class StateBudget:
    def __init__(self, lmdb_env, max_bytes: int, cache=None, records=None, sessions=None,
                 agents: Callable[[], dict[str, bool]] = dict, on_evicted: Callable[[list[dict]], None] | None = None):
        self.lmdb = lmdb_env
        self.max_bytes = max_bytes
        self.cache, self.records, self.sessions = cache, records, sessions
        self.agents = agents            # the agents attached to this sidecar: id -> whether it runs
        self.on_evicted = on_evicted    # told (after the commit, maybe from the writer thread) of running ones
        self.evictions = 0
        self._psize: int | None = None   # the store's page size, read once

    def used(self, txn: lmdb.Transaction) -> int:
        """Bytes of the pages the databases use (their B-trees and large values), as of this transaction."""
        total = 0
        for db in self.lmdb.db.values():
            stat = txn.stat(db)
            total += (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]) * stat["psize"]
        return total

    def enforce(self, txn: lmdb.Transaction, written: int | None = None) -> list[dict]:
        """Evict until the state is within its target; returns the running conversations it had to drop.
        `written`: at most how many bytes this transaction wrote, if known. The pages in use are never more
        than the file as last committed plus what this transaction added, so while that stays under the
        target, counting them (a stat of every database, on every commit) is skipped."""
        if self._psize is None:
            self._psize = txn.stat(self.lmdb.db["meta"])["psize"]
        psize = self._psize
        file_size = extent(self.lmdb.env, psize)
        if written is not None and file_size + 2 * written + 16 * psize <= self.max_bytes * TARGET:
            return []   # (2x and 16 pages: the B-tree pages a write may split or copy, beside its bytes)
        # a file past the budget: less data, so what comes fits in the file (never below half the budget: a
        # file grown under a larger budget keeps its size, LMDB never shrinks it)
        target = int(max(self.max_bytes * TARGET - max(0, file_size - self.max_bytes), self.max_bytes / 2))
        used = self.used(txn)
        if used <= target:
            return []
        agents, recent = self.agents(), time.time() - RUNNING_SECONDS

        def running(agent: str, updated: float) -> bool:
            return agents.get(agent, updated >= recent)
        dropped: list[dict] = []
        while used > target:
            freed = 0
            while freed < used - target:   # bytes of values as an estimate; the pages are counted again below
                step = self._evict_next(txn, running, dropped)
                if step is None:
                    break
                freed += step
                self.evictions += 1
            if not freed:
                break   # nothing left to evict
            used = self.used(txn)
        return dropped

    def _evict_next(self, txn: lmdb.Transaction, running: Callable[[str, float], bool], dropped: list[dict]
                    ) -> int | None:
        cache = self.cache
        if cache is not None:
            row = cache.oldest_expired(txn)
            if row is not None:
                return cache.evict_one(txn, row, expired=True)
        if self.sessions is not None and self._share(txn) > RUNNING_SHARE:   # checkpoints past their share
            row = self.sessions.least_recent(txn, keep=running)
            if row is not None:
                return self.sessions.evict_one(txn, row)
            return self._drop_running(txn, dropped)
        candidates = []
        if cache is not None and (row := cache.least_recent(txn)) is not None:
            candidates.append((STAMP.unpack(row[:8])[0], 0, row))
        if self.records is not None and (key := self.records.least_recent(txn)) is not None:
            candidates.append((STAMP.unpack(key[:8])[0], 1, key))
        if self.sessions is not None:
            row = self.sessions.least_recent(txn, keep=running)
            if row is not None:
                candidates.append((self.sessions.row_info(row)[0], 2, row))
        if candidates:
            _, kind, row = min(candidates)
            if kind == 0:
                return cache.evict_one(txn, row, expired=False)
            return (self.records if kind == 1 else self.sessions).evict_one(txn, row)
        return self._drop_running(txn, dropped) if self.sessions is not None else None

    def _share(self, txn: lmdb.Transaction) -> float:
        """The share of the budget the checkpoints' pages take."""
        stat = txn.stat(self.lmdb.db["sessions"])
        return (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]) * stat["psize"] / self.max_bytes

    def _drop_running(self, txn: lmdb.Transaction, dropped: list[dict]) -> int | None:
        """Evict the least recently updated conversation though it runs; it is named in `dropped`."""
        row = self.sessions.least_recent(txn)
        if row is None:
            return None
        updated, sid = self.sessions.row_info(row)
        agent = txn.get(row, db=self.lmdb.db["sessions"]) or b""
        freed = self.sessions.evict_one(txn, row)
        dropped.append({"session": sid, "agent": agent.decode(errors="replace"), "updated": round(updated, 3),
                        "bytes": freed})
        return freed

    def report(self, dropped: list[dict]) -> None:
        """After the commit: running conversations had to go (the budget is smaller than what runs)."""
        log.warning("sidecar: the state budget ([state] max_mb = %g) evicted %d running conversation(s) (%s); "
                    "their next turn checkpoints them again; raise max_mb to keep them", self.max_bytes / 2**20,
                    len(dropped), ", ".join(d["session"] for d in dropped[:5]))
        if self.on_evicted is not None:
            self.on_evicted(dropped)
