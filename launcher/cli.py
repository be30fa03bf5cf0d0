"""`sidecar`: the command line. Each command's first docstring line is its help.

Every error ends here as one line, `sidecar: ...`, and exit status 2 (127/126
when the agent's command cannot be found or run, as shells do): the user's
mistakes say what to do, a bug says where it happened (`python -X dev -m
launcher ...` shows its traceback). A reader that goes away (`sidecar stats |
head -1`) ends the command quietly with 141, as SIGPIPE ends a shell tool.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import sys
import traceback
from pathlib import Path
from typing import Callable

from agent_sidecar import proxy
from agent_sidecar.proxy import __version__
from agent_sidecar.proxy.config import CACHE_MODES, CacheSection, Config, ConfigError, load, to_toml
from agent_sidecar.proxy.listen import ListenError

from .client import SidecarUnreachable
from .shared import SharedError
from .supervise import LaunchError

FIXABLE = (ConfigError, ListenError, LaunchError, SharedError, SidecarUnreachable)   # their messages say what to do

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[func.__name__.removeprefix("cmd_")] = func
    return func


def effective_config(args: argparse.Namespace) -> Config:
    flags: dict[str, dict] = {}
    if getattr(args, "port", None) is not None:
        flags.setdefault("proxy", {})["port"] = args.port
    if getattr(args, "host", None) is not None:
        flags.setdefault("proxy", {})["host"] = args.host
    if getattr(args, "cache", None) is not None:
        flags.setdefault("cache", {})["mode"] = args.cache
    if getattr(args, "quiet", False):
        flags.setdefault("launcher", {})["quiet"] = True
    if getattr(args, "restore", None):
        flags.setdefault("launcher", {})["restore"] = args.restore
    if getattr(args, "shared", False):
        flags.setdefault("launcher", {})["shared"] = True
    return load(args.config, flags=flags)


@command
def cmd_run(args: argparse.Namespace) -> int:
    """Run an agent command with all its API calls passing the sidecar."""
    from .supervise import run_agent
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ConfigError("no command given: use sidecar run -- CMD [ARGS...]")
    config = effective_config(args)
    connect = args.connect
    if connect and args.port is not None:
        raise ConfigError("--port sets the port of the sidecar 'sidecar run' starts; with --connect the agent "
                          "uses the one at that URL: drop --port (or --connect)")
    if connect and args.shared:
        raise ConfigError("--shared and --connect both choose the sidecar the agent uses: give one of them")
    if config.launcher.shared and not connect:
        from .shared import ensure_server
        connect = ensure_server(config)
    # The agent's own cache mode reaches the server it joins, in its base URL; the server's stays its default.
    mode = args.cache or (config.cache.mode if config.cache.mode != CacheSection.mode else "")
    return run_agent(cmd, config, connect=connect, cache_mode=mode if connect else "")


@command
def cmd_serve(args: argparse.Namespace) -> int:
    """Run one standalone proxy in the foreground for several agents to share."""
    from agent_sidecar.proxy.listen import bind
    from agent_sidecar.proxy.server import run
    if args.shared_server is not None:
        return _serve_shared(args.shared_server)
    config = effective_config(args)
    sock = bind(config.proxy.host, config.proxy.port, config.proxy.allow_remote)
    host, port = sock.getsockname()[:2]
    config = config.replace("proxy", port=port)

    def ready(port: int) -> None:
        print(f"sidecar: serving on http://{host}:{port} - attach agents with "
              f"'sidecar run --connect http://{host}:{port} -- CMD'; Ctrl-C stops", file=sys.stderr, flush=True)

    run(config, sock, on_ready=ready)
    return 0


def _serve_shared(ready_fd: int) -> int:
    """The background server `sidecar run --shared` starts, with the launcher's exact config."""
    import json
    import os
    from agent_sidecar.proxy.config import load_layers
    from agent_sidecar.proxy.listen import bind
    from agent_sidecar.proxy.server import run
    from . import shared
    config = load_layers([json.loads(os.environ.pop("SIDECAR_PROXY_CONFIG"))], ["launcher"])
    sock = bind(config.proxy.host, 0, config.proxy.allow_remote)
    host, port = sock.getsockname()[:2]
    try:
        run(config, sock, idle_timeout=config.shared.idle_timeout,
            on_ready=lambda port: shared.announce(config, f"http://{host}:{port}", ready_fd, port))
    finally:
        shared.forget(config)
    return 0


