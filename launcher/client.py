"""Talking to a running sidecar's /_sidecar/ endpoints from the command line (stdlib only)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit
from pathlib import Path
from typing import Any

TOKEN_HEADER = "x-sidecar-token"   # the names proxy/admin.py uses (this module stays free of aiohttp)
MAX_CMD = 4096                     # characters of an agent's command line reported (the server takes 8192)


class SidecarUnreachable(Exception):
    pass


class SidecarRefused(SidecarUnreachable):
    """The sidecar answered, and said no; the message is its own."""


class NotASidecar(SidecarUnreachable):
    """Something answered at the address, but not as a sidecar does."""


def check_server(url: str, what: str = "--connect") -> dict:
    """The health of the sidecar at `url` (a `sidecar serve`), or an error saying what is there instead."""
    check_url(url, what)
    if urlsplit(url).path.strip("/"):
        raise SidecarUnreachable(f"{what} takes the sidecar's own address, http://HOST:PORT (the one 'sidecar "
                                 f"serve' prints), without a path; not {url!r}")
    try:
        health = call(url, "/_sidecar/health", timeout=3.0)
    except SidecarRefused as exc:
        raise NotASidecar(f"{url} is not a sidecar ({str(exc).partition('(')[2].rstrip(')')} to "
                          f"/_sidecar/health); give {what} the URL 'sidecar serve' prints") from None
    except NotASidecar as exc:
        raise NotASidecar(f"{exc}; give {what} the URL 'sidecar serve' prints") from None
    except SidecarUnreachable as exc:
        raise SidecarUnreachable(f"{exc}; start one with 'sidecar serve' (it prints its URL), or drop {what} "
                                 f"to let 'sidecar run' start its own") from None
    if not isinstance(health, dict) or not isinstance(health.get("pid"), int) or "version" not in health:
        raise NotASidecar(f"{url} is not a sidecar (its /_sidecar/health is not a sidecar's); give {what} the "
                          f"URL 'sidecar serve' prints")
    return health


def check_url(url: object, what: str = "a sidecar's address") -> str:
    """`url` if it looks like http://HOST:PORT[/...], else SidecarUnreachable saying what it should look like."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1)
    except ValueError:   # a port out of range, a bad IPv6 literal
        ok = False
    if not ok:
        raise SidecarUnreachable(f"{what} must look like http://127.0.0.1:PORT, not {url!r}")
    return url


def token_path(state_dir: Path, pid: int) -> Path:
    """Where the sidecar of process `pid` leaves the token its launchers show (proxy.admin.token_path)."""
    return state_dir / "tokens" / f"{pid}.token"


def call(base: str, path: str, doc: Any = None, timeout: float = 3.0, token: str | None = None) -> Any:
    data = None if doc is None else json.dumps(doc).encode()
    headers = {"content-type": "application/json"} if data else {}
    if token is not None:
        headers[TOKEN_HEADER] = token
    check_url(base)
    import urllib.error   # here, not at start: `sidecar run` without --connect never needs them (20 ms)
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via an HTTP proxy
    try:
        request = urllib.request.Request(base.rstrip("/") + path, data=data, headers=headers)
        with opener.open(request, timeout=timeout) as response:
            answer = response.read()
    except urllib.error.HTTPError as exc:
        said = exc.read(500).decode(errors="replace").strip().removeprefix("sidecar: ")
        raise SidecarRefused(f"the sidecar at {base} refused {path.partition('?')[0]} (HTTP {exc.code}: "
                             f"{said or exc.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SidecarUnreachable(f"no sidecar answers at {base} ({getattr(exc, 'reason', None) or exc})") from None
    try:
        return json.loads(answer)
    except ValueError:
        raise NotASidecar(f"{base} is not a sidecar: {path.partition('?')[0]} answered with no JSON") from None


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
