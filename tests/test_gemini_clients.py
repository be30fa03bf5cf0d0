"""The real Gemini clients through `sidecar run`, against the mock: the google-genai SDK and the Gemini CLI.

For each, with the usual command: the output is the same as a direct run
against the mock, the first run's calls reached the mock through the sidecar,
and a second identical run sends the mock nothing. The Gemini CLI (npm
@google/gemini-cli, skipped where it is not installed) runs with a temporary
HOME, so the user's ~/.gemini is never touched, and non-interactively with a
tool call: the mock answers a functionCall, the CLI runs the tool and sends
its functionResponse.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import upstream_env
from agent_sidecar.launcher import gemini_cli

PY = sys.executable
GEMINI = shutil.which("gemini")
KEY = "test-gemini-key-not-real"

SDK_AGENT = r'''
from google import genai
client = genai.Client()   # GEMINI_API_KEY and GOOGLE_GEMINI_BASE_URL from the environment
answer = client.models.generate_content(model="gemini-2.5-flash", contents="Tell me about the river Ouse.")
print("json:", answer.text, answer.usage_metadata.candidates_token_count)
chunks = client.models.generate_content_stream(model="gemini-2.5-flash", contents="Tell me about the river Exe.")
print("stream:", [(c.text, c.candidates[0].finish_reason) for c in chunks])
'''


async def timed(run, *args, **kw):
    start = time.monotonic()
    done = await run(*args, **kw)
    return done, time.monotonic() - start


async def three_runs(sidecar, mock, command: list[str], env: dict, timeout: float, program=None):
    """Direct, through the sidecar, and through it again: (runs, mock calls of each, wall times)."""
    calls, runs, walls = [], [], []
    for through in (False, True, True):
        before = mock.count()
        if through:
            done, wall = await timed(sidecar.run, "run", "--quiet", "--", *command, env=env, timeout=timeout)
        else:
            done, wall = await timed(sidecar.run, *command[1:], env=env, timeout=timeout, program=(command[0],))
        assert done.returncode == 0, done.err
        runs.append(done)
        calls.append(mock.count() - before)
        walls.append(round(wall, 2))
    print(f"\n{Path(command[0]).name}: mock calls direct/first/second {calls}, wall s {walls}")
    return runs, calls


async def sidecar_records(sidecar, env: dict) -> list[dict]:
    done = await sidecar.run("stats", "--json", "--by", "route", env=env)
    assert done.returncode == 0, done.err
    return json.loads(done.out)


@pytest.mark.timeout(120)
async def test_google_genai_sdk_through_sidecar_run(sidecar, script, mock):
    env = {**upstream_env(mock), "GEMINI_API_KEY": KEY}
    agent = str(script(SDK_AGENT))
    (direct, first, second), calls = await three_runs(sidecar, mock, [PY, agent], env, 60)
    assert direct.out.startswith("json: ") and "STOP" in direct.out
    assert first.out == direct.out and second.out == direct.out
    assert calls == [2, 2, 0]
    stats = await sidecar_records(sidecar, env)   # the first run's calls went through the sidecar
    routes = stats["groups"]
    assert routes["/v1/models/gemini-2.5-flash:generateContent"]["calls"] == 2
    assert routes["/v1/models/gemini-2.5-flash:streamGenerateContent"]["calls"] == 2
    assert stats["all"]["calls"] == 4 and stats["all"]["hits"] == 2
    seen = [r for r in mock.received if r.path.endswith(":generateContent")]
    assert seen[-1].headers["x-goog-api-key"] == KEY


def gemini_env(mock, home: Path) -> dict[str, str]:
    """The Gemini CLI on a Gemini API key, offline, in a temporary HOME; its settings as the auth dialog
    leaves them for "Use Gemini API key" (with GOOGLE_GEMINI_BASE_URL alone, 0.61 refuses to run headless)."""
    (home / ".gemini").mkdir(parents=True)
    (home / ".gemini" / "settings.json").write_text(json.dumps({
        "security": {"auth": {"selectedType": "gemini-api-key"}},
        "privacy": {"usageStatisticsEnabled": False}, "general": {"disableAutoUpdate": True}}))
    return {**upstream_env(mock), "HOME": str(home), "GEMINI_API_KEY": KEY, "GEMINI_CLI_TRUST_WORKSPACE": "true",
            "NO_COLOR": "1"}


@pytest.mark.skipif(GEMINI is None, reason="the Gemini CLI is not installed (npm i -g @google/gemini-cli)")
@pytest.mark.timeout(240)
async def test_gemini_cli_with_a_tool_call_through_sidecar_run(sidecar, mock, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("the river bends twice\n")
    sidecar.cwd = workdir
    env = gemini_env(mock, tmp_path / "home")
    command = [GEMINI, "-p", "please use a tool glob to look around"]
    (direct, first, second), calls = await three_runs(sidecar, mock, command, env, 90)
    assert direct.out.strip()
    assert first.out == direct.out and second.out == direct.out
    # Per prompt: the router's generateContent, the turn that calls the tool, the turn after its response.
    assert calls[0] == calls[1] >= 3 and calls[2] == 0, calls
    turns = [r for r in mock.received if r.path.endswith(":streamGenerateContent")]
    assert any("functionResponse" in part for turn in turns for content in turn.json["contents"]
               for part in content["parts"]), "the CLI never sent a tool's response"
    stats = await sidecar_records(sidecar, env)
    assert stats["all"]["calls"] == 2 * calls[0] and stats["all"]["hits"] == calls[0]


def test_the_gemini_cli_keeps_the_api_key_auth_it_would_have_picked(tmp_path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setattr(gemini_cli, "secure", lambda path: True)   # tmp_path lies under the world-writable /tmp
    assert gemini_cli.agent_env({"GEMINI_API_KEY": KEY}, state) == {
        "GEMINI_CLI_SYSTEM_DEFAULTS_PATH": str(state / "gemini-cli-defaults.json")}
    written = state / "gemini-cli-defaults.json"
    assert json.loads(written.read_text()) == {"security": {"auth": {"selectedType": "gemini-api-key"}}}
    assert written.stat().st_mode & 0o777 == 0o600
    for own in ({}, {"GEMINI_API_KEY": KEY, "GOOGLE_GEMINI_BASE_URL": "http://gateway"},   # already a gateway user
                {"GEMINI_API_KEY": KEY, "GOOGLE_GENAI_USE_VERTEXAI": "true"},
                {"GEMINI_API_KEY": KEY, "GEMINI_CLI_SYSTEM_DEFAULTS_PATH": "/etc/mine.json"}):
        assert gemini_cli.agent_env(own, state) == {}, own
    monkeypatch.undo()
    assert not gemini_cli.secure(tmp_path)   # the CLI would skip the file here (and warn): so nothing is set
    assert gemini_cli.agent_env({"GEMINI_API_KEY": KEY}, tmp_path / "other") == {}
