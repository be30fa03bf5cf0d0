"""`sidecar` as real processes: run, serve, config; real agents using the sync SDKs, the mock as the API."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import tomllib

import pytest

from conftest import upstream_env

PY = sys.executable

SDK_AGENT = r'''
import sys
import anthropic, openai


def prompt(n):  # a different request each call, so no answer can come from the sidecar's cache
    return [{"role": "user", "content": f"Tell me about river number {n}."}]
a = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, timeout=20)   # base URL from ANTHROPIC_BASE_URL
o = openai.OpenAI(api_key="sk-test", max_retries=0, timeout=20)             # base URL from OPENAI_BASE_URL
print("bases", a.base_url, o.base_url, file=sys.stderr)

m = a.messages.create(model="claude-mock-1", max_tokens=64, messages=prompt(1))
print("anthropic json:", m.model_dump_json(exclude={"id"}))
events = a.messages.create(model="claude-mock-1", max_tokens=64, messages=prompt(2), stream=True)
print("anthropic stream:", [e.model_dump(exclude={"message": {"id"}}) for e in events])
c = o.chat.completions.create(model="gpt-4o-mini", messages=prompt(3))
print("openai json:", c.model_dump_json(exclude={"id", "created"}))
chunks = o.chat.completions.create(model="gpt-4o-mini", messages=prompt(4), stream=True)
print("openai stream:", [ch.model_dump(exclude={"id", "created"}) for ch in chunks])
'''

ENV_AGENT = r'''
import json, os, urllib.request
seen = {k: os.environ.get(k) for k in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_URL", "ANTHROPIC_API_BASE", "OPENAI_BASE_URL",
                                       "OPENAI_API_BASE", "GOOGLE_GEMINI_BASE_URL", "SIDECAR_URL", "SIDECAR_AGENT_ID")}
with urllib.request.urlopen(seen["SIDECAR_URL"] + "/_sidecar/health", timeout=10) as resp:
    seen["health"] = json.load(resp)
print(json.dumps(seen))
'''

QUIET_AGENT = r'''
import json, os, urllib.request
for stream in (False, True):  # two different requests: neither is answered from the cache
    body = {"model": "claude-mock-1", "max_tokens": 16, "messages": [{"role": "user", "content": f"hi {stream}"}]}
    req = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages",
                                 data=json.dumps({**body, "stream": stream}).encode(),
                                 headers={"content-type": "application/json", "x-api-key": "k",
                                          "anthropic-version": "2023-06-01"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200 and resp.read()
'''

TRAP_AGENT = r'''
import os, signal, sys, time

def on_signal(sig, frame):
    print("got", signal.Signals(sig).name, flush=True)
    time.sleep(0.3)  # still busy: the launcher must wait for this
    print("bye", flush=True)
    sys.exit(100 + sig)

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
print("ready", os.getpid(), flush=True)
while True:
    signal.pause()
'''

CONNECT_AGENT = r'''
import os
import anthropic
print(os.environ["SIDECAR_AGENT_ID"], os.environ["ANTHROPIC_BASE_URL"], flush=True)
m = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, timeout=20).messages.create(
    model="claude-mock-1", max_tokens=16, messages=[{"role": "user", "content": "hello, I am " + os.environ["SIDECAR_AGENT_ID"]}])
print(m.content[0].text)
'''


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def one_sidecar_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sidecar: "), stderr
    return lines[0]


# ---- agents through the sidecar ------------------------------------------------------------


async def test_sdk_agent_through_sidecar_matches_direct(sidecar, script, mock):
    agent = script(SDK_AGENT)
    direct, via = await asyncio.gather(
        sidecar.python(agent, env=upstream_env(mock)),
        sidecar.run("run", "--quiet", "--", PY, str(agent), env=upstream_env(mock)))
    assert direct.returncode == 0, direct.err
    assert via.returncode == 0, via.err
    assert via.out == direct.out
    assert [line.split(":")[0] for line in via.out.splitlines()] == [
        "anthropic json", "anthropic stream", "openai json", "openai stream"]
    # The agent under the sidecar was pointed at the proxy, so its calls reached the mock only through it.
    (bases,) = via.err.splitlines()  # and the sidecar itself said nothing
    _, anthropic_base, openai_base = bases.split()
    assert port_of(anthropic_base) == port_of(openai_base) != port_of(mock.url)
    assert mock.count("/v1/messages") == 4 and mock.count("/v1/chat/completions") == 4
    assert mock.count() == 8


async def test_agent_env_points_at_proxy(sidecar, script, mock):
    # Set already (LangChain and litellm read these first): taken as upstreams, and repointed for the agent.
    already = {"ANTHROPIC_API_URL": mock.url, "OPENAI_API_BASE": mock.url + "/v1", "ANTHROPIC_API_BASE": mock.url}
    done = await sidecar.run("run", "--quiet", "--", PY, str(script(ENV_AGENT)), env={**upstream_env(mock), **already})
    assert done.returncode == 0, done.err
    seen = json.loads(done.out)
    url = seen["SIDECAR_URL"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
    assert port_of(url) != port_of(mock.url)
    assert seen["ANTHROPIC_BASE_URL"] == seen["ANTHROPIC_API_URL"] == seen["ANTHROPIC_API_BASE"] == url
    assert seen["OPENAI_BASE_URL"] == seen["OPENAI_API_BASE"] == url + "/v1"
    assert seen["GOOGLE_GEMINI_BASE_URL"] == url
    # One pointing elsewhere than its API's upstream keeps its value: repointed, its calls would change place.
    elsewhere = {**upstream_env(mock), "ANTHROPIC_API_URL": "http://127.0.0.1:9/elsewhere"}
    done = await sidecar.run("run", "--quiet", "--", PY, str(script(ENV_AGENT)), env=elsewhere)
    seen = json.loads(done.out)
    assert seen["ANTHROPIC_API_URL"] == "http://127.0.0.1:9/elsewhere"
    assert seen["ANTHROPIC_BASE_URL"] == seen["SIDECAR_URL"]
    assert seen["SIDECAR_AGENT_ID"]
    assert seen["health"]["status"] == "ok"
    assert seen["health"]["agent"] == seen["SIDECAR_AGENT_ID"]
    # The proxy does not outlive the run.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port_of(url)), timeout=5).close()


async def test_an_agent_that_made_no_call_through_the_sidecar_is_named_in_one_line(sidecar, script, mock):
    # It asks the sidecar's health (no API call) and exits: as an agent whose calls went around the sidecar.
    done = await sidecar.run("run", "--", PY, str(script(ENV_AGENT)), env=upstream_env(mock))
    assert done.returncode == 0, done.err
    line = one_sidecar_line(done.err)
    assert "no API calls came through the sidecar" in line and mock.count() == 0
    for variable in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_URL", "ANTHROPIC_API_BASE", "OPENAI_BASE_URL",
                     "OPENAI_API_BASE", "GOOGLE_GEMINI_BASE_URL"):
        assert variable in line


async def test_base_url_variables_already_set_become_the_upstreams(sidecar):
    env = {"ANTHROPIC_API_URL": "http://127.0.0.1:9/a", "ANTHROPIC_API_BASE": "http://127.0.0.1:9/b",
           "OPENAI_API_BASE": "http://127.0.0.1:9/o/v1", "GOOGLE_GEMINI_BASE_URL": "http://127.0.0.1:9/g"}
    done = await sidecar.run("config", env=env)
    assert done.returncode == 0, done.err
    upstream = tomllib.loads(done.out)["upstream"]
    assert upstream == {"anthropic": "http://127.0.0.1:9/a", "openai": "http://127.0.0.1:9/o/v1",
                        "gemini": "http://127.0.0.1:9/g"}
    done = await sidecar.run("config", env={**env, "ANTHROPIC_BASE_URL": "http://127.0.0.1:9/first"})
    assert tomllib.loads(done.out)["upstream"]["anthropic"] == "http://127.0.0.1:9/first"   # the usual one first


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "default"])
async def test_sidecar_prints_nothing_while_agent_runs(sidecar, script, mock, isolated_env, quiet):
    flags = ["--quiet"] if quiet else []
    done = await sidecar.run("run", *flags, "--", PY, str(script(QUIET_AGENT)), env=upstream_env(mock))
    assert done.returncode == 0, done.err
    assert done.stdout == b""
    if quiet:
        assert done.stderr == b""
    else:  # at most the launcher's own closing summary, after the agent exited: no proxy logs
        assert all(line.startswith("sidecar: ") for line in done.err.splitlines()), done.err
    assert mock.count("/v1/messages") == 2
    assert (isolated_env / "logs" / "proxy.log").exists()  # the proxy's own output went to its log


# ---- exit status, signals, stdio ----------------------------------------------------------


@pytest.mark.parametrize("code, status", [
    ("pass", 0),
    ("import sys; sys.exit(3)", 3),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137),
], ids=["exit-0", "exit-3", "sigkill"])
async def test_exit_status_passes_through(sidecar, code, status):
    done = await sidecar.run("run", "--quiet", "--", PY, "-c", code)
    assert done.returncode == status, done.err
    assert done.stderr == b""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
async def test_signal_sent_to_launcher_reaches_agent(sidecar, script, sig):
    proc = await sidecar.spawn("run", "--quiet", "--", PY, str(script(TRAP_AGENT)))
    ready = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert ready.startswith(b"ready "), ready + await proc.stderr.read()
    agent_pid = int(ready.split()[1])
    proc.send_signal(sig)  # kill() to the launcher alone, not its process group
    rest = await asyncio.wait_for(proc.stdout.read(), 10)
    await asyncio.wait_for(proc.wait(), 10)
    assert rest.decode() == f"got {sig.name}\nbye\n"
    assert proc.returncode == 100 + sig
    # The launcher reaped the agent before it exited: the agent is gone, not orphaned.
    with pytest.raises(ProcessLookupError):
        os.kill(agent_pid, 0)
    assert await proc.stderr.read() == b""


async def test_stdin_and_stdout_pass_through_untouched(sidecar):
    data = bytes(range(256)) * 64 + os.urandom(256 * 1024) + b"\r\n\x00no newline at the end"
    done = await sidecar.run("run", "--quiet", "--", "cat", input=data)
    assert done.returncode == 0, done.err
    assert done.stdout == data
    assert done.stderr == b""


# ---- errors the user can fix --------------------------------------------------------------


async def test_command_not_found(sidecar):
    done = await sidecar.run("run", "--", "no-such-agent-command-xyz", "--flag")
    assert done.returncode == 127
    assert "no-such-agent-command-xyz" in one_sidecar_line(done.err)
    assert done.stdout == b""


async def test_command_not_executable(sidecar, tmp_path):
    target = tmp_path / "not-executable.sh"
    target.write_text("#!/bin/sh\necho hi\n")
    target.chmod(0o644)
    done = await sidecar.run("run", "--", str(target))
    assert done.returncode == 126
    assert str(target) in one_sidecar_line(done.err)


async def test_no_command(sidecar):
    done = await sidecar.run("run", "--")
    assert done.returncode == 2
    assert "no command" in one_sidecar_line(done.err)


@pytest.mark.parametrize("command", ["run", "serve"])
async def test_port_in_use(sidecar, tmp_path, command):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    marker = tmp_path / "agent-ran"
    try:
        args = ["--", PY, "-c", f"open({str(marker)!r}, 'w')"] if command == "run" else []
        done = await sidecar.run(command, "--port", str(port), *args)
    finally:
        held.close()
    assert done.returncode == 2
    line = one_sidecar_line(done.err)
    assert f"port {port}" in line and "in use" in line
    assert not marker.exists()


@pytest.mark.parametrize("how, text, key", [
    ("flag", "[proxy]\nbogus_setting = 1\n", "bogus_setting"),
    ("flag", '[proxy]\nport = "eighty"\n', "port"),
    ("flag", '[cache]\nmode = "sometimes"\n', "mode"),
    ("flag", "[nonsense]\nx = 1\n", "nonsense"),
    ("env", "[proxy]\nbogus_setting = 1\n", "bogus_setting"),   # the file named by SIDECAR_CONFIG
], ids=["unknown-key", "wrong-type", "bad-choice", "unknown-section", "via-SIDECAR_CONFIG"])
async def test_invalid_config_file(sidecar, tmp_path, how, text, key):
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    marker = tmp_path / "agent-ran"
    agent = ["--", PY, "-c", f"open({str(marker)!r}, 'w')"]
    if how == "flag":
        done = await sidecar.run("run", "--config", str(path), *agent)
    else:
        done = await sidecar.run("run", *agent, env={"SIDECAR_CONFIG": str(path)})
    assert done.returncode == 2
    line = one_sidecar_line(done.err)
    assert key in line and str(path) in line
    assert not marker.exists()


async def test_invalid_env_setting(sidecar):
    done = await sidecar.run("run", "--", PY, "-c", "pass", env={"SIDECAR_PROXY_READ_TIMEOUT": "soon"})
    assert done.returncode == 2
    line = one_sidecar_line(done.err)
    assert "read_timeout" in line and "environment" in line


async def test_config_shows_precedence(sidecar, tmp_path, isolated_env):
    path = tmp_path / "sidecar.toml"
    path.write_text('[proxy]\nport = 1111\nread_timeout = 11.0\nconnect_timeout = 3.0\n'
                    '[cache]\nmode = "read-only"\nttl_seconds = 60.0\n')
    env = {"SIDECAR_PROXY_PORT": "2222", "SIDECAR_PROXY_READ_TIMEOUT": "22", "SIDECAR_CACHE_MODE": "off",
           "ANTHROPIC_BASE_URL": "http://127.0.0.1:9/anthropic"}
    without_flags, with_flags = await asyncio.gather(
        sidecar.run("config", "--config", str(path), env=env),
        sidecar.run("config", "--config", str(path), "--port", "3333", "--cache", "refresh", env=env))
    for done in (without_flags, with_flags):
        assert done.returncode == 0, done.err
        assert done.stderr == b""
    plain, flagged = tomllib.loads(without_flags.out), tomllib.loads(with_flags.out)
    for conf in (plain, flagged):
        assert conf["proxy"]["read_timeout"] == 22.0       # env over file
        assert conf["proxy"]["connect_timeout"] == 3.0     # file over default
        assert conf["proxy"]["max_body_mb"] == 32.0        # default
        assert conf["cache"]["ttl_seconds"] == 60.0
        assert conf["upstream"]["anthropic"] == "http://127.0.0.1:9/anthropic"
        assert conf["state"]["dir"] == str(isolated_env)
    assert (plain["proxy"]["port"], plain["cache"]["mode"]) == (2222, "off")              # env over file
    assert (flagged["proxy"]["port"], flagged["cache"]["mode"]) == (3333, "refresh")      # flag over env


# ---- one shared server, several agents ----------------------------------------------------


async def test_serve_with_two_connected_agents(sidecar, script, mock):
    server = await sidecar.spawn("serve", env=upstream_env(mock))
    banner = await asyncio.wait_for(server.stderr.readline(), 20)
    found = re.search(rb"serving on (http://127\.0\.0\.1:\d+)", banner)
    assert found, banner
    url = found.group(1).decode()
    agent = str(script(CONNECT_AGENT))
    # The agents' own environment names no upstream: the mock is reachable only through the server.
    first, second = await asyncio.gather(
        sidecar.run("run", "--quiet", "--connect", url, "--", PY, agent),
        sidecar.run("run", "--quiet", "--connect", url, "--", PY, agent, env={"SIDECAR_PROXY_AGENT_ID": "agent-b"}))
    ids = []
    for done in (first, second):
        assert done.returncode == 0, done.err
        assert done.stderr == b""
        head, text = done.out.splitlines()
        agent_id, base = head.split()
        assert base == f"{url}/a/{agent_id}"
        assert text
        ids.append(agent_id)
    assert ids[1] == "agent-b" and ids[0] != ids[1]
    assert [r.path for r in mock.received] == ["/v1/messages", "/v1/messages"]

    server.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.wait(), 10) == 0
    assert await server.stdout.read() == b""
