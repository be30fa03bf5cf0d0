"""Content codings: reading a compressed answer, and whether a client accepts one.

What is relayed on a miss stays exactly as the upstream sent it. A stored
answer keeps its coding too, and is served as stored to a client whose
`Accept-Encoding` takes that coding, decoded to identity for any other client.
Only codings the standard library decodes (gzip, deflate) are stored; an
answer in another coding (br, zstd) is relayed but not cached.
"""

from __future__ import annotations

import gzip
import zlib

STORABLE = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


class UndecodableBody(ValueError):
    """The body is not what its content-encoding says."""


def decoded(body: bytes, encoding: str) -> bytes:
    """A body without its content-encoding, for reading."""
    encoding = encoding.strip().lower()
    try:
        if encoding in ("gzip", "x-gzip"):
            return gzip.decompress(body)
        if encoding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:   # raw deflate, as some servers send it
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except (OSError, EOFError, zlib.error) as exc:
        raise UndecodableBody(f"body is not valid {encoding}: {exc}") from exc
    if encoding in ("", "identity"):
        return body
    raise UndecodableBody(f"unsupported content-encoding {encoding!r}")


def accepts(accept_encoding: str, encoding: str) -> bool:
    """Whether a request's Accept-Encoding takes `encoding` (RFC 9110 12.5.3, q=0 refuses)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return True
    wildcard = False
    for item in accept_encoding.lower().split(","):
        name, *params = item.split(";")
        name = name.strip()
        taken = _quality(params) > 0
        if name == encoding or (encoding == "gzip" and name == "x-gzip"):
            return taken
        if name == "*":
            wildcard = taken
    return wildcard


def _quality(params: list[str]) -> float:
    for param in params:
        key, _, value = param.partition("=")
        if key.strip() == "q":
            try:
                return float(value)
            except ValueError:
                return 1.0
    return 1.0
