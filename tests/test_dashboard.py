"""The live view: its data with real calls through the sidecar, the push over SSE (coalesced, idle when
nobody watches), the Host check, the page in a real headless Chromium, and `sidecar top`.

The proxy runs in-process in front of the mock API; `sidecar serve`/`run`/`top` run as real processes.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from conftest import proxy_config, until, upstream_env
from agent_sidecar.proxy.admin import ADMIN_TOKEN, TOKEN_HEADER
from agent_sidecar.proxy.app import make_app
from agent_sidecar.proxy.events import make_event
from agent_sidecar.proxy.live_push import PUSH_HUB, PUSH_INTERVAL
from agent_sidecar.proxy.state import STATE

MODEL = "claude-mock-1"
KEY = "sk-ant-api03-" + "Zq7" * 15          # long enough to look like a real key
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
SECRET_CMD = f"python agent.py --api-key {KEY}"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


SYSTEM = "You are a lighthouse keeper."


def prompt(text: str) -> dict:
    return {"model": MODEL, "max_tokens": 24, "system": SYSTEM, "messages": [{"role": "user", "content": text}]}


async def ask(session: aiohttp.ClientSession, url: str, text: str, stream: bool = False) -> str:
    """One Anthropic call through the sidecar (with a system prompt); returns its x-sidecar-cache outcome."""
    async with session.post(url + "/v1/messages", json={**prompt(text), "stream": stream}, headers=HEADERS) as r:
        await r.read()
        assert r.status == 200
        return r.headers["x-sidecar-cache"]




@pytest.fixture
async def px(aiohttp_server, mock, isolated_env):
    """The sidecar in-process (upstream: the mock); px.url, px.app."""
    app = make_app(proxy_config(mock.url, mock.url + "/v1", isolated_env))
    server = await aiohttp_server(app, access_log=None)
    await app[STATE].settled()   # the price table loaded: a call's record is made the moment it ends
    server.url = f"http://127.0.0.1:{server.port}"
    return server


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def launcher(px) -> dict[str, str]:
    """What `sidecar run --connect` shows to report an agent: the sidecar's token."""
    return {TOKEN_HEADER: px.app[ADMIN_TOKEN]}


async def overview(http: aiohttp.ClientSession, url: str) -> tuple[dict, bytes]:
    async with http.get(url + "/_sidecar/overview") as r:
        assert r.status == 200
        body = await r.read()
    return orjson.loads(body), body


async def lighthouse_session(http, url: str) -> str:
    """The id of the conversation about lighthouses, found through the session pages' data."""
    doc, _ = await overview(http, url)
    for session in doc["sessions"]:
        async with http.get(f"{url}/_sidecar/sessions/{session['id']}/messages") as r:
            if "lighthouses" in (await r.json())["messages"][0]["content"]:
                return session["id"]
    raise AssertionError("no lighthouse conversation")


async def four_calls(http, url: str) -> None:
    """A, A, B (streamed), A: 4 calls, 2 hits, 2 cache entries, 2 conversations."""
    outcomes = [await ask(http, url, "Tell me about lighthouses"), await ask(http, url, "Tell me about lighthouses"),
                await ask(http, url, "Name a river", stream=True), await ask(http, url, "Tell me about lighthouses")]
    # A repeat that comes while the first answer is still being stored joins it: served as a hit all the same.
    assert [o.replace("coalesced", "hit") for o in outcomes] == ["miss", "hit", "miss", "hit"]


# ---- the data ----------------------------------------------------------------------------------


