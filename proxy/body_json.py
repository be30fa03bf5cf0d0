"""Request bodies parsed in proportion to what changed, not to the conversation's length.

An agent's next request repeats its conversation so far, byte for byte, and
adds a turn: parsing every request whole costs milliseconds per megabyte, on
the event loop, every turn (orjson holds the GIL: a thread would not help).
So for a large body `BodyParser` looks for the conversation's messages array
(`"messages":[`, `"input":[` or `"contents":[`), compares its leading bytes
with the messages of a recent request (one memcmp, no parse), and parses
only the rest: the fields around the array and the new messages. The
messages it recognised are the previous parse's objects, shared (nothing in
the proxy changes a parsed body in place).

The result is exactly `orjson.loads(body)`, or the body is parsed whole:
- the messages reused are complete JSON values whose bytes in this body are
  those of the earlier one, each followed by `,` or `]`;
- the array's key is the top level's: the bytes before it, closed with `}`,
  parse as an object, and no other `"key"` follows the reused messages
  (orjson keeps the last of duplicate keys);
- anything else (no array, a client that does not write compact JSON as
  orjson does, a parse error) falls back to a whole parse.
A message's bytes as orjson writes them (`rows`) come with the parse: the
checkpoint stores them without serialising the conversation again. Each body
remembered has a serial number, and a parse says which remembered body its
leading messages repeat (`lineage`): the checkpoint then knows those rows
equal the ones it stored from that body, without comparing them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import orjson

MIN_BYTES = 64 << 10        # smaller bodies are parsed whole: it costs less than comparing
MAX_KEPT = 16               # recent conversations remembered ...
MAX_KEPT_BYTES = 64 << 20   # ... and their bodies' bytes at most (the oldest go first)
COMMA, CLOSE = ord(","), ord("]")


@dataclass(slots=True)
class Seen:
    """A recent body and the messages at the start of its array whose bytes are orjson's for them."""
    body: bytes
    serial: int           # this body's number, in the order bodies were remembered
    start: int            # offset of the array's first element
    head: dict | None     # the members before the array's key, parsed (a body parsed whole: None)
    ends: list[int]       # ends[i]: offset (from start) just past message i, where a `,` or `]` is
    messages: list        # their parsed objects

    def matched(self, body: bytes, start: int) -> int:
        """How many of these messages `body` repeats from `start` on (each whole, followed by `,` or `]`)."""
        n = len(self.ends)
        guess = max(1, n - 1)   # a client moves its cache marker off the last message: all but it, usually
        if self._repeats(body, start, guess):   # one memcmp of the whole run
            count = guess
            while count < n and self._extends(body, start, count):
                count += 1
            return count
        low, high = 0, guess - 1   # the first `low` repeat, none past `high`: halve
        while low < high:
            mid = (low + high + 1) // 2
            if self._repeats(body, start, mid):
                low = mid
            else:
                high = mid - 1
        return low

    def _extends(self, body: bytes, start: int, count: int) -> bool:
        """Given that the first `count` messages repeat, whether the next one does too (its bytes only)."""
        first, end = self.ends[count - 1] + 1, self.ends[count]
        return body[start + first - 1] == COMMA and \
            body.startswith(memoryview(self.body)[self.start + first:self.start + end], start + first) and \
            start + end < len(body) and body[start + end] in (COMMA, CLOSE)

    def _repeats(self, body: bytes, start: int, count: int) -> bool:
        end = self.ends[count - 1]
        return body.startswith(memoryview(self.body)[self.start:self.start + end], start) and \
            start + end < len(body) and body[start + end] in (COMMA, CLOSE)

    def rows(self, count: int) -> list[memoryview]:
        """orjson's bytes of the first `count` messages (views of the body: nothing copied)."""
        view, start, ends = memoryview(self.body), self.start, self.ends
        return [view[start + (ends[i - 1] + 1 if i else 0):start + ends[i]] for i in range(count)]


@dataclass(slots=True)
class Parsed:
    json: Any
    rows: list | None = None   # orjson's bytes (bytes or memoryviews) of the array's first messages (all, for a compact client)
    reused: int = 0                   # of them, those taken from an earlier parse
    ends: list[int] | None = None     # where they end (see Seen.ends)
    reused_from: int = 0              # the serial of the body they were taken from
    head: dict | None = None          # the members before the array's key, parsed alone
    serial: int = 0                   # this body's serial, once remembered

    @property
    def lineage(self) -> tuple[int, int, int] | None:
        """(this body's serial, the serial of the body whose first `reused` messages it repeats byte for
        byte, or 0, and `reused`); None when the body is not remembered."""
        return (self.serial, self.reused_from, self.reused) if self.serial else None


