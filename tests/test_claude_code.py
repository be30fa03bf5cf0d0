"""Claude Code (the real CLI from npm) through `sidecar run`, against the mock API.

Skipped where `claude` is not installed (CI installs @anthropic-ai/claude-code).
Claude Code is kept offline: nonessential traffic off, HOME in tmp_path.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import upstream_env
from agent_sidecar.proxy.config import load_layers
from agent_sidecar.proxy.records import RecordLog
from agent_sidecar.proxy.store import open_lmdb
from test_costs import price

CLAUDE = shutil.which("claude")
pytestmark = pytest.mark.skipif(CLAUDE is None, reason="Claude Code is not installed (npm i -g @anthropic-ai/claude-code)")


def claude_env(mock, home: Path) -> dict[str, str]:
    return {**upstream_env(mock), "HOME": str(home), "ANTHROPIC_API_KEY": "sk-ant-test-key-not-real",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1"}


def message_records(state_dir: Path) -> list[dict]:
    """The Messages API call records the sidecar kept in `state_dir`, oldest first."""
    lmdb_env = open_lmdb(load_layers([{"state": {"dir": str(state_dir)}}], ["test"]))
    try:
        return [r for r in RecordLog(lmdb_env, 1000).read(0) if r["route"] == "/v1/messages"]
    finally:
        lmdb_env.close()


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


@pytest.mark.timeout(180)
async def test_claude_code_usage_and_dollars_are_exact_per_call_and_per_session(sidecar, mock, tmp_path,
                                                                               isolated_env):
    """Claude Code marks its tools, system prompt and newest turn for caching: two sessions with other prompts
    share the prefix, so the second reads what the first wrote; every count and dollar is as the mock sent it."""
    mock.profile.validate = False
    workdir = tmp_path / "work"
    workdir.mkdir()
    sidecar.cwd = workdir
    env = claude_env(mock, tmp_path / "home")
    for prompt in ("say hi", "say bye"):
        done = await sidecar.run("run", "--quiet", "--", CLAUDE, "-p", prompt, env=env, timeout=60)
        assert done.returncode == 0, done.err
    records = message_records(isolated_env)
    assert [r["usage"] for r in records] == mock.sent_usage and len(records) == 2
    first, second = mock.sent_usage
    assert first["cache_creation_input_tokens"] > 0 and second["cache_read_input_tokens"] > 0
    for record, sent in zip(records, mock.sent_usage):
        assert record["cache_read_tokens"] == sent["cache_read_input_tokens"]
        assert record["cache_write_tokens"] == sent["cache_creation_input_tokens"]
        assert record["input_tokens"] == (sent["input_tokens"] + sent["cache_read_input_tokens"] +
                                          sent["cache_creation_input_tokens"])
        assert record["cost_usd"] == pytest.approx(float(price("anthropic", record["model"], sent)), abs=1e-9)

    table = await sidecar.run("stats", "--by", "session", "--json", env=env)
    groups = json.loads(table.stdout)["groups"]
    assert len({r["session"] for r in records}) == 2
    for record in records:
        assert groups[record["session"]]["cost_usd"] == record["cost_usd"]
        assert groups[record["session"]]["prompt_cache_ratio"] == round(record["cache_read_tokens"] /
                                                                        record["input_tokens"], 4)


@pytest.mark.timeout(180)
async def test_claude_code_past_its_budget_is_refused_once_and_does_not_retry(sidecar, mock, tmp_path, isolated_env):
    """One sidecar, two prompts: the first spends the whole (tiny) budget, the second is refused with a 402 that
    Claude Code reports and does not send again."""
    mock.profile.validate = False
    workdir = tmp_path / "work"
    workdir.mkdir()
    sidecar.cwd = workdir
    env = {**claude_env(mock, tmp_path / "home"), "SIDECAR_LIMITS_BUDGET_USD": "total=0.0001"}
    both = f"{shlex.quote(CLAUDE)} -p 'say hi'; {shlex.quote(CLAUDE)} -p 'say bye'"
    done = await sidecar.run("run", "--quiet", "--", "sh", "-c", both, env=env, timeout=120)
    assert done.returncode != 0                       # the second prompt failed, as Claude Code reports an API error
    assert "total budget is spent" in done.out + done.err
    assert mock.count("/v1/messages") == 1            # the refused prompt never reached the upstream
    records = message_records(isolated_env)
    assert [r["status"] for r in records] == [200, 402]   # and it did not try again
