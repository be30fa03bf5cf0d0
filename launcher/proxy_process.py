"""The embedded proxy of `sidecar run`: started, told about its agent, restarted, stopped.

The launcher holds the listening socket and hands it to `python -m agent_sidecar.proxy`, so
the port never changes: a proxy that dies is restarted on the very same socket
and the agent's next call (or its SDK's retry) just works. Control messages
(agent started/exited, restore) go over the proxy's stdin, one JSON line each;
the ones that describe the run are repeated to a restarted proxy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from agent_sidecar.proxy.config import Config

MAX_QUICK_RESTARTS = 5    # proxy deaths within a minute before the launcher gives up on it


def open_log(path: Path):
    """A log file for a child's output, appended to: the file 0600 and its directory 0700, even if they existed."""
    for missing in reversed([d for d in (path.parent, *path.parent.parents) if not d.exists()]):
        missing.mkdir(mode=0o700, exist_ok=True)   # the state dir too, when this comes first
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def unblock_signals() -> None:
    """preexec_fn: children start with no signals blocked (the launcher blocks them to sigwait)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


@dataclass
class ProxyProcess:
    config: Config
    sock: socket.socket
    log_path: Path
    process: subprocess.Popen | None = None
    ready: bool = False
    deaths: list[float] = field(default_factory=list)
    standing: dict[str, dict] = field(default_factory=dict)   # messages a restarted proxy must hear again

    def start(self) -> None:
        self.ready = False
        env = {**os.environ, "SIDECAR_PROXY_CONFIG": orjson.dumps(self.config.to_dict()).decode()}
        with open_log(self.log_path) as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent_sidecar.proxy", "--fd", str(self.sock.fileno()), "--notify-parent"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(self.sock.fileno(),),
                start_new_session=True, preexec_fn=unblock_signals, env=env)
        for message in self.standing.values():
            self.send(message)

    def send(self, message: dict, standing: str | None = None) -> None:
        """One control message; `standing` names one to repeat to a restarted proxy."""
        if standing:
            self.standing[standing] = message
        try:
            self.process.stdin.write(orjson.dumps(message) + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, AttributeError):
            pass   # a dead proxy is restarted and told again

    def died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def may_restart(self) -> bool:
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < 60] + [now]
        return len(self.deaths) <= MAX_QUICK_RESTARTS

    def give_up(self) -> None:
        """Close the port, so the agent's calls fail at once instead of waiting for a proxy."""
        self.process = None
        self.sock.close()

    def stop(self, wait: float = 10.0) -> None:
        """Close its stdin (it finishes its writes and exits); kill it if it does not."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        if not self.ready:
            proc.kill()   # still importing: it has served nothing, so there is nothing to finish
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + wait
        while proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0 or signal.sigtimedwait({signal.SIGCHLD}, left) is None and proc.poll() is None:
                proc.kill()
                proc.wait()
                break
