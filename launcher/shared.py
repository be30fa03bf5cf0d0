"""The user's shared sidecar: one background server that every `sidecar run --shared` joins.

Like sccache: a state file in the state directory (shared.json) says where it
listens, with its pid, version and config fingerprint. A launcher takes a file
lock, reuses a live server, replaces a stale file from a dead one, or starts a
new server and waits until it is ready; two launchers starting at the same
moment therefore end up with one server. A server of another version or with
another config is explained, not silently used. The server stops by itself
after `[shared] idle_timeout` seconds without agents.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent_sidecar.proxy import __version__
from agent_sidecar.proxy.config import CacheSection, Config
from agent_sidecar.proxy.run_file import write_private

from . import client
from .proxy_process import open_log, unblock_signals
from .summary import human_bytes

STATE_FILE = "shared.json"


class SharedError(Exception):
    """The shared sidecar cannot be used; the message says why and what to do."""

    status = 2


def fingerprint(config: Config) -> str:
    """The settings that must agree between a launcher and the server it joins."""
    doc = config.to_dict()
    doc.pop("launcher")
    doc.pop("shared")
    doc["cache"] = {k: v for k, v in doc["cache"].items() if k != "mode"}   # each agent's own (in its base URL)
    doc["proxy"] = {k: v for k, v in doc["proxy"].items() if k not in ("port", "agent_id")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def state_path(config: Config) -> Path:
    return config.state_dir / STATE_FILE


def read_state(config: Config) -> dict | None:
    """The state file's contents; None if there is none or it is not one a server wrote (garbled, cut short)."""
    try:
        info = json.loads(state_path(config).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("url"), str) or type(info.get("pid")) is not int:
        return None
    return info


def live(info: dict | None) -> dict | None:
    """The server's health if the one the file names answers; None for a stale file."""
    if not isinstance(info, dict):
        return None
    try:
        health = client.call(info.get("url"), "/_sidecar/health", timeout=2.0)
    except client.SidecarUnreachable:
        return None
    return health if isinstance(health, dict) and health.get("pid") == info.get("pid") else None


def ensure_server(config: Config) -> str:
    """The URL of a running shared sidecar that matches this config, starting one if needed."""
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with os.fdopen(os.open(config.state_dir / "shared.lock", os.O_WRONLY | os.O_CREAT, 0o600), "a") as lock:
        os.fchmod(lock.fileno(), 0o600)   # one made 0644 by an older version, too
        fcntl.flock(lock, fcntl.LOCK_EX)   # one launcher at a time decides; the others then find its server
        info = read_state(config)
        health = live(info)
        if health is not None:
            if health.get("version") != __version__:
                raise SharedError(f"the shared sidecar (pid {info['pid']}) runs version {health.get('version')}, "
                                  f"this launcher is {__version__}; stop it with 'sidecar stop' and run again")
            if info.get("fingerprint") != fingerprint(config):
                raise SharedError(f"the shared sidecar (pid {info['pid']}) runs with another configuration; "
                                  f"stop it with 'sidecar stop' to restart it with this one, or drop --shared")
            return info["url"]
        state_path(config).unlink(missing_ok=True)   # stale: its server is gone
        return _start(config)


def _start(config: Config) -> str:
    read_fd, write_fd = os.pipe()
    log_path = config.state_dir / "logs" / "shared.log"
    doc = config.to_dict()
    doc["cache"]["mode"] = CacheSection.mode   # the server's default; an agent's own mode comes in its base URL
    env = {**os.environ, "SIDECAR_PROXY_CONFIG": json.dumps(doc)}
    with open_log(log_path) as log:
        subprocess.Popen([sys.executable, "-m", "agent_sidecar.launcher", "serve", "--shared-server", str(write_fd)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_fd,), env=env,
                         start_new_session=True, preexec_fn=unblock_signals)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 30)
        line = os.read(read_fd, 4096).decode() if ready else ""
    finally:
        os.close(read_fd)
    if not line.startswith("http"):
        raise SharedError(f"the shared sidecar did not start; see {log_path}")
    return line.strip()


def announce(config: Config, url: str, ready_fd: int, port: int) -> None:
    """Server side, once listening: write the state file, then tell the waiting launcher."""
    info = {"pid": os.getpid(), "url": url, "port": port, "version": __version__,
            "fingerprint": fingerprint(config), "started": time.time()}
    path = state_path(config)
    write_private(path, json.dumps(info).encode())
    os.write(ready_fd, url.encode() + b"\n")
    os.close(ready_fd)


def forget(config: Config) -> None:
    """Server side, on exit: remove the state file if it is still ours."""
    info = read_state(config)
    if info and info.get("pid") == os.getpid():
        state_path(config).unlink(missing_ok=True)


NONE_RUNS = 1   # the exit status of `sidecar stop` and `sidecar status` when no shared sidecar runs


def stop(config: Config) -> int:
    """`sidecar stop`: stop the shared sidecar and wait for it to finish its writes; 1 if none runs."""
    info = read_state(config)
    if live(info) is None:
        state_path(config).unlink(missing_ok=True)
        print("sidecar: no shared sidecar is running, nothing to stop"
              + (" (removed a stale state file)" if info else ""))
        return NONE_RUNS
    os.kill(info["pid"], signal.SIGTERM)
    killed = ""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:   # a CLI waiting for another process: a short poll is fine here
        if not _running(info["pid"]):
            break
        time.sleep(0.05)
    else:
        os.kill(info["pid"], signal.SIGKILL)
        killed = " with SIGKILL: it did not stop within 15 s of SIGTERM"
    state_path(config).unlink(missing_ok=True)
    print(f"sidecar: stopped the shared sidecar (pid {info['pid']}){killed}")
    return 0


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped (in a container without an init, it may never be)."""
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def status(config: Config) -> int:
    """`sidecar status`: where the shared sidecar listens, its agents and calls; 1 if none runs."""
    info = read_state(config)
    if live(info) is None:
        print("sidecar: no shared sidecar is running (start one with 'sidecar run --shared -- CMD')"
              + (" (removed a stale state file)" if info else ""))
        state_path(config).unlink(missing_ok=True)
        return NONE_RUNS
    doc = client.call(info["url"], "/_sidecar/stats")
    total = doc["summary"]["all"]
    running = [a for a in doc["agents"] if a["state"] != "exited"]
    print(f"shared sidecar  {info['url']}  pid {info['pid']}  version {info.get('version')}  "
          f"up {time.time() - float(info.get('started') or time.time()):.0f} s")
    print(f"agents          {len(running)} running, {len(doc['agents'])} seen")
    for agent in doc["agents"]:
        print(f"  {agent['id']:28} {agent['state']:9} pid {agent['pid']:<8} "
              f"peak {human_bytes(agent.get('peak_rss') or 0):>7}  {agent['cmd'][:60]}")
    rate = total["hit_rate"]
    print(f"calls           {total['calls']}  (cache hits {total['hits']}{f', {rate:.0%}' if rate is not None else ''})"
          f"  in flight {doc['limits']['in_flight']}  queued {doc['limits']['queued']}")
    return 0
