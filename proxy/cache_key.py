"""The cache key: a hash of the canonical request, partitioned per credential.

Canonical request = method, API path (no agent prefix), query, the headers
that change the answer, and the JSON body with the ignored fields removed
(dotted paths; `[*]` stands for every element of a list, as in `input[*].id`),
in the order the client sent it (a client always sends its keys in one order;
sorting a 4 MB body would cost 14 times as much as writing it). Whether the
call streams is ignored on purpose: one answer
serves both forms (a Gemini stream is keyed as its JSON method,
gemini_api.key_target). The credential partition is a keyed hash (HMAC with a
secret kept in the state directory) of every credential the call carries:
`x-api-key`, `authorization`, `api-key` (Azure OpenAI), `x-goog-api-key`, a
`key=` query parameter (Gemini, left out of the canonical query) and the
headers in `[cache] credential_headers`. One key's answers are never served
to another, a call without any credential is a partition of its own, and no
key is ever stored.

The canonical form has a version, KEY_VERSION: bump it whenever `canonical`,
`request_hash`, `partition` or `key` would make another key for the same
request. The state
store keeps the version its entries were keyed with and drops entries of an
older form when it is opened (they could never be hit again); exports carry
it, so an import of another form is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Iterable

import orjson

from .gemini_api import key_target

# The partition of a call carrying only these is HMAC("x-api-key\0authorization"), as it always was:
# existing entries keep hitting. Any other credential present is appended after them, tagged by its name.
CREDENTIAL_HEADERS = ("x-api-key", "authorization")
MORE_CREDENTIAL_HEADERS = ("api-key", "x-goog-api-key")
QUERY_KEY = "key="          # Gemini's ?key=API_KEY
MEMO_SIZE = 1024            # credentials whose partition is remembered (an HMAC per call saved)
# The canonical form's version (see above). 1: sorted body keys, BLAKE2b; 2: the client's key order, SHA-256.
KEY_VERSION = 2


class Uncacheable(ValueError):
    """The request cannot be put in canonical form (nested deeper than the JSON writer goes)."""
# Imported recordings (`sidecar cache import`) live here: any key may read them.
ANY_KEY = b"*"


def load_secret(state_dir: Path) -> bytes:
    """The per-installation HMAC secret, created 0600 on first use. Written whole to a private file, then
    linked into place: a sidecar starting at the same moment reads all 32 bytes or none, never a part."""
    path = state_dir / "partition.secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_bytes(32)
    fd, draft = tempfile.mkstemp(dir=state_dir, prefix=".partition.")   # 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secret)
        os.link(draft, path)
    except FileExistsError:  # another sidecar made it first
        return path.read_bytes()
    finally:
        os.unlink(draft)
    return secret


EACH = "[*]"   # a step of a field path: every element of a list


def field_path(text: str) -> tuple[str, ...]:
    """'input[*].id' -> ('input', '[*]', 'id'); ValueError for a path that names no field."""
    steps: list[str] = []
    for part in text.split("."):
        name, bracket, rest = part.partition("[")
        lists = (bracket + rest).count(EACH)
        if not name or (bracket + rest) != EACH * lists:
            raise ValueError(f"{text!r} is not a field path: use dotted names, with [*] after a list's "
                             f"name for each of its elements (e.g. input[*].id)")
        steps += [name, *[EACH] * lists]
    if steps[-1] == EACH:
        raise ValueError(f"{text!r} ends with [*]: name the field to leave out of each element (e.g. input[*].id)")
    return tuple(steps)


_PLACE = orjson.dumps(f"\0sidecar turns {secrets.token_hex(16)}\0")   # no body holds it: a random name


def _spliced(doc: dict, body: dict, field: str, rows: list) -> list:
    """The parts of orjson.dumps(doc), with body[field] written as its elements' known bytes."""
    doc = {**doc, "body": {**body, field: orjson.loads(_PLACE)}}
    written = orjson.dumps(doc)
    at = written.index(_PLACE)
    parts = [written[:at] + b"[", rows[0]]
    for row in rows[1:]:
        parts += (b",", row)
    parts.append(b"]" + written[at + len(_PLACE):])
    return parts


def without(body: Any, paths: Iterable[tuple[str, ...]]) -> Any:
    """A copy of body with the ignored fields removed (only the dicts and lists on their paths are copied)."""
    for path in paths:
        body = _dropped(body, path)
    return body


def _dropped(node: Any, path: tuple[str, ...]) -> Any:
    head, rest = path[0], path[1:]
    if head == EACH:
        return [_dropped(item, rest) for item in node] if isinstance(node, list) else node
    if not isinstance(node, dict) or head not in node:
        return node
    if not rest:
        return {k: v for k, v in node.items() if k != head}
    return {**node, head: _dropped(node[head], rest)}


class KeyMaker:
    def __init__(self, secret: bytes, ignore_fields: Iterable[str], key_headers: Iterable[str],
                 credential_headers: Iterable[str] = ()):
        self._secret = secret
        self.ignore = tuple(field_path(f) for f in ignore_fields)
        self.headers = tuple(h.lower() for h in key_headers)
        configured = (h.lower() for h in credential_headers)
        self.credentials = tuple(dict.fromkeys(h for h in (*MORE_CREDENTIAL_HEADERS, *configured)
                                               if h not in CREDENTIAL_HEADERS))
        # A credential is in the partition, never in the canonical request (which entries keep on disk).
        self.headers = tuple(h.lower() for h in key_headers
                             if h.lower() not in CREDENTIAL_HEADERS and h.lower() not in self.credentials)
        self._memo: dict[str, bytes] = {}

    def canonical(self, method: str, path: str, query: str, headers, body: Any,
                  turns: tuple[str, list] | None = None) -> bytes:
        """The canonical request: what the key is the hash of (and what `sidecar cache why` compares)."""
        return b"".join(self.canonical_parts(method, path, query, headers, body, turns))   # one part: itself

    def canonical_parts(self, method: str, path: str, query: str, headers, body: Any,
                        turns: tuple[str, list] | None = None) -> list:
        """`canonical` as the parts it is made of, joined by nobody that needs not: `turns`: (field, rows),
        orjson's bytes of every element of body[field] (body_json.py), which are parts as they are (views
        of the request's body): a large request's canonical form costs no copy of it."""
        if QUERY_KEY in query:   # a credential: it goes to the partition, never into the request hash
            query = "&".join(part for part in query.split("&") if not part.startswith(QUERY_KEY))
        path, query = key_target(path, query)
        kept = without(body, self.ignore)
        doc = {"method": method, "path": path, "query": query,
               "headers": {h: headers[h] for h in self.headers if h in headers}, "body": kept}
        try:
            if turns is not None and isinstance(kept, dict) and isinstance(body, dict):
                field, rows = turns
                if kept.get(field) is body.get(field) and len(rows) == len(body.get(field) or ()) > 0:
                    return _spliced(doc, kept, field, rows)
            return [orjson.dumps(doc)]
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
    def request_hash(canonical: bytes | list) -> bytes:
        """The key without a partition: what export carries. SHA-256 (hardware-accelerated where the CPU has
        SHA extensions: 2.5 times BLAKE2b's speed here) of the canonical request (or of its parts, in
        order), cut to 16 bytes."""
        if isinstance(canonical, list):
            digest = hashlib.sha256()
            for part in canonical:
                digest.update(part)
            return digest.digest()[:16]
        return hashlib.sha256(canonical).digest()[:16]

    @staticmethod
    def key(request_hash: bytes, partition: bytes) -> bytes:
        return hashlib.blake2b(request_hash + partition, digest_size=16).digest()
