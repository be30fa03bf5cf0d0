"""Shared fixtures: an isolated environment, the mock LLM API, the proxy in-process and as `sidecar run`.

Only the LLM API is mocked (bench.mock_upstream); everything else is real: the
proxy serves on an ephemeral port, `sidecar run` runs as a real process tree.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_sidecar.bench.mock_upstream import MockUpstream
from agent_sidecar.proxy.app import make_app
from agent_sidecar.proxy.events import EventLog
from agent_sidecar.proxy.config import load_layers
from agent_sidecar.proxy.state import STATE

GENERIC_NAMES = ("proxy", "launcher", "bench")   # the folders, imported only as agent_sidecar.<name>


@pytest.fixture(autouse=True)
def imports_only_agent_sidecar():
    """No test imported the repository's folders under their bare names (a second copy of each module)."""
    yield
    stray = sorted(name for name in sys.modules if name.split(".")[0] in GENERIC_NAMES)
    assert not stray, f"imported under a bare name instead of agent_sidecar.*: {stray}"


ENV_PREFIXES = ("ANTHROPIC_", "OPENAI_", "SIDECAR_", "GOOGLE_GEMINI_", "GEMINI_", "OTEL_", "TRACEPARENT")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No test reads the user's keys/settings or writes to the real home; returns the state dir."""
    for var in list(os.environ):
        if var.startswith(ENV_PREFIXES) or var.lower() in PROXY_VARS:
            monkeypatch.delenv(var)
    state = tmp_path / "state"
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SIDECAR_STATE_DIR", str(state))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return state


@pytest.fixture
async def mock() -> MockUpstream:
    upstream = MockUpstream()
    await upstream.start("127.0.0.1", 0)
    try:
        yield upstream
    finally:
        await upstream.stop()


# ---- the proxy in-process ----------------------------------------------------------


def proxy_config(anthropic: str, openai: str, state_dir: Path, **sections: dict[str, Any]):
    """A config whose upstreams are `anthropic`/`openai`; `sections` add settings, e.g. proxy={...}."""
    layer: dict[str, dict[str, Any]] = {"upstream": {"anthropic": anthropic, "openai": openai, "gemini": anthropic},
                                        "state": {"dir": str(state_dir)}, **sections}
    return load_layers([layer], ["test"])


@pytest.fixture
def start_proxy(aiohttp_server, tmp_path: Path):
    """start_proxy(anthropic_url, openai_url, proxy={...}, ...) -> the proxy's base URL."""

    started = 0

    async def start(anthropic: str, openai: str, **sections: dict[str, Any]) -> str:
        nonlocal started
        started += 1  # each proxy its own state dir (its own LMDB environment)
        app = make_app(proxy_config(anthropic, openai, tmp_path / f"proxy-state-{started}", **sections))
        # TestServer cancels handlers whose client went away, as proxy.server does.
        server = await aiohttp_server(app, access_log=None)
        await app[STATE].settled()   # the price table loaded: a call's record is made the moment it ends
        return f"http://127.0.0.1:{server.port}"

    return start


@pytest.fixture
async def proxy_url(start_proxy, mock: MockUpstream) -> str:
    """The proxy in-process, its upstreams at the mock."""
    return await start_proxy(mock.url, mock.url + "/v1")


# ---- `sidecar` as a real process -----------------------------------------------------


@dataclass
class Done:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def err(self) -> str:
        return self.stderr.decode()


def upstream_env(mock: MockUpstream) -> dict[str, str]:
    """What points `sidecar run`/`serve` (or an agent run directly) at the mock."""
    return {"ANTHROPIC_BASE_URL": mock.url, "OPENAI_BASE_URL": mock.url + "/v1", "GOOGLE_GEMINI_BASE_URL": mock.url}


