"""One cached answer and its versioned on-disk encoding.

Layout: b"SC1" + 4-byte big-endian meta length + meta JSON + body. The version
is in the magic: an entry of another format is never misread; it is a miss.
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

MAGIC = b"SC1"
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

    def encode(self) -> bytes:
        meta = orjson.dumps({"status": self.status, "headers": self.headers, "stream": self.stream,
                             "chunks": self.pacing,   # named "chunks" on disk since format 1
                             "meta": self.meta, "created": self.created})
        return MAGIC + struct.pack(">I", len(meta)) + meta + self.body

    @classmethod
    def decode(cls, blob: bytes) -> "Entry":
        if blob[:3] != MAGIC or len(blob) < 7:
            raise CorruptEntry("unknown entry format")
        (size,) = struct.unpack_from(">I", blob, 3)
        try:
            meta = orjson.loads(blob[7:7 + size])
            return cls(status=meta["status"], headers=[tuple(h) for h in meta["headers"]], body=bytes(blob[7 + size:]),
                       stream=meta["stream"], pacing=meta["chunks"], meta=meta["meta"], created=meta["created"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptEntry(f"undecodable entry: {exc}") from None

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name), "")


def kept_headers(headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items()
            if k.lower() not in NOT_KEPT and not k.lower().startswith("x-sidecar-")]
