"""`sidecar cache ...`: look into, move and tidy the response cache.

Works on the state directory directly (LMDB allows it while sidecars run).
Export/import carry recordings to another machine: imported answers are
readable with any API key, so a CI run can replay them with a dummy key.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time

import orjson

from agent_sidecar.proxy.cache_key import ANY_KEY, KEY_VERSION, KeyMaker, load_secret
from agent_sidecar.proxy.config import Config, ConfigError
from agent_sidecar.proxy.entry import CorruptEntry, Entry
from agent_sidecar.proxy.encoding import decoded
from agent_sidecar.proxy.sse import EventParser, MalformedStream, assemble_anthropic, assemble_openai
from agent_sidecar.proxy.response_store import ResponseStore
from agent_sidecar.proxy.store import StoreError, open_lmdb, set_aside

from . import cache_why as why
from .terminal import clean


def open_store(config: Config) -> ResponseStore:
    return ResponseStore(open_lmdb(config), int(config.cache.max_size_mb * 1024 * 1024))


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def entries(store: ResponseStore):
    for key, blob in store.items():
        try:
            yield key, Entry.decode(blob)
        except CorruptEntry:
            yield key, None


def find(store: ResponseStore, prefix: str) -> tuple[bytes, Entry]:
    matches = [(k, e) for k, e in entries(store) if k.hex().startswith(prefix.lower())]
    if len(matches) != 1:
        raise ConfigError(f"{'no' if not matches else 'more than one'} cache entry matches {prefix!r}; "
                          f"see 'sidecar cache list'")
    return matches[0]


def answer_text(entry: Entry) -> dict:
    """The stored answer as JSON, assembling a stream."""
    if entry.stream:
        parser = EventParser()
        events = parser.feed(entry.body)
        openai = entry.meta.get("path", "").startswith(("/v1/chat", "/v1/embeddings"))
        try:
            return (assemble_openai if openai else assemble_anthropic)(events) or {}
        except MalformedStream as exc:
            raise ConfigError(f"the stored stream is malformed, so it has no JSON form to show ({exc})") from None
    try:
        return orjson.loads(decoded(entry.body, entry.header("content-encoding")))
    except ValueError as exc:   # not JSON, or a coding that does not decode
        raise ConfigError(f"the stored answer is not JSON, so it has no JSON form to show ({exc})") from None


def run(args: argparse.Namespace, config: Config) -> int:
    if args.action == "key":
        return show_key(args, config)
    try:
        store = open_store(config)
    except StoreError as exc:
        if args.action != "clear":
            raise
        return _set_aside(config, exc)
    try:
        return ACTIONS[args.action](args, config, store)
    finally:
        store.lmdb.close()


def stats(args, config, store) -> int:
    info = store.stats()
    ttl = config.cache.ttl_seconds
    print(f"state dir  {config.state_dir}")
    print(f"mode       {config.cache.mode}")
    print(f"entries    {info['entries']}")
    print(f"size       {human(info['bytes'])} of {human(info['max_bytes'])}")
    print(f"ttl        {f'{ttl:g} s' if ttl else 'none'}")
    return 0


def list_entries(args, config, store) -> int:
    rows = sorted(((k, e) for k, e in entries(store) if e is not None), key=lambda r: -r[1].created)
    if not rows:
        print(f"no cache entries (state dir {config.state_dir})")
        return 0
    print(f"{'key':12}  {'created':19}  {'form':4}  {'size':>9}  {'tokens in/out':>13}  request")
    for key, entry in rows[:args.limit]:
        meta = entry.meta
        tokens = f"{meta.get('input_tokens', 0)}/{meta.get('output_tokens', 0)}"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created))
        print(f"{key.hex()[:12]}  {created}  {'sse' if entry.stream else 'json':4}  {human(len(entry.body)):>9}  "
              f"{tokens:>13}  {clean(request_summary(entry))}")
    if len(rows) > args.limit:
        print(f"... {len(rows) - args.limit} more (--limit N)")
    return 0


def request_summary(entry: Entry, words: int = 8) -> str:
    """Route, model and the first words of the last message: which request an entry answers."""
    line = f"{entry.meta.get('path', '')} {entry.meta.get('model', '')}".strip()
    canonical = why.stored_request(entry)
    if canonical is None:
        return line
    body = canonical.get("body")
    messages = body.get("messages") if isinstance(body, dict) else None
    if isinstance(body, dict) and not isinstance(messages, list):
        messages = body.get("input") if isinstance(body.get("input"), list) else [{"content": body.get("input")}]
    if not messages:
        return line
    text = " ".join(why.text_of(messages[-1]).split()[:words])
    return f"{line}  \"{text[:80]}\"" if text else line


def show(args, config, store) -> int:
    key, entry = find(store, args.key)
    if entry is None:
        raise ConfigError(f"cache entry {key.hex()} is unreadable (corrupt or of another format); "
                          f"'sidecar cache prune' removes it")
    meta = {"key": key.hex(), "created": entry.created, "status": entry.status, "stream": entry.stream,
            "headers": dict(entry.headers), **entry.meta, "request": why.stored_request(entry),
            "answer": answer_text(entry)}
    sys.stdout.write(orjson.dumps(meta, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _set_aside(config: Config, exc: StoreError) -> int:
    """The fix a broken store's error names: move it aside (kept, not deleted) and start afresh."""
    aside = set_aside(config.state_dir)
    print(f"the state store could not be read, so it was moved to {aside}; a new, empty one takes its place "
          f"(cache, sessions and call records start afresh), and a running sidecar uses it from its next call")
    return 0


