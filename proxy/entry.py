"""One cached answer and its versioned on-disk encoding.

Layout: b"SC1" + 4-byte big-endian meta length + meta JSON + body, or b"SC2"
and the same, then the canonical request the entry was keyed on (its length
in the meta as "request"; no credential is ever in it), which `sidecar cache
why` compares. The version is in the magic: an entry of another format is
never misread (an older sidecar takes SC2 for a miss).
The upstream's own response headers are kept (request ids, rate-limit
headers, processing times: what a client or a user may read), less the ones
that belong to one hop or one moment; never anything a client sent (no secrets).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict

from .headers import without_prefix

MAGIC = b"SC1"
MAGIC_WITH_REQUEST = b"SC2"
# Headers of the original answer that a replay must not repeat: framing, the moment, cookies, our own.
NOT_KEPT = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "date", "set-cookie",
                      "server-timing"})


class CorruptEntry(Exception):
    """The stored bytes are not an entry this version can read."""


@dataclass(slots=True)
class Entry:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stream: bool                           # body is an SSE stream
    pacing: list[tuple[float, int]] | None = None  # a stream's chunks: (seconds after the first, length)
    meta: dict[str, Any] = field(default_factory=dict)  # path, model, usage, upstream_s, include_usage, hash
    created: float = field(default_factory=time.time)
    request: bytes | memoryview = b""      # the canonical request (JSON), b"" for an entry stored without it
    # Not stored: what replays made of it (another form's body, the recorded chunks: replay.py), kept with
    # the decoded entry for the hits to come (cache.py keeps recent decoded entries).
    made: dict | None = None

    def encode(self) -> bytes:
        head = {"status": self.status, "headers": self.headers, "stream": self.stream,
                "chunks": self.pacing,   # named "chunks" on disk since format 1
                "meta": self.meta, "created": self.created}
        if not self.request:
            meta = orjson.dumps(head)
            return MAGIC + struct.pack(">I", len(meta)) + meta + self.body
        meta = orjson.dumps({**head, "request": len(self.request)})
        return MAGIC_WITH_REQUEST + struct.pack(">I", len(meta)) + meta + self.body + self.request

    @classmethod
    def decode(cls, blob: bytes) -> "Entry":
        magic = blob[:3]
        if magic not in (MAGIC, MAGIC_WITH_REQUEST) or len(blob) < 7:
            raise CorruptEntry("unknown entry format")
        (size,) = struct.unpack_from(">I", blob, 3)
        try:
            meta = orjson.loads(blob[7:7 + size])
            end = len(blob) - (meta["request"] if magic == MAGIC_WITH_REQUEST else 0)
            if not 7 + size <= end <= len(blob):
                raise CorruptEntry("undecodable entry: its request length is out of bounds")
            return cls(status=meta["status"], headers=[tuple(h) for h in meta["headers"]],
                       body=bytes(blob[7 + size:end]), stream=meta["stream"], pacing=meta["chunks"],
                       meta=meta["meta"], created=meta["created"],
                       request=memoryview(blob)[end:])   # not copied: only `sidecar cache why` reads it
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptEntry(f"undecodable entry: {exc}") from None

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name), "")


def kept_headers(headers) -> list[tuple[str, str]]:
    kept = CIMultiDict(headers)
    for name in NOT_KEPT:
        kept.popall(name, None)
    return list(without_prefix(kept, "x-sidecar-").items())
