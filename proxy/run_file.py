"""The run file: how `sidecar top` finds the proxy that a `sidecar run` embeds (<state_dir>/run/<pid>.json).

Also the one way a small state file is written: whole (a temporary renamed over it), 0600.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson


def register_run(state_dir: Path, url: str, agent: str) -> Path | None:
    """Write <state_dir>/run/<pid>.json so `sidecar top` finds this proxy; the caller removes it on exit."""
    path = state_dir / "run" / f"{os.getpid()}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, orjson.dumps({"pid": os.getpid(), "url": url, "agent": agent, "started": time.time()}))
    except OSError:
        return None   # serving matters more than being found
    return path


def write_private(path: Path, *parts: bytes) -> None:
    """Replace path with the parts, one after the other, at once (readers see the old file or the new one),
    mode 0600. (Parts: a large value is written as it is, never copied into one buffer first.)"""
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)   # a temporary left 0644 by an older version, too
        left = [memoryview(part) for part in parts if part]
        while left:   # writev may stop short (a signal, a large write): go on from where it stopped
            written = os.writev(fd, left)
            while left and written >= len(left[0]):
                written -= len(left.pop(0))
            if left:
                left[0] = left[0][written:]
    finally:
        os.close(fd)
    os.replace(temporary, path)