class Sidecar:
    """Runs `python -m agent_sidecar.launcher ...` (the `sidecar` command) in its own process group."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.procs: list[asyncio.subprocess.Process] = []

    async def spawn(self, *args: str, env: dict[str, str] | None = None, stdin: int | None = None,
                    program: tuple[str, ...] = (sys.executable, "-m", "agent_sidecar.launcher")) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *program, *args, env={**os.environ, **(env or {})}, cwd=self.cwd,
            stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        self.procs.append(proc)
        return proc

    async def run(self, *args: str, env: dict[str, str] | None = None, input: bytes | None = None,
                  timeout: float = 30.0, **kw: Any) -> Done:
        proc = await self.spawn(*args, env=env, stdin=asyncio.subprocess.PIPE if input is not None else None, **kw)
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        return Done(proc.returncode, out, err)

    async def serve(self, *args: str, env: dict[str, str] | None = None) -> str:
        """`sidecar serve` on a free port, once it serves: its URL (from the line it says so on stderr)."""
        server = await self.spawn("serve", *args, env=env)
        line = await asyncio.wait_for(server.stderr.readline(), 20)
        found = re.search(rb"serving on (http://127\.0\.0\.1:\d+)", line)
        assert found, line
        return found.group(1).decode()

    async def python(self, script: Path, env: dict[str, str] | None = None, timeout: float = 30.0) -> Done:
        """Run an agent script directly (no sidecar), for comparison."""
        return await self.run(str(script), env=env, timeout=timeout, program=(sys.executable,))

    async def cleanup(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await proc.wait()


@pytest.fixture
async def sidecar(tmp_path: Path) -> Sidecar:
    runner = Sidecar(tmp_path)
    try:
        yield runner
    finally:
        await runner.cleanup()


@pytest.fixture
def script(tmp_path: Path):
    """script(source, name) -> path of a Python file holding `source`."""

    def write(source: str, name: str = "agent.py") -> Path:
        path = tmp_path / name
        path.write_text(source)
        return path

    return write


def stop_process(proc: subprocess.Popen) -> None:
    """End a test's child process: terminate, then kill if it lingers; its stdout pipe closed."""
    if proc.stdout is not None:
        proc.stdout.close()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Bounded polling, for what no awaitable announces (state other processes or tasks change)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


_prompts = itertools.count()


def unique_prompt(tag: str = "") -> list[dict]:
    """A request no other call makes, so neither the cache nor single flight merges calls."""
    return [{"role": "user", "content": f"Question {next(_prompts)} {tag} {time.monotonic_ns()}"}]


# ---- the proxy in-process, any settings, its own state dir --------------------------------------


@dataclass
class AppProxy:
    server: Any           # aiohttp TestServer
    config: Any           # proxy.config.Config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def state(self):
        return self.server.app[STATE]

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    def agent(self, agent: str) -> str:
        return f"{self.url}/a/{agent}"

    async def get(self, path: str) -> tuple[int, Any, bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.get(self.url + path) as resp:
                return resp.status, resp.headers, await resp.read()

    async def limits(self) -> dict:
        status, _, body = await self.get("/_sidecar/limits")
        assert status == 200
        return json.loads(body)

    async def records(self) -> list[dict]:
        await self.state.records.drain()
        return list(self.state.records.read(0))

    def events(self) -> list[dict]:
        return list(EventLog(self.state_dir).read())


@pytest.fixture
def start_app(aiohttp_server, tmp_path: Path):
    """start_app(upstream_url, limits={...}, monitor={...}, ...) -> AppProxy with a state dir of its own."""
    count = itertools.count()

    async def start(upstream: str, **sections: dict[str, Any]) -> AppProxy:
        layer = {"upstream": {"anthropic": upstream, "openai": upstream + "/v1", "gemini": upstream},
                 "state": {"dir": str(tmp_path / f"app-state-{next(count)}")}, **sections}
        config = load_layers([layer], ["test"])
        proxy = AppProxy(await aiohttp_server(make_app(config), access_log=None), config)
        await proxy.state.settled()   # the price table loaded: a call's record is made the moment it ends
        return proxy

    return start
