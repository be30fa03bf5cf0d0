"""Secrets stay secret: a cache partition per credential, private file modes, no request headers in logs.

The partition tests run the proxy in-process on a real port against the mock
(which speaks the Anthropic and OpenAI APIs: the partition does not depend on
the API, so Azure's and Gemini's credentials ride on those routes). The mode
and log tests run `sidecar run`, `sidecar run --shared` and `sidecar serve`
as real processes and send them raw, malformed HTTP requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from conftest import upstream_env
from agent_sidecar.proxy.cache_key import MEMO_SIZE, KeyMaker

ANTHROPIC = {"path": "/v1/messages", "headers": {"anthropic-version": "2023-06-01"},
             "body": {"model": "claude-mock-1", "max_tokens": 32, "messages": [{"role": "user", "content": "Hi."}]}}
OPENAI = {"path": "/v1/chat/completions", "headers": {},
          "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi."}]}}
NOT_LOGGED = "the request is not logged"
ROOT = Path(__file__).resolve().parent.parent


async def ask(url: str, api: dict, headers: dict | None = None, query: str = "") -> tuple[str, str]:
    """One call; returns (x-sidecar-cache, the answer's id)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url + api["path"] + query, json=api["body"],
                                headers={**api["headers"], **(headers or {})}) as resp:
            assert resp.status == 200, await resp.text()
            return resp.headers["x-sidecar-cache"], (await resp.json())["id"]


def leaks(root: Path, secrets: list[str]) -> list[str]:
    """Files under root holding any of the secrets (a binary grep)."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {s}" for s in secrets if s.encode() in data]
    return found


def wrong_modes(modes: dict[str, tuple[bool, int]]) -> dict[str, str]:
    """Entries whose mode is not 0700 (a directory) or 0600 (a file)."""
    return {path: oct(mode) for path, (is_dir, mode) in modes.items() if mode != (0o700 if is_dir else 0o600)}


def modes_of(root: Path) -> dict[str, tuple[bool, int]]:
    return {str(p.relative_to(root)): (p.is_dir(), stat.S_IMODE(p.lstat().st_mode)) for p in [root, *root.rglob("*")]}


# ---- the cache partition ---------------------------------------------------------------------------------


CREDENTIALS = {   # how a call carries credential `value`: (api, headers, query)
    "api-key": lambda value: (OPENAI, {"api-key": value}, ""),
    "x-goog-api-key": lambda value: (ANTHROPIC, {"x-goog-api-key": value}, ""),
    "key-query": lambda value: (ANTHROPIC, {}, f"?alt=json&key={value}"),
    "configured-header": lambda value: (ANTHROPIC, {"x-gateway-key": value}, ""),
}


@pytest.mark.parametrize("kind", list(CREDENTIALS))
async def test_distinct_credentials_never_share_an_answer(start_app, mock, kind):
    px = await start_app(mock.url, cache={"credential_headers": ["X-Gateway-Key"]})
    carry = CREDENTIALS[kind]
    state_a, answer_a = await ask(px.url, *carry("secret-A"))
    await px.state.cache.drain()
    state_b, answer_b = await ask(px.url, *carry("secret-B"))
    await px.state.cache.drain()
    assert (state_a, state_b) == ("miss", "miss") and answer_a != answer_b
    # The same value hits its own answer, and only its own.
    assert await ask(px.url, *carry("secret-A")) == ("hit", answer_a)
    assert await ask(px.url, *carry("secret-B")) == ("hit", answer_b)
    assert mock.count() == 2


async def test_a_call_without_credentials_is_its_own_partition(start_app, mock):
    px = await start_app(mock.url)
    state, bare = await ask(px.url, ANTHROPIC)
    await px.state.cache.drain()
    assert state == "miss"
    # One value in different credential headers: each a partition, none the bare one.
    answers = {bare}
    for headers in ({"x-api-key": "same"}, {"api-key": "same"}, {"x-goog-api-key": "same"}):
        state, answer = await ask(px.url, ANTHROPIC, headers)
        await px.state.cache.drain()
        assert state == "miss", headers
        answers.add(answer)
    state, answer = await ask(px.url, ANTHROPIC, query="?key=same")
    await px.state.cache.drain()
    assert state == "miss"
    answers.add(answer)
    assert len(answers) == 5 and mock.count() == 5
    assert await ask(px.url, ANTHROPIC) == ("hit", bare)


def old_partition(secret: bytes, headers) -> bytes:
    """The partition as it was before api-key, x-goog-api-key and key= counted."""
    credential = "\0".join(headers.get(h, "") for h in ("x-api-key", "authorization"))
    return hmac.new(secret, credential.encode(), hashlib.sha256).digest()[:16]


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "sk-ant-1"}, {"Authorization": "Bearer sk-2"},
                                     {"x-api-key": "sk-ant-1", "authorization": "Bearer sk-2"},
                                     {"x-api-key": "sk-ant-1", "anthropic-version": "2023-06-01", "user-agent": "x"}])
def test_partitions_of_x_api_key_and_authorization_are_unchanged(headers):
    """The user's existing cache keeps hitting: nothing new is mixed in unless a new credential is present."""
    keys = KeyMaker(b"s" * 32, (), (), credential_headers=("x-gateway-key",))
    headers = CIMultiDict(headers)
    assert keys.partition(headers, "beta=true") == keys.partition(headers) == old_partition(b"s" * 32, headers)
    assert keys.partition(CIMultiDict(headers, **{"api-key": "k"})) != old_partition(b"s" * 32, headers)


