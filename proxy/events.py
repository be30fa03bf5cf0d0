"""The events log: threshold crossings and process events, one JSON line each.

A plain append-only file in the state directory (events.jsonl), so several
sidecars and the launcher can append to it and `sidecar events --follow` can
tail it. Rotated to events.jsonl.1 beyond a size limit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import orjson

MAX_BYTES = 8 << 20


def make_event(kind: str, state: str = "info", **detail: Any) -> dict[str, Any]:
    """state: raised (a threshold crossed), cleared (it recovered) or info (a process event)."""
    return {"ts": round(time.time(), 3), "kind": kind, "state": state, **detail}


class EventLog:
    def __init__(self, state_dir: Path, max_bytes: int = MAX_BYTES):
        self.path = state_dir / "events.jsonl"
        self.max_bytes = max_bytes

    def append(self, event: dict[str, Any]) -> None:
        line = orjson.dumps(event) + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write of one line: appends from several processes do not interleave
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > self.max_bytes:
            os.replace(self.path, self.path.with_suffix(".jsonl.1"))

    def read(self, since: float = 0.0) -> Iterator[dict[str, Any]]:
        for path in (self.path.with_suffix(".jsonl.1"), self.path):
            try:
                with open(path, "rb") as fh:
                    for line in fh:
                        event = _parse(line)
                        if event is not None and event.get("ts", 0) >= since:
                            yield event
            except FileNotFoundError:
                continue


def _parse(line: bytes) -> dict | None:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def format_event(event: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.get("ts", 0)))
    detail = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("ts", "kind", "state"))
    return f"{when}  {event.get('kind', '?'):22} {event.get('state', ''):8} {detail}"
