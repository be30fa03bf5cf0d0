"""Figures that are true: an agent's peak memory is the figure /usr/bin/time gives (wait4 for `sidecar run`'s
child, VmHWM over the tree for an attached agent), an attached agent's exit has its status, a session's turns
are its answers, the summary adds up and names restarts, an agent's id is the same run after run."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from conftest import upstream_env
from agent_sidecar.launcher.summary import event_words, format_summary
from agent_sidecar.proxy.config import MonitorSection
from agent_sidecar.proxy.events import EventLog
from agent_sidecar.proxy.monitor import Agent, Monitor, high_water_mark

PY = sys.executable
MB = 1 << 20

# Holds about 160 MB in a child it waits for (wait4 counts reaped descendants, as /usr/bin/time does), then
# about 120 MB itself, makes one call and exits with status 3.
HUNGRY = r'''
import os, subprocess, sys, anthropic
subprocess.run([sys.executable, "-c", "b = b'x' * (160 << 20)"], check=True)
held = b"y" * (120 << 20)
anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, timeout=20).messages.create(
    model="claude-mock-1", max_tokens=8, messages=[{"role": "user", "content": "how much memory?"}])
print("id", os.environ.get("SIDECAR_AGENT_ID"), flush=True)
sys.exit(3)
'''

SUMMARY_PEAK = re.compile(r"agent peak RSS (\d+) MB")


def time_peak(script: Path, env: dict) -> int:
    """/usr/bin/time's maximum resident set size of the script run directly, in bytes. (Run it in a thread:
    the mock it calls serves on the test's own loop.)"""
    done = subprocess.run(["/usr/bin/time", "-f", "TIME %M", PY, str(script)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 3, done.stderr   # the same run as through the sidecar: its call answered
    return int(re.search(r"TIME (\d+)", done.stderr).group(1)) * 1024


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs /usr/bin/time (apt install time)")
@pytest.mark.timeout(240)   # two runs of an agent of 160 MB: on a loaded machine, a minute or more
async def test_run_reports_the_peak_usr_bin_time_gives(sidecar, script, mock, isolated_env):
    agent = script(HUNGRY)
    done = await sidecar.run("run", "--", PY, str(agent), env=upstream_env(mock), timeout=200)
    assert done.returncode == 3, done.err
    reported = int(SUMMARY_PEAK.search(done.err).group(1)) * MB
    measured = await asyncio.to_thread(time_peak, agent, upstream_env(mock))
    assert measured > 160 * MB
    assert abs(reported - measured) < 0.1 * measured, (reported, measured)   # the same figure, run to run
    exited = [e for e in EventLog(isolated_env).read() if e["kind"] == "agent_exited"]
    assert len(exited) == 1 and exited[0]["status"] == 3
    assert abs(exited[0]["peak_rss"] - measured) < 0.1 * measured, (exited, measured)


@pytest.mark.timeout(180)
async def test_an_attached_agent_has_its_exit_status_and_real_peak(sidecar, script, mock, isolated_env):
    url = await sidecar.serve(env=upstream_env(mock))
    done = await sidecar.run("run", "--connect", url, "--", PY, str(script(HUNGRY)), timeout=150)
    assert done.returncode == 3, done.err
    agent_id = done.out.split()[1]
    exited = [e for e in EventLog(isolated_env).read() if e["kind"] == "agent_exited" and e["agent"] == agent_id]
    assert len(exited) == 1 and exited[0]["status"] == 3, exited        # not null: the launcher's report
    assert exited[0]["peak_rss"] > 160 * MB, exited
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/_sidecar/agents") as response:
            table = {a["id"]: a for a in await response.json()}
    assert table[agent_id]["exit_status"] == 3 and table[agent_id]["peak_rss"] > 160 * MB


async def test_an_agent_whose_launcher_is_killed_still_exits_in_the_table(sidecar, script, mock, isolated_env):
    """No launcher left to report: the exit is recorded once both are gone (status unknown, so null)."""
    url = await sidecar.serve(env=upstream_env(mock))
    agent = script("import time; print('up', flush=True); time.sleep(2)", "sleeper.py")
    launcher = await sidecar.spawn("run", "--connect", url, "--", PY, str(agent))
    assert await asyncio.wait_for(launcher.stdout.readline(), 20) == b"up\n"
    os.killpg(launcher.pid, 9)   # the launcher and the agent, at once
    await launcher.wait()
    for _ in range(400):
        if any(e["kind"] == "agent_exited" for e in EventLog(isolated_env).read()):
            break
        await asyncio.sleep(0.025)
    exited = [e for e in EventLog(isolated_env).read() if e["kind"] == "agent_exited"]
    assert len(exited) == 1 and exited[0]["status"] is None


async def test_sampling_keeps_the_high_water_mark_not_the_current_size():
    """A peak between two samples is not missed: VmHWM keeps it after the memory is given back."""
    child = await asyncio.create_subprocess_exec(
        PY, "-c", "import sys; b = b'x' * (150 << 20); del b; print('freed', flush=True); sys.stdin.read()",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert await asyncio.wait_for(child.stdout.readline(), 20) == b"freed\n"
        assert high_water_mark(child.pid) > 150 * MB
        monitor = Monitor(MonitorSection(), EventLog(Path("/nonexistent")), limiter=None)
        monitor.agents["a"] = agent = Agent("a", pid=child.pid)
        monitor._sample_agent(agent)
        assert agent.peak_rss > 150 * MB > agent.rss
    finally:
        child.stdin.close()
        await child.wait()


def test_the_summary_adds_up():
    summary = {"calls": 2, "hits": 1, "hit_rate": 1.0, "saved_upstream_s": 0.1, "saved_tokens": 10,
               "total": {"p50": 1.0, "p95": 2.0}, "input_tokens": 5, "output_tokens": 6, "errors": {}}
    line = format_summary(summary, [], 96 * MB)
    assert "2 API calls, 1 from cache (50%)" in line and "agent peak RSS 96 MB" in line


def test_the_summary_names_restarts_and_thresholds_of_this_agent():
    events = [{"kind": "agent_restarted", "state": "info", "agent": "me"},
              {"kind": "agent_restarted", "state": "info", "agent": "me"},
              {"kind": "agent_restarted", "state": "info", "agent": "someone-else"},
              {"kind": "slow_response", "state": "raised", "agent": "me"},
              {"kind": "memory_pressure", "state": "raised"},
              {"kind": "slow_response", "state": "cleared", "agent": "me"}]
    assert event_words(events, "me") == "agent_restarted x2, memory_pressure, slow_response"
    assert event_words([], "me") == "none"


CRASHER = r'''
import os, sys, anthropic
anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, timeout=20).messages.create(
    model="claude-mock-1", max_tokens=8, messages=[{"role": "user", "content": "crash " + str(len(sys.argv))}])
if len(sys.argv) == 1:
    os.kill(os.getpid(), 9)
'''


@pytest.mark.timeout(180)
async def test_the_summary_after_a_crash_and_a_restart_says_so(sidecar, script, mock):
    env = {**upstream_env(mock), "SIDECAR_LAUNCHER_RESTART": "on-failure", "SIDECAR_LAUNCHER_RESTART_BACKOFF": "0",
           "SIDECAR_LAUNCHER_RESTART_ARGS": "again"}
    done = await sidecar.run("run", "--", PY, str(script(CRASHER)), env=env, timeout=150)
    assert done.returncode == 0, done.err
    assert "2 API calls, 0 from cache (0%)" in done.err and "events: agent_restarted" in done.err, done.err


async def test_agent_ids_are_the_same_for_the_same_command_in_the_same_directory(sidecar, script, mock, tmp_path):
    agent = script("import os; print(os.environ['SIDECAR_AGENT_ID'])", "who.py")
    first, second = [await sidecar.run("run", "--quiet", "--", PY, str(agent)) for _ in range(2)]
    assert first.out == second.out and first.out.startswith("python")
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    elsewhere = subprocess.run([PY, "-m", "agent_sidecar.launcher", "run", "--quiet", "--", PY, str(agent)], cwd=other_dir,
                               capture_output=True, text=True, timeout=60)
    other_args = await sidecar.run("run", "--quiet", "--", PY, str(agent), "x")
    assert elsewhere.stdout != first.out and other_args.out != first.out


async def test_a_sessions_turns_are_its_answers(start_app, mock):
    """A call that carries a restored history of 5 messages checkpoints 6 messages and 3 turns, not 1."""
    proxy = await start_app(mock.url)
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"},
               {"role": "user", "content": "two"}, {"role": "assistant", "content": "2"},
               {"role": "user", "content": "three"}]
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/messages", json={"model": "claude-mock-1", "max_tokens": 8,
                                                                  "messages": history},
                                headers={"x-api-key": "k", "anthropic-version": "2023-06-01"}) as response:
            assert response.status == 200
    [meta] = proxy.state.sessions.list()
    assert (meta["messages"], meta["turns"]) == (6, 3)