@command
def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the shared sidecar (the one `sidecar run --shared` starts)."""
    from . import shared
    return shared.stop(effective_config(args))


@command
def cmd_status(args: argparse.Namespace) -> int:
    """Show the shared sidecar: where it listens, its agents and calls."""
    from . import shared
    return shared.status(effective_config(args))


@command
def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective configuration (defaults < file < SIDECAR_* environment < flags)."""
    sys.stdout.write(to_toml(effective_config(args)))
    return 0


@command
def cmd_cache(args: argparse.Namespace) -> int:
    """Inspect and manage the response cache."""
    from . import cache_cmd
    return cache_cmd.run(args, effective_config(args))


@command
def cmd_stats(args: argparse.Namespace) -> int:
    """Calls, hit rate, latency percentiles, tokens and savings from the stored records."""
    from . import stats_cmd
    return stats_cmd.run_stats(args, effective_config(args))


@command
def cmd_events(args: argparse.Namespace) -> int:
    """Threshold crossings and agent events from the events log."""
    from . import stats_cmd
    return stats_cmd.run_events(args, effective_config(args))


@command
def cmd_sessions(args: argparse.Namespace) -> int:
    """The checkpointed conversations: list, show, export, delete, prune."""
    from . import sessions_cmd
    return sessions_cmd.run(args, effective_config(args))


@command
def cmd_top(args: argparse.Namespace) -> int:
    """Live overview of a running sidecar in the terminal, redrawn as it pushes updates (q quits)."""
    from . import top
    return top.run(args, effective_config(args))


@command
def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark direct vs through the sidecar (python -m bench; --quick, --json FILE, --plot FILE)."""
    from agent_sidecar.bench.__main__ import main as bench_main
    return bench_main(args.bench_args, prog="sidecar bench")   # its options are its own


@command
def cmd_doctor(args: argparse.Namespace) -> int:
    """Check what a run needs (config, upstreams, state directory, store, port, agents), one line each with its fix."""
    from . import doctor
    return doctor.run(args)


@command
def cmd_demo(args: argparse.Namespace) -> int:
    """Run a small example agent through the sidecar against the built-in mock API."""
    from .demo import run_demo
    return run_demo(effective_config(args))


def number(kind: type, low: float, high: float | None = None, noun: str = "") -> Callable[[str], float]:
    """An argparse type: a `kind` from `low` to `high`, else a one-line usage error naming the option."""
    def parse(text: str):
        value = kind(text)   # a ValueError: argparse says "invalid int value: 'x'"
        if value != value or value < low or high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}")
        return value
    parse.__name__ = kind.__name__
    return parse


PORT = number(int, 0, 65535, "a port number (0 to 65535; 0 takes any free port)")
COUNT = number(int, 1, noun="a count (1 or more)")
DAYS = number(float, 0, noun="a number of days (0 or more)")
CONFIG_HELP = "config file (default: $SIDECAR_CONFIG, else built-in defaults)"


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. The commands whose parsers live in their own modules (cache, sessions,
    stats, events) are left out when `argv` names another: `sidecar run` starts every agent, and their
    imports would cost it 30 ms."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    top = argparse.ArgumentParser(prog="sidecar", description="A sidecar for LLM agents: cache, limits, timings, checkpoints.")
    top.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, **kw) -> argparse.ArgumentParser:
        doc = (COMMANDS[name].__doc__ or "").splitlines()[0]
        return sub.add_parser(name, parents=[common], help=doc, description=doc, **kw)

    run = add("run", usage="sidecar run [-h] [--config FILE] [--port N] [--connect URL] [--cache MODE] [--quiet] "
                           "[--shared] [--restore [SESSION]] -- CMD [ARGS...]")
    run.add_argument("--port", type=PORT, metavar="N", help="port for the embedded proxy (default: any free port)")
    run.add_argument("--connect", metavar="URL", help="attach to a running 'sidecar serve' instead of starting a proxy")
    run.add_argument("--cache", choices=CACHE_MODES, metavar="MODE",
                     help=f"cache mode for this run: {', '.join(CACHE_MODES)} (default: [cache] mode, read-write)")
    run.add_argument("--quiet", action="store_true", help="print no summary when the agent exits")
    run.add_argument("--shared", action="store_true",
                     help="join the user's shared sidecar (started in the background if none runs)")
    run.add_argument("--restore", metavar="SESSION", nargs="?", const="last",
                     help="continue a checkpointed conversation (an id from 'sidecar sessions list', or last)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the agent command and its arguments, after --")

    serve = add("serve")
    serve.add_argument("--port", type=PORT, metavar="N",
                       help="port to listen on (default: from config, else any free port)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--shared-server", type=int, metavar="FD", help=argparse.SUPPRESS)
    config = add("config")  # the flags run/serve take, so their effect on the config can be seen
    config.add_argument("--port", type=PORT, metavar="N", help="as for run/serve")
    config.add_argument("--host", help="as for serve")
    config.add_argument("--cache", choices=CACHE_MODES, metavar="MODE", help="as for run")
    add("demo")
    doctor = add("doctor", epilog="exit status: 0 nothing would fail, 1 something would, 2 an error")
    doctor.add_argument("--offline", action="store_true", help="do not resolve or connect to the upstreams")
    add("stop", epilog="exit status: 0 stopped, 1 none was running, 2 an error")
    add("status", epilog="exit status: 0 it runs, 1 none runs, 2 an error")
    add("bench", add_help=False).add_argument("bench_args", nargs=argparse.REMAINDER,
                                              help="options of python -m bench (sidecar bench --help)")
    watch = add("top")
    watch.add_argument("--url", help="the sidecar's URL (default: the shared sidecar, else the newest 'sidecar run')")
    watch.add_argument("--once", action="store_true", help="print the overview once, as plain text, and exit")
    if argv is None or not argv or argv[0] not in sub.choices:
        from . import cache_cmd, sessions_cmd, stats_cmd
        cache_cmd.add_parser(sub, common)
        sessions_cmd.add_parser(sub, common)
        stats_cmd.add_parsers(sub, common)
    for command_parser in sub.choices.values():
        _own(command_parser)
    return top


def _own(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    """Each (sub-)command's parser reports its own usage errors; sub-actions take --config after them too."""
    parser.set_defaults(own_parser=parser)   # the innermost parser's default wins
    if nested and "--config" not in parser._option_string_actions:   # SUPPRESS: unless given, the command's stays
        parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _own(child, nested=True)


