"""`sidecar run`: the agent as a child, the proxy as a sibling, signals passed on.

The launcher binds the port itself and hands the socket to a `python -m agent_sidecar.proxy`
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

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent_sidecar.proxy import __version__, telemetry, tracecontext
from agent_sidecar.proxy.config import UPSTREAM_VARIABLES, VARIABLE_SUFFIX, Config, UpstreamSection
from agent_sidecar.proxy.events import EventLog
from agent_sidecar.proxy.listen import bind
from agent_sidecar.proxy.routes import agent_base

from . import client, codex, gemini_cli
from .proxy_process import ProxyProcess, unblock_signals
from .summary import format_summary

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2)
WATCHED = {signal.SIGCHLD, signal.SIGUSR1, *FORWARDED}
SI_KERNEL = 0x80          # si_code of a signal the kernel (the terminal) generated


class LaunchError(Exception):
    """The agent could not be started; `status` is the exit status to use."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def exit_status(returncode: int) -> int:
    """A shell's convention: 128+N when the child died of signal N."""
    return 128 - returncode if returncode < 0 else returncode


def agent_id_for(cmd: list[str], config: Config) -> str:
    """[proxy] agent_id, else the command's name and a hash of the command and the directory it runs in:
    the same agent gets the same id run after run, so `sidecar stats --by agent` groups its runs."""
    if config.proxy.agent_id:
        return config.proxy.agent_id
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(cmd[0]).name).lstrip("._-")[:40] or "agent"
    digest = hashlib.sha256(json.dumps([os.getcwd(), cmd]).encode()).hexdigest()[:6]
    return f"{name}-{digest}"


def agent_env(base: str, proxy_url: str, agent: str, upstream: UpstreamSection,
              traceparent: str = "") -> dict[str, str]:
    """The agent's environment: every base-URL variable a client reads (proxy/config.py) points at the sidecar,
    so one an SDK reads first does not send its calls around it. A variable the user set to another place than
    its API's upstream keeps its value: the sidecar forwards to one upstream per API, and its calls must not
    change destination."""
    env = dict(os.environ)
    for var, api in UPSTREAM_VARIABLES:
        own = env.get(var)
        if not own or own.rstrip("/") == getattr(upstream, api).rstrip("/"):
            env[var] = base + VARIABLE_SUFFIX[api]
    env.update(SIDECAR_URL=proxy_url, SIDECAR_AGENT_ID=agent)
    if traceparent:   # the agent's own spans, if it makes any, join the run's trace
        env["TRACEPARENT"] = traceparent
    return env


def repointed(env: dict[str, str], base: str) -> tuple[str, ...]:
    return tuple(var for var, api in UPSTREAM_VARIABLES if env.get(var) == base + VARIABLE_SUFFIX[api])


def tell(proxy: ProxyProcess | None, connect: str | None, message: dict, state_dir: Path) -> None:
    """An agent's process event, to the embedded proxy (its pipe) or to the shared server (with its token)."""
    if proxy is not None:
        proxy.send({"agent": message}, standing="agent" if message.get("event") != "exited" else None)
    elif connect:
        try:
            client.report_agent(connect, state_dir, {**message, "watch": True}, timeout=1.0)
        except client.SidecarRefused as exc:
            if message.get("event") != "exited":   # said once; the agent runs all the same, unlisted
                print(f"sidecar: {exc}; the agent runs, but the server does not list it", file=sys.stderr)
        except client.SidecarUnreachable:
            pass   # the agent's own calls will show the problem; its run must not fail for this