class BodyParser:
    """Parses request bodies, remembering the messages of the recent large ones."""

    def __init__(self, max_kept: int = MAX_KEPT, max_kept_bytes: int = MAX_KEPT_BYTES, min_bytes: int = MIN_BYTES):
        self.max_kept, self.max_kept_bytes, self.min_bytes = max_kept, max_kept_bytes, min_bytes
        self._seen: list[Seen] = []   # most recent last
        self._serials = itertools.count(1)
        self.reused = 0               # messages not parsed again, in all

    def forget(self) -> None:
        """Memory relief: no body is kept (the next turn of each conversation is parsed whole)."""
        self._seen.clear()

    def snapshot(self) -> dict:
        return {"messages_reused": self.reused, "bodies_kept": len(self._seen),
                "kept_mb": round(sum(len(seen.body) for seen in self._seen) / 2**20, 2)}

    def parse(self, body: bytes, key: str) -> Parsed:
        """`orjson.loads(body)` (its errors too), reusing what an earlier body of the conversation parsed.
        `key`: the name of the top-level array holding the conversation ("messages", "input", "contents")."""
        if len(body) < self.min_bytes:
            return Parsed(orjson.loads(body))
        marker = b'"' + key.encode() + b'":['
        at = body.find(marker)
        if at <= 0:
            return Parsed(orjson.loads(body))
        start = at + len(marker)
        parsed = self._reuse(body, key, at, start)
        if parsed is None:
            parsed = Parsed(orjson.loads(body))
        self._learn(body, key, start, parsed)
        return parsed

    def _reuse(self, body: bytes, key: str, at: int, start: int) -> Parsed | None:
        best, count = None, 0
        for seen in self._seen:
            n = seen.matched(body, start)
            if n > count:
                best, count = seen, n
        if best is None:
            return None
        end = start + best.ends[count - 1]
        tail = body[end + 1:] if body[end] == COMMA else body[end:]
        if b'"' + key.encode() + b'"' in tail:   # a second key of that name would be the one that counts
            return None
        try:   # the array's key is at the top level: what precedes it closes as an object; what follows
            # it opens as one. Merged in order, as orjson fills a dict (a repeated key: its first place, last value)
            if best.head is not None and best.start == start and body.startswith(memoryview(best.body)[:at]):
                head_doc = best.head   # the same bytes before the array (system prompt, tools): parsed before
            else:
                head = body[:at]
                head_doc = orjson.loads(head[:-1] + b"}" if head.endswith(b",") else head + b"}")
            after = orjson.loads(b"{" + body[at:start] + tail)
        except orjson.JSONDecodeError:
            return None
        rest = after.pop(key, None) if isinstance(after, dict) else None
        if not isinstance(head_doc, dict) or not isinstance(rest, list):
            return None
        doc = dict(head_doc)   # the kept head stays as parsed: the next turn may take it again
        self._seen.remove(best)   # the conversation moved on: its newer body replaces it
        doc[key] = best.messages[:count] + rest
        doc.update(after)
        self.reused += count
        return Parsed(doc, best.rows(count), count, best.ends[:count], best.serial, head_doc)

    def _learn(self, body: bytes, key: str, start: int, parsed: Parsed) -> None:
        """Remember the messages of this body whose bytes are orjson's (all of them, for a compact client)."""
        messages = parsed.json.get(key) if isinstance(parsed.json, dict) else None
        if not isinstance(messages, list) or not messages:
            return
        rows, ends = list(parsed.rows or ()), list(parsed.ends or ())
        while len(ends) < len(messages):
            at = start + (ends[-1] + 1 if ends else 0)
            if ends and body[start + ends[-1]] != COMMA:
                break
            row = orjson.dumps(messages[len(ends)])
            past = at + len(row)
            if not body.startswith(row, at) or past >= len(body) or body[past] not in (COMMA, CLOSE):
                break
            rows.append(row)
            ends.append(past - start)
        parsed.rows, parsed.ends = rows, ends
        if not ends:
            return
        seen = Seen(body, next(self._serials), start, parsed.head, ends, messages[:len(ends)])
        self._seen.append(seen)
        parsed.serial = seen.serial
        kept = sum(len(seen.body) for seen in self._seen)
        while len(self._seen) > self.max_kept or kept > self.max_kept_bytes:
            kept -= len(self._seen.pop(0).body)
