"""`sidecar cache why`: why a call missed, as the fields where its canonical request differs from another.

Each entry keeps the canonical request it was keyed on (proxy/entry.py) and
the proxy keeps the last miss's (<state dir>/last-miss.json). Requests are
flattened to paths (`body.messages[3].content`, `headers.anthropic-version`)
and compared leaf by leaf; the nearest entry is the one with the fewest
differences, on the same route first. Identical requests that still missed
were made with another credential: the partition, not the request, differs.
"""

from __future__ import annotations

import argparse
import difflib
import time
from typing import Any, Iterator

import orjson

from agent_sidecar.proxy.last_miss import read as read_last_miss
from agent_sidecar.proxy.config import Config, ConfigError
from agent_sidecar.proxy.entry import Entry

from .terminal import clean

SHOWN = 20          # differing fields printed at most
PREVIEW = 48        # characters of a value shown


def stored_request(entry: Entry) -> dict | None:
    """The canonical request an entry was keyed on, or None for one stored before entries kept it."""
    if not entry.request:
        return None
    try:
        doc = orjson.loads(entry.request)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def last_miss(config: Config, store) -> tuple[dict, dict]:
    """(what the proxy noted of the last miss, its canonical request)."""
    try:
        noted = read_last_miss(getattr(store, "lmdb", None), config.state_dir)
        if noted is None:
            raise ConfigError(f"no miss noted yet in {config.state_dir}: a sidecar notes each miss there; "
                              f"or name two entries: sidecar cache why KEY KEY")
        return noted[0], orjson.loads(noted[1])
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"the last miss noted in {config.state_dir} is unreadable ({exc}); it is rewritten at "
                          f"the next miss") from None


def text_of(message: Any) -> str:
    """The words of a message (a string, or the text parts of a content list)."""
    content = message.get("content") if isinstance(message, dict) else message
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict)
                        and isinstance(part.get("text"), str))
    return ""


def flatten(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        if not value:
            yield path, {}
        for key in sorted(value):
            yield from flatten(value[key], f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        if not value:
            yield path, []
        for index, item in enumerate(value):
            yield from flatten(item, f"{path}[{index}]")
    else:
        yield path, value


ABSENT = object()


def differences(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    left, right = dict(flatten(a)), dict(flatten(b))
    return [(path, left.get(path, ABSENT), right.get(path, ABSENT))
            for path in sorted(left.keys() | right.keys(), key=_order(left, right))
            if left.get(path, ABSENT) != right.get(path, ABSENT)]


def _order(left: dict, right: dict):
    """Fields in request order: method, path, query, headers, then the body as it was written."""
    position = {path: i for i, path in enumerate([*left, *(p for p in right if p not in left)])}
    rank = {"method": 0, "path": 1, "query": 2, "headers": 3, "body": 4}
    return lambda path: (rank.get(path.split(".")[0].split("[")[0], 5), position[path])


def show(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    text = orjson.dumps(value).decode()
    return text if len(text) <= PREVIEW else text[:PREVIEW - 3] + "..."


def nearest(request: dict, candidates: list[tuple[bytes, Entry, dict]]) -> tuple[bytes, Entry, dict] | None:
    if not candidates:
        return None
    same_route = [c for c in candidates if (c[2].get("method"), c[2].get("path")) ==
                  (request.get("method"), request.get("path"))] or candidates
    def distance(candidate) -> tuple:
        diff = differences(request, candidate[2])
        return len(diff), sum(_unlike(a, b) for _, a, b in diff), -candidate[1].created
    return min(same_route, key=distance)


def _unlike(a: Any, b: Any) -> float:
    """How unlike two differing values are, 0 to 1: for two strings, by their characters (the first 2000)."""
    if isinstance(a, str) and isinstance(b, str):
        return 1.0 - difflib.SequenceMatcher(None, a[:2000], b[:2000], autojunk=False).quick_ratio()
    return 1.0


def _label(key: bytes, entry: Entry) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created))
    return f"entry {key.hex()[:12]} (stored {when})"


def run(args: argparse.Namespace, config: Config, store, entries, find) -> int:
    if len(args.entries) > 2:
        raise ConfigError("sidecar cache why takes at most two entries: KEY KEY (or 'last' for the last miss)")
    stored = [(k, e, r) for k, e in entries(store) if e is not None and (r := stored_request(e)) is not None]

    def pick(ref: str) -> tuple[str, dict, bytes | None]:
        if ref == "last":
            noted, request = last_miss(config, store)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(noted.get("ts", 0)))
            key = bytes.fromhex(noted["key"]) if isinstance(noted.get("key"), str) else None
            return f"the last miss (key {str(noted.get('key'))[:12]}, {when}, agent {noted.get('agent')})", \
                request, key   # its answer may have been stored since: compared with the others
        key, entry = find(store, ref)
        request = stored_request(entry) if entry is not None else None
        if request is None:
            raise ConfigError(f"cache entry {key.hex()[:12]} keeps no request (stored by an older version, or "
                              f"unreadable): it cannot be compared")
        return _label(key, entry), request, key

    refs = args.entries or ["last"]
    first_label, first, first_key = pick(refs[0])
    if len(refs) == 2:
        second_label, second, second_key = pick(refs[1])
        if first_key is not None and first_key == second_key:
            print(f"{clean(first_label)} and {clean(second_label)} are the same request and key: its answer was "
                  f"stored after it missed, so the same call now hits")
            return 0
    else:
        found = nearest(first, [c for c in stored if c[0] != first_key])
        if found is None:
            print(f"{first_label}: no stored entry to compare it with (state dir {config.state_dir})")
            return 0
        second_label, second = _label(found[0], found[1]), found[2]
        if len(refs) == 1 or refs[0] == "last":
            second_label = "the nearest, " + second_label
    diff = differences(first, second)
    if not diff:
        print(f"{clean(first_label)} and {clean(second_label)} have the same canonical request: the key differs "
              f"by the credential (another API key, or none), which partitions the cache")
        return 0
    print(f"{clean(first_label)}\n  against {clean(second_label)}: {len(diff)} field{'s' * (len(diff) != 1)} differ")
    width = min(48, max(len(path) for path, _, _ in diff[:SHOWN]))
    for path, left, right in diff[:SHOWN]:
        print(f"  {clean(path):{width}}  {clean(show(left))}  !=  {clean(show(right))}")
    if len(diff) > SHOWN:
        print(f"  ... {len(diff) - SHOWN} more")
    return 0
