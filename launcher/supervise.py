"""`sidecar run`: the agent as a child, the proxy as a sibling, signals passed on.

The launcher binds the port itself and hands the socket to a `python -m proxy`
process, so the agent starts at once (the kernel queues its first connections
while the proxy imports) and a proxy that dies is restarted on the very same
port. The agent keeps the terminal: same process group, same stdin/stdout/
stderr. All waiting is done in `sigwaitinfo`: child exits and forwarded
signals are events; nothing polls.

Ctrl-C at the terminal reaches the agent directly (it is in the foreground
process group), so signals the kernel sent are not forwarded a second time;
signals sent with kill() to the launcher are.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from proxy.config import Config
from proxy.listen import bind

from . import client
from .summary import format_summary

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2)
WATCHED = {signal.SIGCHLD, signal.SIGUSR1, *FORWARDED}
SI_KERNEL = 0x80          # si_code of a signal the kernel (the terminal) generated
MAX_QUICK_RESTARTS = 5    # proxy deaths within a minute before the launcher gives up on it


class LaunchError(Exception):
    """The agent could not be started; `status` is the exit status to use."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def exit_status(returncode: int) -> int:
    """A shell's convention: 128+N when the child died of signal N."""
    return 128 - returncode if returncode < 0 else returncode


def agent_id_for(cmd: list[str], config: Config) -> str:
    if config.proxy.agent_id:
        return config.proxy.agent_id
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(cmd[0]).name)[:40] or "agent"
    return f"{name}-{secrets.token_hex(3)}"


def agent_env(base: str, proxy_url: str, agent: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ANTHROPIC_BASE_URL=base, OPENAI_BASE_URL=base + "/v1", SIDECAR_URL=proxy_url, SIDECAR_AGENT_ID=agent)
    return env


@dataclass
class ProxyProcess:
    """The embedded proxy: started, watched, restarted on the launcher's socket."""

    config: Config
    sock: socket.socket
    log_path: Path
    process: subprocess.Popen | None = None
    ready: bool = False
    deaths: list[float] | None = None
    agent: dict | None = None       # told to every proxy process, including a restarted one

    def start(self) -> None:
        self.ready = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {**os.environ, "SIDECAR_PROXY_CONFIG": orjson.dumps(self.config.to_dict()).decode()}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--fd", str(self.sock.fileno()), "--notify-parent"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(self.sock.fileno(),),
                start_new_session=True, preexec_fn=_unblock_signals, env=env)
        if self.agent:
            self.send(self.agent)

    def send(self, message: dict) -> None:
        """One control message to the proxy (it reads them once it is serving)."""
        try:
            self.process.stdin.write(orjson.dumps({"agent": message}) + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, AttributeError):
            pass   # a dead proxy is restarted and told again

    def died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def may_restart(self) -> bool:
        now = time.monotonic()
        self.deaths = [t for t in (self.deaths or []) if now - t < 60] + [now]
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


def tell(proxy: ProxyProcess | None, connect: str | None, message: dict) -> None:
    """An agent's process event, to the embedded proxy or to the shared server."""
    if proxy is not None:
        if message.get("event") == "started":
            proxy.agent = message
        proxy.send(message)
    elif connect:
        try:
            client.call(connect, "/_sidecar/agents", message, timeout=1.0)
        except client.SidecarUnreachable:
            pass   # the agent's own calls will show the problem; its run must not fail for this


def run_agent(cmd: list[str], config: Config, connect: str | None = None) -> int:
    """Run CMD behind the sidecar; return the exit status `sidecar run` should have."""
    agent = agent_id_for(cmd, config)
    started = time.time()
    proxy: ProxyProcess | None = None
    if connect:
        base = f"{connect.rstrip('/')}/a/{agent}"
        proxy_url = connect.rstrip("/")
    else:
        sock = bind(config.proxy.host, config.proxy.port, config.proxy.allow_remote)
        host, port = sock.getsockname()[:2]
        proxy_url = base = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        config = config.replace("proxy", agent_id=agent, port=port)
        proxy = ProxyProcess(config, sock, config.state_dir / "logs" / "proxy.log")

    signal.signal(signal.SIGCHLD, lambda *_: None)  # a caught signal stays pending while blocked
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    try:
        if proxy:
            proxy.start()
        try:
            child = subprocess.Popen(cmd, env=agent_env(base, proxy_url, agent), preexec_fn=_unblock_signals)
        except FileNotFoundError:
            raise LaunchError(f"command not found: {cmd[0]}; check the name and your PATH", 127) from None
        except PermissionError:
            raise LaunchError(f"cannot execute {cmd[0]}: permission denied", 126) from None
        tell(proxy, connect, {"id": agent, "event": "started", "pid": child.pid, "cmd": shlex.join(cmd)})
        status, peak_rss = _supervise(child, proxy)
        tell(proxy, connect, {"id": agent, "event": "exited", "status": status})
        if not config.launcher.quiet and (connect or proxy and proxy.ready):
            print_summary(proxy_url, agent, started, peak_rss)
    finally:
        if proxy:
            proxy.stop()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
    return status


def print_summary(proxy_url: str, agent: str, started: float, peak_rss: int) -> None:
    """One short summary of the agent's calls on stderr, once it has exited."""
    try:
        doc = client.call(proxy_url, f"/_sidecar/stats?agent={agent}&since={started}", timeout=5.0)
    except client.SidecarUnreachable:
        return
    print(format_summary(doc["summary"]["all"], doc.get("events", []), peak_rss), file=sys.stderr)


def _supervise(child: subprocess.Popen, proxy: ProxyProcess | None) -> tuple[int, int]:
    """Wait for the agent, forwarding signals and restarting the proxy; (exit status, peak RSS bytes)."""
    while True:
        info = signal.sigwaitinfo(WATCHED)
        sig = info.si_signo
        if sig == signal.SIGUSR1:
            if proxy:
                proxy.ready = True
        elif sig == signal.SIGCHLD:
            pid, wait_status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                child.returncode = os.waitstatus_to_exitcode(wait_status)
                return exit_status(child.returncode), usage.ru_maxrss * 1024
            if proxy and proxy.died():
                if proxy.may_restart():
                    proxy.start()
                else:
                    print(f"sidecar: the proxy keeps failing; see {proxy.log_path}. The agent's API calls will "
                          f"fail until it exits.", file=sys.stderr)
                    proxy.give_up()
        elif info.si_code != SI_KERNEL:
            # Sent by kill(): pass it on. The terminal already delivered its own to the agent.
            try:
                child.send_signal(sig)
            except ProcessLookupError:
                pass
