"""Scenario 8: two sidecars on one Redis, hits served across sidecars, vs the LMDB backend.

A real `redis-server` (no persistence) on a free 127.0.0.1 port; sidecars A
and B with `[state] backend = "redis"` on it (separate state dirs), and a
third sidecar on the default LMDB backend. A set of unique JSON requests is
sent once through A (misses, stored in Redis) and once through the LMDB
sidecar (stored in its LMDB). Then every request of the set is fetched once
through B: each must be a hit (`x-sidecar-cache: hit`) stored by A. Then
direct (the mock), B's Redis hits and the LMDB sidecar's hits alternate in
rounds: p50/p99 latency at concurrency 1, throughput at 32. Redis is stopped
at the end, also on errors (it is one of the run's processes).
"""

from __future__ import annotations

import importlib.util
import os

from .overhead import _job
from .plan import Ctx, alternate
from .procs import BenchError
from .stats import Fig, Result, Series, p50, p99, rps, vs, paired

REDIS_SERVER = "/usr/bin/redis-server"
SET_TAG = "s8-set"   # bodies "s8-set #i: ...": a workload of n calls repeats the first n of the set


def redis(ctx: Ctx) -> Result:
    plan, procs = ctx.plan, ctx.procs
    n_set = max(plan.n_c1, plan.n_c32)
    res = Result("redis", "8. Two sidecars on one Redis",
                 f"zero-delay mock, {plan.hit_tokens}-token answers (~1 KB JSON); redis-server (no persistence) on "
                 f"127.0.0.1; sidecars A and B with the Redis backend, one sidecar with LMDB; {n_set} unique "
                 f"requests stored through A (and through the LMDB sidecar), then hits through B (stored by A) "
                 f"vs hits through the LMDB sidecar vs direct")
    missing = ("no redis-server at " + REDIS_SERVER if not os.access(REDIS_SERVER, os.X_OK) else
               "the Redis client is not installed (pip install 'agent-sidecar[redis]')"
               if importlib.util.find_spec("redis") is None else None)
    if missing:
        res.skipped = missing
        res.table(["measure", "value"], [["Redis vs LMDB hits", f"SKIPPED: {missing}"]])
        return res

    load = procs.load()
    mock = procs.mock(output_tokens=plan.hit_tokens)
    server = procs.redis(REDIS_SERVER)
    procs.ready(mock)
    store = {"state_backend": "redis", "state_redis_url": server.url}
    side_a, side_b, lmdb = procs.sidecar(mock.url, **store), procs.sidecar(mock.url, **store), procs.sidecar(mock.url)
    procs.ready(side_a, side_b, lmdb)

    for name, side in (("sidecar A (Redis)", side_a), ("LMDB sidecar", lmdb)):
        warm = load.run(_job(side.url, n_set, 8, False, SET_TAG))
        if warm["errors"] or warm["cache"].get("miss", 0) != n_set:
            raise BenchError(f"storing the set through {name}: expected {n_set} misses, got {warm['cache']}, "
                             f"errors {warm['errors']}")
    first = load.run(_job(side_b.url, n_set, 8, False, SET_TAG))
    if first["errors"]:
        raise BenchError(f"first fetch through sidecar B: errors {first['errors']}")
    first_hits = first["cache"].get("hit", 0)
    through_b = {"calls": 0, "hits": 0}

    def job(url: str, n: int, c: int, count: bool = False):
        def run(r: int) -> dict:
            result = load.run(_job(url, n, c, False, SET_TAG))
            if count:
                through_b["calls"] += result["ok"] + sum(result["errors"].values())
                through_b["hits"] += result["cache"].get("hit", 0)
            return result
        return run

    data: dict[str, dict[str, Series]] = {}
    for w, c, n in (("json_c1", 1, plan.n_c1), ("json_c32", 32, plan.n_c32)):
        data[w] = alternate(plan, {"direct": job(mock.url, n, c), "redis": job(side_b.url, n, c, count=True),
                                   "lmdb": job(lmdb.url, n, c)}, expect={"redis": "hit", "lmdb": "hit"})
        for p in (server, side_a, side_b, lmdb):
            p.check()
    res.series = {f"{w}.{t}": s for w, d in data.items() for t, s in d.items()}

    res.put("cross_hits.first_fetch", Fig(first_hits, "calls"))
    res.put("cross_hits.rounds", Fig(through_b["hits"], "calls"))
    rows = [["first fetch through B of each request stored by A", "cross-sidecar hits",
             f"{first_hits:,} of {n_set:,} calls", "", "", "", "", ""],
            ["every call through B in the rounds (incl. warm-up)", "cross-sidecar hits",
             f"{through_b['hits']:,} of {through_b['calls']:,} calls", "", "", "", "", ""]]
    res.put("cross_hits.expected", Fig(n_set + through_b["calls"], "calls"))
    for w, label, measure, key, fn, unit in (("json_c1", "JSON, c=1", "p50 latency", "p50_ms", p50("latency_ms"), "ms"),
                                             ("json_c1", "JSON, c=1", "p99 latency", "p99_ms", p99("latency_ms"), "ms"),
                                             ("json_c32", "JSON, c=32", "throughput", "rps", rps, "req/s")):
        d = data[w]
        rows.append([label, measure, res.put(f"{w}.{key}.direct", d["direct"].fig(fn, unit)),
                     res.put(f"{w}.{key}.redis", d["redis"].fig(fn, unit)), vs(d["direct"], d["redis"], fn, unit),
                     res.put(f"{w}.{key}.lmdb", d["lmdb"].fig(fn, unit)), vs(d["direct"], d["lmdb"], fn, unit),
                     vs(d["lmdb"], d["redis"], fn, unit)])
        res.put(f"{w}.{key}.redis_vs_lmdb", paired(d["lmdb"], d["redis"], fn, "ratio", "x"))
        res.put(f"{w}.{key}.redis_minus_lmdb", paired(d["lmdb"], d["redis"], fn, "diff", unit))
    res.table(["workload", "measure", "direct", "Redis hit (via B, stored by A)", "Redis vs direct",
               "LMDB hit", "LMDB vs direct", "Redis vs LMDB"], rows)
    res.notes.append(f"{plan.rounds} measured rounds after {plan.warmup} warm-up, the three alternated; figure = "
                     f"median of the per-round values (min–max); comparisons = median of per-round differences "
                     f"and ratios. A workload of n calls repeats the first n requests of the set, one each.")
    if first_hits != n_set or through_b["hits"] != through_b["calls"]:
        res.error = (f"not every call through B was a hit: first fetch {first_hits} of {n_set}, rounds "
                     f"{through_b['hits']} of {through_b['calls']}")
    return res
