"""Binding the listening socket, shared by `sidecar run` and `sidecar serve`.

Kept free of aiohttp so the launcher can bind before the proxy has imported
anything: the launcher holds the socket, agents can connect at once (the
kernel queues them), and a restarted proxy takes over the very same port.
"""

from __future__ import annotations

import errno
import ipaddress
import socket


class ListenError(Exception):
    """The address cannot be bound; the message says what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, allow_remote: bool) -> socket.socket:
    if not allow_remote and not is_loopback(host):
        raise ListenError(f"refusing to listen on {host}: the sidecar binds loopback only; set "
                          f"[proxy] allow_remote = true to expose it (agents' keys pass through it)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"port {port} on {host} is already in use; pick another with --port "
                              f"(or --port 0 for any free port)") from None
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    return sock
