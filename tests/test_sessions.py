"""Checkpoints and restoration, with real processes and real SIGKILLs.

The mock API validates message structure as the real one does (strict
user/assistant alternation, every tool_use answered by a tool_result in the
next message), so a restored conversation the API would refuse fails here.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import aiohttp
import pytest

from conftest import upstream_env
from proxy.config import load_layers
from proxy.sessions import Sessions, trim_for_api
from proxy.store import open_lmdb

SDK_AGENT = '''
import os, sys, anthropic
client = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0)
TOOLS = [{"name": "lookup", "description": "look a word up",
          "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
def ask(messages):
    return client.messages.create(model="claude-mock-1", max_tokens=64, tools=TOOLS, messages=messages)
if sys.argv[1] == "first-life":
    messages = [{"role": "user", "content": "Hello, remember the word PELICAN."}]
    reply = ask(messages)
    messages.append({"role": "assistant", "content": reply.content})
    print("A1", reply.content[0].text, flush=True)
    messages.append({"role": "user", "content": "Now please use a tool to check."})
    reply = ask(messages)
    assert reply.stop_reason == "tool_use", reply
    messages.append({"role": "assistant", "content": reply.content})
    messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": reply.content[0].id,
                                                  "content": "PELICAN: a large water bird"}]})
    with client.messages.stream(model="claude-mock-1", max_tokens=64, tools=TOOLS, messages=messages) as s:
        reply = s.get_final_message()
    messages.append({"role": "assistant", "content": reply.content})
    print("A3", reply.content[0].text, flush=True)
    messages.append({"role": "user", "content": "And use a tool again."})
    reply = ask(messages)
    print("pending tool", reply.content[0].id, flush=True)
    os.kill(os.getpid(), 9)   # crash with a tool call unanswered
else:
    reply = ask([{"role": "user", "content": "What word did I ask you to remember?"}])
    print("B1", reply.content[0].text, flush=True)
'''


async def test_killed_agent_restored_with_its_earlier_turns(sidecar, mock, script, tmp_path):
    agent = script(SDK_AGENT)
    env = upstream_env(mock)
    first = await sidecar.run("run", "--quiet", "--", "python", str(agent), "first-life", env=env, timeout=60)
    assert first.returncode == 137, first.err          # died of SIGKILL, status passed through
    seen = dict(line.split(" ", 1) for line in first.out.splitlines() if line[:2] in ("A1", "A3"))
    before = mock.count("/v1/messages")

    second = await sidecar.run("run", "--quiet", "--restore", "--", "python", str(agent), "second-life",
                               env=env, timeout=60)
    assert second.returncode == 0, second.err + second.out
    assert mock.count("/v1/messages") == before + 1
    sent = mock.received[-1].json["messages"]
    texts = json.dumps(sent)
    assert "PELICAN" in texts and seen["A1"] in texts and seen["A3"] in texts
    assert sent[-1] == {"role": "user", "content": "What word did I ask you to remember?"}
    assert sent[-2]["role"] == "assistant"                 # trimmed back to a complete assistant turn
    assert "use a tool again" not in texts                 # the unanswered tool call was cut off
    # The mock validated alternation and tool pairing: an invalid history would have been a 400.
    assert "B1 " in second.out


async def _serve(sidecar, env) -> tuple[asyncio.subprocess.Process, str]:
    proc = await sidecar.spawn("serve", "--port", "0", env=env)
    line = await asyncio.wait_for(proc.stderr.readline(), 20)
    url = line.decode().split("serving on ", 1)[1].split()[0]
    return proc, url


@pytest.mark.parametrize("stream", [False, True])
async def test_sidecar_killed_right_after_an_answer_has_it_checkpointed(sidecar, mock, isolated_env, stream):
    answers = []
    for round_ in range(3):
        proc, url = await _serve(sidecar, upstream_env(mock))
        body = {"model": "claude-mock-1", "max_tokens": 64, "stream": stream,
                "messages": [{"role": "user", "content": f"Kill me after answering, round {round_}."}]}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/messages", json=body, headers={
                    "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}) as response:
                raw = await response.read()
        os.kill(proc.pid, signal.SIGKILL)          # the moment the agent has the last byte
        await proc.wait()
        if stream:
            text = "".join(json.loads(line[6:])["delta"]["text"] for line in raw.decode().splitlines()
                           if line.startswith("data: ") and '"text_delta"' in line)
        else:
            text = json.loads(raw)["content"][0]["text"]
        answers.append(text)

    config = load_layers([{"state": {"dir": str(isolated_env)}}], ["test"])
    lmdb_env = open_lmdb(config)
    try:
        sessions = Sessions(lmdb_env)
        stored = [json.dumps(sessions.messages(meta["id"])) for meta in sessions.list()]
    finally:
        lmdb_env.close()
    for text in answers:
        assert any(text in conversation for conversation in stored), text


CHAOS_AGENT = r'''
import json, os, random, sys, threading, urllib.request
base = os.environ["ANTHROPIC_BASE_URL"]
log, run_id = sys.argv[1], sys.argv[2]
def call(messages, stream):
    body = {"model": "claude-mock-1", "max_tokens": 64, "messages": messages, "stream": stream}
    request = urllib.request.Request(base + "/v1/messages", data=json.dumps(body).encode(), headers={
        "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01", "content-type": "application/json"})
    with urllib.request.urlopen(request) as response:
        data = response.read().decode()
    if not stream:
        return json.loads(data)["content"][0]["text"]
    return "".join(json.loads(l[6:])["delta"]["text"] for l in data.splitlines()
                   if l.startswith("data: ") and '"text_delta"' in l)
if "--continue" in sys.argv:      # the restarted life: open a new conversation
    call([{"role": "user", "content": f"Where were we? ({run_id})"}], False)
    sys.exit(0)
random.seed(run_id)
messages = []
with open(log, "a") as seen:
    for turn in range(20):
        messages.append({"role": "user", "content": f"{run_id} turn {turn}"})
        text = call(messages, stream=turn % 2 == 1)
        seen.write(json.dumps(text) + "\n")
        seen.flush()
        if turn == 0:   # the kill lands at a random point after the first answer, however slow the start
            threading.Timer(random.uniform(0.0, 0.3), lambda: os.kill(os.getpid(), 9)).start()
        messages.append({"role": "assistant", "content": text})
os.kill(os.getpid(), 9)
'''


@pytest.mark.timeout(240)
async def test_chaos_kills_restore_full_context(sidecar, mock, script, tmp_path):
    """Kill the agent at random points many times; each restart must carry every answer it had seen."""
    mock.profile.ttft = 0.01
    agent = script(CHAOS_AGENT, "chaos_agent.py")
    env = {**upstream_env(mock), "SIDECAR_LAUNCHER_RESTART": "on-failure", "SIDECAR_LAUNCHER_MAX_RESTARTS": "1",
           "SIDECAR_LAUNCHER_RESTART_BACKOFF": "0", "SIDECAR_LAUNCHER_RESTART_ARGS": "--continue"}
    deadline = time.monotonic() + 150
    sessions = restored = 0
    failures = []
    for run in range(60):
        if time.monotonic() > deadline:
            break
        run_id = f"chaos-{run}-{random.randrange(1 << 30)}"
        log = tmp_path / f"{run_id}.log"
        log.touch()
        done = await sidecar.run("run", "--quiet", "--", "python", str(agent), str(log), run_id, env=env, timeout=60)
        assert done.returncode == 0, done.err
        seen = [json.loads(line) for line in log.read_text().splitlines()]
        if not seen:
            continue   # killed before any answer: there was no context to keep
        sessions += 1
        resumed = [r for r in mock.received if r.json and f"Where were we? ({run_id})" in json.dumps(r.json)]
        context = json.dumps(resumed[-1].json["messages"]) if resumed else ""
        if all(json.dumps(text)[1:-1] in context for text in seen):
            restored += 1
        else:
            failures.append(run_id)
    fraction = restored / sessions if sessions else 0.0
    print(f"\nchaos: {restored}/{sessions} sessions restored with their full context ({fraction:.1%})")
    assert sessions >= 10, "too few sessions had an answer before the kill to judge"
    assert fraction >= 0.995, failures


def test_trim_keeps_a_history_the_api_accepts():
    user = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}
    tool_call = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "x", "input": {}}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}
    assert trim_for_api([user, answer]) == [user, answer]
    assert trim_for_api([user, answer, user, tool_call]) == [user, answer]
    assert trim_for_api([user, tool_call, result, answer, user]) == [user, tool_call, result, answer]
    assert trim_for_api([user]) == []