def test_key_query_is_left_out_of_the_canonical_request():
    keys = KeyMaker(b"s" * 32, (), ())
    bare = keys.canonical("POST", "/v1beta/models/m:generateContent", "alt=sse&monkey=1", {}, {"a": 1})
    for query in ("key=AIzaSECRET&alt=sse&monkey=1", "alt=sse&key=AIzaSECRET&monkey=1", "alt=sse&monkey=1&key=x"):
        canonical = keys.canonical("POST", "/v1beta/models/m:generateContent", query, {}, {"a": 1})
        assert canonical == bare and b"SECRET" not in canonical
    assert keys.partition({}, "alt=sse&key=A") != keys.partition({}, "alt=sse&key=B") != keys.partition({}, "alt=sse")


def test_partition_memo_is_bounded():
    keys = KeyMaker(b"s" * 32, (), ())
    first = keys.partition({"x-api-key": "key-0"})
    for n in range(MEMO_SIZE + 10):
        keys.partition({"x-api-key": f"key-{n}"})
    assert len(keys._memo) <= MEMO_SIZE
    assert keys.partition({"x-api-key": "key-0"}) == first


async def test_no_credential_reaches_the_state_directory(start_app, mock):
    px = await start_app(mock.url, cache={"credential_headers": ["x-gateway-key"]})
    secrets = {"x-api-key": "sk-ant-api03-LEAKCHECK-xapikey", "authorization": "Bearer sk-proj-LEAKCHECK-bearer",
               "api-key": "LEAKCHECK-azure-0123456789abcdef", "x-goog-api-key": "AIzaLEAKCHECK-goog-header",
               "x-gateway-key": "LEAKCHECK-gateway"}
    query_key = "AIzaLEAKCHECK-goog-query"
    for name, value in secrets.items():
        for _ in range(2):   # a miss, then a hit
            await ask(px.url, OPENAI if name in ("authorization", "api-key") else ANTHROPIC, {name: value})
    for _ in range(2):
        await ask(px.url, ANTHROPIC, query=f"?key={query_key}")
    assert mock.count() == 6
    await px.server.close()   # drains every write and closes the store
    assert (px.state_dir / "lmdb" / "data.mdb").stat().st_size > 0
    assert leaks(px.state_dir, [*secrets.values(), query_key, "LEAKCHECK"]) == []


# ---- file modes, and no headers in the logs of `sidecar run` and the shared sidecar ---------------------------


AGENT = r'''
import json, os, socket, stat, sys, urllib.request
from pathlib import Path
from urllib.parse import urlsplit

secret = sys.argv[1]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
body = {"model": "claude-mock-1", "max_tokens": 32, "messages": [{"role": "user", "content": sys.argv[2]}]}
request = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", data=json.dumps(body).encode(),
                                 headers={"x-api-key": secret, "anthropic-version": "2023-06-01",
                                          "content-type": "application/json"})
with opener.open(request, timeout=30) as response:
    json.loads(response.read())
url = urlsplit(os.environ["SIDECAR_URL"])
for bad in (b"x-api-key: %s\x01\r\n", b"x-api-key: %s\nfoo: bar\r\n"):   # a bad header line quoting the key
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n" + bad % secret.encode() + b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    print("BAD", answer.split(b"\r\n", 1)[0].decode(), flush=True)
root = Path(os.environ["SIDECAR_STATE_DIR"])
modes = {}
for path in [root, *root.rglob("*")]:
    try:
        modes[str(path.relative_to(root))] = [path.is_dir(), stat.S_IMODE(path.lstat().st_mode)]
    except FileNotFoundError:   # a temporary renamed meanwhile
        pass
print("MODES", json.dumps(modes), flush=True)
'''