async def test_overview_shows_calls_cache_latency_agents_and_sessions_without_content(px, http):
    await four_calls(http, px.url)
    async with http.post(px.url + "/_sidecar/agents", json={"id": "agent-x", "event": "started", "pid": os.getpid(),
                                                             "cmd": SECRET_CMD}, headers=launcher(px)) as r:
        assert r.status == 200
    doc, body = await overview(http, px.url)
    total = doc["summary"]["all"]
    assert (total["calls"], total["hits"], total["hit_rate"]) == (4, 2, 0.5)
    assert total["saved_tokens"] > 0 and total["saved_upstream_s"] >= 0
    assert doc["cache"]["entries"] == 2 and doc["cache"]["bytes"] > 0
    model = doc["summary"]["groups"][MODEL]
    for phase in ("total", "ttft", "queue", "overhead"):
        assert model[phase]["p50"] is not None and model[phase]["p95"] is not None, phase
    assert sum(doc["chart"]["calls"]) == 4 and sum(doc["chart"]["hits"]) == 2
    assert len(doc["chart"]["calls"]) == 90 and doc["chart"]["p95"][-1] is not None   # the bucket holding now
    assert (doc["limits"]["in_flight"], doc["limits"]["queued"], doc["limits"]["effective_limit"]) == (0, 0, None)
    agent = next(a for a in doc["agents"] if a["id"] == "agent-x")
    assert agent["state"] == "running" and agent["pid"] == os.getpid() and agent["rss"] > 0
    assert len(doc["sessions"]) == 2 and {s["turns"] for s in doc["sessions"]} == {1}
    # Conversation content only on the session page; an API key nowhere.
    for secret in (b"lighthouse", b"river", KEY.encode(), KEY[:20].encode()):
        assert secret not in body, secret
    assert "--api-key ***" in agent["cmd"]

    async with http.post(px.url + "/_sidecar/agents", json={"id": "agent-x", "event": "restarted", "pid": os.getpid(),
                                                             "cmd": SECRET_CMD}, headers=launcher(px)) as r:
        assert r.status == 200
    doc, _ = await overview(http, px.url)
    assert next(a for a in doc["agents"] if a["id"] == "agent-x")["state"] == "restarted"
    assert doc["events"][0]["kind"] == "agent_restarted"     # the latest first


async def test_session_page_and_its_data(px, http):
    await four_calls(http, px.url)
    sid = await lighthouse_session(http, px.url)
    async with http.get(f"{px.url}/_sidecar/sessions/{sid}") as r:
        assert r.status == 200 and "session.js" in await r.text()
        assert "default-src 'self'" in r.headers["content-security-policy"]
    async with http.get(f"{px.url}/_sidecar/sessions/{sid}/messages") as r:
        assert r.status == 200
        body = await r.read()
    data = orjson.loads(body)
    assert data["session"]["id"] == sid
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][0]["content"] == "Tell me about lighthouses"
    assert KEY.encode() not in body
    async with http.get(f"{px.url}/_sidecar/sessions/nosuchsession/messages") as r:
        assert r.status == 404


@pytest.mark.parametrize("path", ["/_sidecar/", "/_sidecar/live", "/_sidecar/overview", "/_sidecar/stats",
                                  "/_sidecar/health", "/_sidecar/static/dashboard.js", "/_sidecar/sessions/x/messages"])
async def test_every_sidecar_route_answers_only_requests_addressed_to_this_machine(px, http, path):
    async with http.get(px.url + path, headers={"Host": f"evil.example:{px.port}"}) as r:
        assert r.status == 403
        assert "refused" in await r.text()
    async with http.get(px.url + path, headers={"Host": f"localhost:{px.port}"}) as r:
        assert r.status != 403


async def test_allow_remote_lifts_the_host_check(aiohttp_server, mock, isolated_env, http):
    app = make_app(proxy_config(mock.url, mock.url + "/v1", isolated_env, proxy={"allow_remote": True}))
    server = await aiohttp_server(app, access_log=None)
    async with http.get(f"http://127.0.0.1:{server.port}/_sidecar/", headers={"Host": "evil.example"}) as r:
        assert r.status == 200


# ---- the push ----------------------------------------------------------------------------------


class Stream:
    """A /_sidecar/live reader: each snapshot with the time it arrived."""

    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response

    async def next(self, timeout: float = 10.0) -> tuple[float, dict]:
        async with asyncio.timeout(timeout):
            while True:
                line = await self.response.content.readline()
                assert line, "the stream ended"
                if line.startswith(b"data: "):
                    return time.monotonic(), orjson.loads(line[6:])

    async def until(self, predicate, timeout: float = 10.0) -> list[tuple[float, dict]]:
        frames = []
        async with asyncio.timeout(timeout):
            while not frames or not predicate(frames[-1][1]):
                frames.append(await self.next(timeout))
        return frames


async def test_live_pushes_after_calls_and_events_at_most_every_half_second(px, http):
    async with http.get(px.url + "/_sidecar/live") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        live = Stream(r)
        _, first = await live.next()
        assert first["summary"]["all"]["calls"] == 0          # the current state at once
        await ask(http, px.url, "one")
        before = await live.until(lambda d: d["summary"]["all"]["calls"] == 1)
        # A burst: never two pushes within PUSH_INTERVAL, by the sidecar's own clock (each snapshot's "now",
        # taken when it was pushed; when they arrive here depends on the machine's load), so fewer than calls.
        for i in range(30):
            await ask(http, px.url, "one")
        frames = await live.until(lambda d: d["summary"]["all"]["calls"] == 31, timeout=60)
        pushed = [before[-1][1]["now"]] + [doc["now"] for _, doc in frames]
        assert all(b - a >= PUSH_INTERVAL * 0.95 for a, b in zip(pushed, pushed[1:])), pushed
        assert len(frames) < 30
        # An event from the monitor (no request involved) is pushed too.
        px.app[STATE].monitor.emit(make_event("test_event", "raised", note="pushed"))
        await live.until(lambda d: d["events"] and d["events"][0]["kind"] == "test_event")


