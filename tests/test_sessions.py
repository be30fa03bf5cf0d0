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
import orjson
import pytest

from conftest import upstream_env
from agent_sidecar.proxy.call import Call
from agent_sidecar.proxy.config import load_layers
from agent_sidecar.proxy.restore import trim_for_api
from agent_sidecar.proxy.routes import Route
from agent_sidecar.proxy.sessions import Sessions
from agent_sidecar.proxy.store import MIN_MAP, Lmdb, open_lmdb

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
    # Seeded: the kill points of a run that failed come again with CHAOS_SEED=<the seed it printed>.
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30))
    print(f"\nchaos seed {seed} (CHAOS_SEED={seed} repeats its kill points)")
    rng = random.Random(seed)
    deadline = time.monotonic() + 60
    sessions = restored = 0
    failures = []
    for run in range(20):   # each run a seeded kill point; every CI run draws new ones
        if time.monotonic() > deadline:
            break
        run_id = f"chaos-{run}-{rng.randrange(1 << 30)}"
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
    assert sessions >= 10, f"too few sessions had an answer before the kill to judge (seed {seed})"
    assert fraction >= 0.995, (f"seed {seed}", failures)


def test_trim_keeps_a_history_the_api_accepts():
    user = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}
    tool_call = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "x", "input": {}}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}
    assert trim_for_api([user, answer]) == [user, answer]
    assert trim_for_api([user, answer, user, tool_call]) == [user, answer]
    assert trim_for_api([user, tool_call, result, answer, user]) == [user, tool_call, result, answer]
    assert trim_for_api([user]) == []


# ---- the checkpoint store alone, on a real LMDB ----------------------------------------------------


@pytest.fixture
def store(tmp_path):
    lmdb_env = Lmdb(tmp_path / "store", MIN_MAP)
    try:
        yield Sessions(lmdb_env)
    finally:
        lmdb_env.close()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def chat_call(messages: list[dict], agent: str = "agent-1", api: str = "anthropic", **fields) -> Call:
    """A Messages (or Chat Completions) API call as the pipeline hands it over, its body parsed."""
    call = Call(Route(agent, api, "/v1/messages" if api == "anthropic" else "/v1/chat/completions", ""), "POST")
    call.json = {"model": "claude-mock-1", "max_tokens": 64, **fields, "messages": messages}
    call.body = orjson.dumps(call.json)
    return call


async def turn(store: Sessions, messages: list[dict], reply: str, **fields) -> str:
    """Checkpoint one completed turn; the conversation's id."""
    call = chat_call(messages, **fields)
    await store.checkpoint(call, {"content": [{"type": "text", "text": reply}]}, {})
    return call.session


async def test_a_rewritten_middle_message_replaces_the_stored_one(store):
    history = [user("u0"), assistant("a0"), user("u1"), assistant("a1"), user("u2")]
    sid = await turn(store, history, "a2")
    assert store.messages(sid) == history + [assistant("a2")]
    # The agent compacts its second message and goes on: the old text must not survive in the checkpoint.
    edited = [*history[:2], user("u1, summarised"), *history[3:], assistant("a2"), user("u3")]
    assert await turn(store, edited, "a3") == sid
    assert store.messages(sid) == edited + [assistant("a3")]
    # A shorter history that differs in the middle replaces everything from the difference on.
    shorter = [user("u0"), assistant("a0, edited")]
    shorter_sid = await turn(store, [*shorter, user("u1 again")], "b1")
    assert shorter_sid == sid
    assert store.messages(sid) == [*shorter, user("u1 again"), assistant("b1")]
    assert store.list()[0]["messages"] == 4


async def test_an_earlier_turn_sent_again_leaves_the_checkpoint_whole(store):
    """A restored agent replaying its old conversation (cache hits, checkpointed too) keeps every later turn."""
    history = [user("u0"), assistant("a0"), user("u1"), assistant("a1"), user("u2")]
    sid = await turn(store, history, "a2")
    await turn(store, history[:1], "a0")
    await turn(store, history[:3], "a1")
    assert store.messages(sid) == history + [assistant("a2")]
    # The latest turn sent again (a retry) is checkpointed with the answer the agent saw last.
    await turn(store, history, "a2, retried")
    assert store.messages(sid) == history + [assistant("a2, retried")]


# ---- a restore goes to the conversation that continues the checkpointed one ---------------------------