def printed(out: str, label: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(label + " ")]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_state_files_are_private_and_logs_hold_no_headers(sidecar, mock, script, isolated_env):
    agent = str(script(AGENT))
    secret = "sk-ant-api03-SECRETinTHElog-0123456789"
    shared_pid = None
    try:
        done = await sidecar.run("run", "--quiet", "--", sys.executable, agent, secret, "plain run",
                                 env=upstream_env(mock))
        assert done.returncode == 0, done.err
        during_run = {k: tuple(v) for k, v in json.loads(printed(done.out, "MODES")[0]).items()}
        done = await sidecar.run("run", "--shared", "--quiet", "--", sys.executable, agent, secret, "shared run",
                                 env=upstream_env(mock))
        assert done.returncode == 0, done.err
        shared_pid = json.loads((isolated_env / "shared.json").read_text())["pid"]
        during_shared = {k: tuple(v) for k, v in json.loads(printed(done.out, "MODES")[0]).items()}
        assert printed(done.out, "BAD") == ["HTTP/1.0 400 Bad Request"] * 2
    finally:
        stopped = await sidecar.run("stop", timeout=30)
        if shared_pid is not None and alive(shared_pid):
            os.kill(shared_pid, signal.SIGKILL)
    assert stopped.returncode == 0, stopped.err
    after = modes_of(isolated_env)
    # What each kind of run writes was there to be checked.
    assert any(re.fullmatch(r"run/\d+\.json", path) for path in during_run), sorted(during_run)
    for path in ("partition.secret", "lmdb/data.mdb", "lmdb/lock.mdb", "logs/proxy.log"):
        assert path in during_run, (path, sorted(during_run))
    for path in ("shared.json", "shared.lock", "logs/shared.log"):
        assert path in during_shared, (path, sorted(during_shared))
    assert "events.jsonl" in after, sorted(after)
    assert wrong_modes(during_run) == {} and wrong_modes(during_shared) == {} and wrong_modes(after) == {}
    # aiohttp's complaint about each bad request is one line, without the request.
    for log in ("proxy.log", "shared.log"):
        text = (isolated_env / "logs" / log).read_text()
        assert text.count(NOT_LOGGED) == 2, text
        assert "Traceback" not in text, text
    assert leaks(isolated_env, [secret, "SECRETinTHElog"]) == []


# ---- `sidecar serve`: what it prints --------------------------------------------------------------------------


BAD_REQUESTS = [
    b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: %s\x01\r\n\r\n",          # a bad byte in its value
    b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: %s\r\nbad header line\r\n\r\n",
    b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: %s\nfoo: bar\r\n\r\n",       # a bare LF
    b"POST /v1/messages HTTP/1.1\r\nx-api-key: %s\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
]


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_serve_logs_bad_requests_without_their_headers(sidecar, mock, isolated_env, parser):
    secret = "sk-ant-api03-SECRETonSTDERR-abcdef012345"
    env = {**upstream_env(mock), **({"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "python" else {})}
    server = await sidecar.spawn("serve", env=env)
    banner = await asyncio.wait_for(server.stderr.readline(), 20)
    port = int(re.search(rb"serving on http://127\.0\.0\.1:(\d+)", banner).group(1))
    for request in BAD_REQUESTS:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request % secret.encode())
        answer = await asyncio.wait_for(reader.read(), 20)   # the 400, then aiohttp closes the connection
        writer.close()
        await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.0 400 ") or answer.startswith(b"HTTP/1.1 400 "), answer
    server.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.wait(), 20) == 0
    err = (await server.stderr.read()).decode()
    assert secret not in err and "SECRETonSTDERR" not in err, err
    assert err.count(NOT_LOGGED) == len(BAD_REQUESTS) and "Traceback" not in err, err
    assert leaks(isolated_env, [secret, "SECRETonSTDERR"]) == []


def test_sidecars_starting_together_share_one_whole_secret(tmp_path):
    """Eight processes create the partition secret at the same moment: each reads the same 32 bytes."""
    code = "import sys; from pathlib import Path; from agent_sidecar.proxy.cache_key import load_secret; " \
           "sys.stdout.write(load_secret(Path(sys.argv[1])).hex())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "state")], env=env,
                                 stdout=subprocess.PIPE) for _ in range(8)]
    secrets = {child.communicate(timeout=60)[0] for child in children}
    assert len(secrets) == 1 and len(bytes.fromhex(secrets.pop().decode())) == 32
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["partition.secret"]   # no drafts left
