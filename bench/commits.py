"""`python -m bench.commits`: what one store write costs: `writemap` or not, and with the state's byte budget.

The proxy commits inline on the event loop, without fsync. Issue 13 dropped `writemap` (a full disk was a
SIGBUS on the sparse mapping; without it pages go through pwrite() and a full disk is a failed commit);
this measures what that costs per commit, and what the byte budget (`[state] max_mb`, proxy/state_budget.py)
adds per write once the store is at its budget and every write evicts.

Two tables, each in one run, configurations alternating round by round, medians of the per-round medians
(min-max of the rounds beside them), microseconds per write, for values of 1, 20 and 150 KB:
- raw LMDB commits (one put, one commit), writemap on vs off;
- `ResponseStore.put` (the proxy's cache write) without a budget vs at a 16 MB budget.

    python -m bench.commits [--rounds 7] [--puts 400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import lmdb

from agent_sidecar.proxy.state_budget import StateBudget
from agent_sidecar.proxy.entry import Entry
from agent_sidecar.proxy.records import RecordLog
from agent_sidecar.proxy.sessions import Sessions
from agent_sidecar.proxy.response_store import ResponseStore
from agent_sidecar.proxy.store import Lmdb

SIZES = (1 << 10, 20 << 10, 150 << 10)
BUDGET = 16 << 20


def raw_commits(path: Path, writemap: bool, size: int, puts: int) -> list[float]:
    env = lmdb.open(str(path), map_size=1 << 30, writemap=writemap, sync=False, metasync=False, max_dbs=2)
    value, times = os.urandom(size), []
    try:
        for n in range(puts):
            start = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(b"k%06d" % (n % 64), value)   # 64 keys rewritten: the file stays small, pages reused
            times.append(time.perf_counter() - start)
    finally:
        env.close()
    return times


async def store_puts(path: Path, budget: bool, size: int, puts: int) -> list[float]:
    env = Lmdb(path, 1 << 20)
    store = ResponseStore(env, 1 << 30)
    if budget:
        env.budget = StateBudget(env, BUDGET, store, RecordLog(env, 10 ** 6), Sessions(env))
    blob, times = Entry(status=200, headers=[], body=os.urandom(size), stream=False).encode(), []
    try:
        for n in range(puts + BUDGET // size):   # the first writes fill the store up to its budget: not timed
            start = time.perf_counter()
            await store.put(b"k%07d" % n, blob)
            if n >= BUDGET // size:
                times.append(time.perf_counter() - start)
    finally:
        env.close()
    return times


def table(title: str, names: tuple[str, str], runs: dict) -> None:
    print(f"\n{title}\n{'value':>8}  " + "  ".join(f"{n:>24}" for n in names) + "     ratio")
    for size in SIZES:
        cells, medians = [], []
        for name in names:
            per_round = [statistics.median(r) * 1e6 for r in runs[name, size]]
            medians.append(statistics.median(per_round))
            cells.append(f"{medians[-1]:8.1f} us ({min(per_round):.0f}-{max(per_round):.0f})")
        print(f"{size >> 10:>5} KB  " + "  ".join(f"{c:>24}" for c in cells) + f"   x{medians[1] / medians[0]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.commits", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--puts", type=int, default=400)
    args = p.parse_args()
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    raw: dict = {}
    store: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):   # round 0: warm-up, discarded
            for size in SIZES:
                for writemap in (True, False):
                    path = Path(tmp) / f"raw-{r}-{size}-{writemap}"
                    path.mkdir()
                    times = raw_commits(path, writemap, size, args.puts)
                    if r:
                        raw.setdefault(("writemap", size) if writemap else ("no writemap", size), []).append(times)
                for budget in (False, True):
                    times = asyncio.run(store_puts(Path(tmp) / f"store-{r}-{size}-{budget}", budget, size, args.puts))
                    if r:
                        store.setdefault(("budget" if budget else "no budget", size), []).append(times)
    table("raw LMDB commit (one put), no fsync", ("writemap", "no writemap"), raw)
    table(f"ResponseStore.put, the store at a {BUDGET >> 20} MB budget (evicting per write)",
          ("no budget", "budget"), store)


if __name__ == "__main__":
    main()
