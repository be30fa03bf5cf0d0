"""The run file: how `sidecar top` finds the proxy that a `sidecar run` embeds (<state_dir>/run/<pid>.json)."""

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
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps({"pid": os.getpid(), "url": url, "agent": agent, "started": time.time()}))
        os.replace(temporary, path)
    except OSError:
        return None   # serving matters more than being found
    return path