async def test_nothing_runs_for_an_absent_viewer(px, http):
    hub, monitor = px.app[PUSH_HUB], px.app[STATE].monitor
    await ask(http, px.url, "nobody watches")
    assert hub.timer is None and hub.changed not in monitor.listeners and not hub.viewers
    async with http.get(px.url + "/_sidecar/live") as r:
        live = Stream(r)
        await live.next()
        assert hub.changed in monitor.listeners and len(hub.viewers) == 1
        await ask(http, px.url, "someone watches")
        await live.until(lambda d: d["summary"]["all"]["calls"] == 2)
        await until(lambda: hub.timer is None, what="the push timer to disarm once nothing changes")
    await until(lambda: not hub.viewers, what="the viewer to leave")
    assert hub.changed not in monitor.listeners
    await ask(http, px.url, "nobody watches again")
    assert hub.timer is None


# ---- the page in a real browser ------------------------------------------------------------------


def chromium(tmp_path: Path):
    """Headless Debian chromium through its own chromedriver (Selenium Manager downloads nothing)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        pytest.skip("chromium / chromedriver not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1400,1100",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)


async def test_page_in_headless_chromium_updates_live(px, http, tmp_path):
    driver = await asyncio.to_thread(chromium, tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def text(element_id: str) -> str:
        return driver.find_element(By.ID, element_id).text

    async def wait(condition, what: str) -> None:
        await asyncio.to_thread(WebDriverWait(driver, 15).until, lambda _: condition(), what)

    try:
        await four_calls(http, px.url)
        async with http.post(px.url + "/_sidecar/agents", headers=launcher(px),
                             json={"id": "agent-x", "event": "started", "pid": os.getpid(), "cmd": SECRET_CMD}) as r:
            assert r.status == 200
        await asyncio.to_thread(driver.get, px.url + "/_sidecar/")
        await wait(lambda: text("calls") == "4" and text("hit-rate") == "50%", "4 calls, 50% hits")
        await wait(lambda: text("status") == "live", "the live stream to be open")
        assert "agent-x" in text("agents") and "running" in text("agents")
        assert MODEL in text("latency")
        assert text("spent") == "unknown"                    # the mock model has no price: never $0
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-calls rect.hit")
        assert "lighthouse" not in driver.page_source and KEY not in driver.page_source
        driver.execute_script("window.notReloaded = true")
        await ask(http, px.url, "Name a river")                       # a new call, a hit: 5 calls, 3 hits
        await wait(lambda: text("calls") == "5" and text("hit-rate") == "60%", "the new call to appear")
        assert driver.execute_script("return window.notReloaded === true")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard-test.png"
        assert await asyncio.to_thread(driver.save_screenshot, str(shot))
        print(f"screenshot: {shot}")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # The session link opens the conversation, read-only.
        sid = await lighthouse_session(http, px.url)
        link = driver.find_element(By.LINK_TEXT, sid)
        await asyncio.to_thread(link.click)
        await wait(lambda: "lighthouses" in text("conversation") and SYSTEM in text("conversation"), "the conversation")
        assert "ASSISTANT" in text("conversation").upper()
    finally:
        await asyncio.to_thread(driver.quit)


# ---- sidecar top ---------------------------------------------------------------------------------


async def serve(sidecar, mock) -> str:
    server = await sidecar.spawn("serve", env=upstream_env(mock))
    banner = await asyncio.wait_for(server.stderr.readline(), 20)
    return banner.decode().split("serving on ")[1].split(" ")[0]


async def test_top_once_prints_the_overview_of_a_serve_process(sidecar, mock, http):
    url = await serve(sidecar, mock)
    await four_calls(http, url)
    done = await sidecar.run("top", "--once", "--url", url)
    assert done.returncode == 0, done.err
    out = done.out
    assert "\x1b" not in out                                # plain text
    assert f"sidecar 0.1.0  {url}" in out.splitlines()[0]
    assert "calls 4  hit rate 50%, 2 from cache  in flight 0  queued 0  limit none" in out
    assert "cache 2 entries" in out
    row = next(line for line in out.splitlines() if line.startswith(MODEL)).split()
    assert row[1:3] == ["4", "50%"]
    assert out.count(" default ") >= 2                      # two sessions of the serve's own agent id
    assert "lighthouse" not in out and KEY not in out


async def test_top_finds_a_running_sidecar_run_and_the_run_file_goes_with_it(sidecar, script, mock, isolated_env):
    agent = script(
        "import anthropic, os, subprocess, sys\n"
        "anthropic.Anthropic(api_key='k').messages.create(model='claude-mock-1', max_tokens=8,\n"
        "    messages=[{'role': 'user', 'content': 'hi'}])\n"
        "top = subprocess.run([sys.executable, '-m', 'agent_sidecar.launcher', 'top', '--once'], capture_output=True, text=True)\n"
        "print(os.environ['SIDECAR_AGENT_ID']); print(top.returncode); print(top.stdout); print(top.stderr)\n"
        "print(sorted(os.listdir(os.path.join(os.environ['SIDECAR_STATE_DIR'], 'run'))))\n")
    done = await sidecar.run("run", "--quiet", "--", sys.executable, str(agent), env=upstream_env(mock))
    assert done.returncode == 0, done.err
    agent_id, status, *rest = done.out.splitlines()
    assert status == "0", done.out
    assert f"agent {agent_id}" in rest[0] and "calls 1 " in done.out, done.out
    assert agent_id in done.out.split("AGENT", 1)[1]       # the agent's row: pid, command
    assert rest[-1].startswith("['") and rest[-1].endswith(".json']")
    assert list((isolated_env / "run").glob("*.json")) == []   # removed when the proxy stopped
    none = await sidecar.run("top", "--once")
    assert none.returncode == 2 and "no running sidecar found" in none.err


async def test_top_without_a_terminal_prints_a_plain_frame_per_push(px, sidecar, http):
    top = await sidecar.spawn("top", "--url", px.url)
    try:
        first = await asyncio.wait_for(top.stdout.readuntil(b"\n\n"), 20)
        assert b"calls 0 " in first and b"\x1b" not in first
        await ask(http, px.url, "pushed to top")
        frame = b""
        async with asyncio.timeout(10):
            while b"calls 1 " not in frame:
                frame = await top.stdout.readuntil(b"\n\n")
        assert b"\x1b" not in frame
    finally:
        top.kill()
        await top.wait()


async def test_top_in_a_terminal_redraws_in_place_and_q_restores_it(px, sidecar, http):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    before = termios.tcgetattr(slave)
    output = bytearray()
    arrived = asyncio.Event()

    def readable() -> None:
        try:
            output.extend(os.read(master, 65536))
        except OSError:
            asyncio.get_running_loop().remove_reader(master)
        arrived.set()

    async def seen(text: bytes, after: int = 0) -> None:
        async with asyncio.timeout(60):   # bounded, generous: a loaded machine starts Python slowly
            while text not in output[after:]:
                arrived.clear()
                await arrived.wait()

    loop = asyncio.get_running_loop()
    loop.add_reader(master, readable)
    top = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent_sidecar.launcher", "top", "--url", px.url,
                                               stdin=slave, stdout=slave, stderr=asyncio.subprocess.PIPE,
                                               env={**os.environ, "TERM": "xterm"}, start_new_session=True)
    try:
        await seen(b"calls 0 ")
        await seen(b"q quits\x1b[K\x1b[J")   # the whole first frame: a pty may hand it over in pieces
        assert output.startswith(b"\x1b[?1049h")              # the alternate screen, like top
        assert not termios.tcgetattr(slave)[3] & termios.ICANON   # cbreak: a key arrives at once
        mark = output.rindex(b"\x1b[J") + len(b"\x1b[J")      # after the last frame drawn so far
        await ask(http, px.url, "pushed to the terminal")
        await seen(b"calls 1 ", mark)
        assert output[mark:].startswith(b"\x1b[H")             # redrawn in place, from the top left
        os.write(master, b"q")
        assert await asyncio.wait_for(top.wait(), 60) == 0
        await seen(b"\x1b[?1049l")                             # the screen given back
        assert termios.tcgetattr(slave) == before              # and the terminal's mode
    finally:
        loop.remove_reader(master)
        if top.returncode is None:
            os.killpg(top.pid, signal.SIGKILL)
            await top.wait()
        os.close(master)
        os.close(slave)
