"""`sidecar`: the command line. Each command's first docstring line is its help.

Errors the user can fix end here as one line, `sidecar: ...`, and exit status
2 (127/126 when the agent's command cannot be found or run, as shells do).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from proxy.config import Config, ConfigError, load, to_toml
from proxy.listen import ListenError

from .shared import SharedError
from .supervise import LaunchError

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
    if config.launcher.shared and not connect:
        from .shared import ensure_server
        connect = ensure_server(config)
    return run_agent(cmd, config, connect=connect)


@command
def cmd_serve(args: argparse.Namespace) -> int:
    """Run one standalone proxy in the foreground for several agents to share."""
    from proxy.listen import bind
    from proxy.server import run
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
    from proxy.config import load_layers
    from proxy.listen import bind
    from proxy.server import run
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
    import os
    os.execv(sys.executable, [sys.executable, "-m", "bench", *args.bench_args])   # its options are its own


@command
def cmd_demo(args: argparse.Namespace) -> int:
    """Run a small example agent through the sidecar against the built-in mock API."""
    from .demo import run_demo
    return run_demo(effective_config(args))


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="config file (default: $SIDECAR_CONFIG, else built-in defaults)")
    top = argparse.ArgumentParser(prog="sidecar", description="A sidecar for LLM agents: cache, limits, timings, checkpoints.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, **kw) -> argparse.ArgumentParser:
        doc = (COMMANDS[name].__doc__ or "").splitlines()[0]
        return sub.add_parser(name, parents=[common], help=doc, description=doc, **kw)

    run = add("run", usage="sidecar run [--config FILE] [--port N] [--connect URL] [--restore [SESSION]] -- CMD [ARGS...]")
    run.add_argument("--port", type=int, help="port for the embedded proxy (default: any free port)")
    run.add_argument("--connect", metavar="URL", help="attach to a running 'sidecar serve' instead of starting a proxy")
    run.add_argument("--cache", choices=["read-write", "read-only", "refresh", "off", "replay"], help="cache mode for this run")
    run.add_argument("--quiet", action="store_true", help="print no summary when the agent exits")
    run.add_argument("--shared", action="store_true",
                     help="join the user's shared sidecar (started in the background if none runs)")
    run.add_argument("--restore", metavar="SESSION", nargs="?", const="last",
                     help="continue a checkpointed conversation (an id from 'sidecar sessions list', or last)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the agent command, after --")

    serve = add("serve")
    serve.add_argument("--port", type=int, help="port to listen on (default: from config, else any free port)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--shared-server", type=int, metavar="FD", help=argparse.SUPPRESS)
    config = add("config")  # the flags run/serve take, so their effect on the config can be seen
    config.add_argument("--port", type=int, help="as for run/serve")
    config.add_argument("--host", help="as for serve")
    config.add_argument("--cache", choices=["read-write", "read-only", "refresh", "off", "replay"], help="as for run")
    add("demo")
    add("stop")
    add("status")
    add("bench", add_help=False).add_argument("bench_args", nargs=argparse.REMAINDER,
                                              help="options of python -m bench (sidecar bench --help)")
    watch = add("top")
    watch.add_argument("--url", help="the sidecar's URL (default: the shared sidecar, else the newest 'sidecar run')")
    watch.add_argument("--once", action="store_true", help="print the overview once, as plain text, and exit")
    from . import cache_cmd, sessions_cmd, stats_cmd
    cache_cmd.add_parser(sub, common)
    sessions_cmd.add_parser(sub, common)
    stats_cmd.add_parsers(sub, common)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:   # every option after it belongs to python -m bench
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, ListenError, LaunchError, SharedError) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return getattr(exc, "status", 2)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
