"""State that survives: a full disk, a broken or foreign store, two sidecars growing one map.

Real processes on real file systems: the mock upstream (`python -m bench.mock_upstream`) and `sidecar serve`
run as children; the full disk is a 5 MB tmpfs (skipped where mount is not permitted); the CLI runs as
`python -m agent_sidecar.launcher`. Every call through the proxy must be answered.
- test_full_disk: large answers, 8 at once, on a nearly full tmpfs: every call answered, the process alive, one
  `store_unavailable` event; space freed, the next answer is stored and the event cleared.
- test_broken_store[<kind>]: a corrupt header, corrupt pages, a newer format, a foreign file: one line
  `sidecar: ...` naming data.mdb and the fix, status 2, for `stats`, `cache stats`, `sessions list`; the
  proxy starts anyway and forwards uncached, its stats and live page answer; `sidecar cache clear`, run while
  the proxy serves, fixes it: the proxy opens the new store at its next call, caches again, clears the event.
- test_the_byte_budget_holds_under_a_long_run: [state] max_mb = 4, three times that written by a real
  `sidecar serve`: the file stays within it, old entries and an exited agent's conversations go first, a
  running agent's conversation is kept whole, every call answered.
- test_map_grown_by_another_process: a child grows the map; this process's readers (records, sessions,
  cache items) adopt it instead of raising MapResizedError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import stop_process
from agent_sidecar.proxy.state_budget import StateBudget
from agent_sidecar.proxy.store import Lmdb

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
pytestmark = pytest.mark.timeout(120)


def child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPENAI_", "SIDECAR_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONPATH": str(ROOT)}


def start(args: list[str], log: Path, ready: str, env: dict) -> tuple[subprocess.Popen, str]:
    """A child process, once `ready` shows in its stderr; returns it and the URL that follows `ready`."""
    with log.open("wb") as out:
        proc = subprocess.Popen([PY, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out,
                                start_new_session=True)
    deadline = time.monotonic() + 30
    while ready not in (text := log.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"{args} did not start: {text}")
        time.sleep(0.02)   # another process starting: a short poll with a deadline
    return proc, text.split(ready, 1)[1].split()[0]


class Rig:
    """A mock upstream and a `sidecar serve` with its state directory at `state`."""

    def __init__(self, tmp: Path, state: Path, output_tokens: int = 12, state_settings: str = ""):
        self.env = child_env(tmp / "home")
        self.config = tmp / "config.toml"
        self.mock, url = start(["-m", "agent_sidecar.bench.mock_upstream", "--port", "0", "--output-tokens", str(output_tokens)],
                               tmp / "mock.log", "listening on ", self.env)
        self.config.write_text(f'[upstream]\nanthropic = "{url}"\nopenai = "{url}/v1"\n[state]\ndir = "{state}"\n'
                               f'{state_settings}\n[cache]\nmax_size_mb = 64.0\n')
        self.log = tmp / "sidecar.log"
        self.proc = None
        self.proc, self.url = start(["-m", "agent_sidecar.launcher", "serve", "--port", "0", "--config", str(self.config)],
                                    self.log, "serving on ", self.env)

    def close(self) -> None:
        for proc in (self.proc, self.mock):
            if proc is not None:
                stop_process(proc)

    def call(self, text: str | list, agent: str = "") -> tuple[int, dict]:
        messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
        body = json.dumps({"model": "claude-test", "max_tokens": 30000, "temperature": 0,
                           "messages": messages}).encode()
        prefix = f"/a/{agent}" if agent else ""
        request = urllib.request.Request(self.url + prefix + "/v1/messages", body, method="POST", headers={
            "content-type": "application/json", "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"})
        with urllib.request.urlopen(request, timeout=30) as reply:   # a bound against a hang, not a timing
            return reply.status, {k.lower(): v for k, v in reply.headers.items()} | {"body": reply.read()}

    def get(self, path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(self.url + path, timeout=30) as reply:
            return reply.status, reply.read()

    def overview(self) -> dict:
        return json.loads(self.get("/_sidecar/overview")[1])

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "agent_sidecar.launcher", *args, "--config", str(self.config)], cwd=ROOT, env=self.env,
                              capture_output=True, timeout=60)


@pytest.fixture(params=[5, 24], ids=["pwrite", "writemap"])
def tmpfs(tmp_path, request):
    """5 MB: no room for a first writemap map, the store uses pwrite(); 24 MB: a writemap store, its 16 MB map
    reserved before the disk fills."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {request.param} MB tmpfs here ({done.stderr.decode().strip()}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk(tmp_path, tmpfs):
    state = tmpfs / "state"
    rig = Rig(tmp_path, state, output_tokens=20000)   # answers of about 150 KB
    try:
        filler = tmpfs / "filler"
        with filler.open("wb") as out:   # all but about 1.5 MB of the file system
            out.write(b"\0" * (int(os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize) - (3 << 19)))
        calls = 120   # enough to fill a reserved map too
        with ThreadPoolExecutor(8) as pool:   # under load: 8 calls at once
            answered = list(pool.map(lambda i: rig.call(f"full disk {i}")[0], range(calls)))
        assert answered == [200] * calls
        assert rig.proc.poll() is None, rig.log.read_text()
        overview = rig.overview()
        assert "store_unavailable" in overview["active_events"], overview
        raised = [e for e in overview["events"] if e["kind"] == "store_unavailable"]
        assert [e["state"] for e in raised] == ["raised"], raised
        assert "free disk space" in raised[0]["fix"]
        stored = overview["cache"]["entries"]
        assert stored < calls

        filler.unlink()   # space returns: the next answer is stored
        assert rig.call("after the disk was freed")[0] == 200
        overview = rig.overview()
        assert overview["cache"]["entries"] == stored + 1
        assert "store_unavailable" not in overview["active_events"]
        ours = sorted((e for e in overview["events"] if e["kind"] == "store_unavailable"), key=lambda e: e["ts"])
        assert [e["state"] for e in ours] == ["raised", "cleared"], ours
        status, headers = rig.call("after the disk was freed")
        assert status == 200 and headers.get("x-sidecar-cache") == "hit", headers
        assert rig.proc.poll() is None
    finally:
        rig.close()
    assert "Bus error" not in rig.log.read_text() and "Traceback" not in rig.log.read_text()


