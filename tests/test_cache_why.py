"""Why did this miss: each entry keeps its canonical request (never a credential), `sidecar cache list` says which
request an entry answers, `sidecar cache why` names the fields in which a miss differs from the nearest entry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anthropic
import pytest

from conftest import until

from agent_sidecar.proxy.entry import MAGIC, CorruptEntry, Entry

PY = sys.executable
SECRET = "sk-ant-very-secret-key-123"


def sidecar(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([PY, "-m", "agent_sidecar.launcher", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert "Traceback" not in done.stderr + done.stdout and "unexpected" not in done.stderr, done.stderr
    return done


async def ask(url: str, text: str, key: str = SECRET, version: str | None = None, max_tokens: int = 32) -> None:
    headers = {"anthropic-version": version} if version else None
    async with anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0, timeout=20,
                                        default_headers=headers) as client:
        await client.messages.create(model="claude-mock-1", max_tokens=max_tokens, system="Be brief.",
                                     messages=[{"role": "user", "content": text}])


@pytest.fixture
async def proxy(start_app, mock, isolated_env):
    # the default state dir of the CLI is the proxy's here
    return await start_app(mock.url, state={"dir": str(isolated_env)})


async def test_list_says_which_request_each_entry_answers(proxy, tmp_path):
    await ask(proxy.url, "Tell me about the rivers of France, their sources and their mouths")
    await proxy.state.cache.drain()
    done = sidecar("cache", "list", cwd=tmp_path)
    header, row = done.stdout.splitlines()
    assert header.split()[0] == "key" and header.rstrip().endswith("request")
    key = row.split()[0]
    assert len(key) == 12 and all(c in "0123456789abcdef" for c in key)
    assert row.endswith('/v1/messages claude-mock-1  "Tell me about the rivers of France, their"'), row


async def test_why_names_the_fields_that_differ_from_the_nearest_entry(proxy, tmp_path, isolated_env):
    await ask(proxy.url, "Tell me about the rivers of France")
    await ask(proxy.url, "Tell me about the lakes of Italy")
    await ask(proxy.url, "Tell me about the rivers of Spain", max_tokens=64)   # the last miss
    await proxy.state.cache.drain()
    done = sidecar("cache", "why", cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("the last miss (key ") and "agent default" in lines[0]
    assert "against the nearest, entry " in lines[1] and "2 fields differ" in lines[1], done.stdout
    fields = {line.split()[0]: line for line in lines[2:]}
    assert set(fields) == {"body.max_tokens", "body.messages[0].content"}
    assert '"Tell me about the rivers of Spain"  !=  "Tell me about the rivers of France"' in \
        fields["body.messages[0].content"]


async def test_the_last_miss_is_the_newest_whether_noted_in_the_store_or_in_a_file(proxy, tmp_path, isolated_env):
    """Up to 16 KB the note joins the store's next commit (no file); a larger request goes to a file; the newer
    of the two is the last miss."""
    from agent_sidecar.proxy.last_miss import IN_STORE, LAST_MISS
    await ask(proxy.url, "Tell me about the rivers of France")
    await ask(proxy.url, "Tell me about the rivers of Germany")
    await proxy.state.cache.drain()
    assert not (isolated_env / LAST_MISS).exists()
    noted = sidecar("cache", "why", cwd=tmp_path)
    assert '"Tell me about the rivers of Germany"  !=  "Tell me about the rivers of France"' in noted.stdout
    big = "Tell me about the rivers of Spain " + "x" * IN_STORE
    await ask(proxy.url, big)
    await until(lambda: (isolated_env / LAST_MISS).exists())
    noted = sidecar("cache", "why", cwd=tmp_path)
    assert noted.stdout.startswith("the last miss") and "rivers of Spain" in noted.stdout, noted.stdout
    await ask(proxy.url, "Tell me about the rivers of Italy")   # small again: the store's note is the newer
    await proxy.state.cache.drain()
    noted = sidecar("cache", "why", cwd=tmp_path)
    assert '"Tell me about the rivers of Italy"' in noted.stdout and "x" * 100 not in noted.stdout, noted.stdout


async def test_the_sdks_anthropic_version_is_part_of_the_key(proxy, tmp_path):
    await ask(proxy.url, "Same words")
    await ask(proxy.url, "Same words", version="2024-01-01")
    await proxy.state.cache.drain()
    lines = sidecar("cache", "why", cwd=tmp_path).stdout.splitlines()
    assert "1 field differ" in lines[1]
    sdk_version = anthropic.Anthropic(api_key="k").default_headers["anthropic-version"]   # what the SDK sends
    assert lines[2].split() == ["headers.anthropic-version", '"2024-01-01"', "!=", f'"{sdk_version}"']


async def test_the_same_request_with_another_key_is_a_credential_miss(proxy, tmp_path):
    await ask(proxy.url, "Same words")
    await ask(proxy.url, "Same words", key="sk-ant-another-key")
    await proxy.state.cache.drain()
    done = sidecar("cache", "why", cwd=tmp_path)
    assert "have the same canonical request: the key differs by the credential" in done.stdout


async def test_a_replay_miss_is_explained(start_app, mock, isolated_env, tmp_path):
    recorder = await start_app(mock.url, state={"dir": str(isolated_env)})
    await ask(recorder.url, "What is the capital of France?")
    await recorder.state.cache.drain()
    replayer = await start_app(mock.url, state={"dir": str(isolated_env)}, cache={"mode": "replay"})
    with pytest.raises(anthropic.NotFoundError):
        await ask(replayer.url, "What is the capital of Spain?")
    await replayer.state.cache.drain()
    done = sidecar("cache", "why", cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert '"What is the capital of Spain?"  !=  "What is the capital of France?"' in lines[2], done


async def test_no_credential_reaches_the_disk(start_app, mock, isolated_env):
    proxy = await start_app(mock.url, state={"dir": str(isolated_env)},
                            cache={"key_headers": ["anthropic-version", "x-api-key", "authorization"]})
    await ask(proxy.url, "Keep my key to yourself")
    await proxy.state.cache.drain()
    await proxy.state.records.drain()
    for path in isolated_env.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    [(_, blob)] = list(proxy.state.cache.store.items())
    assert b'"anthropic-version"' in bytes(Entry.decode(blob).request)


def test_entries_keep_their_request_and_old_ones_still_read():
    entry = Entry(status=200, headers=[("content-type", "application/json")], body=b'{"ok":1}', stream=False,
                  meta={"path": "/v1/messages"}, request=b'{"body":{"model":"m"}}')
    again = Entry.decode(entry.encode())
    assert (again.body, bytes(again.request)) == (b'{"ok":1}', b'{"body":{"model":"m"}}')
    old = Entry(status=200, headers=[], body=b"{}", stream=False).encode()
    assert old[:3] == MAGIC and Entry.decode(old).request == b"" and Entry.decode(old).body == b"{}"
    blob = entry.encode()
    with pytest.raises(CorruptEntry):
        Entry.decode(blob[:-30])   # the request's length runs past the end


async def test_why_with_nothing_to_compare_is_one_line(tmp_path, isolated_env):
    done = sidecar("cache", "why", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("sidecar: no miss noted yet")
    done = sidecar("cache", "why", "a", "b", "c", cwd=tmp_path)
    assert done.returncode == 2 and "at most two" in done.stderr
