"""Talking to a running sidecar's /_sidecar/ endpoints from the command line (stdlib only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TOKEN_HEADER = "x-sidecar-token"   # the names proxy/admin.py uses (this module stays free of aiohttp)
MAX_CMD = 4096                     # characters of an agent's command line reported (the server takes 8192)


class SidecarUnreachable(Exception):
    pass


class SidecarRefused(SidecarUnreachable):
    """The sidecar answered, and said no; the message is its own."""


def token_path(state_dir: Path, pid: int) -> Path:
    """Where the sidecar of process `pid` leaves the token its launchers show (proxy.admin.token_path)."""
    return state_dir / "tokens" / f"{pid}.token"


def call(base: str, path: str, doc: Any = None, timeout: float = 3.0, token: str | None = None) -> Any:
    data = None if doc is None else json.dumps(doc).encode()
    headers = {"content-type": "application/json"} if data else {}
    if token is not None:
        headers[TOKEN_HEADER] = token
    request = urllib.request.Request(base.rstrip("/") + path, data=data, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via an HTTP proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        said = exc.read(500).decode(errors="replace").strip().removeprefix("sidecar: ")
        raise SidecarRefused(f"the sidecar at {base} refused {path.partition('?')[0]} (HTTP {exc.code}: "
                             f"{said or exc.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SidecarUnreachable(f"no sidecar answers at {base} ({exc})") from None


def report_agent(base: str, state_dir: Path, message: dict, timeout: float = 1.0) -> None:
    """Tell the sidecar at `base` of an agent event, showing the token its process left in `state_dir`."""
    health = call(base, "/_sidecar/health", timeout=timeout)
    try:
        token = token_path(state_dir, int(health["pid"])).read_text().strip()
    except (OSError, KeyError, TypeError, ValueError):
        raise SidecarRefused(f"the sidecar at {base} left no token in {state_dir / 'tokens'}, so it cannot be told "
                             f"of this agent; run the launcher with the server's state directory") from None
    if isinstance(message.get("cmd"), str):
        message = {**message, "cmd": message["cmd"][:MAX_CMD]}
    call(base, "/_sidecar/agents", message, timeout=timeout, token=token)
