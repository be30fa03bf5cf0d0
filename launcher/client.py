"""Talking to a running sidecar's /_sidecar/ endpoints from the command line (stdlib only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class SidecarUnreachable(Exception):
    pass


def call(base: str, path: str, doc: Any = None, timeout: float = 3.0) -> Any:
    data = None if doc is None else json.dumps(doc).encode()
    request = urllib.request.Request(base.rstrip("/") + path, data=data,
                                     headers={"content-type": "application/json"} if data else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via an HTTP proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SidecarUnreachable(f"no sidecar answers at {base} ({exc})") from None
