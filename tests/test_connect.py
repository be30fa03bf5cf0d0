"""`sidecar run --connect URL`: every flag honoured or refused, every wrong URL one clear line before the agent
starts. Real processes: a `sidecar serve` in front of the mock API, agents using the official SDK."""

from __future__ import annotations

import asyncio
import re
import socket
import sys

import pytest

from conftest import upstream_env

PY = sys.executable

AGENT = r'''
import os, sys
import anthropic
open(os.environ["MARK"], "a").write("ran\n")
try:
    m = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, timeout=20).messages.create(
        model="claude-mock-1", max_tokens=16, messages=[{"role": "user", "content": sys.argv[1]}])
except anthropic.APIStatusError as exc:
    print("status", exc.status_code, exc.body["error"]["message"])
else:
    print("answer", m.content[0].text)
'''


@pytest.fixture
async def served(sidecar, mock):
    """A `sidecar serve` whose upstream is the mock; its URL."""
    server = await sidecar.spawn("serve", env=upstream_env(mock))
    banner = await asyncio.wait_for(server.stderr.readline(), 20)
    found = re.search(rb"serving on (http://127\.0\.0\.1:\d+)", banner)
    assert found, banner
    yield found.group(1).decode()


@pytest.fixture
def agent(script, tmp_path):
    mark = tmp_path / "ran"
    return str(script(AGENT)), {"MARK": str(mark)}, mark


def refused_port() -> socket.socket:
    placeholder = socket.socket()
    placeholder.bind(("127.0.0.1", 0))
    return placeholder


def one_line(done) -> str:
    text = done.err
    assert "Traceback" not in text + done.out and "unexpected" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidecar: "), text
    return lines[0]


async def test_nothing_listening_is_one_line_and_the_agent_never_starts(sidecar, agent):
    path, env, mark = agent
    with refused_port() as placeholder:
        url = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
        done = await sidecar.run("run", "--connect", url, "--", PY, path, "hi", env=env)
    assert done.returncode == 2
    line = one_line(done)
    assert f"no sidecar answers at {url}" in line and "'sidecar serve'" in line, line
    assert not mark.exists()


@pytest.mark.parametrize("url,says", [("127.0.0.1:44235", "--connect must look like http://127.0.0.1:PORT"),
                                      ("localhost", "--connect must look like http://127.0.0.1:PORT"),
                                      ("http://127.0.0.1:99999", "--connect must look like http://127.0.0.1:PORT"),
                                      ("ftp://127.0.0.1:21", "--connect must look like http://127.0.0.1:PORT")])
async def test_a_url_that_is_no_url_is_one_line(url, says, sidecar, agent):
    path, env, mark = agent
    done = await sidecar.run("run", "--connect", url, "--", PY, path, "hi", env=env)
    assert done.returncode == 2
    assert says in one_line(done)
    assert not mark.exists()


async def test_a_server_that_is_not_a_sidecar_is_one_line(sidecar, agent, mock):
    path, env, mark = agent
    done = await sidecar.run("run", "--connect", mock.url, "--", PY, path, "hi", env=env)
    assert done.returncode == 2
    line = one_line(done)
    assert f"{mock.url} is not a sidecar (HTTP 404" in line and "'sidecar serve' prints" in line, line
    assert not mark.exists() and mock.count("/v1/messages") == 0


async def test_an_agent_base_url_is_not_the_sidecars_address(sidecar, agent, served):
    path, env, mark = agent
    done = await sidecar.run("run", "--connect", served + "/a/other", "--", PY, path, "hi", env=env)
    assert done.returncode == 2 and "without a path" in one_line(done)


@pytest.mark.parametrize("flags,says", [(["--port", "5555"], "drop --port"),
                                        (["--shared"], "--shared and --connect both choose"),
                                        (["--restore"], "--restore needs the agent's own sidecar")])
async def test_flags_that_cannot_apply_are_refused(flags, says, sidecar, agent, served):
    path, env, mark = agent
    done = await sidecar.run("run", "--connect", served, *flags, "--", PY, path, "hi", env=env)
    assert done.returncode == 2
    assert says in one_line(done)
    assert not mark.exists()


@pytest.mark.timeout(300)   # seven agents, one after the other
async def test_the_agents_cache_mode_reaches_the_server(sidecar, agent, served, mock, tmp_path):
    path, env, mark = agent
    # replay: a miss is an error, never an upstream call that spends tokens
    replayed = await sidecar.run("run", "--quiet", "--connect", served, "--cache", "replay", "--", PY, path, "new",
                                 env=env)
    assert replayed.returncode == 0, replayed.err
    assert replayed.out.startswith("status 404 sidecar: cache miss in replay mode"), replayed.out
    assert mock.count("/v1/messages") == 0

    recorded = await sidecar.run("run", "--quiet", "--connect", served, "--", PY, path, "new", env=env)
    assert recorded.out.startswith("answer") and mock.count("/v1/messages") == 1   # the server's own mode
    again = await sidecar.run("run", "--quiet", "--connect", served, "--cache", "replay", "--", PY, path, "new",
                              env=env)
    assert again.out == recorded.out and mock.count("/v1/messages") == 1          # replayed from the cache

    # off, from a config file: every call goes upstream, none is stored
    config = tmp_path / "off.toml"
    config.write_text('[cache]\nmode = "off"\n')
    for _ in range(2):
        off = await sidecar.run("run", "--quiet", "--config", str(config), "--connect", served, "--", PY, path,
                                "uncached", env=env)
        assert off.out.startswith("answer"), off.err
    assert mock.count("/v1/messages") == 3
    assert (await sidecar.run("run", "--quiet", "--connect", served, "--cache", "replay", "--", PY, path,
                              "uncached", env=env)).out.startswith("status 404")
