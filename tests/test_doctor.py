"""`sidecar doctor` as a real process: one line per check, a fix on each that fails, status 1 when something would
fail, nothing lasting started or created."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PY = sys.executable


def doctor(*args: str, cwd: Path, env: dict[str, str] | None = None):
    """Run it with no agent on the PATH unless `env` gives one (the real ones take seconds to say a version)."""
    env = {"PATH": str(cwd / "no-agents"), **(env or {})}
    return subprocess.run([PY, "-m", "agent_sidecar.launcher", "doctor", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def checks(done) -> dict[str, tuple[str, str]]:
    assert "Traceback" not in done.stdout + done.stderr and done.stderr == "", done.stderr
    rows = {}
    for line in done.stdout.split("\n\n")[0].splitlines():
        status, rest = line.split(None, 1)
        name, said = rest[:18].strip(), rest[18:].strip()
        rows[name] = (status, said)
    return rows


@pytest.fixture
def fake_agents(tmp_path) -> str:
    """A PATH with a `claude` that says its version, and nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    claude.write_text("#!/bin/sh\necho '9.9.9 (Claude Code)'\n")
    claude.chmod(0o755)
    return str(bin_dir)


async def test_a_sound_setup_passes_and_creates_nothing(mock, fake_agents, tmp_path, isolated_env):
    env = {"ANTHROPIC_BASE_URL": mock.url, "GOOGLE_GEMINI_BASE_URL": mock.url, "SIDECAR_UPSTREAM_OPENAI": mock.url + "/v1", "PATH": fake_agents}
    done = doctor(cwd=tmp_path, env=env)
    rows = checks(done)
    assert done.returncode == 0, done.stdout
    assert rows["upstream anthropic"][0] == "ok" and f"{mock.url} (from ANTHROPIC_BASE_URL)" in rows["upstream anthropic"][1]
    assert rows["upstream openai"][0] == "ok" and "(from SIDECAR_UPSTREAM_OPENAI)" in rows["upstream openai"][1]
    assert "accepts connections" in rows["upstream anthropic"][1]
    assert rows["state dir"][0] == "ok" and "free" in rows["state dir"][1]
    assert rows["store"][0] == "ok" and "none yet" in rows["store"][1] and "format 2" in rows["store"][1]
    assert rows["listen"][0] == "ok"
    assert rows["agent claude"][0] == "ok" and "(9.9.9 (Claude Code))" in rows["agent claude"][1]
    assert "ANTHROPIC_BASE_URL" in rows["agent claude"][1]
    assert rows["agent codex"][0] == "info" and "not on the PATH" in rows["agent codex"][1]
    assert done.stdout.rstrip().endswith("all checks passed")
    assert not isolated_env.exists()   # probed, not created


async def test_an_existing_store_shows_its_format(mock, tmp_path, isolated_env):
    from agent_sidecar.proxy.store import Lmdb
    Lmdb(isolated_env, map_size=64 << 20, writemap_within=1 << 30).close()   # the proxy's kind: a 16 MB map
    rows = checks(doctor("--offline", cwd=tmp_path))
    assert rows["store"][0] == "ok" and "format 2" in rows["store"][1] and rows["state dir"][0] == "ok"
    assert re.search(r"[\d.]+ KB in use, [\d.]+ (MB|KB) on disk", rows["store"][1]), rows["store"]   # pages, blocks


def test_what_would_fail_is_one_line_each_with_its_fix(tmp_path, isolated_env):
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        isolated_env.parent.mkdir(parents=True, exist_ok=True)
        isolated_env.write_text("not a directory")
        env = {"ANTHROPIC_BASE_URL": f"http://127.0.0.1:{refused.getsockname()[1]}",
               "SIDECAR_UPSTREAM_OPENAI": "api.openai.com/v1", "SIDECAR_PROXY_PORT": str(busy.getsockname()[1]),
               "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
        done = doctor(cwd=tmp_path, env=env)
    finally:
        refused.close()
        busy.close()
    rows = checks(done)
    assert done.returncode == 1
    assert rows["state dir"][0] == "FAIL" and "is a file" in rows["state dir"][1] and "fix:" in rows["state dir"][1]
    assert rows["upstream openai"][0] == "FAIL" and "not an http(s) URL" in rows["upstream openai"][1]
    assert rows["listen"][0] == "FAIL" and "already in use" in rows["listen"][1]
    assert rows["http proxy"][0] == "FAIL" and "fix: export NO_PROXY=127.0.0.1,localhost" in rows["http proxy"][1]
    assert "failing" in done.stdout.splitlines()[-1]


def test_a_refused_upstream_and_a_broken_config_say_what_to_fix(tmp_path):
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    try:
        config = tmp_path / "sidecar.toml"
        config.write_text(f'[upstream]\nanthropic = "http://127.0.0.1:{refused.getsockname()[1]}"\n')
        rows = checks(doctor("--config", str(config), cwd=tmp_path))
        broken = checks(doctor(cwd=tmp_path, env={"SIDECAR_CACHE_MOD": "off"}))
    finally:
        refused.close()
    status, said = rows["upstream anthropic"]
    assert status == "FAIL" and f"[upstream] anthropic in {config}" in said and "cannot connect" in said
    assert "fix: start the server it names, or set [upstream] anthropic" in said
    assert rows["config"] == ("ok", f"{config} parses")
    assert broken["config"][0] == "FAIL" and "SIDECAR_CACHE_MOD is not a setting" in broken["config"][1]


def test_a_store_of_another_format_is_a_failure(tmp_path, isolated_env):
    from agent_sidecar.proxy.store import Lmdb
    store = Lmdb(isolated_env, map_size=64 << 20)
    store.write_now(lambda txn: txn.put(b"format", b"99", db=store.db["meta"]))
    store.close()
    done = doctor("--offline", cwd=tmp_path)
    status, said = checks(done)["store"]
    assert done.returncode == 1 and status == "FAIL" and "format '99'" in said and "sidecar cache clear" in said


def test_redis_unreachable_is_a_failure(tmp_path):
    pytest.importorskip("redis")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        env = {"SIDECAR_STATE_BACKEND": "redis", "SIDECAR_STATE_REDIS_URL": f"redis://127.0.0.1:{closed.getsockname()[1]}/0"}
        status, said = checks(doctor("--offline", cwd=tmp_path, env=env))["redis"]
    finally:
        closed.close()
    assert status == "FAIL" and "does not answer" in said and "[state] redis_url" in said
