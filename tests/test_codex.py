"""Codex CLI (the real binary from npm) through `sidecar run`, against the mock API's Responses socket.

Skipped where `codex` is not installed (CI installs @openai/codex). Codex runs
with its default transport (the Responses WebSocket, a `generate: false`
warm-up, then each turn naming the last answer), HOME and CODEX_HOME in
tmp_path, an API key in CODEX_API_KEY: no user state is read or written.
The direct run is pointed at the mock the way a user would: `-c openai_base_url`.
How the launcher repoints Codex (launcher/codex.py) is tested without it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from agent_sidecar.launcher import codex

CODEX = shutil.which("codex")
needs_codex = pytest.mark.skipif(CODEX is None, reason="Codex CLI is not installed (npm i -g @openai/codex)")
EXEC = ("exec", "--skip-git-repo-check")


@pytest.fixture
def codex_env(tmp_path: Path, sidecar) -> dict[str, str]:
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    workdir = tmp_path / "work"
    workdir.mkdir()
    sidecar.cwd = workdir   # the same working directory for every run: it is in Codex's prompt
    return {"HOME": str(home), "CODEX_HOME": str(home / ".codex"), "CODEX_API_KEY": "sk-test-codex-not-real"}


async def timed(sidecar, *args: str, env: dict, program=None):
    start = time.monotonic()
    done = await sidecar.run(*args, env=env, timeout=90, **({"program": program} if program else {}))
    return done, time.monotonic() - start


async def direct_and_through(sidecar, mock, env: dict, prompt: str):
    """A direct run, then two identical runs through the sidecar: what each printed and sent."""
    direct, t_direct = await timed(sidecar, "-c", f'openai_base_url="{mock.url}/v1"', *EXEC, prompt,
                                   env=env, program=(CODEX,))
    assert direct.returncode == 0, direct.err
    sent_direct = mock.socket_requests
    through_env = {**env, "OPENAI_BASE_URL": mock.url + "/v1"}   # the sidecar's upstream; Codex never reads it
    runs = []
    for _ in range(2):
        before, total = mock.socket_requests, mock.count()
        through, took = await timed(sidecar, "run", "--quiet", "--", CODEX, *EXEC, prompt, env=through_env)
        assert through.returncode == 0, through.err
        runs.append((through, mock.socket_requests - before, mock.count() - total, took))
    print(f"\ncodex exec {prompt!r}: direct {t_direct:.2f} s ({sent_direct} requests); " + "; ".join(
        f"through #{i + 1} {took:.2f} s ({sent} requests, {connects} upgrades)"
        for i, (_, sent, connects, took) in enumerate(runs)))
    return direct, sent_direct, runs


@needs_codex
@pytest.mark.timeout(300)
async def test_codex_exec_through_the_sidecar_then_from_the_cache(sidecar, mock, codex_env):
    direct, sent_direct, [(first, sent_first, _, _), (second, sent_second, connects_second, _)] = \
        await direct_and_through(sidecar, mock, codex_env, "say hi")
    assert sent_direct == 2                     # the warm-up and the turn, on the socket
    assert first.out == direct.out != ""        # the answer, byte for byte
    assert sent_first == 2                      # Codex's own config never named the mock: the sidecar sent them
    assert "Falling back" not in first.err and "Reconnecting" not in first.err   # the socket worked at once
    created = [m for m in mock.socket_messages if m.get("type") == "response.create"][-2:]
    assert created[0]["generate"] is False and created[1]["previous_response_id"]
    assert second.out == direct.out
    assert sent_second == 0 and connects_second == 0   # every answer from the cache: no upstream socket at all
    assert "Falling back" not in second.err and "Reconnecting" not in second.err
    stats = await sidecar.run("stats", "--json", "--by", "route")   # the sidecar's own records of both runs
    assert stats.returncode == 0, stats.err
    responses = json.loads(stats.out)["groups"]["/v1/responses"]
    assert (responses["calls"], responses["hits"]) == (4, 2)
    assert responses["input_tokens"] > 0


@needs_codex
@pytest.mark.timeout(300)
async def test_codex_exec_with_a_tool_call(sidecar, mock, codex_env):
    direct, sent_direct, [(first, sent_first, _, _), (second, sent_second, _, _)] = \
        await direct_and_through(sidecar, mock, codex_env, "use a tool")
    assert sent_direct == 3                     # warm-up, the turn that calls the tool, the turn after its output
    calls = [m for m in mock.socket_messages if any(i.get("type") == "custom_tool_call_output"
                                                     for i in m.get("input", ()))]
    assert calls, "Codex ran no tool"
    assert first.out == direct.out != ""
    assert second.out == direct.out
    # The turn before the tool's output is a hit; the one after may miss (Codex's tool output is its own):
    # then it goes up whole, since the upstream never saw the answer it builds on.
    assert sent_second <= 1
    assert "previous_response_not_found" not in second.err


@needs_codex
@pytest.mark.timeout(300)
async def test_codex_with_its_own_base_url_keeps_it_and_its_config(sidecar, mock, codex_env, tmp_path):
    """The user's openai_base_url (config.toml) is where the sidecar sends the calls; the file is left as it was."""
    config = Path(codex_env["CODEX_HOME"]) / "config.toml"
    config.write_text(f'# mine\nopenai_base_url = "{mock.url}/v1"\n')
    before = config.read_bytes()
    for expected in (2, 0):   # no OPENAI_BASE_URL: the upstream is the one Codex's config names
        count = mock.socket_requests
        done = await sidecar.run("run", "--quiet", "--", CODEX, *EXEC, "say hi", env=codex_env, timeout=90)
        assert done.returncode == 0, done.err
        assert mock.socket_requests - count == expected   # the second from the cache: through the sidecar
    assert config.read_bytes() == before
    assert not (Path(codex_env["CODEX_HOME"]) / "auth.json").exists()


