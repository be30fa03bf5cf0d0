"""`sidecar doctor`: checks a user can run to see why things do not work, one line each, with the fix.

Nothing lasting is started: the config is loaded, the state directory probed
with a temporary file, the store opened read-only, each upstream resolved and
connected to (and closed), Redis pinged, the agents' own `--version` run.
Exit status 0 when nothing would fail, 1 when something would.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent_sidecar.proxy import __version__
from agent_sidecar.proxy.config import PROXY_VARIABLES, Config, ConfigError, load

from .summary import human_bytes
from .terminal import clean

# Known agents: how `sidecar run` points each at the sidecar (or why it cannot).
AGENTS = {
    "claude": "ANTHROPIC_BASE_URL=<sidecar>/a/<id> (Claude Code reads it)",
    "codex": "codex -c openai_base_url=<sidecar>/a/<id>/v1 (Codex reads its base URL only from its config; "
             "launcher/codex.py adds the override, the user's ~/.codex untouched)",
    "gemini": "GOOGLE_GEMINI_BASE_URL=<sidecar>/a/<id> (the Gemini CLI reads it)",
}
UPSTREAM_VARIABLES = {"anthropic": ("SIDECAR_UPSTREAM_ANTHROPIC", "ANTHROPIC_BASE_URL"),
                      "openai": ("SIDECAR_UPSTREAM_OPENAI", "OPENAI_BASE_URL"),
                      "gemini": ("SIDECAR_UPSTREAM_GEMINI", "GOOGLE_GEMINI_BASE_URL")}


@dataclass
class Check:
    status: str          # ok | warn | FAIL | info
    name: str
    said: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:4}  {self.name:18} {self.said}" + (f"; fix: {self.fix}" if self.fix else "")


def run(args: argparse.Namespace) -> int:
    checks = list(diagnose(args.config, os.environ, connect=not args.offline))
    for check in checks:
        print(clean(check.line()))
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    print(f"\n{failed} failing, {warned} to look at" if failed or warned else "\nall checks passed")
    return 1 if failed else 0


def diagnose(path: str | None, environ, connect: bool = True):
    yield Check("info", "sidecar", f"{__version__} on Python {platform.python_version()} ({sys.executable})")
    source = path or environ.get("SIDECAR_CONFIG") or ""
    try:
        config = load(path, environ)
    except ConfigError as exc:
        yield Check("FAIL", "config", str(exc), "correct it; 'sidecar config' shows the effective settings")
        config = load(None, {k: v for k, v in environ.items() if not k.startswith("SIDECAR_")})
    else:
        yield Check("ok", "config", f"{source} parses" if source else "built-in defaults (no --config, no "
                                                                      "$SIDECAR_CONFIG)")
    if environ.get("SIDECAR_URL"):
        yield Check("info", "inside a run", f"this shell runs behind the sidecar at {environ['SIDECAR_URL']}: "
                                            f"the base URLs below may be the sidecar's own")
    for api in UPSTREAM_VARIABLES:
        yield from upstream_checks(config, api, source, environ, connect)
    yield from state_checks(config)
    yield from listen_checks(config)
    yield from proxy_variable_checks(environ)
    yield from agent_checks(environ)


def upstream_checks(config: Config, api: str, source: str, environ, connect: bool):
    url = getattr(config.upstream, api)
    name = f"upstream {api}"
    own, base = UPSTREAM_VARIABLES[api]
    where = own if environ.get(own) else base if environ.get(base) else f"[upstream] {api} in {source}" \
        if source and f"{api}" in _file_keys(source, "upstream") else "the default"
    setting = f"[upstream] {api} (or {own} / {base})"
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        host = port = None
    if parts.scheme not in ("http", "https") or not host:
        yield Check("FAIL", name, f"{url!r} (from {where}) is not an http(s) URL", f"set {setting}")
        return
    said = f"{url} (from {where})"
    if not connect:
        yield Check("ok", name, said + ", not contacted (--offline)")
        return
    if any(environ.get(v) for v in PROXY_VARIABLES):
        yield Check("info", name, said + ", reached through the HTTP(S) proxy set in the environment; "
                                         "not contacted directly")
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        yield Check("FAIL", name, f"{said}: {host} does not resolve ({exc.strerror})",
                    f"check the name and the network, or set {setting}")
        return
    family, kind, proto, _, address = addresses[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(3)
            sock.connect(address)
    except OSError as exc:
        yield Check("FAIL", name, f"{said}: cannot connect to {host}:{port} ({exc.strerror or exc})",
                    f"start the server it names, or set {setting}")
        return
    yield Check("ok", name, said + f", {host}:{port} accepts connections")


def _file_keys(path: str, section: str) -> set[str]:
    from agent_sidecar.proxy.config import read_file
    try:
        doc = read_file(path).get(section, {})
    except ConfigError:
        return set()
    return set(doc) if isinstance(doc, dict) else set()


def state_checks(config: Config):
    state_dir = config.state_dir
    probe = state_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent   # where it would be created
    if probe.exists() and not probe.is_dir():
        yield Check("FAIL", "state dir", f"{probe} is a file, not a directory",
                    "move it away, or set [state] dir / SIDECAR_STATE_DIR elsewhere")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".sidecar-doctor-"):
            pass
    except OSError as exc:
        yield Check("FAIL", "state dir", f"{state_dir}: cannot write in {probe} ({exc.strerror})",
                    "fix its permissions, or set [state] dir / SIDECAR_STATE_DIR elsewhere")
        return
    free = shutil.disk_usage(probe).free
    limit = int(config.cache.max_size_mb * 1024 * 1024)
    said = f"{state_dir} {'writable' if probe == state_dir else f'(created on first use in {probe})'}, " \
           f"{human_bytes(free)} free"
    if free < limit:
        yield Check("warn", "state dir", f"{said}, less than [cache] max_size_mb ({human_bytes(limit)})",
                    "free disk space, or lower [cache] max_size_mb")
    else:
        yield Check("ok", "state dir", said)
    yield store_check(state_dir)
    if config.state.backend == "redis":
        yield redis_check(config)


def store_check(state_dir: Path) -> Check:
    import lmdb
    from agent_sidecar.proxy.migrations import CURRENT
    from agent_sidecar.proxy.reserve import extent
    from agent_sidecar.proxy.store import FIX
    data = state_dir / "lmdb" / "data.mdb"
    if not data.exists():
        return Check("ok", "store", f"none yet ({data} is made on the first run; format {CURRENT})")
    try:
        env = lmdb.open(str(data.parent), readonly=True, lock=False, max_dbs=16)
        try:
            with env.begin() as txn:
                meta = env.open_db(b"meta", txn=txn, create=False)
                found = txn.get(b"format", db=meta)
            in_use = extent(env)
        finally:
            env.close()
    except lmdb.Error as exc:
        return Check("FAIL", "store", f"{data} cannot be read ({exc})", FIX.format(dir=data.parent))
    version = int(found) if found and found.isdigit() else None
    if version is None or version > CURRENT:
        shown = found.decode(errors="replace")[:20] if found else "none"
        return Check("FAIL", "store", f"{data} has format {shown!r}, this sidecar reads {CURRENT} (and upgrades older)",
                     FIX.format(dir=data.parent))
    upgrade = f" (the next run upgrades it to format {CURRENT})" if version < CURRENT else ""
    # in use, and on disk: a writemap store's whole map is allocated (proxy/reserve.py)
    return Check("ok", "store", f"{data}, format {version}{upgrade}, {human_bytes(in_use)} in use, "
                                f"{human_bytes(data.stat().st_blocks * 512)} on disk")


def redis_check(config: Config) -> Check:
    url = config.state.redis_url
    try:
        import redis
    except ImportError:
        return Check("FAIL", "redis", "[state] backend = \"redis\" but the Redis client is not installed",
                     "pip install 'agent-sidecar[redis]'")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        return Check("FAIL", "redis", f"{url} does not answer ({exc})",
                     "start Redis there, or set [state] redis_url / SIDECAR_STATE_REDIS_URL")
    return Check("ok", "redis", f"{url} answers")


def listen_checks(config: Config):
    from agent_sidecar.proxy.listen import ListenError, bind
    host, port = config.proxy.host, config.proxy.port
    try:
        bind(host, port, config.proxy.allow_remote).close()
    except ListenError as exc:
        yield Check("FAIL", "listen", str(exc), "")
        return
    yield Check("ok", "listen", f"{host}:{port or 'any free port'} can be bound")


def proxy_variable_checks(environ):
    """An HTTP proxy the agents' SDKs would send their calls to the sidecar through."""
    proxies = [v for v in PROXY_VARIABLES if environ.get(v)]
    if not proxies:
        return
    no_proxy = ",".join(environ.get(v, "") for v in ("NO_PROXY", "no_proxy")).replace(" ", "").split(",")
    if not {"127.0.0.1", "localhost", "*"} & set(no_proxy):
        yield Check("FAIL", "http proxy", f"{', '.join(proxies)} set and NO_PROXY does not name 127.0.0.1: the "
                                          f"agents' SDKs would send their calls to the sidecar through that proxy",
                    "export NO_PROXY=127.0.0.1,localhost")
    else:
        yield Check("ok", "http proxy", f"{', '.join(proxies)} set; NO_PROXY keeps 127.0.0.1 direct")


def agent_checks(environ):
    path = environ.get("PATH", os.defpath)
    found = {name: shutil.which(name, path=path) for name in AGENTS}
    with ThreadPoolExecutor(len(AGENTS)) as pool:   # a node CLI can take seconds to say its version
        versions = dict(zip(found, pool.map(lambda program: program and _version(program), found.values())))
    for name, how in AGENTS.items():
        if found[name] is None:
            yield Check("info", f"agent {name}", f"not on the PATH (sidecar run would set {how.split(';')[0]})")
            continue
        status = "warn" if "bypass" in how else "ok"
        yield Check(status, f"agent {name}", f"{found[name]} {versions[name]}: {how}")


def _version(program: str) -> str:
    try:
        done = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=5,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(--version failed: {exc})"
    text = (done.stdout or done.stderr).strip().splitlines()
    return f"({text[0][:60]})" if text else ""
