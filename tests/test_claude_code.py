"""Claude Code (the real CLI from npm) through `sidecar run`, against the mock API.

Skipped where `claude` is not installed (CI installs @anthropic-ai/claude-code).
Claude Code is kept offline: nonessential traffic off, HOME in tmp_path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import upstream_env

CLAUDE = shutil.which("claude")
pytestmark = pytest.mark.skipif(CLAUDE is None, reason="Claude Code is not installed (npm i -g @anthropic-ai/claude-code)")


def claude_env(mock, home: Path) -> dict[str, str]:
    return {**upstream_env(mock), "HOME": str(home), "ANTHROPIC_API_KEY": "sk-ant-test-key-not-real",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1"}


@pytest.mark.timeout(120)
async def test_claude_code_answer_is_unchanged_and_repeated_prompt_is_a_hit(sidecar, mock, tmp_path):
    mock.profile.validate = False   # Claude Code sends a mid-conversation "system" role the strict mock refuses
    workdir = tmp_path / "work"
    workdir.mkdir()
    sidecar.cwd = workdir
    env = claude_env(mock, tmp_path / "home")
    direct = await sidecar.run("-p", "say hi", env=env, program=(CLAUDE,), timeout=60)
    assert direct.returncode == 0, direct.err
    direct_calls = mock.count("/v1/messages")
    assert direct_calls == 1

    through = await sidecar.run("run", "--quiet", "--", CLAUDE, "-p", "say hi", env=env, timeout=60)
    assert through.returncode == 0, through.err
    assert through.out == direct.out                          # the agent's answer, byte for byte
    assert through.err == ""                                  # the sidecar said nothing
    assert mock.count("/v1/messages") == direct_calls + 1     # it went upstream, through the proxy
    sent = [r for r in mock.received if r.path == "/v1/messages"][-1]
    assert sent.query == "beta=true" and sent.json["stream"] is True
    assert sent.headers.get("x-api-key") == "sk-ant-test-key-not-real"

    again = await sidecar.run("run", "--quiet", "--", CLAUDE, "-p", "say hi", env=env, timeout=60)
    assert again.returncode == 0, again.err
    assert again.out == direct.out
    # Only the session id changed between the runs, and it is not part of the key: a cache hit.
    assert mock.count("/v1/messages") == direct_calls + 1