def clear(args, config, store) -> int:
    try:
        keys = [k for k, _ in store.items()]
    except StoreError as exc:   # opened, but its pages are broken
        store.lmdb.close()
        return _set_aside(config, exc)
    store.delete_now(keys)
    print(f"removed {len(keys)} entries")
    return 0


def prune(args, config, store) -> int:
    """Remove unreadable and expired entries, then evict down to the size limit."""
    ttl = config.cache.ttl_seconds
    now = time.time()
    doomed = [k for k, e in entries(store) if e is None or ttl and now - e.created > ttl]
    store.delete_now(doomed)
    evicted = store.evict_now()
    print(f"removed {len(doomed)} unreadable or expired entries; evicted {human(evicted)} over the size limit")
    return 0


def export(args, config, store) -> int:
    count = 0
    with open(args.file, "wb") as out:
        for _, entry in entries(store):
            if entry is not None and entry.meta.get("hash"):
                out.write(orjson.dumps({"hash": entry.meta["hash"], "key_version": KEY_VERSION,
                                        "entry": base64.b64encode(entry.encode()).decode()}))
                out.write(b"\n")
                count += 1
    print(f"exported {count} entries to {args.file} (no API keys are in it)")
    return 0


def import_entries(args, config, store) -> int:
    try:
        with open(args.file, "rb") as src:
            lines = [orjson.loads(line) for line in src if line.strip()]
        blobs = [(bytes.fromhex(line["hash"]), base64.b64decode(line["entry"])) for line in lines]
        for _, blob in blobs:
            Entry.decode(blob)
    except (OSError, ValueError, KeyError, TypeError, CorruptEntry) as exc:
        raise ConfigError(f"{args.file} is not a sidecar cache export ({exc}); make one with 'sidecar cache export'")
    forms = {line.get("key_version", 1) for line in lines} - {KEY_VERSION}   # exports before versions: form 1
    if forms:
        raise ConfigError(f"{args.file} holds entries keyed in form {', '.join(map(str, sorted(forms, key=str)))}, "
                          f"this sidecar keys in form {KEY_VERSION}, so they could never be hit; record them again "
                          f"and export with this sidecar")

    store.import_now([(KeyMaker.key(request_hash, ANY_KEY), blob) for request_hash, blob in blobs])
    print(f"imported {len(blobs)} entries from {args.file}; they answer calls made with any API key")
    return 0


def show_key(args, config: Config) -> int:
    """Print the key of a request read from stdin: a body, or {"method","path","headers","body"}."""
    try:
        doc = orjson.loads(sys.stdin.buffer.read())
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"stdin is not JSON ({exc}); pipe a request body or "
                          '{"path": ..., "headers": {...}, "body": {...}}') from None
    if not (isinstance(doc, dict) and "body" in doc and ("path" in doc or "headers" in doc)):
        doc = {"body": doc}
    given = doc.get("headers") or {}
    if not (isinstance(doc.get("path", ""), str) and isinstance(doc.get("method", ""), str) and isinstance(given, dict)
            and all(isinstance(v, str) for v in given.values())):
        raise ConfigError('stdin: "path" and "method" must be strings and "headers" an object of strings')
    headers = {k.lower(): v for k, v in given.items()}
    keys = KeyMaker(load_secret(config.state_dir), config.cache.ignore_fields, config.cache.key_headers,
                    config.cache.credential_headers)
    path, _, query = doc.get("path", "/v1/messages").partition("?")
    canonical = keys.canonical(doc.get("method", "POST"), path, query, headers, doc["body"])
    request_hash = keys.request_hash(canonical)
    print(f"request hash  {request_hash.hex()}   (shown as 'hash' by 'sidecar cache show')")
    print(f"key           {keys.key(request_hash, keys.partition(headers, query)).hex()}   (for this credential, "
          f"or for calls without one)")
    print("canonical     " + orjson.dumps(orjson.loads(canonical), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
          .decode().replace("\n", "\n              "))
    return 0


def explain(args, config, store) -> int:
    """`sidecar cache why [A [B]]`: the fields in which two canonical requests differ."""
    return why.run(args, config, store, entries, find)


ACTIONS = {"stats": stats, "list": list_entries, "show": show, "clear": clear, "prune": prune,
           "export": export, "import": import_entries, "why": explain}


def add_parser(sub, common) -> None:
    from .cli import COUNT
    cache = sub.add_parser("cache", parents=[common], help="inspect and manage the response cache",
                           description="Inspect and manage the response cache.")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".")

    action("stats", "entries, size, limit")
    action("list", "entries, newest first").add_argument("--limit", type=COUNT, default=50, metavar="N",
                                                          help="show at most N entries (default 50)")
    action("show", "one entry and its answer").add_argument("key", help="its key, or a unique key prefix")
    action("clear", "remove every entry")
    action("prune", "remove expired/unreadable entries, evict to the size limit")
    action("export", "write all entries to FILE (JSON lines)").add_argument(
        "file", help="the file to write (its directory must exist); holds no API keys")
    action("import", "load entries from FILE; any API key may read them").add_argument(
        "file", help="a file written by 'sidecar cache export'")
    action("key", "print the key and canonical form of a request read from stdin (headers as the SDK sends "
                  "them: anthropic-version is part of the key)")
    action("why", "why a call missed: the fields where its request differs from the nearest stored one"
           ).add_argument("entries", nargs="*", metavar="KEY",
                          help="none: the last miss against the nearest entry; one: that entry against its nearest "
                               "other; two: those two ('last' names the last miss)")
