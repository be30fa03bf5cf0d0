"""The sidecar's own surface: no web page can drive it, no endpoint under /_sidecar/ shows a secret.

POST /_sidecar/agents takes only a launcher showing the process's token; every request a browser makes
cross-site (a foreign Origin, Sec-Fetch-Site, a body type any page may send) is refused, on the API routes
in the API's own shape; everything /_sidecar/ sends is redacted. The proxy runs in-process in front of the
mock API, `sidecar serve`/`run --connect` as real processes, the cross-site page in headless Chromium.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from conftest import proxy_config, upstream_env
from agent_sidecar.launcher import client
from agent_sidecar.proxy import admin
from agent_sidecar.proxy.admin import ADMIN_TOKEN, TOKEN_HEADER, token_path
from agent_sidecar.proxy.app import make_app
from agent_sidecar.proxy.state import STATE

KEY = "sk-ant-api03-" + "Qx9" * 15 + "-AA"
ENV_KEY = "sk-ant-api03-" + "Wv4" * 14
GOOGLE_KEY = "AIzaSy" + "Gh3" * 11
SECRET_CMD = f"ANTHROPIC_API_KEY={ENV_KEY} GEMINI_API_KEY={GOOGLE_KEY} python agent.py --api-key {KEY}"
SECRETS = [s.encode() for s in (KEY, ENV_KEY, GOOGLE_KEY, KEY[:24], ENV_KEY[:24], GOOGLE_KEY[:20], "Qx9Qx9", "Wv4Wv4")]
MESSAGE = {"model": "claude-mock-1", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}
API_HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
PY = sys.executable


class Sidecar:
    """The sidecar in-process in front of the mock; every request it answers is noted in `seen`."""

    def __init__(self, server, mock):
        self.server, self.mock = server, mock
        self.url = f"http://127.0.0.1:{server.port}"
        self.app = server.app

    @property
    def token(self) -> str:
        return self.app[ADMIN_TOKEN]

    @property
    def agents(self) -> dict:
        return self.app[STATE].monitor.agents


@pytest.fixture
async def px(aiohttp_server, mock, isolated_env):
    app = make_app(proxy_config(mock.url, mock.url + "/v1", isolated_env))
    seen: list[tuple[str, str, str | None, int]] = []

    @web.middleware
    async def note(request: web.Request, handler):   # outside the sidecar's own: sees what reached it
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            seen.append((request.method, request.path, request.headers.get("origin"), exc.status))
            raise
        seen.append((request.method, request.path, request.headers.get("origin"), response.status))
        return response

    app.middlewares.insert(0, note)
    sidecar = Sidecar(await aiohttp_server(app, access_log=None), mock)
    sidecar.seen = seen
    return sidecar


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def register(http, px, doc, token: str | None = "", **headers) -> tuple[int, bytes]:
    """POST /_sidecar/agents; token "" means the sidecar's own."""
    if token is not None:
        headers[TOKEN_HEADER] = token or px.token
    async with http.post(px.url + "/_sidecar/agents", data=orjson.dumps(doc) if not isinstance(doc, bytes) else doc,
                         headers={"content-type": "application/json", **headers}) as r:
        return r.status, await r.read()


def started(ident: str, **extra) -> dict:
    return {"id": ident, "event": "started", "pid": os.getpid(), "cmd": "python agent.py", **extra}


# ---- POST /_sidecar/agents: the launcher's token, nothing else -------------------------------------