TOOLS = [{"name": "lookup", "description": "look a word up",
          "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},
         {"name": "edit", "description": "edit a file",
          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]
INSTRUCTIONS = "You are an interactive agent that helps users with software engineering tasks.\n" * 40


def agent_system(first_prompt: str, git_status: str) -> list[dict]:
    """Shaped like Claude Code's: a billing line that follows the first prompt, then the instructions,
    which end with the environment (git status); both change between an agent's lives."""
    return [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.197.{len(first_prompt):03x}; "
                                     "cc_entrypoint=cli;"},
            {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK."},
            {"type": "text", "text": f"{INSTRUCTIONS}<env>\nWorking directory: /work\n</env>\n"
                                     f"gitStatus: {git_status}"}]


async def test_restore_goes_to_the_continuation_not_to_a_title_or_sub_agent_call(start_app, mock):
    px = await start_app(mock.url)
    headers = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}

    async def send(http, messages, **fields) -> list[dict]:
        body = {"model": "claude-mock-1", "max_tokens": 64, **fields, "messages": messages}
        async with http.post(px.url + "/v1/messages", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            assert response.headers["x-sidecar-cache"] == "miss"   # so the mock saw what the proxy sent
        assert mock.received[-1].json["messages"][-len(messages):] == messages
        return mock.received[-1].json["messages"]

    async with aiohttp.ClientSession() as http:
        first = [user("Hello, remember the word PELICAN.")]
        system = agent_system(first[0]["content"], "M a.txt")
        await send(http, first, system=system, tools=TOOLS)

        found = px.state.sessions.arm("last")   # the agent died; its restart opens new conversations
        assert found is not None
        title = [user("What word did I ask you to remember?")]
        title_system = [{"type": "text", "text": "Write a 5-10 word title for the conversation. Reply with the "
                                                 "title only."}]
        assert await send(http, title, system=title_system) == title
        sub_agent = [user("Search the code for the word.")]
        sub_system = [*system[:2], {"type": "text", "text": "You are an agent for a coding CLI. Given the user's "
                                                            "message, use the tools to search.\n<env>\n</env>"}]
        assert await send(http, sub_agent, system=sub_system, tools=TOOLS[:1]) == sub_agent

        question = [user("What word did I ask you to remember?")]
        restored = await send(http, question, system=agent_system(question[0]["content"], "M a.txt\n?? b.txt"),
                              tools=TOOLS)
        assert "PELICAN" in json.dumps(restored) and restored[-1] == question[0] and len(restored) == 3

        # Once chosen, the continuation keeps it; a title call with the same first message does not take it.
        assert await send(http, question, system=[{"type": "text", "text": "Title this, in 3 words."}]) == question
        more = [user("Search the tests too.")]
        assert await send(http, more, system=sub_system, tools=TOOLS[:1]) == more
        follow_up = [*question, assistant("fine"), user("And then?")]
        again = await send(http, follow_up, system=agent_system(question[0]["content"], "M a.txt\n?? b.txt"),
                           tools=TOOLS)
        assert "PELICAN" in json.dumps(again) and len(again) == 5


async def test_a_supervised_restart_restores_into_the_same_agent_only(store):
    await turn(store, [user("u0")], "a0", tools=TOOLS)
    assert store.arm("agent:agent-1") is not None
    other = chat_call([user("hi")], agent="agent-2", tools=TOOLS)
    store.restore(other)
    assert not other.restored and other.json["messages"] == [user("hi")]
    mine = chat_call([user("hi")], tools=TOOLS)
    store.restore(mine)
    assert mine.restored and orjson.loads(mine.body)["messages"] == [user("u0"), assistant("a0"), user("hi")]


async def test_openai_restore_matches_on_the_system_message_and_keeps_the_new_one_first(store):
    system = {"role": "system", "content": "You are terse. Today is Monday."}
    call = chat_call([system, user("u0")], api="openai", tools=[{"type": "function", "function": {"name": "f"}}])
    await store.checkpoint(call, {"choices": [{"message": {"role": "assistant", "content": "a0"}}]}, {})
    store.arm(call.session)
    tools = call.json["tools"]
    title = chat_call([{"role": "system", "content": "Write a title."}, user("hi")], api="openai", tools=tools)
    store.restore(title)
    assert not title.restored
    today = {"role": "system", "content": "You are terse. Today is Tuesday."}
    again = chat_call([today, user("hi")], api="openai", tools=tools)
    store.restore(again)
    assert again.json["messages"] == [today, user("u0"), {"role": "assistant", "content": "a0"}, user("hi")]


def test_the_latest_conversations_come_from_the_index_as_the_list_gives_them(tmp_path):
    """Sessions.latest(n) (the live page's, at every push) is list()[:n], whatever rows sort around `u:`."""
    import orjson
    from agent_sidecar.proxy.sessions import Sessions
    from agent_sidecar.proxy.store import Lmdb
    env = Lmdb(tmp_path / "state", 1 << 20)
    try:
        sessions = Sessions(env)
        assert sessions.latest(10) == []
        for n in range(30):
            sid = f"r{n:015d}"
            meta = {"id": sid, "agent": f"a{n % 3}", "api": "anthropic", "model": "m", "client_session": None,
                    "tools_digest": "t", "tools_hash": "h", "turns": 1}
            env.write_now(lambda txn: sessions._merge(txn, sid, [orjson.dumps({"role": "user", "content": str(n)})],
                                                      meta, None))
        env.write_now(lambda txn: txn.put(b"zz-after-the-index", b"", db=env.db["sessions"]))
        for count in (0, 1, 10, 30, 50):
            assert sessions.latest(count) == sessions.list()[:count], count
        env.write_now(lambda txn: txn.delete(b"zz-after-the-index", db=env.db["sessions"]))
        assert sessions.latest(5) == sessions.list()[:5]
    finally:
        env.close()


async def test_a_hit_works_out_its_conversation_once(store, monkeypatch):
    """A hit asks whether it repeats the turn just kept and, when it does not (this process did not keep
    it), is checkpointed: which conversation it continues is worked out once for the call, not twice."""
    from agent_sidecar.proxy import sessions as sessions_module
    worked_out, real = [], sessions_module.session_id
    monkeypatch.setattr(sessions_module, "session_id", lambda *args: worked_out.append(args) or real(*args))
    call = chat_call([user("u0")])
    call.headers, call.request_hash = {}, b"h" * 16
    assert not store.has_turn(call)
    await store.checkpoint(call, {"content": [{"type": "text", "text": "a0"}]}, call.headers)
    assert len(worked_out) == 1
    assert store.messages(call.session) == [user("u0"), assistant("a0")]
    again = chat_call([user("u0")])
    again.headers, again.request_hash = {}, b"h" * 16
    assert store.has_turn(again) and again.session == call.session and len(worked_out) == 2