def test_the_byte_budget_holds_under_a_long_run(tmp_path):
    """Three times the budget written (answers of about 20 KB, a checkpoint and a record per call): the file
    never passes [state] max_mb; an exited agent's conversations and old entries go, oldest first; the
    running agent's conversation is kept whole; every call is answered."""
    budget = 4 << 20
    rig = Rig(tmp_path, tmp_path / "state", output_tokens=2500, state_settings="max_mb = 4.0")
    try:
        token = next((tmp_path / "state" / "tokens").glob("*.token")).read_text()
        for doc in ({"id": "keeper", "event": "started", "pid": os.getpid()},
                    {"id": "done", "event": "started", "pid": os.getpid()}, {"id": "done", "event": "exited"}):
            request = urllib.request.Request(rig.url + "/_sidecar/agents", json.dumps(doc).encode(), method="POST",
                                             headers={"content-type": "application/json", "x-sidecar-token": token})
            with urllib.request.urlopen(request, timeout=30) as reply:
                assert reply.status == 200
        data, history, sizes = tmp_path / "state" / "lmdb" / "data.mdb", [], []
        for n in range(600):
            assert rig.call(f"a one-off question {n}", agent="done")[0] == 200
            if n % 40 == 0:   # the keeper's conversation: a turn now and then
                history.append({"role": "user", "content": f"keeper turn {n // 40}"})
                status, reply = rig.call(history, agent="keeper")
                assert status == 200
                history.append({"role": "assistant", "content": json.loads(reply["body"])["content"]})
                sizes.append(data.stat().st_size)
        sizes.append(data.stat().st_size)
        assert max(sizes) <= budget, str(sizes)

        assert rig.call("a one-off question 599", agent="done")[1].get("x-sidecar-cache") == "hit"   # the newest
        assert rig.call("a one-off question 0", agent="done")[1].get("x-sidecar-cache") == "miss"   # evicted
        listed = rig.cli("sessions", "list", "--limit", "1000")
        assert listed.returncode == 0, listed
        # session, updated (date and time), turns, messages, agent, model
        rows = [line.split() for line in listed.stdout.decode().splitlines()[1:] if line.strip()]
        keeper = [row for row in rows if row[5] == "keeper"]
        assert len(keeper) == 1 and keeper[0][4] == str(len(history)), keeper   # kept, whole
        assert 20 < sum(1 for row in rows if row[5] == "done") < 600              # the oldest went
        overview = rig.overview()
        assert overview["cache"]["entries"] < 600
        assert not [e for e in overview["events"] if e["kind"] == "checkpoint_evicted"]   # no running one went
        assert rig.proc.poll() is None
    finally:
        rig.close()
    assert "Traceback" not in rig.log.read_text()
    env = Lmdb(tmp_path / "state", 1 << 20)   # the pages in use, counted as the budget counts them
    try:
        assert env.read(StateBudget(env, budget).used) <= budget
    finally:
        env.close()


