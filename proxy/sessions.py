"""Conversation checkpoints, and restoring one into a restarted agent.

Each conversation gets a stable id: the client's own session id where it sends
one (Claude Code: `metadata.user_id`'s session_id), else a hash of the agent
and the conversation's root (system prompt and first user message). On every
completed turn the messages the conversation added since the last checkpoint
and the assistant's answer are appended, in one LMDB transaction that commits
before the answer's last byte is relayed: whatever the agent saw is on disk.

Restoring: when a restored agent opens a conversation that is not a replay of
the checkpointed one (a different first message), the checkpointed messages,
trimmed back to a point the API accepts, are put in front of its messages. An
agent that replays its old conversation passes unchanged, so its repeated
calls are cache hits (fast-forward, no tokens spent).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterator

import lmdb
import orjson

from .call import Call
from .store import Lmdb

CHAT_ROUTES = {"/v1/messages": "anthropic", "/v1/chat/completions": "openai"}


def _digest(value: Any) -> str:
    return hashlib.blake2b(orjson.dumps(value), digest_size=8).hexdigest()


def _common_prefix(hashes: list[str], messages: list[dict]) -> int:
    """How many leading messages are already stored. Agents append, so checking the boundary message
    is enough (each turn hashes only what is new); a rewritten history gets the full comparison."""
    n = min(len(hashes), len(messages))
    if n == 0:
        return 0
    if _digest(messages[n - 1]) == hashes[n - 1] and _digest(messages[0]) == hashes[0]:
        return n
    common = 0
    while common < n and hashes[common] == _digest(messages[common]):
        common += 1
    return common


def client_session(body: dict, headers) -> str | None:
    """The session id a client sends itself, if any (Claude Code does, two ways)."""
    user_id = (body.get("metadata") or {}).get("user_id")
    if isinstance(user_id, str) and user_id.startswith("{"):
        try:
            session = orjson.loads(user_id).get("session_id")
        except (orjson.JSONDecodeError, AttributeError):
            session = None
        if session:
            return str(session)
    return headers.get("x-claude-code-session-id")


def session_id(agent: str, body: dict, headers) -> str:
    own = client_session(body, headers)
    if own:
        return "c" + _digest(["client", own])[:15]
    messages = body.get("messages") or []
    first_user = next((m for m in messages if m.get("role") == "user"), None)
    system = body.get("system")
    head = system[:4096] if isinstance(system, str) else orjson.dumps(system)[:4096].decode("utf-8", "ignore")
    return "r" + _digest([agent, head, first_user])[:15]


def answer_message(api: str, answer: dict | None) -> dict | None:
    """The assistant's turn as it would appear in the next request's messages."""
    if not answer:
        return None
    if api == "anthropic":
        return {"role": "assistant", "content": answer.get("content") or []}
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    turn = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        turn["tool_calls"] = message["tool_calls"]
    return turn


def _tool_uses(message: dict) -> set[str]:
    content = message.get("content")
    ids = {b.get("id") for b in content if isinstance(b, dict) and b.get("type") == "tool_use"} \
        if isinstance(content, list) else set()
    ids |= {c.get("id") for c in message.get("tool_calls") or []}
    return ids


def trim_for_api(messages: list[dict]) -> list[dict]:
    """The longest prefix the API accepts as history: it ends with an assistant turn that asks for no
    tool result (so the agent's own next user message can follow), with no tool call left unanswered."""
    end = len(messages)
    while end > 0:
        last = messages[end - 1]
        if last.get("role") == "assistant" and not _tool_uses(last):
            break
        end -= 1
    prefix = messages[:end]
    while prefix and prefix[0].get("role") not in ("user", "system"):
        prefix = prefix[1:]
    return prefix


class Sessions:
    """Checkpoints in the `sessions` database: a meta row per session and one row per message."""

    def __init__(self, lmdb_env: Lmdb, mirror=None):
        self.lmdb = lmdb_env
        self.mirror = mirror     # RedisCheckpoints for a fleet, or None
        self._db = lmdb_env.db["sessions"]
        self.restore_from: str | None = None    # session to restore into the next new conversation
        self._restored_root: str | None = None  # that conversation, once chosen
        self.restore_messages: list[dict] = []

    # -- checkpoints --
    @staticmethod
    def applies(call: Call) -> bool:
        return call.method == "POST" and call.route.path in CHAT_ROUTES and isinstance(call.json, dict) \
            and isinstance(call.json.get("messages"), list)

    async def checkpoint(self, call: Call, answer: dict | None, headers) -> None:
        """Append what this turn added; committed when this returns."""
        reply = answer_message(call.route.api, answer)
        if reply is None:
            return
        sid = call.session or session_id(call.route.agent, call.json, headers)
        call.session = sid
        messages = list(call.forwarded_messages or call.json["messages"]) + [reply]
        meta = {"id": sid, "agent": call.route.agent, "api": call.route.api, "model": call.model,
                "system": call.json.get("system"), "client_session": client_session(call.json, headers)}
        await self.lmdb.write(lambda txn: self._append(txn, sid, messages, meta))
        if self.mirror is not None:
            await self.mirror.append(sid, messages, meta)

    def _append(self, txn: lmdb.Transaction, sid: str, messages: list[dict], meta: dict) -> None:
        key = f"s:{sid}".encode()
        old = txn.get(key, db=self._db)
        meta = dict(meta)
        system = meta.pop("system")
        stored = orjson.loads(old) if old else {**meta, "created": time.time(), "hashes": []}
        hashes: list[str] = stored["hashes"]
        common = _common_prefix(hashes, messages)
        new_hashes = hashes[:common] + [_digest(m) for m in messages[common:]]
        for index in range(common, len(hashes)):   # history the agent rewrote (e.g. compacted)
            txn.delete(self._message_key(sid, index), db=self._db)
        for index in range(common, len(messages)):
            txn.put(self._message_key(sid, index), orjson.dumps(messages[index]), db=self._db)
        system_digest = _digest(system)
        if stored.get("system_digest") != system_digest:   # its own row, rewritten only when it changes: it can be large
            txn.put(f"y:{sid}".encode(), orjson.dumps(system), db=self._db)
            stored["system_digest"] = system_digest
        stored.update(model=meta["model"] or stored.get("model"), updated=time.time(),
                      hashes=new_hashes, turns=stored.get("turns", 0) + 1, messages=len(messages))
        txn.put(key, orjson.dumps(stored), db=self._db)

    @staticmethod
    def _message_key(sid: str, index: int) -> bytes:
        return f"m:{sid}:".encode() + index.to_bytes(4, "big")

    # -- reading --
    def list(self) -> list[dict]:
        with self.lmdb.env.begin(db=self._db) as txn:
            cursor = txn.cursor()
            rows = []
            if cursor.set_range(b"s:"):
                for key, value in cursor:
                    if not key.startswith(b"s:"):
                        break
                    meta = orjson.loads(value)
                    meta.pop("hashes", None)
                    meta.pop("system_digest", None)
                    rows.append(meta)
        return sorted(rows, key=lambda m: m.get("updated", 0), reverse=True)

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
        with self.lmdb.env.begin(db=self._db) as txn:
            raw = txn.get(f"y:{meta['id']}".encode())
        return {**meta, "system": orjson.loads(raw) if raw else None}

    def messages(self, sid: str) -> list[dict]:
        prefix = f"m:{sid}:".encode()
        with self.lmdb.env.begin(db=self._db) as txn:
            cursor = txn.cursor()
            out = []
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    out.append(orjson.loads(value))
        return out

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

    def iter_ids(self) -> Iterator[str]:
        return (m["id"] for m in self.list())

    # -- restoring --
    def arm(self, ref: str) -> dict | None:
        """Restore `ref` into the next conversation the agent opens."""
        found = self.find(ref)
        if found is None:
            return None
        self.restore_from = found["id"]
        self.restore_messages = trim_for_api(self.messages(found["id"]))
        self._restored_root = None
        return found

    def restore(self, call: Call) -> None:
        """Put the checkpointed history in front of a new conversation's messages."""
        if not self.restore_messages or not self.applies(call):
            return
        messages = call.json["messages"]
        lead = 0   # OpenAI-style system messages stay first
        while lead < len(messages) and messages[lead].get("role") in ("system", "developer"):
            lead += 1
        if lead >= len(messages) or messages[lead].get("role") != "user":
            return
        root = _digest(messages[lead])
        old = [m for m in self.restore_messages if m.get("role") not in ("system", "developer")] \
            if lead else self.restore_messages
        if self._restored_root is None:
            if old and root == _digest(old[0]):
                return   # the agent replays its old conversation: leave it to the cache
            self._restored_root = root
        elif root != self._restored_root:
            return
        call.forwarded_messages = messages[:lead] + old + messages[lead:]
        call.json = {**call.json, "messages": call.forwarded_messages}
        call.body = orjson.dumps(call.json)
        call.restored = True
