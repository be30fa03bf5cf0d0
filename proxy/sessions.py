"""Conversation checkpoints in the `sessions` database, and the restore armed for a restarted agent.

On every completed turn the conversation's messages and the assistant's answer
are merged into its checkpoint, in one LMDB transaction that commits before the
answer's last byte is relayed: whatever the agent saw is on disk. Rows:
`s:{id}` the meta, `y:{id}` the system prompt (its own row, rewritten only when
it changes: it can be large), `m:{id}:{index}` one per message, and
`u:{updated}{id}` -> agent, the index that finds the least recently updated
conversation for the state's byte budget (state_budget.py), and `q:{id}:{response id}`
for each `p:` row below, so that they go with their conversation.

The merge is exact: each message's bytes (orjson's, as the request's parse
gave them, body_json.py; else serialised once) are compared with its stored row
(read in one cursor walk; several times cheaper than hashing them), and only
rows that differ are written; a message the agent rewrote in the middle
(compacted, edited) replaces the stored one. The leading messages a request
repeats byte for byte from the previous request this process checkpointed for
the conversation (body_json.py's lineage) are not compared again, as long as
the conversation is as this process left it (its `updated` stamp unchanged:
no other sidecar on the state wrote it since): a turn costs what it adds. The `u:` index also gives the
latest conversations (the live page's) without reading every one. A request that repeats an
earlier turn unchanged (a replay through the cache) leaves the later turns.

A Responses API turn that names a `previous_response_id` sends only its new
items: row `p:{response id}` says which conversation that response ended and
how many items it had, so the turn's items are merged from there on.
"""

from __future__ import annotations

import re
import struct
import time
from typing import Callable

import lmdb
import orjson

from .call import Call
from . import gemini_api, responses_api
from .conversation import (ASSISTANT_ROLES, CHAT_ROUTES, RESPONSES, SYSTEM_ROLES, answer_turns, client_session, derived,
                           digest, session_id, tools_digest, turns_field, turns_of, unmarked)
from .restore import Restore
from .store import Lmdb

# Meta fields for the store's own use, not shown; `hashes` were per-message digests earlier versions kept.
PRIVATE = ("hashes", "system_digest", "tools_digest", "tools_hash")
STAMP = struct.Struct(">d")


MARKER = b'"cache_control":'
MARKER_VALUE = re.compile(rb'\{[^{}]*\}|null|true|false|"[^"\\]*"')


def without_markers(row) -> bytes:
    """orjson's bytes of a message less its prompt-cache markers: the bytes of `unmarked` of it, without
    parsing it (a quote inside a JSON string is escaped, so the marker's key cannot be text)."""
    data = bytes(row)
    parts, at = [], 0
    while (found := data.find(MARKER, at)) >= 0:
        value = MARKER_VALUE.match(data, found + len(MARKER))
        if value is None:
            parts.append(data[at:found + len(MARKER)])
            at = found + len(MARKER)
            continue
        begin, end = found, value.end()
        if data[begin - 1:begin] == b",":   # a later member: its comma before it goes too
            begin -= 1
        elif data[end:end + 1] == b",":     # the first member: the comma after it
            end += 1
        parts.append(data[at:begin])
        at = end
    parts.append(data[at:])
    return b"".join(parts)


def index_key(updated: float, sid: str | bytes) -> bytes:
    return b"u:" + STAMP.pack(updated) + (sid.encode() if isinstance(sid, str) else sid)


