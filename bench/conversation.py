"""Claude-Code-shaped conversations for the realistic-traffic scenario, and their load job.

A request is shaped like Claude Code's: 24 tools with JSON schemas, a
3-part system prompt with `cache_control` markers, and turns of assistant
`tool_use` / user `tool_result` (file reads, command output) whose results
make the body grow. Turn 0 is about 76 KB; the last turn of a conversation
is `last_kb`, the sizes in between growing geometrically, as a long agent
session's context does. Every body of a conversation extends the one
before it (same prefix), and a tag in the first message makes each run's
conversations unique, so each call is a miss that goes upstream.

The load job (`conversation`, run in `python -m bench.load`) builds every
body before it starts the clock, then runs `agents` conversations at once,
each turn streamed and waited for, and reports each call's latency with its
body size.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import orjson

from .load import HEADERS, MODEL, Tally, _ms, _session

TOOL_NAMES = ("Task", "Bash", "Glob", "Grep", "LS", "ExitPlanMode", "Read", "Edit", "MultiEdit", "Write",
              "NotebookEdit", "WebFetch", "TodoWrite", "WebSearch", "BashOutput", "KillShell", "SlashCommand",
              "mcp__ide__getDiagnostics", "mcp__ide__executeCode", "ListMcpResources", "ReadMcpResource",
              "AskUserQuestion", "Skill", "EnterPlanMode")
assert len(TOOL_NAMES) == 24
FIRST_KB = 76


def _text(seed: str, size: int) -> str:
    """`size` bytes of word-like text, a function of the seed (files and outputs look like this, not zeros)."""
    out, counter = [], 0
    while sum(map(len, out)) < size:
        digest = hashlib.blake2b(f"{seed}:{counter}".encode(), digest_size=64).hexdigest()
        out.append(" ".join(digest[i:i + 7] for i in range(0, 126, 7)) + "\n")
        counter += 1
    return "".join(out)[:size]


def _tools() -> list[dict]:
    tools = []
    for name in TOOL_NAMES:
        props = {f"{name.lower()}_{p}": {"type": t, "description": _text(f"{name}{p}", 120)}
                 for p, t in (("path", "string"), ("limit", "integer"), ("pattern", "string"), ("flag", "boolean"))}
        tools.append({"name": name, "description": _text(name, 1500),
                      "input_schema": {"type": "object", "properties": props, "required": list(props)[:1],
                                       "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}})
    return tools


def _system() -> list[dict]:
    return [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": _text("instructions", 14_000), "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "<env>Working directory: /work/project\nIs directory a git repo: Yes\n"
                                     "Platform: linux\nToday's date: 2026-12-01</env>\n" + _text("git status", 1200)}]


def turn_sizes(turns: int, last_kb: int, first_kb: int = FIRST_KB) -> list[int]:
    """Each turn's body size in bytes, from first_kb to last_kb geometrically."""
    if turns == 1:
        return [first_kb * 1024]
    ratio = (last_kb / first_kb) ** (1 / (turns - 1))
    return [int(first_kb * 1024 * ratio ** i) for i in range(turns)]


def bodies(tag: str, turns: int, last_kb: int, stream: bool = True) -> list[bytes]:
    """The request bodies of one conversation, each the one before plus a tool_use/tool_result turn."""
    sizes = turn_sizes(turns, last_kb)
    base = {"model": MODEL, "max_tokens": 32000, "system": _system(), "tools": _tools(),
            "metadata": {"user_id": "user_bench_account__session_" + hashlib.md5(tag.encode()).hexdigest()}}
    if stream:
        base["stream"] = True
    messages: list[dict] = [{"role": "user", "content": [
        {"type": "text", "text": f"<system-reminder>{tag}</system-reminder>"},
        {"type": "text", "text": "Fix the failing test in tests/test_build.py", "cache_control": {"type": "ephemeral"}}]}]
    frame = len(orjson.dumps({**base, "messages": messages}))
    messages[0]["content"][0]["text"] = f"<system-reminder>{tag} {_text(tag, max(0, sizes[0] - frame))}</system-reminder>"
    out = [orjson.dumps({**base, "messages": messages})]
    for i, size in enumerate(sizes[1:], 1):
        tool_id = f"toolu_01{hashlib.blake2b(f'{tag}{i}'.encode(), digest_size=11).hexdigest()}"
        for message in messages:   # the conversation's marker moves to its newest message
            for block in message["content"]:
                block.pop("cache_control", None)
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": f"Reading part {i} of the build output."},
            {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"read_path": f"/work/project/log{i}.txt"}}]})
        grow = max(0, size - len(out[-1]) - 400)
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": _text(f"{tag}-{i}", grow),
             "cache_control": {"type": "ephemeral"}}]})
        out.append(orjson.dumps({**base, "messages": messages}))
    return out


async def conversation(url: str, agents: int, turns: int, last_kb: int, tag: str, stream: bool = True) -> dict:
    """`agents` conversations at once; each turn waits for the answer before the next is sent."""
    http = _session(url)
    convs = [bodies(f"{tag}-a{a}", turns, last_kb, stream) for a in range(agents)]
    tally = Tally()
    calls: list[tuple[int, int, float]] = []   # (turn, body bytes, latency ms)

    async def agent(conv: list[bytes]) -> None:
        for i, body in enumerate(conv):
            t0 = time.perf_counter()
            try:
                async with http.post(url + "/v1/messages", data=body, headers=HEADERS) as resp:
                    tally.count(tally.status, str(resp.status))
                    tally.count(tally.cache, resp.headers.get("x-sidecar-cache", "none"))
                    data = await resp.read()
            except (OSError, asyncio.TimeoutError) as exc:
                tally.count(tally.errors, type(exc).__name__)
                continue
            if resp.status != 200 or (b"message_stop" if stream else b'"type":"message"') not in data:
                tally.count(tally.errors, f"http_{resp.status}" if resp.status != 200 else "incomplete_answer")
                continue
            tally.ok += 1
            latency = _ms(time.perf_counter(), t0)
            tally.latency.append(latency)
            calls.append((i, len(body), latency))

    t0 = time.perf_counter()
    await asyncio.gather(*(agent(conv) for conv in convs))
    result = tally.result(time.perf_counter() - t0)
    result["calls"] = calls
    result["sent_bytes"] = sum(map(len, (b for conv in convs for b in conv)))
    return result