def dispatch(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:   # every option after it belongs to python -m bench
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args, extra = parser(argv).parse_known_args(argv)
    if extra:
        args.own_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """The one place errors end: one line on stderr, exit status 2 (or the error's own, for a launch)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        try:
            return dispatch(argv)
        finally:
            sys.stdout.flush()   # a reader that went away shows here, not as a traceback at exit
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _reader_gone():
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the exit's own flush goes nowhere
            return 141
        print(f"sidecar: {describe(exc)}".replace("\n", " "), file=sys.stderr)
        return exc.status if isinstance(exc, FIXABLE) and isinstance(getattr(exc, "status", None), int) else 2


def _reader_gone() -> bool:
    """Whether stdout's reader went away (a pipe's read end closed), not some socket of ours."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


OS_HINTS = {errno.ENOENT: "check the path: the file, or the directory it goes in, must exist",
            errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
            errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (over quota)",
            errno.EISDIR: "give a file, not a directory", errno.EEXIST: "something else is in the way",
            errno.ENOTDIR: "a part of the path is a file, not a directory",
            errno.EROFS: "the file system is read-only: choose another place"}


def describe(exc: Exception) -> str:
    """The one-line message for an error: its own when it says what to do, else what failed and where."""
    if isinstance(exc, FIXABLE):
        return str(exc)
    if isinstance(exc, OSError):
        where = "".join(f"{name}: " for name in (exc.filename, exc.filename2) if name is not None)
        hint = OS_HINTS.get(exc.errno)
        return f"{where}{exc.strerror or exc}" + (f" ({hint})" if hint else "")
    import lmdb
    from agent_sidecar.proxy.store import StoreError   # imported here, not at start: it costs 30 ms
    if isinstance(exc, StoreError):
        return str(exc)
    if isinstance(exc, lmdb.Error):
        return (f"the state store failed: {exc}; move the state directory away (see [state] dir in 'sidecar config') "
                f"or remove it to start afresh")
    if sys.flags.dev_mode:
        raise exc
    ours = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).parent in PACKAGES]
    frame = (ours or traceback.extract_tb(exc.__traceback__))[-1]
    return (f"unexpected {type(exc).__name__}: {exc} (at {Path(frame.filename).name}:{frame.lineno}); this is a bug, "
            f"please report it ('python -X dev -m agent_sidecar.launcher ...' shows the traceback)")


PACKAGES = {Path(__file__).parent, Path(proxy.__file__).parent}   # where a bug's line is worth naming


if __name__ == "__main__":
    sys.exit(main())