# ---- how the launcher repoints Codex -------------------------------------------------------------

BASE = "http://127.0.0.1:4321"
OVERRIDE = ["-c", 'openai_base_url="http://127.0.0.1:4321/v1"']


def test_other_commands_are_left_alone(tmp_path):
    assert codex.repoint(["claude", "-p", "hi"], BASE, {"HOME": str(tmp_path)}, True) == (["claude", "-p", "hi"],
                                                                                          None, ())


def test_codex_gets_the_base_url_as_a_config_override(tmp_path):
    env = {"HOME": str(tmp_path)}
    launch = codex.repoint(["/usr/bin/codex", "exec", "hi"], BASE, env, own_proxy=True)
    assert launch.cmd == ["/usr/bin/codex", *OVERRIDE, "exec", "hi"]
    assert launch.upstream is None and launch.ignore_fields == ("input[*].id",)
    shared = codex.repoint(["codex", "exec", "hi"], BASE, env, own_proxy=False)
    assert shared.cmd == ["codex", *OVERRIDE, "exec", "hi"] and shared.ignore_fields == ()


@pytest.mark.parametrize("given", [["-c", "openai_base_url=https://gw.example/v1"],
                                   ["--config", 'openai_base_url="https://gw.example/v1"'],
                                   ["--config=openai_base_url=https://gw.example/v1"]])
def test_the_users_own_base_url_becomes_the_upstream(tmp_path, given):
    launch = codex.repoint(["codex", "exec", *given, "hi"], BASE, {"HOME": str(tmp_path)}, own_proxy=True)
    assert launch.cmd == ["codex", *OVERRIDE, "exec", "hi"]
    assert launch.upstream == "https://gw.example/v1"


def test_config_toml_is_read_where_codex_reads_it(tmp_path):
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text('openai_base_url = "https://gw.example/v1"\n')
    env = {"HOME": str(tmp_path), "CODEX_HOME": str(home)}
    assert codex.repoint(["codex", "exec", "hi"], BASE, env, own_proxy=True).upstream == "https://gw.example/v1"
    # a shared sidecar has its own upstream: Codex then goes where its config says, as without the sidecar
    assert codex.repoint(["codex", "exec", "hi"], BASE, env, own_proxy=False).cmd == ["codex", "exec", "hi"]


@pytest.mark.parametrize("files, env, repointed", [
    ({"auth.json": '{"auth_mode": "chatgpt", "tokens": {"id_token": "x"}}'}, {}, False),
    ({"auth.json": '{"auth_mode": "chatgpt"}'}, {"CODEX_API_KEY": "sk-x"}, True),   # the key wins
    ({"auth.json": '{"auth_mode": "apikey", "OPENAI_API_KEY": "sk-x"}'}, {}, True),
    ({"auth.json": '{"OPENAI_API_KEY": null, "tokens": {"id_token": "x"}}'}, {}, False),   # an older Codex's file
    ({"config.toml": 'model_provider = "ollama"\n'}, {}, False),
    ({}, {}, True),
])
def test_what_is_left_alone(tmp_path, files, env, repointed):
    home = tmp_path / ".codex"
    home.mkdir()
    for name, text in files.items():
        (home / name).write_text(text)
    launch = codex.repoint(["codex", "exec", "hi"], BASE, {"HOME": str(tmp_path), **env}, own_proxy=True)
    assert (launch.cmd != ["codex", "exec", "hi"]) is repointed
