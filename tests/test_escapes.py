"""Untrusted strings never reach the terminal with control sequences: `top`, `events`, `sessions`, `stats`.

An agent's command line (registered with the proxy), a model name (in the call records and the live
overview), event details (events.jsonl) and conversation text (a checkpointed session) carry an OSC
title, a clear-screen CSI, 8-bit C1 controls and other C0 bytes; each command runs as a real child
process and its output holds none of them.
"""

from __future__ import annotations

import re

import aiohttp
import orjson
import pytest

from conftest import until
from agent_sidecar.launcher.terminal import clean
from agent_sidecar.proxy import admin
from agent_sidecar.proxy.events import EventLog, make_event

pytestmark = pytest.mark.timeout(120)

EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[31m\x9b2J\x9d0;c1\x9c\r\x08\x00\x7f"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # anything but tab and newline
HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01", "content-type": "application/json"}


def assert_clean(text: str, *visible: str) -> None:
    assert not CONTROL.search(text), repr(CONTROL.search(text).group())
    for part in visible:
        assert part in text, (part, text)


def test_clean_keeps_text_drops_sequences():
    assert clean(f"a{EVIL}b") == "ab"
    assert clean("x\x1bPdcs payload\x1b\\y\x1b(Bz") == "xyz"
    assert clean("tab\tand\nnewline") == "tab and newline"
    assert clean("tab\tand\nnewline", multiline=True) == "tab\tand\nnewline"
    assert clean("héllo 日本 ☃") == "héllo 日本 ☃"


async def test_no_printer_lets_a_control_sequence_through(start_app, mock, sidecar):
    px = await start_app(mock.url)
    env = {"SIDECAR_STATE_DIR": str(px.state_dir)}
    model = f"claude-mock-1{EVIL}x"
    async with aiohttp.ClientSession() as http:
        agent = {"id": "evil-agent", "event": "started", "pid": 4242, "cmd": f"python agent.py {EVIL} --flag"}
        async with http.post(px.url + "/_sidecar/agents", data=orjson.dumps(agent),
                             headers={admin.TOKEN_HEADER: px.server.app[admin.ADMIN_TOKEN],
                                      "content-type": "application/json"}) as resp:
            assert resp.status == 200, await resp.text()
        doc = {"model": model, "max_tokens": 16,
               "messages": [{"role": "user", "content": f"hello{EVIL}\nsecond line\tend"}]}
        async with http.post(px.agent("evil-agent") + "/v1/messages", data=orjson.dumps(doc),
                             headers=HEADERS) as resp:
            assert resp.status == 200, await resp.text()
    px.state.monitor.emit(make_event("slow_response", "raised", model=model, detail=f"see {EVIL} here"))
    EventLog(px.state_dir).append(make_event("agent_exited", agent=f"a{EVIL}", cmd=f"rm{EVIL}"))
    await px.records()
    await until(lambda: px.state.sessions.list(), what="the session's checkpoint")

    top = await sidecar.run("top", "--once", "--url", px.url, env=env)
    assert top.returncode == 0, top.err
    assert_clean(top.out, "python agent.py", "--flag", "claude-mock-1", "see", "here")
    events = await sidecar.run("events", env=env)
    assert events.returncode == 0, events.err
    assert_clean(events.out, "slow_response", "agent_exited", "see", "here")
    show = await sidecar.run("sessions", "show", "last", env=env)
    assert show.returncode == 0, show.err
    assert_clean(show.out, "hello", "second line\tend", "claude-mock-1")
    listing = await sidecar.run("sessions", "list", env=env)
    assert listing.returncode == 0, listing.err
    assert_clean(listing.out, "claude-mock-1")
    stats = await sidecar.run("stats", "--by", "model", env=env)
    assert stats.returncode == 0, stats.err
    assert_clean(stats.out, "claude-mock-1")
    cached = await sidecar.run("cache", "list", env=env)
    assert cached.returncode == 0, cached.err
    assert_clean(cached.out, "claude-mock-1")
