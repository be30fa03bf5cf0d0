"""A long-lived shared sidecar stays bounded: agent table, agent sampling, metric label sets (agents and models),
limiter counters, connections.

The table and the label sets are driven through a real in-process proxy; the header timeout and the
connection cap through `proxy.server.serve` itself (the runner and site `sidecar serve` uses) on a real
socket, stopped by closing its control pipe.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from contextlib import asynccontextmanager

import aiohttp
import orjson
import pytest

from agent_sidecar.bench.mock_upstream import Profile
from conftest import proxy_config, unique_prompt
from agent_sidecar.proxy import admin, server
from agent_sidecar.proxy.monitor import Monitor

pytestmark = pytest.mark.timeout(120)

HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01", "content-type": "application/json"}


async def call(http: aiohttp.ClientSession, url: str, model: str = "claude-mock-1") -> int:
    doc = {"model": model, "max_tokens": 16, "messages": unique_prompt()}
    async with http.post(url + "/v1/messages", data=orjson.dumps(doc), headers=HEADERS) as resp:
        await resp.read()
        return resp.status


# ---- the agent table and the Prometheus label sets ----------------------------------------------


async def test_exited_agents_leave_the_table_beyond_the_most_recent_few(start_app, mock, monkeypatch):
    monkeypatch.setattr(Monitor, "keep_exited", 3)
    px = await start_app(mock.url)
    token = {admin.TOKEN_HEADER: px.server.app[admin.ADMIN_TOKEN], "content-type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async def report(doc: dict) -> None:
            async with http.post(px.url + "/_sidecar/agents", data=orjson.dumps(doc), headers=token) as resp:
                assert resp.status == 200, await resp.text()
        await report({"id": "keeps-running", "event": "started", "pid": os.getpid()})
        for n in range(40):
            await report({"id": f"agent-{n}", "event": "started", "pid": 1000 + n})
            await report({"id": f"agent-{n}", "event": "exited", "status": 0})
        async with http.get(px.url + "/_sidecar/agents") as resp:
            listed = [a["id"] for a in await resp.json()]
    assert listed == ["keeps-running", "agent-37", "agent-38", "agent-39"]
    # an exited agent that comes back is running again and is not dropped with the exited ones
    px.state.monitor.on_agent({"id": "agent-39", "event": "started", "pid": 2000})
    for n in range(40, 44):
        px.state.monitor.on_agent({"id": f"agent-{n}", "event": "started", "pid": 1000 + n})
        px.state.monitor.on_agent({"id": f"agent-{n}", "event": "exited", "status": 1})
    assert list(px.state.monitor.agents) == ["keeps-running", "agent-39", "agent-41", "agent-42", "agent-43"]


async def test_an_agent_event_samples_that_agent_only(start_app, mock, monkeypatch):
    # it sampled every running agent's process tree, on the loop: 5,000 registrations took 0.35 s each
    px = await start_app(mock.url)
    monitor = px.state.monitor
    for n in range(50):
        monitor.on_agent({"id": f"agent-{n}", "event": "started", "pid": os.getpid()})
    sampled = []
    real = Monitor._sample_agent
    monkeypatch.setattr(Monitor, "_sample_agent", lambda self, agent: (sampled.append(agent.id), real(self, agent)))
    monitor.on_agent({"id": "one-more", "event": "started", "pid": os.getpid()})
    monitor.on_agent({"id": "agent-3", "event": "exited", "status": 0})
    assert sampled == ["one-more"]
    assert monitor.agents["one-more"].rss > 0


async def test_metric_labels_hold_a_bounded_number_of_agents_the_rest_fold_into_other(start_app, mock):
    px = await start_app(mock.url)
    px.state.stats.max_agents = 3
    async with aiohttp.ClientSession() as http:
        for n in range(12):
            assert await call(http, px.agent(f"agent-{n}")) == 200
        assert await call(http, px.agent("agent-11")) == 200   # a known one stays itself
        async with http.get(px.url + "/_sidecar/metrics") as resp:
            text = await resp.text()
    calls = re.findall(r'^sidecar_calls_total\{agent="([^"]*)".*\} (\d+)$', text, re.M)
    assert {agent for agent, _ in calls} == {"agent-9", "agent-10", "agent-11", "other"}
    assert sum(int(n) for _, n in calls) == 13                      # nothing lost: folded, not dropped
    assert dict(calls)["other"] == "9" and dict(calls)["agent-11"] == "2"
    tokens = {a for a in re.findall(r'^sidecar_tokens_total\{agent="([^"]*)"', text, re.M)}
    assert tokens == {"agent-9", "agent-10", "agent-11", "other"}
    assert len(px.state.stats.series["agent"]) == 3


async def test_metric_labels_hold_a_bounded_number_of_models_the_rest_fold_into_other(start_app, mock):
    px = await start_app(mock.url)
    px.state.stats.max_models = 2
    async with aiohttp.ClientSession() as http:
        for n in range(8):   # any client may send any model name: each would be a series of its own
            assert await call(http, px.agent(f"agent-{n % 2}"), model=f"model-{n}") == 200
        assert await call(http, px.agent("agent-0"), model="model-7") == 200   # a known one stays itself
        async with http.get(px.url + "/_sidecar/metrics") as resp:
            text = await resp.text()
    calls = re.findall(r'^sidecar_calls_total\{.*model="([^"]*)".*\} (\d+)$', text, re.M)
    assert {model for model, _ in calls} == {"model-6", "model-7", "other"}
    assert sum(int(n) for _, n in calls) == 9                       # nothing lost: folded, not dropped
    assert sum(int(n) for m, n in calls if m == "model-7") == 2
    durations = re.findall(r'^sidecar_call_duration_seconds_count\{model="([^"]*)"\} (\d+)$', text, re.M)
    assert dict(durations) == {"model-6": "1", "model-7": "2", "other": "6"}
    assert len(px.state.stats.series["model"]) == 2


# ---- limiter counters ---------------------------------------------------------------------------


async def test_limiter_forgets_agents_and_models_once_their_calls_end(start_app, mock):
    mock.profile = Profile(ttft=0.05)
    px = await start_app(mock.url, limits={"max_concurrency": 2, "per_agent": 1})
    async with aiohttp.ClientSession() as http:
        statuses = await asyncio.gather(*(call(http, px.agent(f"agent-{n % 6}"), model=f"model-{n % 4}")
                                          for n in range(30)))
    assert statuses == [200] * 30
    limiter = px.state.limiter
    assert limiter.waited > 0                                        # calls did queue
    assert (limiter.in_flight, limiter.queued) == (0, 0)
    assert (dict(limiter.by_agent), dict(limiter.by_model), limiter.queues) == ({}, {}, {})


# ---- the server: header timeout, connection cap -------------------------------------------------


@asynccontextmanager
async def serving(mock, tmp_path, **proxy):
    config = proxy_config(mock.url, mock.url + "/v1", tmp_path / "served", proxy=proxy)
    sock = socket.create_server(("127.0.0.1", 0))
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    ready = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve(config, sock, control_fd=read_end, on_ready=ready.set_result))
    try:
        port = await asyncio.wait_for(ready, 30)
        yield port
    finally:
        os.close(write_end)                                          # end of file: serve() returns
        await asyncio.wait_for(task, 30)
        os.close(read_end)
        sock.close()


async def health(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A kept-alive connection that has had one full exchange: the server surely counts it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /_sidecar/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    return reader, writer, head + await reader.readexactly(length)


async def test_unfinished_request_heads_are_closed_after_the_header_timeout(mock, tmp_path):
    async with serving(mock, tmp_path, header_timeout=1.0) as port:
        loris = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
        for _, writer in loris:
            writer.write(f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-api-".encode())
        ends = await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in loris)), 30)
        assert ends == [b""] * 50                                    # each one closed by the server
        _, writer, answer = await health(port)                       # and the sidecar still serves
        assert answer.startswith(b"HTTP/1.1 200")
        for _, w in [*loris, (None, writer)]:
            w.close()


async def test_connections_beyond_the_cap_get_an_api_shaped_503(mock, tmp_path):
    async with serving(mock, tmp_path, max_connections=8) as port:
        held = [await health(port) for _ in range(8)]
        assert all(answer.startswith(b"HTTP/1.1 200") for _, _, answer in held)
        for path, shape in (("/v1/messages", "anthropic"), ("/a/agent-x/v1/chat/completions", "openai")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = orjson.dumps({"model": "m", "messages": []})
            headers = HEADERS if shape == "anthropic" else {"authorization": "Bearer sk-test"}
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-length: {len(body)}\r\n"
                         .encode() + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n" + body)
            answer = await asyncio.wait_for(reader.read(), 30)       # the answer, then the server's end of file
            writer.close()
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head and b"connection: close" in head
            doc = orjson.loads(payload)
            error = doc["error"]
            assert error["message"].startswith("sidecar: too many connections (8 open")
            assert (doc.get("type"), error["type"]) == (("error", "overloaded_error") if shape == "anthropic"
                                                        else (None, "server_error"))
        _, writer, _ = held.pop()
        writer.close()                                               # one leaves: room for the next one

        async def served() -> bool:
            _, w, answer = await health(port)
            held.append((None, w, answer))
            return answer.startswith(b"HTTP/1.1 200")
        for _ in range(200):
            if await served():
                break
            await asyncio.sleep(0.01)
        assert held[-1][2].startswith(b"HTTP/1.1 200")
        for _, w, _ in held:
            w.close()
