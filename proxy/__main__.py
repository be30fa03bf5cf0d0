"""`python -m agent_sidecar.proxy --fd N`: the proxy process that `sidecar run` supervises.

It serves on the inherited listening socket N with the effective config the
launcher put in SIDECAR_PROXY_CONFIG (JSON), takes control messages (one JSON
line each) on stdin, and exits when stdin reaches end of file.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

import orjson

from .config import ConfigError, load_layers
from .server import run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m agent_sidecar.proxy")
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--notify-parent", action="store_true", help="send SIGUSR1 to the parent when ready")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = load_layers([orjson.loads(os.environ["SIDECAR_PROXY_CONFIG"])], ["launcher"])
    except (ConfigError, orjson.JSONDecodeError, KeyError) as exc:
        print(f"sidecar: proxy could not read its config: {exc}", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=args.fd)
    os.set_blocking(sys.stdin.fileno(), False)
    parent = os.getppid()

    def ready(port: int) -> None:
        if args.notify_parent:
            os.kill(parent, signal.SIGUSR1)

    run(config, sock, control_fd=sys.stdin.fileno(), on_ready=ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
