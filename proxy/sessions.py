"""Conversation checkpoints in the `sessions` database, and the restore armed for a restarted agent.

On every completed turn the conversation's messages and the assistant's answer
are merged into its checkpoint, in one LMDB transaction that commits before the
answer's last byte is relayed: whatever the agent saw is on disk. Rows:
`s:{id}` the meta, `y:{id}` the system prompt (its own row, rewritten only when
it changes: it can be large), `m:{id}:{index}` one per message.

The merge is exact: each message is serialised once, its bytes compared with
its stored row (read in one cursor walk; several times cheaper than hashing
them), and only rows that differ are written; a message the agent rewrote in the
middle (compacted, edited) replaces the stored one. A request that repeats an
earlier turn unchanged (a replay through the cache) leaves the later turns.
"""

from __future__ import annotations

import time

import lmdb
import orjson

from .call import Call
from .conversation import CHAT_ROUTES, answer_message, client_session, digest, session_id, tools_digest
from .restore import Restore
from .store import Lmdb

# Meta fields for the store's own use, not shown; `hashes` were per-message digests earlier versions kept.
PRIVATE = ("hashes", "system_digest", "tools_digest")


class Sessions:
    """Checkpoints in the `sessions` database: a meta row per session and one row per message."""

    def __init__(self, lmdb_env: Lmdb, mirror=None):
        self.lmdb = lmdb_env
        self.mirror = mirror     # RedisCheckpoints for a fleet, or None
        self._db = lmdb_env.db["sessions"]
        self.armed: Restore | None = None    # for the next conversation that continues a checkpoint
        # The last turn checkpointed per conversation (its request hash): a hit repeating it is already kept.
        self._last_turn: dict[str, bytes] = {}

    # -- checkpoints --
    @staticmethod
    def applies(call: Call) -> bool:
        return call.method == "POST" and call.route.path in CHAT_ROUTES and isinstance(call.json, dict) \
            and isinstance(call.json.get("messages"), list)

    def has_turn(self, call: Call) -> bool:
        """Whether this very request was the conversation's last checkpointed turn (so its answer is kept)."""
        call.session = call.session or session_id(call.route.agent, call.json, call.headers)
        return bool(call.request_hash) and self._last_turn.get(call.session) == call.request_hash

    async def checkpoint(self, call: Call, answer: dict | None, headers) -> None:
        """Merge this turn into the conversation's checkpoint; committed when this returns."""
        reply = answer_message(call.route.api, answer)
        if reply is None:
            return
        sid = call.session or session_id(call.route.agent, call.json, headers)
        call.session = sid
        messages = [*(call.forwarded_messages or call.json["messages"]), reply]
        rows = [orjson.dumps(m) for m in messages]
        system = call.json.get("system")
        meta = {"id": sid, "agent": call.route.agent, "api": call.route.api, "model": call.model,
                "client_session": client_session(call.json, headers), "tools_digest": tools_digest(call.json),
                # the conversation's turns are its answers, however many calls (a restore, a retry) made them
                "turns": sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")}
        await self.lmdb.write(lambda txn: self._merge(txn, sid, rows, meta, system))
        if len(self._last_turn) >= 10_000:   # bounded: forgetting only costs a redundant merge
            self._last_turn.clear()
        self._last_turn[sid] = call.request_hash
        if self.mirror is not None:
            await self.mirror.append(sid, messages, {**meta, "system": system})

    def _merge(self, txn: lmdb.Transaction, sid: str, rows: list[bytes], meta: dict, system) -> None:
        key = f"s:{sid}".encode()
        old = txn.get(key, db=self._db)
        stored = orjson.loads(old) if old else {**meta, "created": time.time()}
        count = stored.get("messages", 0)
        differ = self._differing(txn, sid, rows)
        if count > len(rows) and (not differ or differ[0] == len(rows) - 1):
            return   # an earlier turn sent again, unchanged up to its answer: the later turns stay
        if count == len(rows) and not differ:
            return   # the same turn again (a cache hit, a coalesced call): nothing new to keep
        for index in [*differ, *range(count, len(rows))]:
            txn.put(self._message_key(sid, index), rows[index], db=self._db)
        for index in range(len(rows), count):
            txn.delete(self._message_key(sid, index), db=self._db)
        system_digest = digest(system)
        if stored.get("system_digest") != system_digest:
            txn.put(f"y:{sid}".encode(), orjson.dumps(system), db=self._db)
            stored["system_digest"] = system_digest
        stored.pop("hashes", None)
        stored.update(model=meta["model"] or stored.get("model"), tools_digest=meta["tools_digest"],
                      updated=time.time(), turns=meta["turns"], messages=len(rows))
        txn.put(key, orjson.dumps(stored), db=self._db)

    def _differing(self, txn: lmdb.Transaction, sid: str, rows: list[bytes]) -> list[int]:
        """The indices below len(rows) whose stored row differs, in order (rows are stored densely from 0)."""
        prefix = f"m:{sid}:".encode()
        cursor = txn.cursor(db=self._db)
        differ = []
        if cursor.set_range(prefix):
            for index, (key, value) in enumerate(cursor):
                if index >= len(rows) or not key.startswith(prefix):
                    break
                if value != rows[index]:
                    differ.append(index)
        return differ

    @staticmethod
    def _message_key(sid: str, index: int) -> bytes:
        return f"m:{sid}:".encode() + index.to_bytes(4, "big")

    # -- reading --
    def list(self) -> list[dict]:
        return sorted(self.lmdb.read(self._list, []), key=lambda m: m.get("updated", 0), reverse=True)

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
        prefix = f"m:{sid}:".encode()

        def remove(txn: lmdb.Transaction) -> None:
            txn.delete(f"s:{sid}".encode(), db=self._db)
            txn.delete(f"y:{sid}".encode(), db=self._db)
            cursor = txn.cursor(db=self._db)
            if cursor.set_range(prefix):
                while cursor.key().startswith(prefix):
                    if not cursor.delete():
                        break
        self.lmdb.write_now(remove)

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