class Sessions:
    """Checkpoints in the `sessions` database: a meta row per session and one row per message."""

    def __init__(self, lmdb_env: Lmdb, mirror=None):
        self.lmdb = lmdb_env
        self.mirror = mirror     # RedisCheckpoints for a fleet, or None
        self.armed: Restore | None = None    # for the next conversation that continues a checkpoint
        # The last turn checkpointed per conversation: its request hash (a hit repeating it is already kept),
        # the serial of the request body (body_json.py) whose messages the stored rows begin with (0: none
        # known) and the checkpoint's `updated` stamp then.
        self._last_turn: dict[str, tuple[bytes, int, float | None]] = {}
        self.rows_compared = 0   # stored rows compared with a request's, in all ...
        self.rows_known = 0      # ... and those known equal, not compared

    @property
    def _db(self):
        return self.lmdb.db["sessions"]   # looked up per use: a store that could not be opened reopens

    # -- checkpoints --
    @staticmethod
    def applies(call: Call) -> bool:
        return call.method == "POST" and (call.route.path in CHAT_ROUTES or gemini_api.is_generate(call.route.path)) and isinstance(call.json, dict) \
            and turns_of(call.route.path, call.json)[1] is not None

    def has_turn(self, call: Call) -> bool:
        """Whether this very request was the conversation's last checkpointed turn (so its answer is kept)."""
        call.session = self._placed(call, call.headers)[0]
        last = self._last_turn.get(call.session)
        return bool(call.request_hash) and last is not None and last[0] == call.request_hash

    def _placed(self, call: Call, headers) -> tuple[str, int]:
        """`_place`, worked out once per call (a hit asks `has_turn` and may then be checkpointed)."""
        if call.place is None:
            call.place = self._place(call, headers)
        return call.place

    def _place(self, call: Call, headers) -> tuple[str, int]:
        """The conversation this call continues, and the index its first message has in it."""
        previous = call.json.get("previous_response_id") if call.route.path == responses_api.PATH else None
        if isinstance(previous, str):
            found = self.lmdb.read(lambda txn: txn.get(b"p:" + previous.encode(), db=self._db))
            if found:
                sid, start = orjson.loads(found)
                return sid, start
            return "r" + digest([call.route.agent, "previous", previous])[:15], 0   # a chain begun elsewhere
        return session_id(call.route.agent, call.json, headers, call.route.path), 0

    async def checkpoint(self, call: Call, answer: dict | None, headers) -> None:
        """Merge this turn into the conversation's checkpoint; committed when this returns."""
        path = call.route.path
        replies = answer_turns(path, call.route.api, answer)
        if not replies:
            return
        sid, start = self._placed(call, headers)
        call.session = sid
        system, turns = turns_of(path, call.json)
        messages = [*(call.forwarded_messages or turns), *replies]
        known = call.turn_rows if call.forwarded_messages is None and turns is call.json.get(turns_field(path)) \
            else None   # the request's own turns, as parsed: their bytes came with the parse
        known = (known or [])[:len(messages)]
        rows = [*known, *(orjson.dumps(m) for m in messages[len(known):])]
        meta = {"id": sid, "agent": call.route.agent, "api": call.route.api, "model": call.model,
                "client_session": client_session(call.json, headers), "tools_digest": tools_digest(call.json),
                "tools_hash": derived(call.json.get("tools"), "digest", digest),
                # the conversation's turns are its answers, however many calls (a restore, a retry) made them
                "turns": sum(1 for m in messages if isinstance(m, dict) and m.get("role") in ASSISTANT_ROLES)}
        if path == responses_api.PATH:
            meta["format"] = RESPONSES
        # A Responses answer's id: the next turn may name it as its previous_response_id.
        ends = answer.get("id") if meta.get("format") and isinstance(answer.get("id"), str) else None
        change: dict = {}
        lineage = call.turns_lineage if known else None   # (this body, the body its first turns repeat, how many)
        last = self._last_turn.get(sid)
        same = (lineage[2], last[2]) if lineage and last and last[1] and lineage[1] == last[1] and not start else None
        system_bytes = derived(system, "bytes", orjson.dumps)   # the very system object of the turn before: once
        size = sum(map(len, rows)) + 256 * len(rows) + len(system_bytes) + 4096   # rows, keys, meta
        updated = await self.lmdb.write(lambda txn: self._merge(txn, sid, rows, meta, system, start, ends, change,
                                                                same), size)
        if change:   # what changed since the previous turn, in the order a prompt cache reads a request
            call.prefix_change = [name for name in ("tools", "system") if change[name]] + [
                "system" if isinstance(messages[i - start], dict) and messages[i - start].get("role") in SYSTEM_ROLES
                else f"messages[{i}]" for i in change["messages"]]
        if len(self._last_turn) >= 10_000:   # bounded: forgetting only costs a redundant merge (or compare)
            self._last_turn.clear()
        self._last_turn[sid] = (call.request_hash, lineage[0] if lineage and updated else 0, updated)
        if self.mirror is not None:
            await self.mirror.append(sid, messages if not start else self.messages(sid), {**meta, "system": system})

    def _merge(self, txn: lmdb.Transaction, sid: str, rows: list[bytes], meta: dict, system, start: int = 0,
               ends: str | None = None, change: dict | None = None,
               same: tuple[int, float] | None = None) -> float | None:
        """Rows are the messages from index `start` on; `ends`: the id of the answer they end with. Into
        `change`: what differs from the previous turn (tools, system, messages beyond their cache markers).
        `same`: (n, stamp): the first n rows equal the stored ones if the checkpoint's `updated` is still
        stamp. Returns the checkpoint's `updated` stamp."""
        key = f"s:{sid}".encode()
        old = txn.get(key, db=self._db)
        stored = orjson.loads(old) if old else {**meta, "created": time.time()}
        count = stored.get("messages", 0)
        start = min(start, count)   # a chain from an answer a later branch cut off: rows stay dense
        total = start + len(rows)
        if ends is not None:
            txn.put(b"p:" + ends.encode(), orjson.dumps([sid, total]), db=self._db)
            txn.put(b"q:" + sid.encode() + b":" + ends.encode(), b"", db=self._db)   # p: rows go with it
        changed: list[int] = []   # differing beyond their prompt-cache markers
        known = min(same[0], count) if same and old and stored.get("updated") == same[1] else 0
        self.rows_known += max(0, known - start)
        differ = self._differing(txn, sid, rows, changed, start, known)
        if count > total and (not differ or differ[0] == total - 1):
            return stored.get("updated")   # an earlier turn sent again, unchanged up to its answer: the later stay
        if count == total and not differ:
            return stored.get("updated")   # the same turn again (a hit, a coalesced call): nothing new to keep
        for index in [*differ, *range(max(count, start), total)]:
            txn.put(self._message_key(sid, index), rows[index - start], db=self._db)
        for index in range(total, count):
            txn.delete(self._message_key(sid, index), db=self._db)
        system_digest = derived(system, "digest", digest)
        if old and change is not None:
            before = txn.get(f"y:{sid}".encode(), db=self._db) if stored.get("system_digest") != system_digest else None
            change.update(tools=stored.get("tools_hash", meta.get("tools_hash")) != meta.get("tools_hash"),
                          system=before is not None and unmarked(orjson.loads(before)) != unmarked(system),
                          messages=changed[:3])
        if stored.get("system_digest") != system_digest:
            txn.put(f"y:{sid}".encode(), orjson.dumps(system), db=self._db)
            stored["system_digest"] = system_digest
        stored.pop("hashes", None)
        if stored.get("updated") is not None:
            txn.delete(index_key(stored["updated"], sid), db=self._db)
        stored.update(model=meta["model"] or stored.get("model"), tools_digest=meta["tools_digest"],
                      tools_hash=meta.get("tools_hash"), updated=time.time(), messages=total,
                      turns=meta["turns"] + (stored.get("turns", 0) if start else 0) if "turns" in meta
                      else stored.get("turns", 0) + 1)
        txn.put(key, orjson.dumps(stored), db=self._db)
        txn.put(index_key(stored["updated"], sid), str(stored.get("agent", "")).encode(), db=self._db)
        return stored["updated"]

    def _differing(self, txn: lmdb.Transaction, sid: str, rows: list[bytes], changed: list[int],
                   start: int = 0, known: int = 0) -> list[int]:
        """The indices from `start` whose stored row differs from rows[index - start], in order (rows are
        stored densely from 0), leaving out the first `known`, known to be equal; into `changed` those that
        differ by more than where the prompt-cache markers are."""
        prefix = f"m:{sid}:".encode()
        cursor = txn.cursor(db=self._db)
        differ = []
        first = max(start, known)
        if cursor.set_range(self._message_key(sid, first)):
            for index, (key, value) in enumerate(cursor, first):
                if index >= start + len(rows) or not key.startswith(prefix):
                    break
                row = rows[index - start]   # bytes, or a view of the request's body (body_json.py)
                self.rows_compared += 1
                if len(value) != len(row) or not value.startswith(row):   # one memcmp either way
                    differ.append(index)
                    if without_markers(value) != without_markers(row):
                        changed.append(index)
        return differ

    @staticmethod
    def _message_key(sid: str, index: int) -> bytes:
        return f"m:{sid}:".encode() + index.to_bytes(4, "big")

    def snapshot(self) -> dict:
        return {"rows_compared": self.rows_compared, "rows_known": self.rows_known}

    # -- reading --
    def list(self) -> list[dict]:
        return sorted(self.lmdb.read(self._list, []), key=lambda m: m.get("updated", 0), reverse=True)

    def latest(self, count: int) -> list[dict]:
        """The `count` most recently updated, newest first: `list()[:count]`, read from the `u:` index's end
        (the live page asks at every push: this does not grow with the number of conversations)."""
        return self.lmdb.read(lambda txn: self._latest(txn, count), [])

    def _latest(self, txn: lmdb.Transaction, count: int) -> list[dict]:
        cursor = txn.cursor(db=self._db)
        rows: list[dict] = []
        placed = cursor.prev() if cursor.set_range(b"u;") else cursor.last()   # the last u: row, or before
        if not placed:
            return rows
        for key in cursor.iterprev(keys=True, values=False):
            if not key.startswith(b"u:") or len(rows) >= count:
                break
            value = txn.get(b"s:" + key[2 + STAMP.size:], db=self._db)
            if value is not None:
                meta = orjson.loads(value)
                for field in PRIVATE:
                    meta.pop(field, None)
                rows.append(meta)
        return rows

    def _list(self, txn: lmdb.Transaction) -> list[dict]:
        cursor = txn.cursor(db=self._db)
        rows = []
        if cursor.set_range(b"s:"):
            for key, value in cursor:
                if not key.startswith(b"s:"):
                    break
                meta = orjson.loads(value)
                for field in PRIVATE:
                    meta.pop(field, None)
                rows.append(meta)
        return rows

    def find(self, ref: str) -> dict | None:
        """A session by id, unique id prefix, 'last' (the most recently updated) or 'agent:ID'."""
        rows = self.list()
        if ref.startswith("agent:"):   # the latest conversation of one agent (a supervised restart)
            rows = [m for m in rows if m.get("agent") == ref[6:]]
            ref = "last"
        if ref == "last":
            return self._with_system(rows[0]) if rows else None
        matches = [m for m in rows if m["id"] == ref] or [m for m in rows if m["id"].startswith(ref)]
        return self._with_system(matches[0]) if len(matches) == 1 else None

    def _with_system(self, meta: dict) -> dict:
        raw = self.lmdb.read(lambda txn: txn.get(f"y:{meta['id']}".encode(), db=self._db))
        return {**meta, "system": orjson.loads(raw) if raw else None}

    def messages(self, sid: str) -> list[dict]:
        prefix = f"m:{sid}:".encode()

        def walk(txn: lmdb.Transaction) -> list[dict]:
            cursor = txn.cursor(db=self._db)
            out = []
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    out.append(orjson.loads(value))
            return out
        return self.lmdb.read(walk, [])

    def delete_now(self, sid: str) -> None:
        self.lmdb.write_now(lambda txn: self._remove(txn, sid))

    def _remove(self, txn: lmdb.Transaction, sid: str | bytes) -> int:
        """Delete a conversation's rows; returns the bytes they held."""
        sid = sid.encode() if isinstance(sid, str) else sid
        freed = 0
        meta = txn.get(b"s:" + sid, db=self._db)
        if meta is not None:
            try:
                updated = orjson.loads(meta).get("updated")
            except (orjson.JSONDecodeError, AttributeError):
                updated = None
            if updated is not None:
                txn.delete(index_key(updated, sid), db=self._db)
        for key in (b"s:" + sid, b"y:" + sid):
            value = txn.get(key, db=self._db)
            if value is not None:
                freed += len(key) + len(value)
                txn.delete(key, db=self._db)
        for prefix in (b"m:" + sid + b":", b"q:" + sid + b":"):
            cursor = txn.cursor(db=self._db)
            if cursor.set_range(prefix):
                while cursor.key().startswith(prefix):
                    freed += len(cursor.key()) + len(cursor.value())
                    if prefix[0] == ord("q"):   # the answer ids of this conversation: their p: rows too
                        txn.delete(b"p:" + cursor.key()[len(prefix):], db=self._db)
                    if not cursor.delete():
                        break
        return freed

    def least_recent(self, txn: lmdb.Transaction, keep: Callable[[str, float], bool] | None = None
                     ) -> bytes | None:
        """The `u:` row of the least recently updated conversation; with `keep` (agent, last turn -> whether
        to keep it), of the least recently updated one not kept."""
        cursor = txn.cursor(db=self._db)
        if not cursor.set_range(b"u:"):
            return None
        for key, agent in cursor:
            if not key.startswith(b"u:"):
                return None
            if keep is None or not keep(agent.decode(errors="replace"), STAMP.unpack(key[2:10])[0]):
                return key
        return None

    @staticmethod
    def row_info(row: bytes) -> tuple[float, str]:
        """(last turn, id) of a `u:` row."""
        return STAMP.unpack(row[2:10])[0], row[10:].decode(errors="replace")

    def evict_one(self, txn: lmdb.Transaction, row: bytes) -> int:
        """Remove the conversation of a `u:` row for the state's budget (the row itself even if the rest is
        gone: progress is sure); returns the bytes freed."""
        txn.delete(row, db=self._db)
        return self._remove(txn, row[10:]) + len(row)

    # -- restoring --
    def arm(self, ref: str) -> dict | None:
        """Restore `ref` into the next conversation that continues it."""
        found = self.find(ref)
        if found is None:
            return None
        agent = ref[6:] if ref.startswith("agent:") else None   # --restore runs the agent under a new id
        self.armed = Restore(found, self.messages(found["id"]), agent)
        return found

    def restore(self, call: Call) -> None:
        """Put the checkpointed history in front of the messages of the conversation that continues it."""
        if self.armed is not None and self.applies(call):
            self.armed.apply(call)
