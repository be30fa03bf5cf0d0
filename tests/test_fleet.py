"""Fleets: several sidecars on one Redis, and the user's shared sidecar (`sidecar run --shared`).

Everything is real: `sidecar serve` / `sidecar run --shared` run as processes,
a real redis-server runs on a free port (the Redis tests are skipped without
redis-server or the redis package), and only the LLM API is mocked. Waiting is
bounded polling against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import upstream_env

HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
PREFIX = "fleettest:"


# ---- helpers -------------------------------------------------------------------------


async def eventually(check, timeout: float, what: str, interval: float = 0.05):
    """Poll `check` (sync or async) until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie may linger if nothing reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sse_text(raw: bytes) -> str:
    return "".join(json.loads(line[6:])["delta"]["text"] for line in raw.decode().splitlines()
                   if line.startswith("data: ") and '"text_delta"' in line)


async def ask(session: aiohttp.ClientSession, url: str, prompt: str, *, stream: bool = False,
              key: str = "sk-ant-test") -> tuple[int, str | None, str]:
    """One Messages call: (status, x-sidecar-cache, answer text)."""
    body = {"model": "claude-mock-1", "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}
    async with session.post(url + "/v1/messages", json=body, headers={**HEADERS, "x-api-key": key}) as response:
        raw = await response.read()
        cache = response.headers.get("x-sidecar-cache")
    if response.status != 200:
        return response.status, cache, raw.decode(errors="replace")
    text = sse_text(raw) if stream else json.loads(raw)["content"][0]["text"]
    return response.status, cache, text


async def serve(sidecar, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    """`sidecar serve --port 0` as a process; returns it and its URL (from its stderr line)."""
    proc = await sidecar.spawn("serve", "--port", "0", env=env)

    async def url() -> str:
        while True:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError(f"sidecar serve exited with {await proc.wait()} before serving")
            if "serving on " in line:
                return line.split("serving on ", 1)[1].split()[0]

    return proc, await asyncio.wait_for(url(), 20)


def events_of(state_dir: Path) -> list[dict]:
    try:
        lines = (state_dir / "events.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


# ---- Redis ---------------------------------------------------------------------------


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, no persistence; can be stopped and restarted on its port."""

    def __init__(self, exe: str, workdir: Path):
        import redis
        self.exe = exe
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def start(self) -> None:
        import redis
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client.ping():
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 10 s")
            time.sleep(0.02)   # startup of an external server: a short poll with a deadline

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.connection_pool.disconnect()

    def entries(self) -> int:
        return sum(1 for _ in self.client.scan_iter(match=PREFIX + "entry:*"))

    def slots(self) -> int:
        return self.client.zcard(PREFIX + "slots")


@pytest.fixture
def redis_server(tmp_path: Path):
    pytest.importorskip("redis", exc_type=ImportError,
                        reason="the redis package is not installed (pip install 'agent-sidecar[redis]')")
    exe = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if exe is None:
        pytest.skip("redis-server is not installed")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(exe, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.client.close()


def fleet_env(mock, redis_server: RedisServer, state_dir: Path, **extra: str) -> dict[str, str]:
    return {**upstream_env(mock), "SIDECAR_STATE_DIR": str(state_dir), "SIDECAR_STATE_BACKEND": "redis",
            "SIDECAR_STATE_REDIS_URL": redis_server.url, "SIDECAR_STATE_REDIS_PREFIX": PREFIX, **extra}


async def test_redis_cache_is_shared_by_sidecars_but_not_across_keys(sidecar, mock, redis_server, tmp_path):
    _, url_a = await serve(sidecar, fleet_env(mock, redis_server, tmp_path / "a"))
    _, url_b = await serve(sidecar, fleet_env(mock, redis_server, tmp_path / "b"))
    async with aiohttp.ClientSession() as session:
        # Not streamed: through A, then the same call through B.
        status, cache, first = await ask(session, url_a, "Shared across the fleet, JSON.")
        assert (status, cache) == (200, "miss"), first
        await eventually(lambda: redis_server.entries() == 1, 5, "the answer's entry in Redis")
        status, cache, again = await ask(session, url_b, "Shared across the fleet, JSON.")
        assert (status, cache, again) == (200, "hit", first)
        assert mock.count("/v1/messages") == 1

        # Streamed: through A, then through B streamed and not (one answer, either form).
        status, cache, streamed = await ask(session, url_a, "Shared across the fleet, SSE.", stream=True)
        assert (status, cache) == (200, "miss"), streamed
        await eventually(lambda: redis_server.entries() == 2, 5, "the stream's entry in Redis")
        assert await ask(session, url_b, "Shared across the fleet, SSE.", stream=True) == (200, "hit", streamed)
        assert await ask(session, url_b, "Shared across the fleet, SSE.") == (200, "hit", streamed)
        assert mock.count("/v1/messages") == 2

        # Another API key is another partition, on every sidecar of the fleet.
        status, cache, _ = await ask(session, url_b, "Shared across the fleet, JSON.", key="sk-ant-other")
        assert (status, cache) == (200, "miss")
        status, cache, _ = await ask(session, url_a, "Shared across the fleet, SSE.", stream=True, key="sk-ant-other")
        assert (status, cache) == (200, "miss")
        assert mock.count("/v1/messages") == 4


async def test_redis_global_limit_holds_across_sidecars(sidecar, mock, redis_server, tmp_path):
    mock.profile.ttft = 0.2
    # Leases far longer than the bound below: a waiter that had to wait for one (no pub/sub) fails the test.
    env = {"SIDECAR_LIMITS_MAX_CONCURRENCY": "2", "SIDECAR_STATE_LEASE_SECONDS": "600"}
    _, url_a = await serve(sidecar, fleet_env(mock, redis_server, tmp_path / "a", **env))
    _, url_b = await serve(sidecar, fleet_env(mock, redis_server, tmp_path / "b", **env))
    async with aiohttp.ClientSession() as session:
        results = await asyncio.wait_for(asyncio.gather(*(
            ask(session, (url_a, url_b)[i % 2], f"Global limit, unique call {i}.") for i in range(12))), 120)
    assert [r[:2] for r in results] == [(200, "miss")] * 12, results
    assert mock.count("/v1/messages") == 12
    assert mock.peak_in_flight <= 2, f"{mock.peak_in_flight} calls in flight upstream with a fleet limit of 2"
    assert mock.peak_in_flight == 2           # the limit was used, not just a queue of one
    # A freed slot is announced (pub/sub): the waiters went when it was freed, not after a lease (600 s).
    await eventually(lambda: redis_server.slots() == 0, 5, "every lease given back")


async def test_redis_rate_limit_pacing_is_one_budget_for_the_fleet(sidecar, mock, redis_server, tmp_path):
    """Two sidecars on one Redis pace against one token bucket: what one reserved, the other sees."""
    import anthropic
    from agent_sidecar.bench.mock_upstream import Profile
    mock.profile = Profile(ttft=0.05, rate_input_tokens=1000, rate_window=2.0)
    _, url_a = await serve(sidecar, fleet_env(mock, redis_server, tmp_path / "a"))
    _, url_b = await serve(sidecar, fleet_env(mock, redis_server, tmp_path / "b"))
    prompt = "Summarise this build log line by line. " * 20   # ~200 input tokens: the bucket covers ~4 at once
    clients = [anthropic.AsyncAnthropic(base_url=(url_a, url_b)[i % 2], api_key="sk-ant-test", timeout=60)
               for i in range(8)]

    def ask_sdk(client, tag):
        return client.messages.create(model="claude-mock-1", max_tokens=16,
                                      messages=[{"role": "user", "content": f"{tag} {prompt}"}])
    try:
        await ask_sdk(clients[0], "warm-up")   # through A only: B learns the headroom from the fleet
        results = await asyncio.gather(*(ask_sdk(c, f"fleet {i}") for i, c in enumerate(clients)),
                                       return_exceptions=True)
    finally:
        for c in clients:
            await c.close()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert mock.rate_limited == 0, f"{mock.rate_limited} calls ran into the upstream's 429"
    async with aiohttp.ClientSession() as session:
        async with session.get(url_b + "/_sidecar/overview") as resp:
            headroom = (await resp.json())["headroom"]
    assert headroom["fleet"] is True and headroom["held"] >= 1


async def test_redis_slots_of_a_killed_sidecar_expire_with_their_lease(sidecar, mock, redis_server, tmp_path):
    lease = 2.0
    env = {"SIDECAR_LIMITS_MAX_CONCURRENCY": "2", "SIDECAR_STATE_LEASE_SECONDS": str(lease)}
    proc_a, url_a = await serve(sidecar, fleet_env(mock, redis_server, tmp_path / "a", **env))
    _, url_b = await serve(sidecar, fleet_env(mock, redis_server, tmp_path / "b", **env))
    mock.profile.ttft = 30.0      # A's calls hold their slots until A dies
    async with aiohttp.ClientSession() as session:
        held = [asyncio.create_task(ask(session, url_a, f"Held by the doomed sidecar {i}.")) for i in range(2)]
        try:
            await eventually(lambda: mock.in_flight == 2 and redis_server.slots() == 2, 10,
                             "A holding both fleet slots")
            os.kill(proc_a.pid, signal.SIGKILL)
            await proc_a.wait()
        finally:
            outcomes = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), 10)
        assert all(isinstance(o, aiohttp.ClientError) for o in outcomes), outcomes
        mock.profile.ttft = 0.05
        started = time.monotonic()
        # bounded (the lease ends it), generous: on a loaded machine the expiry is noticed late, never early
        status, cache, _ = await asyncio.wait_for(ask(session, url_b, "The survivor's call."), lease + 60)
        elapsed = time.monotonic() - started
    assert (status, cache) == (200, "miss")
    assert elapsed > lease / 3, "the survivor did not wait: the dead sidecar's slots were not held"
    await eventually(lambda: redis_server.slots() == 0, 5, "the slots sorted set to empty")


async def test_redis_outage_serves_uncached_then_recovers(sidecar, mock, redis_server, tmp_path):
    state = tmp_path / "a"
    _, url = await serve(sidecar, fleet_env(mock, redis_server, state))
    async with aiohttp.ClientSession() as session:
        assert (await ask(session, url, "Before the outage."))[:2] == (200, "miss")
        await eventually(lambda: redis_server.entries() == 1, 5, "the entry in Redis")
        assert (await ask(session, url, "Before the outage."))[:2] == (200, "hit")

        redis_server.stop()
        before = mock.count("/v1/messages")
        for attempt in range(3):
            status, cache, text = await asyncio.wait_for(ask(session, url, "During the outage."), 10)
            assert (status, cache) == (200, "miss"), (attempt, text)
        assert mock.count("/v1/messages") == before + 3
        raised = await eventually(
            lambda: [e for e in events_of(state) if e["kind"] == "redis_unavailable" and e["state"] == "raised"],
            5, "a redis_unavailable raised event in events.jsonl")
        assert len(raised) == 1 and raised[0]["url"] == redis_server.url

        redis_server.start()      # same port, empty: caching must resume by itself after the backoff

        async def cached_again() -> bool:
            status, cache, _ = await ask(session, url, "After the outage.")
            assert status == 200
            return cache == "hit"
        await eventually(cached_again, 15, "a repeated call to be a cache hit again", interval=0.3)
    await eventually(lambda: any(e["kind"] == "redis_unavailable" and e["state"] == "cleared"
                                 for e in events_of(state)), 5, "the redis_unavailable event to clear")


# ---- the shared sidecar (LMDB backend) -----------------------------------------------

AGENT = r'''
import json, os, sys, threading, time, urllib.request
print("URL", os.environ["SIDECAR_URL"], flush=True)
print("AGENT", os.environ["SIDECAR_AGENT_ID"], flush=True)
base = os.environ["ANTHROPIC_BASE_URL"]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print("SERVER", json.loads(opener.open(os.environ["SIDECAR_URL"] + "/_sidecar/health", timeout=10).read())["pid"],
      flush=True)
failures = []
def call(prompt):
    body = {"model": "claude-mock-1", "max_tokens": 32, "messages": [{"role": "user", "content": prompt}]}
    request = urllib.request.Request(base + "/v1/messages", data=json.dumps(body).encode(), headers={
        "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01", "content-type": "application/json"})
    try:
        with opener.open(request, timeout=30) as response:
            json.loads(response.read())["content"][0]["text"]
    except Exception as exc:
        failures.append(repr(exc))
calls, tag = int(sys.argv[1]), sys.argv[2]
pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
threads = [threading.Thread(target=call, args=(f"{tag} call {i}",)) for i in range(calls)]
for t in threads: t.start()
for t in threads: t.join()
if pause:
    time.sleep(pause)       # still attached: the shared server must not stop meanwhile
    call(f"{tag} after the pause")
print("FAILURES", json.dumps(failures), flush=True)
sys.exit(1 if failures else 0)
'''


class Shared:
    """Runs agents under `sidecar run --shared` and keeps track of the servers they start."""

    def __init__(self, sidecar, state_dir: Path, agent: Path):
        self.sidecar = sidecar
        self.state_dir = state_dir
        self.agent = agent
        self.pids: set[int] = set()

    async def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 30.0):
        done = await self.sidecar.run("run", "--shared", "--quiet", "--", sys.executable, str(self.agent), *args,
                                      env=env, timeout=timeout)
        self.info()
        return done

    def info(self) -> dict | None:
        try:
            info = json.loads((self.state_dir / "shared.json").read_text())
        except FileNotFoundError:
            return None
        self.pids.add(info["pid"])
        return info

    def servers(self) -> list[int]:
        """Shared servers of this test's state dir that are running (whatever shared.json says)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--shared-server" in cmdline and f"SIDECAR_STATE_DIR={self.state_dir}".encode() in environ \
                    and alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    async def teardown(self) -> None:
        self.info()
        await self.sidecar.run("stop", timeout=30)
        for pid in self.pids | set(self.servers()):
            if alive(pid) and b"--shared-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def shared(sidecar, isolated_env, script):
    helper = Shared(sidecar, isolated_env, script(AGENT))
    try:
        yield helper
    finally:
        await helper.teardown()


def lines(out: str, label: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(label + " ")]


async def test_shared_agents_share_one_server_limit_and_stats(shared, sidecar, mock):
    mock.profile.ttft = 0.3
    env = {**upstream_env(mock), "SIDECAR_LIMITS_MAX_CONCURRENCY": "1"}
    first, second = await asyncio.gather(shared.run("2", "agent-one", env=env), shared.run("2", "agent-two", env=env))
    assert first.returncode == 0, first.err + first.out
    assert second.returncode == 0, second.err + second.out

    info = shared.info()
    assert info is not None and alive(info["pid"])
    assert shared.servers() == [info["pid"]], "two launchers started at once must end up with one server"
    urls = lines(first.out, "URL") + lines(second.out, "URL")
    assert urls == [info["url"], info["url"]]
    agents = lines(first.out, "AGENT") + lines(second.out, "AGENT")
    assert len(set(agents)) == 2

    assert mock.count("/v1/messages") == 4
    assert mock.peak_in_flight == 1, "one limit for all the shared server's agents"

    status = await sidecar.run("status")
    assert status.returncode == 0, status.err
    assert str(info["pid"]) in status.out and info["url"] in status.out
    for agent in agents:
        assert agent in status.out, status.out

    async with aiohttp.ClientSession() as session:
        async with session.get(info["url"] + "/_sidecar/stats?by=agent") as response:
            doc = await response.json()
        async with session.get(info["url"] + "/_sidecar/stats?since=0&by=agent") as response:
            stored = await response.json()
    assert {a["id"] for a in doc["agents"]} == set(agents)
    for summary in (doc["summary"], stored["summary"]):
        assert summary["all"]["calls"] == 4
        assert {name: group["calls"] for name, group in summary["groups"].items()} == {a: 2 for a in agents}


async def test_shared_killed_server_is_replaced(shared, mock):
    env = upstream_env(mock)
    done = await shared.run("1", "before", env=env)
    assert done.returncode == 0, done.err + done.out
    old = shared.info()
    os.kill(old["pid"], signal.SIGKILL)
    await eventually(lambda: not alive(old["pid"]), 5, "the killed server to be gone")

    done = await shared.run("1", "after", env=env)
    assert done.returncode == 0, done.err + done.out
    new = shared.info()
    assert new["pid"] != old["pid"] and alive(new["pid"])
    assert lines(done.out, "URL") == [new["url"]]
    assert mock.count("/v1/messages") == 2


async def test_shared_server_with_another_config_is_refused(shared, mock):
    env = upstream_env(mock)
    done = await shared.run("1", "first", env=env)
    assert done.returncode == 0, done.err + done.out
    info = shared.info()

    refused = await shared.run("1", "second", env={**env, "SIDECAR_LIMITS_MAX_QUEUE": "7"})
    assert refused.returncode == 2, refused.err + refused.out
    message = refused.err.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("sidecar: ") and "configuration" in message and "sidecar stop" in message
    assert "URL" not in refused.out, "the agent must not run against a server with another config"
    assert shared.info() == info and alive(info["pid"])
    assert mock.count("/v1/messages") == 1


@pytest.mark.timeout(240)   # four agents, one after the other
async def test_shared_agents_keep_their_own_cache_mode(shared, mock):
    """The cache mode is each agent's own (in its base URL): one server, a replay agent never goes upstream."""
    env = upstream_env(mock)
    first = await shared.run("1", "same", env=env)
    assert first.returncode == 0, first.err + first.out
    info = shared.info()
    replayed = await shared.run("1", "same", env={**env, "SIDECAR_CACHE_MODE": "replay"})
    assert replayed.returncode == 0, replayed.err + replayed.out
    missed = await shared.run("1", "other", env={**env, "SIDECAR_CACHE_MODE": "replay"})
    assert missed.returncode == 1 and "HTTPError 404" in missed.out, missed.out
    uncached = await shared.run("1", "same", env={**env, "SIDECAR_CACHE_MODE": "off"})
    assert uncached.returncode == 0, uncached.err + uncached.out
    assert shared.info()["pid"] == info["pid"] and shared.servers() == [info["pid"]]
    assert mock.count("/v1/messages") == 2   # the first call and the uncached one; replay none


async def test_sidecar_stop_stops_the_shared_server(shared, sidecar, mock):
    done = await shared.run("1", "only", env=upstream_env(mock))
    assert done.returncode == 0, done.err + done.out
    info = shared.info()
    status = await sidecar.run("status")
    assert status.returncode == 0 and str(info["pid"]) in status.out, status.err + status.out

    stopped = await sidecar.run("stop", timeout=60)
    assert stopped.returncode == 0, stopped.err
    assert stopped.out.strip() == f"sidecar: stopped the shared sidecar (pid {info['pid']})", stopped.out   # not killed
    assert not alive(info["pid"])
    assert not (shared.state_dir / "shared.json").exists()
    stats = await sidecar.run("stats", "--json")
    assert stats.returncode == 0 and json.loads(stats.out)["all"]["calls"] == 1, stats.err + stats.out

    status = await sidecar.run("status")
    assert status.returncode == 1
    assert "no shared sidecar is running" in status.out


async def test_shared_server_stops_when_idle(shared, mock):
    env = {**upstream_env(mock), "SIDECAR_SHARED_IDLE_TIMEOUT": "1"}
    # The agent stays attached past the idle timeout between its calls: the server must wait for it.
    done = await shared.run("1", "idle", "1.5", env=env)
    assert done.returncode == 0, done.err + done.out
    assert mock.count("/v1/messages") == 2
    pid = int(lines(done.out, "SERVER")[0])
    await eventually(lambda: not alive(pid), 8, "the idle shared server to exit by itself")
    assert not (shared.state_dir / "shared.json").exists()
