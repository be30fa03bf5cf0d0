"""The cache key: a hash of the canonical request, partitioned per credential.

Canonical request = method, API path (no agent prefix), query, the headers
that change the answer, and the JSON body with sorted keys and the ignored
fields removed. Whether the call streams is ignored on purpose: one answer
serves both forms. The credential partition is a keyed hash (HMAC with a
secret kept in the state directory) of every credential the call carries:
`x-api-key`, `authorization`, `api-key` (Azure OpenAI), `x-goog-api-key`, a
`key=` query parameter (Gemini, left out of the canonical query) and the
headers in `[cache] credential_headers`. One key's answers are never served
to another, a call without any credential is a partition of its own, and no
key is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any, Iterable

import orjson

# The partition of a call carrying only these is HMAC("x-api-key\0authorization"), as it always was:
# existing entries keep hitting. Any other credential present is appended after them, tagged by its name.
CREDENTIAL_HEADERS = ("x-api-key", "authorization")
MORE_CREDENTIAL_HEADERS = ("api-key", "x-goog-api-key")
QUERY_KEY = "key="          # Gemini's ?key=API_KEY
MEMO_SIZE = 1024            # credentials whose partition is remembered (an HMAC per call saved)


class Uncacheable(ValueError):
    """The request cannot be put in canonical form (nested deeper than the JSON writer goes)."""
# Imported recordings (`sidecar cache import`) live here: any key may read them.
ANY_KEY = b"*"


def load_secret(state_dir: Path) -> bytes:
    """The per-installation HMAC secret, created 0600 on first use."""
    path = state_dir / "partition.secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another sidecar made it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    return secret


def without(body: Any, dotted: Iterable[tuple[str, ...]]) -> Any:
    """A copy of body with the ignored fields removed (only the dicts on their paths are copied)."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for path in dotted:
        _drop(body, path)
    return body


def _drop(node: dict, path: tuple[str, ...]) -> None:
    head = path[0]
    if len(path) == 1:
        node.pop(head, None)
    elif isinstance(node.get(head), dict):
        node[head] = child = dict(node[head])
        _drop(child, path[1:])


class KeyMaker:
    def __init__(self, secret: bytes, ignore_fields: Iterable[str], key_headers: Iterable[str],
                 credential_headers: Iterable[str] = ()):
        self._secret = secret
        self.ignore = tuple(tuple(f.split(".")) for f in ignore_fields)
        configured = (h.lower() for h in credential_headers)
        self.credentials = tuple(dict.fromkeys(h for h in (*MORE_CREDENTIAL_HEADERS, *configured)
                                               if h not in CREDENTIAL_HEADERS))
        # A credential is in the partition, never in the canonical request (which entries keep on disk).
        self.headers = tuple(h.lower() for h in key_headers
                             if h.lower() not in CREDENTIAL_HEADERS and h.lower() not in self.credentials)
        self._memo: dict[str, bytes] = {}

    def canonical(self, method: str, path: str, query: str, headers, body: Any) -> bytes:
        if QUERY_KEY in query:   # a credential: it goes to the partition, never into the request hash
            query = "&".join(part for part in query.split("&") if not part.startswith(QUERY_KEY))
        doc = {"method": method, "path": path, "query": query,
               "headers": {h: headers[h] for h in self.headers if h in headers},
               "body": without(body, self.ignore)}
        try:
            return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            raise Uncacheable(str(exc)) from exc

    def partition(self, headers, query: str = "") -> bytes:
        """The HMAC of every credential the call carries (header lookups and, once per credential, one HMAC)."""
        parts = [headers.get(h, "") for h in CREDENTIAL_HEADERS]
        for name in self.credentials:
            value = headers.get(name)
            if value is not None:
                parts.append(f"{name}:{value}")
        if QUERY_KEY in query:
            parts.extend(f"?{part}" for part in query.split("&") if part.startswith(QUERY_KEY))
        credential = "\0".join(parts)
        found = self._memo.get(credential)
        if found is None:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            found = self._memo[credential] = hmac.new(self._secret, credential.encode(errors="surrogateescape"),
                                                       hashlib.sha256).digest()[:16]
        return found

    @staticmethod
    def request_hash(canonical: bytes) -> bytes:
        """The key without a partition: what export carries."""
        return hashlib.blake2b(canonical, digest_size=16).digest()

    @staticmethod
    def key(request_hash: bytes, partition: bytes) -> bytes:
        return hashlib.blake2b(request_hash + partition, digest_size=16).digest()
