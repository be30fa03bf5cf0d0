"""Two `sidecar serve` processes on one state directory, one of them growing the LMDB map under the other.

Real processes: the mock upstream (`python -m bench.mock_upstream`) and two sidecars, children started as
tests/test_state_store.py starts them, with SIDECAR_STATE_DIR naming the one state directory. Each sidecar
runs through WRAP, which makes its map 1 MB (there is no setting for it: `map_size_of` adds 256 MB to any
budget, a writemap store starts at 16 MB), so a few MB of answers grow it several times. Both ways a store
is written: through its map (writemap, the proxy's on this file system; grown by half) and with pwrite()
(where the file system cannot hold a reservation, or durable; doubled), and one sidecar of each.
- test_two_sidecars_grow_one_map: sidecar A stores 160 large answers (about 45 KB each) while sidecar B
  answers small calls of its own all along; every call through both is answered, the map grown from 1 MB
  at least three times (the logs say so) and the data file is 8 times the first map; B serves as hits,
  byte for byte, what A stored while and after it grew; B then grows the map further itself and A serves
  B's answers; neither process died nor logged a traceback, MapResizedError or a failing store; both
  answer /_sidecar/stats with every entry counted, and `sidecar cache stats` / `sidecar sessions list`
  read the grown store.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import stop_process
from test_state_store import ROOT, child_env, start

PY = sys.executable
FIRST_MAP = 1 << 20
pytestmark = pytest.mark.timeout(120)

# `sidecar serve` with a 1 MB map: MIN_MAP floors the map, map_size_of sizes it from the config, START_MAP is a
# writemap store's first; in_place says whether the file system can hold its reservation.
WRAP = ("import sys\n"
        "import agent_sidecar.proxy.store as store\n"
        f"store.MIN_MAP = store.START_MAP = {FIRST_MAP}\n"
        f"store.map_size_of = lambda config: {FIRST_MAP}\n"
        "if sys.argv.pop(1) == 'pwrite':\n"
        "    store.in_place = lambda path: False\n"
        "from agent_sidecar.launcher.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
GREW = re.compile(r"grew the state store's map to (\d+) bytes")


def call(url: str, text: str, max_tokens: int) -> tuple[int, str, bytes]:
    """One Messages call; the mock's answer has max_tokens words. Returns status, x-sidecar-cache, body."""
    body = json.dumps({"model": "claude-test", "max_tokens": max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": text}]}).encode()
    request = urllib.request.Request(url + "/v1/messages", body, method="POST", headers={
        "content-type": "application/json", "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"})
    with urllib.request.urlopen(request, timeout=30) as reply:   # a bound against a hang, not a timing
        return reply.status, reply.headers.get("x-sidecar-cache", ""), reply.read()


def get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.status, json.loads(reply.read())


MODES = {"writemap": ("writemap", "writemap"), "pwrite": ("pwrite", "pwrite"),
         "mixed": ("writemap", "pwrite")}   # mixed: A through its map, B with pwrite (a durable one, say)


@pytest.mark.parametrize("writes", list(MODES))
def test_two_sidecars_grow_one_map(tmp_path, writes):
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    env = child_env(tmp_path / "home")
    mock, upstream = start(["-m", "agent_sidecar.bench.mock_upstream", "--port", "0", "--output-tokens", "20000"],
                           tmp_path / "mock.log", "listening on ", env)
    # budgets far above what is written: nothing is evicted, the map only grows
    config.write_text(f'[upstream]\nanthropic = "{upstream}"\nopenai = "{upstream}/v1"\n'
                      f'[state]\nmax_mb = 256.0\n[cache]\nmax_size_mb = 256.0\n')
    env = {**env, "SIDECAR_STATE_DIR": str(state), "SIDECAR_CONFIG": str(config)}
    logs = {name: tmp_path / f"sidecar-{name}.log" for name in ("a", "b")}
    procs: dict[str, subprocess.Popen] = {}
    try:
        urls = {}
        for name, mode in zip(("a", "b"), MODES[writes]):   # one after the other: A makes the store (and its
            # partition secret), B opens it
            procs[name], urls[name] = start(["-c", WRAP, mode, "serve", "--port", "0"], logs[name], "serving on ", env)
        a, b = urls["a"] + "/a/alpha", urls["b"] + "/a/beta"
        data = state / "lmdb" / "data.mdb"
        assert data.stat().st_size <= FIRST_MAP

        # A: 160 answers of 6000 words (about 45 KB) stored, 4 at a time; B, until A is done: small calls of its
        # own, 2 at a time, each asked twice (a miss, then a hit on what it stored itself)
        a_done = threading.Event()

        def b_calls(worker: int) -> list[tuple[str, list]]:
            pairs = []
            while not a_done.is_set():
                text = f"small {worker} {len(pairs)}"
                pairs.append((text, [call(b, text, 20) for _ in range(2)]))
            return pairs

        with ThreadPoolExecutor(4) as pool_a, ThreadPoolExecutor(2) as pool_b:
            b_workers = [pool_b.submit(b_calls, worker) for worker in range(2)]
            try:
                grown = list(pool_a.map(lambda n: call(a, f"large {n}", 6000), range(160)))
            finally:
                a_done.set()
            small = [f.result() for f in b_workers]
        assert [status for status, _, _ in grown] == [200] * 160
        assert [cache for _, cache, _ in grown] == ["miss"] * 160
        assert all(len(pairs) >= 2 for pairs in small), [len(pairs) for pairs in small]   # B ran all along
        small = [pair for pairs in small for pair in pairs]
        assert [[(status, cache) for status, cache, _ in pair] for _, pair in small] == \
            [[(200, "miss"), (200, "hit")]] * len(small)

        grown_by = {name: [int(size) for size in GREW.findall(logs[name].read_text())] for name in logs}
        growth = sorted(grown_by["a"] + grown_by["b"])
        first_growth = 2 * FIRST_MAP if writes == "pwrite" else growth and growth[0]   # doubled; by half or more
        assert growth and FIRST_MAP < growth[0] == first_growth <= 4 * FIRST_MAP, growth   # from the first 1 MB
        assert growth[-1] >= 8 * FIRST_MAP, growth              # and again and again
        first_size = data.stat().st_size
        assert first_size >= 8 * FIRST_MAP, first_size

        # after the growth: what A stores, B serves from the shared cache, byte for byte
        after = [call(a, f"after the growth {n}", 6000) for n in range(10)]
        assert [(status, cache) for status, cache, _ in after] == [(200, "miss")] * 10
        for n, (_, _, body) in enumerate(after):
            assert call(b, f"after the growth {n}", 6000) == (200, "hit", body)
        for n, (_, _, body) in enumerate(grown):   # and what A stored while the map grew
            assert call(b, f"large {n}", 6000) == (200, "hit", body)
        # B has grown the map A grew (the checkpoints of those hits and 40 answers of its own pass A's 16 MB),
        # and A serves what B stored
        by_b = [call(b, f"grown by B {n}", 6000) for n in range(40)]
        assert [(status, cache) for status, cache, _ in by_b] == [(200, "miss")] * 40
        assert len(GREW.findall(logs["b"].read_text())) > len(grown_by["b"]), logs["b"].read_text()
        for n, (_, _, body) in enumerate(by_b):
            assert call(a, f"grown by B {n}", 6000) == (200, "hit", body)
        for text, pair in small[:20]:
            assert call(a, text, 20) == (200, "hit", pair[0][2])

        entries = 160 + len(small) + 10 + 40   # A's, B's small ones, A's after the growth, B's large ones
        for name, url in urls.items():
            assert procs[name].poll() is None, logs[name].read_text()
            status, overview = get(url + "/_sidecar/stats")
            assert status == 200
            assert "store_unavailable" not in overview["active_events"], (name, overview["active_events"])
            assert overview["cache"]["entries"] == entries, (name, overview["cache"])

        # the CLI reads the grown store too (with a map of the default size, not the wrapper's)
        cli = [PY, "-m", "agent_sidecar.launcher"]
        stats = subprocess.run([*cli, "cache", "stats"], cwd=ROOT, env=env, capture_output=True, timeout=60,
                               check=False)
        assert stats.returncode == 0, stats
        assert re.search(rf"^entries +{entries}$", stats.stdout.decode(), re.MULTILINE), stats.stdout
        listed = subprocess.run([*cli, "sessions", "list", "--limit", "1000"], cwd=ROOT, env=env,
                                capture_output=True, timeout=60, check=False)
        assert listed.returncode == 0, listed
        # a conversation per agent: each call of its own, and each one it was served from the other's answers
        agents = [line.split()[5] for line in listed.stdout.decode().splitlines()[1:] if line.strip()]
        answered = {"alpha": 160 + 10 + 40 + 20, "beta": 2 * len(small) + 10 + 160 + 40}
        conversations = {"alpha": 160 + 10 + 40 + 20, "beta": len(small) + 10 + 160 + 40}   # B's pairs: one each
        assert {agent: agents.count(agent) for agent in answered} == conversations, agents
        grown_by = {name: GREW.findall(logs[name].read_text()) for name in logs}
        print(f"first map {FIRST_MAP} bytes; grown by A to {grown_by['a']}, by B to {grown_by['b']}; data.mdb "
              f"{first_size} bytes after the first phase, {data.stat().st_size} at the end; answered by A "
              f"{answered['alpha']}, by B {answered['beta']}")
    finally:
        for proc in (*procs.values(), mock):
            stop_process(proc)
    for name, log in logs.items():
        text = log.read_text()
        assert "Traceback" not in text and "MapResized" not in text, (name, text[-3000:])
        assert "cannot be read" not in text and "cannot be written" not in text, (name, text[-3000:])
