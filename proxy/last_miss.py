"""The last cache miss, for `sidecar cache why`: its key, agent, time and canonical request.

Every miss is noted, so the note must cost next to nothing. A request up to
IN_STORE bytes goes into the store's `meta` database in the next commit the
store makes anyway (the call's own checkpoint, cache entry or record: no
commit of its own, no thread, no file, no task). A
larger one (or any, while the store cannot be opened) goes to LAST_MISS in the
state directory, written off the loop (and
skipped while the previous one is still being written), as a request that size
costs a thread hop anyway. The reader takes the newer of the two. Neither ever
holds a credential: the canonical request is the body the key was made of.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable

import lmdb
import orjson

from .run_file import write_private

log = logging.getLogger("sidecar")
LAST_MISS = "last-miss.json"   # in the state directory: a JSON line, then the canonical request
KEY = b"last_miss"             # in the store's meta database: the same two parts
IN_STORE = 16 << 10   # bytes of canonical request up to which the note joins a commit (larger values
                       # rewritten on every miss scatter the free pages, and the file outgrows its byte budget)


class LastMiss:
    def __init__(self, store, path: Path):
        self.store = store   # the state's Lmdb
        self.path = path
        self.pending: bytes | None = None   # the note the store's next commit carries
        self._writing: asyncio.Future | None = None
        store.riders.append(self)

    def note(self, head: dict[str, Any], canonical: list, spawn: Callable) -> None:
        """`canonical`: the canonical request's parts (written one after the other, never joined)."""
        if sum(map(len, canonical)) <= IN_STORE and self.store.env is not None:   # (no store: the file)
            self.pending = b"".join((orjson.dumps(head), b"\n", *canonical))
        elif self._writing is None or self._writing.done():
            self._writing = spawn(asyncio.to_thread(_write, self.path, orjson.dumps(head) + b"\n", *canonical))

    def pending_size(self) -> int:
        return len(self.pending or b"") + 64

    def ride(self, txn: lmdb.Transaction) -> None:
        """In the transaction of the store's next commit: the note, if one is pending."""
        note, self.pending = self.pending, None
        if note is not None:
            txn.put(KEY, note, db=self.store.db["meta"])


def _write(path: Path, head: bytes, *canonical: bytes) -> None:
    """A full or read-only disk only costs `sidecar cache why` its latest miss."""
    try:
        write_private(path, head, *canonical)
    except OSError as exc:
        log.debug("could not note the last miss in %s: %s", path, exc)


def read(store, state_dir: Path) -> tuple[dict, bytes] | None:
    """(the note's head, the canonical request) of the newer note, or None if no miss was noted.
    Raises ValueError for a note that cannot be read."""
    found = []
    try:
        raw = store.read(lambda txn: txn.get(KEY, db=store.db["meta"])) if store is not None else None
    except lmdb.Error:
        raw = None
    try:
        from_file = (state_dir / LAST_MISS).read_bytes()
    except FileNotFoundError:
        from_file = None
    for data in (raw, from_file):
        if data:
            head, _, canonical = bytes(data).partition(b"\n")
            try:
                found.append((orjson.loads(head), canonical))
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"the last miss's note is unreadable ({exc}); it is rewritten at the next miss")
    return max(found, key=lambda note: note[0].get("ts", 0)) if found else None