def run_agent(cmd: list[str], config: Config, connect: str | None = None, cache_mode: str = "") -> int:
    """Run CMD behind the sidecar, restarting it as configured; return `sidecar run`'s exit status.

    With `connect`, the agent's calls go to that sidecar, in `cache_mode` if given (in its base URL)."""
    agent = agent_id_for(cmd, config)
    started = time.time()
    if config.state.backend == "redis":
        try:
            import redis  # noqa: F401  - checked here, so the error is one line before the agent starts
        except ImportError:
            raise LaunchError("[state] backend = \"redis\" needs the Redis client: pip install 'agent-sidecar[redis]'")
    traced = {}
    if config.telemetry.otlp_endpoint:
        problem = telemetry.missing()
        if problem:   # said once, before the agent takes the terminal; the agent runs all the same
            print(f"sidecar: {problem}", file=sys.stderr)
        traced = tracecontext.for_run(os.environ.get("TRACEPARENT"))
    proxy: ProxyProcess | None = None
    restore = config.launcher.restore
    if connect:
        if restore:
            raise LaunchError("--restore needs the agent's own sidecar; drop --connect to restore a session")
        health = client.check_server(connect)
        if cache_mode and health["version"] != __version__:   # an older server would not honour it
            raise LaunchError(f"the sidecar at {connect} runs version {health['version']}, this launcher "
                              f"{__version__}: it may not honour --cache {cache_mode}; restart it with this version")
        proxy_url = connect.rstrip("/")
        base = agent_base(proxy_url, agent, cache_mode)
    else:
        if restore:
            restore = resolve_session(config, restore)
        sock = bind(config.proxy.host, config.proxy.port, config.proxy.allow_remote)
        host, port = sock.getsockname()[:2]
        proxy_url = base = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        config = config.replace("proxy", agent_id=agent, port=port)
    launch = codex.repoint(cmd, base, os.environ, own_proxy=not connect)   # Codex: a -c override
    cmd = launch.cmd
    if launch.upstream:
        config = config.replace("upstream", openai=launch.upstream)
    if launch.ignore_fields:
        config = config.replace("cache", ignore_fields=(*config.cache.ignore_fields, *launch.ignore_fields))
    if not connect:
        proxy = ProxyProcess(config, sock, config.state_dir / "logs" / "proxy.log")

    settings = config.launcher
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a caught signal stays pending while blocked
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    try:
        if proxy:
            proxy.start()
            if restore:
                proxy.send({"restore": restore}, standing="restore")
        env = {**agent_env(base, proxy_url, agent, config.upstream, traced.get("traceparent", "")),
               **gemini_cli.agent_env(os.environ, config.state_dir)}
        child = spawn(cmd, env)
        tell(proxy, connect, {"id": agent, "event": "started", "pid": child.pid, "cmd": shlex.join(cmd),
                              "launcher": os.getpid(), **traced}, config.state_dir)
        restarts = 0
        peak_rss = 0
        while True:
            status, child_peak, stopped = _supervise(child, proxy)
            peak_rss = max(peak_rss, child_peak)   # over restarts too
            tell(proxy, connect, {"id": agent, "event": "exited", "status": status, "peak_rss": child_peak},
                 config.state_dir)
            wanted = settings.restart == "always" or settings.restart == "on-failure" and status != 0
            if stopped or not wanted or restarts >= settings.max_restarts or _interrupted(settings.restart_backoff):
                break
            restarts += 1
            if proxy:   # the restarted agent's next conversation continues the last checkpointed one
                proxy.send({"restore": f"agent:{agent}"}, standing="restore")
            child = spawn([*cmd, *settings.restart_args], env)
            tell(proxy, connect, {"id": agent, "event": "restarted", "pid": child.pid, "cmd": shlex.join(cmd),
                                  "launcher": os.getpid(), **traced}, config.state_dir)
        if not settings.quiet and (connect or proxy and proxy.ready):
            print_summary(proxy_url, agent, started, peak_rss, config.state_dir, repointed(env, base))
    finally:
        if proxy:
            proxy.stop()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
    return status


def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    try:
        return subprocess.Popen(cmd, env=env, preexec_fn=unblock_signals)
    except FileNotFoundError:
        raise LaunchError(f"command not found: {cmd[0]}; check the name and your PATH", 127) from None
    except PermissionError:
        raise LaunchError(f"cannot execute {cmd[0]}: permission denied", 126) from None


def resolve_session(config: Config, ref: str) -> str:
    """The checkpointed session --restore names ('last', an id or a prefix), or a clear error."""
    from agent_sidecar.proxy.sessions import Sessions
    from agent_sidecar.proxy.store import open_lmdb
    lmdb_env = open_lmdb(config)
    try:
        found = Sessions(lmdb_env).find(ref)
    finally:
        lmdb_env.close()
    if found is None:
        raise LaunchError(f"no checkpointed session matches {ref!r}; see 'sidecar sessions list'")
    return found["id"]


def _interrupted(backoff: float) -> bool:
    """Wait out the restart backoff; True if a terminating signal came meanwhile."""
    deadline = time.monotonic() + backoff
    while (left := deadline - time.monotonic()) > 0:
        info = signal.sigtimedwait(set(FORWARDED), left)
        if info is not None:
            return True
    return False


def print_summary(proxy_url: str, agent: str, started: float, peak_rss: int, state_dir: Path,
                  variables: tuple[str, ...]) -> None:
    """One short summary of the agent's calls on stderr, once it has exited."""
    try:
        doc = client.call(proxy_url, f"/_sidecar/stats?agent={agent}&since={started}", timeout=5.0)
    except client.SidecarUnreachable:
        return
    events = doc.get("events", [])
    log = EventLog(state_dir)
    if log.path.exists():   # the log on disk outlives a proxy that crashed and was restarted (its memory did not)
        events = list(log.read(since=started))
    print(format_summary(doc["summary"]["all"], events, peak_rss, agent, variables), file=sys.stderr)


def _supervise(child: subprocess.Popen, proxy: ProxyProcess | None) -> tuple[int, int, bool]:
    """Wait for the agent, forwarding signals and restarting the proxy.

    Returns (exit status, peak RSS bytes, whether a terminating signal was passed on or seen)."""
    stopped = False
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
                return exit_status(child.returncode), usage.ru_maxrss * 1024, stopped
            if proxy and proxy.died():
                if proxy.may_restart():
                    proxy.start()
                else:
                    print(f"sidecar: the proxy keeps failing; see {proxy.log_path}. The agent's API calls will "
                          f"fail until it exits.", file=sys.stderr)
                    proxy.give_up()
        elif sig == signal.SIGUSR2:
            _forward(child, sig, info)
        else:
            stopped = True   # the user is stopping the agent: no restart
            _forward(child, sig, info)


def _forward(child: subprocess.Popen, sig: int, info) -> None:
    """Pass on a signal sent with kill(); the terminal already delivered its own to the agent."""
    if info.si_code != SI_KERNEL:
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            pass
