"""Header rules: what passes from one hop to the next, and the sidecar's own headers.

Hop-by-hop headers stay on their own hop, and so does `Expect` (the sidecar
answered it and has read the body). Only multidict here: the CLI imports these
rules (through the cache entry) without the cost of importing aiohttp.
"""

from __future__ import annotations

from multidict import CIMultiDict

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Recomputed per hop by aiohttp from the URL and the body; Expect was answered by the sidecar itself.
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}


def end_to_end(headers) -> CIMultiDict:
    """Headers minus hop-by-hop ones, including any the Connection header names. (A copy, then deletions:
    multidict does both in C, where a filter would lower() every name in Python, on every call, twice.)"""
    forwarded = CIMultiDict(headers)
    for name in NOT_FORWARDED:
        forwarded.popall(name, None)
    for connection in headers.getall("connection", ()):
        for token in connection.split(","):
            forwarded.popall(token.strip(), None)
    return forwarded


def without_prefix(headers: CIMultiDict, prefix: str) -> CIMultiDict:
    """`headers` (changed in place) minus every header whose name starts with `prefix` (lower case)."""
    if "\n" + prefix in "\n" + "\n".join(headers.keys()).lower():   # one scan in C; rarely any
        for name in {k for k in headers.keys() if k.lower().startswith(prefix)}:
            headers.popall(name, None)
    return headers


def request_headers(headers) -> CIMultiDict:
    """What goes upstream: end-to-end headers, minus the sidecar's own x-sidecar-* controls."""
    return without_prefix(end_to_end(headers), "x-sidecar-")