async def test_the_token_is_in_a_file_only_the_user_reads_and_is_required(px, http, isolated_env):
    path = token_path(isolated_env, os.getpid())
    assert path.read_text() == px.token and len(px.token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert (client.token_path(isolated_env, 7), client.TOKEN_HEADER) == (token_path(isolated_env, 7), TOKEN_HEADER)
    for token in (None, "guess", px.token[:-1], px.token + "x", "é" * 10):
        status, body = await register(http, px, started("intruder"), token=token)
        assert status == 403 and body.startswith(b"sidecar: ") and TOKEN_HEADER.encode() in body, (token, body)
    assert "intruder" not in px.agents
    status, body = await register(http, px, started("agent-1"))
    assert status == 200 and orjson.loads(body)["id"] == "agent-1" and px.agents["agent-1"].state == "running"
    # A foreign origin is refused even with the right token (a page that guessed it still gets nowhere).
    for headers in ({"origin": "http://evil.example"}, {"origin": "null"}, {"sec-fetch-site": "cross-site"},
                    {"sec-fetch-site": "same-site"}, {"origin": "http://127.0.0.1:1"}):
        status, body = await register(http, px, started("intruder"), **headers)
        assert status == 403 and body.startswith(b"sidecar: refused"), (headers, body)
    status, _ = await register(http, px, started("agent-2"), origin=px.url, **{"sec-fetch-site": "same-origin"})
    assert status == 200 and "intruder" not in px.agents


async def test_the_token_file_goes_when_the_sidecar_stops_and_a_dead_ones_is_cleared(aiohttp_server, mock,
                                                                                    isolated_env):
    tokens = isolated_env / "tokens"
    tokens.mkdir(parents=True, mode=0o700)
    dead = tokens / f"{2 ** 22 + 12345}.token"      # above pid_max: no such process
    dead.write_text("old")
    server = await aiohttp_server(make_app(proxy_config(mock.url, mock.url + "/v1", isolated_env)), access_log=None)
    mine = token_path(isolated_env, os.getpid())
    assert mine.exists() and not dead.exists()
    await server.close()
    assert not mine.exists()


BAD = [
    (b"not json", "JSON object"), (b"[1, 2]", "JSON object"), ({"id": "a", "event": "started", "pid": "123"}, "pid"),
    ({"id": "a", "event": "started", "pid": -4}, "pid"), ({"id": "a", "event": "started", "pid": True}, "pid"),
    ({"id": "a", "event": "started", "pid": 2 ** 40}, "pid"), ({"id": "a", "event": "started"}, "pid"),
    ({"id": "a", "event": "started", "pid": 1.5}, "pid"), ({"id": "a/b", "event": "started", "pid": 1}, "id"),
    ({"id": "a\n", "event": "started", "pid": 1}, "id"), ({"id": 7, "event": "started", "pid": 1}, "id"),
    ({"id": "x" * 65, "event": "started", "pid": 1}, "id"), ({"event": "started", "pid": 1}, "id"),
    ({"id": "a", "event": "crashed", "pid": 1}, "event"), ({"id": "a", "pid": 1}, "event"),
    ({"id": "a", "event": "started", "pid": 1, "cmd": ["python"]}, "cmd"),
    ({"id": "a", "event": "started", "pid": 1, "cmd": "x" * (admin.MAX_CMD + 1)}, "cmd"),
    ({"id": "a", "event": "exited", "status": "1"}, "status"),
    ({"id": "a", "event": "exited", "status": 1.0}, "status"),
    ({"id": "a", "event": "started", "pid": 1, "watch": "yes"}, "watch"),
    ({"id": "a", "event": "started", "pid": 1, "traceparent": f"00-{'0' * 32}-{'1' * 16}-01"}, "traceparent"),
    ({"id": "a", "event": "started", "pid": 1, "traceparent": "00-abc\n"}, "traceparent"),
    ({"id": "a", "event": "started", "pid": 1, "trace_root": 1}, "trace_root"),
    ({"id": "a", "event": "started", "pid": 1, "state": "running"}, "unknown field 'state'"),
]


async def test_a_bad_registration_is_refused_alone_and_later_ones_work(px, http):
    assert (await register(http, px, started("agent-before")))[0] == 200
    for doc, says in BAD:
        status, body = await register(http, px, doc)
        assert status == 400 and body.startswith(b"sidecar: ") and says.encode() in body, (doc, body)
        assert set(px.agents) == {"agent-before"}, doc
    status, body = await register(http, px, b"x" * (admin.MAX_MESSAGE + 1))
    assert status == 413 and body.startswith(b"sidecar: ")
    # Every later registration still works, the whole lifecycle of one agent too.
    for event in ({"event": "started", "pid": os.getpid()}, {"event": "restarted", "pid": os.getpid()},
                  {"event": "exited", "status": 3}):
        status, _ = await register(http, px, {"id": "agent-after", "cmd": "python agent.py", **event})
        assert status == 200, event
    after = px.agents["agent-after"]
    assert (after.state, after.exit_status, after.restarts) == ("exited", 3, 1)
    async with http.put(px.url + "/_sidecar/agents", headers={TOKEN_HEADER: px.token}) as r:
        assert r.status == 405 and px.mock.count() == 0    # never proxied upstream either


async def test_the_agent_table_is_bounded_exited_agents_leave_first(px, http, monkeypatch):
    monkeypatch.setattr(admin, "MAX_AGENTS", 4)
    for n in range(4):
        assert (await register(http, px, started(f"agent-{n}")))[0] == 200
    status, body = await register(http, px, started("agent-4"))
    assert status == 503 and body.startswith(b"sidecar: 4 agents are running") and "agent-4" not in px.agents
    assert (await register(http, px, started("agent-0")))[0] == 200    # one already known: no room needed
    for n in (1, 2):
        assert (await register(http, px, {"id": f"agent-{n}", "event": "exited", "status": 0}))[0] == 200
    assert (await register(http, px, started("agent-4")))[0] == 200
    assert (await register(http, px, started("agent-5")))[0] == 200
    assert list(px.agents) == ["agent-0", "agent-3", "agent-4", "agent-5"]    # the oldest exited left first
    status, body = await register(http, px, {"id": "never-seen", "event": "exited", "status": 0})
    assert (status, body) == (200, b"null") and "never-seen" not in px.agents


# ---- browser requests to the API routes: refused in the API's shape -----------------------------------------


async def post(http, url: str, body: bytes, **headers) -> tuple[int, dict, object]:
    async with http.post(url, data=body, headers={**API_HEADERS, "content-type": "application/json",
                                                  **headers}) as r:
        return r.status, orjson.loads(await r.read()), r.headers


@pytest.mark.parametrize("headers, why", [
    ({"origin": "http://evil.example"}, "web page at 'http://evil.example'"),
    ({"origin": "null"}, "web page at 'null'"),
    ({"origin": "http://127.0.0.1:9"}, "web page at 'http://127.0.0.1:9'"),    # another local port
    ({"sec-fetch-site": "cross-site"}, "cross-site request"),
    ({"sec-fetch-site": "same-site"}, "same-site request"),
    ({"content-type": "text/plain"}, "content-type text/plain"),
    ({"content-type": "text/plain;charset=UTF-8"}, "content-type text/plain"),
    ({"content-type": "application/x-www-form-urlencoded"}, "content-type application/x-www-form-urlencoded"),
    ({"content-type": "multipart/form-data; boundary=x"}, "content-type multipart/form-data"),
])
async def test_api_routes_refuse_browser_cross_site_requests(px, http, headers, why):
    body = orjson.dumps(MESSAGE)
    openai = {"authorization": "Bearer " + KEY, "content-type": "application/json"}
    for path, api in (("/v1/messages", "anthropic"), ("/a/agent-7/v1/messages", "anthropic"),
                      ("/v1/chat/completions", "openai")):
        sent = {**(openai if api == "openai" else {**API_HEADERS, "content-type": "application/json"}), **headers}
        async with http.post(px.url + path, data=body, headers=sent) as r:
            status, doc = r.status, orjson.loads(await r.read())
            assert r.headers["x-sidecar-error"] == "forbidden"
        message = doc["error"]["message"]
        assert status == 403 and message.startswith("sidecar: ") and why in message, (path, doc)
        assert doc["error"]["type"] == ("permission_error" if api == "anthropic" else "invalid_request_error")
    assert px.mock.count() == 0


async def test_api_routes_still_take_what_clients_send(px, http):
    for n, headers in enumerate(({}, {"origin": px.url}, {"sec-fetch-site": "same-origin"}, {"sec-fetch-site": "none"},
                                 {"origin": px.url.replace("127.0.0.1", "localhost"),
                                  "host": f"localhost:{px.server.port}"})):
        body = orjson.dumps({**MESSAGE, "messages": [{"role": "user", "content": f"hello {n}"}]})   # no cache hit
        status, doc, _ = await post(http, px.url + "/v1/messages", body, **headers)
        assert status == 200 and doc["type"] == "message", (headers, doc)
    # An upload is multipart, not JSON: it goes upstream (the mock has no /v1/files: its 404, not ours).
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", b"{}", filename="batch.jsonl")
    async with http.post(px.url + "/v1/files", data=form, headers=API_HEADERS) as r:
        assert r.status != 403 and "x-sidecar-error" not in r.headers
    assert px.mock.count("/v1/messages") == 5 and px.mock.count("/v1/files") == 1


async def test_a_preflight_is_refused_before_it_goes_upstream(px, http):
    async with http.options(px.url + "/v1/messages", headers={"origin": "http://evil.example",
                                                              "access-control-request-method": "POST",
                                                              "access-control-request-headers": "content-type"}) as r:
        assert r.status == 403 and "access-control-allow-origin" not in r.headers
    assert px.mock.count() == 0


# ---- a real cross-site page in headless Chromium ---------------------------------------------------------


PAGE = """<!doctype html><title>not the sidecar</title><script>
const sidecar = %(sidecar)s, body = JSON.stringify(%(message)s);
async function attempt(url, init) {
  try { const r = await fetch(url, init); return "answered " + r.type + " " + r.status; }
  catch (e) { return "failed " + e.name; }
}
(async () => {
  window.results = {
    api_cors: await attempt(sidecar + "/v1/messages", {method: "POST", body,
      headers: {"content-type": "application/json", "x-api-key": "sk-ant-api03-page", "anthropic-version": "2023-06-01",
                "anthropic-dangerous-direct-browser-access": "true"}}),
    api_simple: await attempt(sidecar + "/v1/messages", {method: "POST", mode: "no-cors", body,
      headers: {"content-type": "text/plain"}}),
    api_multipart: await attempt(sidecar + "/v1/messages", {method: "POST", mode: "no-cors", body,
      headers: {"content-type": "multipart/form-data; boundary=x"}}),
    agents_cors: await attempt(sidecar + "/_sidecar/agents", {method: "POST", body: %(agent)s,
      headers: {"content-type": "application/json", "x-sidecar-token": "a guess"}}),
    agents_simple: await attempt(sidecar + "/_sidecar/agents", {method: "POST", mode: "no-cors", body: %(agent)s}),
    read_agents: await attempt(sidecar + "/_sidecar/agents", {}),
  };
})();
</script>"""


async def test_a_cross_site_page_in_chromium_cannot_call_the_api_or_register_an_agent(px, aiohttp_server, tmp_path):
    from test_dashboard import chromium
    agent = json.dumps(json.dumps(started("page-agent")))
    page = PAGE % {"sidecar": json.dumps(px.url), "message": json.dumps(MESSAGE), "agent": agent}

    async def serve_page(_request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")
    site = web.Application()
    site.router.add_get("/", serve_page)
    other = await aiohttp_server(site)
    driver = await asyncio.to_thread(chromium, tmp_path)
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{other.port}/")
        results = await asyncio.to_thread(WebDriverWait(driver, 20).until,
                                          lambda d: d.execute_script("return window.results"), "the page's fetches")
    finally:
        await asyncio.to_thread(driver.quit)
    assert results["api_cors"] == "failed TypeError" and results["agents_cors"] == "failed TypeError", results
    assert results["read_agents"] == "failed TypeError", results
    assert px.mock.count() == 0 and "page-agent" not in px.agents
    # The browser did reach the sidecar, which refused each request (the preflights included) with a 403.
    origin = f"http://127.0.0.1:{other.port}"
    from_page = [(method, path, status) for method, path, sent_origin, status in px.seen if sent_origin == origin]
    assert ("OPTIONS", "/v1/messages", 403) in from_page and ("OPTIONS", "/_sidecar/agents", 403) in from_page
    assert from_page.count(("POST", "/v1/messages", 403)) == 2 and ("POST", "/_sidecar/agents", 403) in from_page
    assert {status for _, _, status in from_page} == {403}, from_page


# ---- secrets masked everywhere under /_sidecar/ -------------------------------------------------------------


def reads(app: web.Application, sid: str) -> list[str]:
    """Every GET route under /_sidecar/, its placeholders filled in (so a new endpoint is covered too)."""
    paths = []
    for resource in app.router.resources():
        path = resource.canonical
        if path.startswith("/_sidecar") and any(r.method in ("GET", "*") for r in resource):
            paths.append(path.replace("{sid}", sid))
    return paths + ["/_sidecar/stats?by=agent", "/_sidecar/stats?agent=secret-agent&since=0", "/_sidecar/stats?since=0"]


async def test_no_endpoint_under_sidecar_shows_a_key_from_a_command_line(px, http):
    status, body = await register(http, px, started("secret-agent", cmd=SECRET_CMD))
    assert status == 200 and all(s not in body for s in SECRETS), body
    async with http.post(px.url + "/a/secret-agent/v1/messages", json=MESSAGE, headers=API_HEADERS) as r:
        assert r.status == 200
    await px.app[STATE].records.drain()
    sid = px.app[STATE].sessions.list()[0]["id"]
    seen = {}
    for path in reads(px.app, sid):
        async with http.get(px.url + path) as r:
            body = await (r.content.readuntil(b"\n\n") if path == "/_sidecar/live" else r.read())
            assert r.status == 200, (path, body)
            assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff", path
        seen[path] = body
        for secret in SECRETS:
            assert secret not in body, (path, secret)
    agents = orjson.loads(seen["/_sidecar/agents"])
    assert agents[0]["cmd"] == "ANTHROPIC_API_KEY=*** GEMINI_API_KEY=*** python agent.py --api-key ***"
    stats = orjson.loads(seen["/_sidecar/stats"])
    assert stats["agents"][0]["cmd"] == agents[0]["cmd"]
    assert {"/_sidecar/health", "/_sidecar/metrics", "/_sidecar/limits", "/_sidecar/overview", "/_sidecar/live",
            f"/_sidecar/sessions/{sid}/messages"} <= set(seen)
    # Refusals say why without echoing what was sent.
    status, body = await register(http, px, {"id": KEY + "/x", "event": "started", "pid": 1})
    assert status == 400 and KEY.encode() not in body


# ---- the launcher shows the token: `sidecar serve` + `sidecar run --connect` as real processes ------------


CONNECTED = """
import json, os, urllib.request
url = os.environ["SIDECAR_URL"] + "/_sidecar/agents"
body = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url).read()
mine = [a for a in json.loads(body) if a["id"] == os.environ["SIDECAR_AGENT_ID"]]
print(json.dumps({"listed": mine, "body": body.decode()}))
"""


async def serve(sidecar, mock, env=None) -> tuple[object, str]:
    server = await sidecar.spawn("serve", env={**upstream_env(mock), **(env or {})})
    banner = await asyncio.wait_for(server.stderr.readline(), 20)
    found = re.search(rb"serving on (http://127\.0\.0\.1:\d+)", banner)
    assert found, banner
    return server, found.group(1).decode()


async def test_run_connect_reports_its_agent_with_the_token(sidecar, script, mock, isolated_env, tmp_path):
    server, url = await serve(sidecar, mock)
    token = token_path(isolated_env, server.pid)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    agent = str(script(CONNECTED))
    done = await sidecar.run("run", "--quiet", "--connect", url, "--", PY, agent, "--api-key", KEY)
    assert done.returncode == 0 and done.stderr == b"", done.err
    out = json.loads(done.out)
    assert len(out["listed"]) == 1 and out["listed"][0]["state"] == "running"
    assert "--api-key ***" in out["listed"][0]["cmd"] and all(s.decode() not in out["body"] for s in SECRETS)

    # A launcher with another state dir has no token: it says so in one line, and its agent runs all the same.
    other = await sidecar.run("run", "--quiet", "--connect", url, "--", PY, agent,
                              env={"SIDECAR_STATE_DIR": str(tmp_path / "elsewhere")})
    assert other.returncode == 0 and json.loads(other.out)["listed"] == []
    assert other.err.count("\n") == 1 and other.err.startswith("sidecar: the sidecar at") and "no token" in other.err

    server.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.wait(), 10) == 0
    assert not token.exists()


@pytest.mark.parametrize("code", ["import agent_sidecar.launcher.client", "agent_sidecar.launcher.cli.parser()"])
def test_the_launcher_stays_free_of_aiohttp(code):
    """Importing aiohttp takes a quarter of a second here: the CLI (every `sidecar ...` start builds its
    parser) must not pay it before it needs a proxy (the cache entry's header rules once pulled it in)."""
    code = f"import sys, agent_sidecar.launcher.cli, agent_sidecar.launcher.client; {code}; print('aiohttp' in sys.modules)"
    import subprocess
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_sidecar_run_loads_only_what_it_runs(tmp_path, isolated_env):
    """`sidecar run -- true` starts every agent: it loads neither the other commands' modules, nor yarl nor
    urllib.request (30 ms of imports between them, measured), which only the proxy or --connect need."""
    import subprocess
    code = ("import runpy, sys; unwanted = tuple(sys.argv[1:]); sys.argv = ['sidecar', 'run', '--quiet', '--', 'true']\n"
            "try:\n    runpy.run_module('agent_sidecar.launcher', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "print(' '.join(sorted(n for n in sys.modules if n in unwanted or n.startswith(unwanted))))")
    unwanted = ["aiohttp", "yarl", "urllib.request", "agent_sidecar.launcher.cache_cmd",
                "agent_sidecar.launcher.sessions_cmd", "agent_sidecar.launcher.stats_cmd", "agent_sidecar.proxy.store"]
    done = subprocess.run([PY, "-c", code, *unwanted], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"sidecar run loaded {done.stdout.strip()}"


def test_installed_under_one_import_name_of_its_own(tmp_path):
    """The distribution claims agent_sidecar only: no top-level proxy, launcher or bench to collide with
    (the PyPI project proxy.py installs a top-level `proxy`)."""
    import subprocess
    code = ("import importlib.util as u, json, sys; "
            "print(json.dumps({n: getattr(u.find_spec(n), 'origin', None) for n in sys.argv[1:]}))")
    names = ["proxy", "launcher", "bench", "agent_sidecar.proxy", "agent_sidecar.launcher", "agent_sidecar.bench"]
    done = subprocess.run([PY, "-c", code, *names], cwd=tmp_path, capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    found = json.loads(done.stdout)
    repo = Path(__file__).resolve().parents[1]
    assert not any(found[n] and Path(found[n]).is_relative_to(repo) for n in ("proxy", "launcher", "bench")), found
    for name in ("proxy", "launcher", "bench"):
        assert Path(found[f"agent_sidecar.{name}"]) == repo / name / "__init__.py", found
    from importlib.metadata import distribution
    assert distribution("agent-sidecar").read_text("top_level.txt").split() == ["agent_sidecar"]