def _store_with_data(state: Path) -> Path:
    """A state store with cache entries in it (written by a CLI process, as a past run would leave it)."""
    code = ("import sys; from pathlib import Path; from agent_sidecar.proxy.store import Lmdb\n"
            "from agent_sidecar.proxy.response_store import ResponseStore\n"
            "env = Lmdb(Path(sys.argv[1]), 1 << 20); store = ResponseStore(env, 1 << 30)\n"
            "store.import_now([(b'k%04d' % i, b'v' * 3000) for i in range(200)]); env.close()\n")
    subprocess.run([PY, "-c", code, str(state)], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return state / "lmdb" / "data.mdb"


def _header(data: Path) -> None:
    with data.open("r+b") as out:
        out.write(os.urandom(4096))


def _pages(data: Path) -> None:
    with data.open("r+b") as out:
        out.seek(2 * 4096)
        out.write(os.urandom(data.stat().st_size - 2 * 4096))


def _newer(data: Path) -> None:
    code = ("import sys, lmdb; env = lmdb.open(sys.argv[1], max_dbs=9); meta = env.open_db(b'meta')\n"
            "with env.begin(write=True) as txn: txn.put(b'format', b'99', db=meta)\n")
    subprocess.run([PY, "-c", code, str(data.parent)], check=True, timeout=30)


def _foreign(data: Path) -> None:
    data.write_text("this is the notes file of another program\n" * 100)


@pytest.mark.parametrize("kind", ["header", "pages", "newer", "foreign"])
def test_broken_store(tmp_path, kind):
    state = tmp_path / "state"
    data = _store_with_data(state)
    {"header": _header, "pages": _pages, "newer": _newer, "foreign": _foreign}[kind](data)
    rig = Rig(tmp_path, state)
    try:
        for command in (["stats"], ["cache", "stats"], ["sessions", "list"]):
            done = rig.cli(*command)
            err = done.stderr.decode()
            assert done.returncode == 2, (command, done)
            assert err.count("\n") == 1 and err.startswith("sidecar: "), (command, err)
            assert str(data) in err and "sidecar cache clear" in err and "aside" in err, err

        for i in range(2):   # the proxy started anyway: forwarded, uncached
            status, headers = rig.call("through a broken store")
            assert status == 200
            assert headers.get("x-sidecar-cache") != "hit", headers
        assert rig.get("/_sidecar/stats")[0] == 200
        assert rig.get("/_sidecar/")[0] == 200
        overview = rig.overview()
        assert "store_unavailable" in overview["active_events"], overview
        assert rig.proc.poll() is None

        done = rig.cli("cache", "clear")   # the fix the message names, while the proxy runs
        assert done.returncode == 0, done
        assert b"running sidecar uses it from its next call" in done.stdout, done.stdout
        assert any(p.name.startswith("lmdb.broken-") for p in state.iterdir())
        assert rig.cli("cache", "stats").returncode == 0
        # the running proxy opens the new store by itself: caching resumes, the event clears
        assert rig.call("after the clear")[1].get("x-sidecar-cache") == "miss"
        assert rig.call("after the clear")[1].get("x-sidecar-cache") == "hit"
        overview = rig.overview()
        assert "store_unavailable" not in overview["active_events"], overview
        ours = sorted((e for e in overview["events"] if e["kind"] == "store_unavailable"), key=lambda e: e["ts"])
        assert [e["state"] for e in ours] == ["raised", "cleared"], ours
        assert rig.proc.poll() is None
        assert "Traceback" not in rig.log.read_text()
    finally:
        rig.close()


GROW = """
import sys, time, orjson
from pathlib import Path
import agent_sidecar.proxy.store
agent_sidecar.proxy.store.MIN_MAP = 1 << 20
from agent_sidecar.proxy.store import Lmdb
from agent_sidecar.proxy.response_store import ResponseStore
env = Lmdb(Path(sys.argv[1]), 1 << 20)
store = ResponseStore(env, 1 << 30)
for i in range(40):
    store.import_now([(b'grown%04d' % i, b'g' * 100_000)])
db = env.db['sessions']
env.write_now(lambda txn: txn.put(b's:grown', orjson.dumps({"id": "grown", "updated": time.time()}), db=db))
rec = env.db['records']
env.write_now(lambda txn: txn.put(b'\\x41' * 12 + b'r', orjson.dumps({"id": "r", "ts": 1.0}), db=rec))
print(env.env.info()['map_size'])
env.close()
"""


def test_map_grown_by_another_process(tmp_path, monkeypatch):
    import agent_sidecar.proxy.store
    from agent_sidecar.proxy.records import RecordLog
    from agent_sidecar.proxy.response_store import ResponseStore
    from agent_sidecar.proxy.sessions import Sessions
    monkeypatch.setattr(agent_sidecar.proxy.store, "MIN_MAP", 1 << 20)
    env = agent_sidecar.proxy.store.Lmdb(tmp_path / "state", 1 << 20)   # this process: a 1 MB map
    try:
        store = ResponseStore(env, 1 << 30)
        records, sessions = RecordLog(env, 1000), Sessions(env)
        assert list(store.items()) == [] and sessions.list() == []
        grown = subprocess.run([PY, "-c", GROW, str(tmp_path / "state")], cwd=ROOT, capture_output=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert grown.returncode == 0, grown.stderr.decode()
        assert int(grown.stdout) >= 4 << 20  # the other process grew the map well beyond this one's
        assert [m["id"] for m in sessions.list()] == ["grown"]
        assert sum(1 for _ in store.items()) == 40
        assert [r["id"] for r in records.read()] == ["r"]
        assert store.stats()["entries"] == 40
        assert sessions.messages("grown") == []
    finally:
        env.close()
