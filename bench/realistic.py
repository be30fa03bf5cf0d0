"""Scenario 9: realistic agent traffic — Claude-Code-shaped conversations that grow to megabytes.

Several agents at once, each a conversation of `real_turns` streamed turns
(bench/conversation.py: 24 tools, a 3-part system prompt, tool_use /
tool_result turns, `cache_control` markers), its body growing from 76 KB to
`real_last_kb`; every call a miss. Direct vs the bare proxy vs the sidecar
with every feature on, in alternating rounds. Reported: the added latency per
call by body size (the sidecar's against the bare proxy's), throughput, and
the worst event-loop stall: a thread of this process asks the target's
cheapest endpoint (the sidecar's /_sidecar/health, the bare proxy's
/_bare/health, the mock's /_mock/stats) every 2 ms during the run; the worst
answer time minus the median is the longest the server's loop was blocked
(or waited for a core: the bare proxy's figure, under the same traffic, is
what aiohttp alone shows on this machine).
"""

from __future__ import annotations

import http.client
import statistics
import threading
import time
from urllib.parse import urlsplit

from .plan import Ctx, alternate
from .stats import Fig, Result, paired, pct, rps

BUCKETS = ((0, 256), (256, 1024), (1024, 1 << 30))   # body size in KB
TARGET_VS_BARE = 1.2      # the sidecar adds at most 1.2× what the bare proxy adds, per size
TARGET_LAG_MS = 2.0       # no call blocks the event loop longer


class Probe:
    """GET `path` every 2 ms on one keep-alive connection, on a thread; `stalls` = worst minus median, ms."""

    def __init__(self, url: str, path: str):
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, path
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            while not self._stop.wait(0.002):
                t0 = time.perf_counter()
                conn.request("GET", self.path)
                conn.getresponse().read()
                self.times.append((time.perf_counter() - t0) * 1000)
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self) -> "Probe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def stall_ms(self) -> float:
        return max(self.times) - statistics.median(self.times) if len(self.times) > 2 else float("nan")


def _bucket(kb: float) -> str:
    for lo, hi in BUCKETS:
        if lo <= kb < hi:
            return f"{lo}–{hi} KB" if hi < 1 << 30 else f"≥ {lo // 1024} MB"
    return "?"


def _median_by_bucket(result: dict) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for _turn, size, latency in result["calls"]:
        by.setdefault(_bucket(size / 1024), []).append(latency)
    return {b: statistics.median(v) for b, v in by.items()}


def realistic(ctx: Ctx) -> Result:
    plan, procs = ctx.plan, ctx.procs
    res = Result("realistic", "10. Realistic agent traffic",
                 f"{plan.real_agents} agents at once, each a Claude-Code-shaped conversation of {plan.real_turns} "
                 f"streamed turns growing from 76 KB to {plan.real_last_kb / 1024:g} MB (24 tools, 3-part system "
                 f"prompt, tool_use/tool_result turns, cache_control markers); zero-delay mock; every call a miss; "
                 f"sidecar with every feature on (cache, records, checkpoints, limits, monitor)")
    load = procs.load()
    mock = procs.mock()
    procs.ready(mock)
    bare, side = procs.bare(mock.url), procs.sidecar(mock.url)
    procs.ready(bare, side)
    targets = {"direct": (mock.url, "/_mock/stats"), "bare": (bare.url, "/_bare/health"),
               "sidecar": (side.url, "/_sidecar/health")}

    def job(name: str, url: str, probe_path: str):
        def run(r: int) -> dict:
            with Probe(url, probe_path) as probe:
                result = load.run({"kind": "conversation", "url": url, "agents": plan.real_agents,
                                   "turns": plan.real_turns, "last_kb": plan.real_last_kb, "tag": f"s9-{name}-r{r}"},
                                  timeout=900)
            result["stall_ms"] = probe.stall_ms()
            result["by_bucket"] = _median_by_bucket(result)
            return result
        return run

    data = alternate(plan, {t: job(t, url, path) for t, (url, path) in targets.items()},
                     expect={"sidecar": "miss"}, warmup=plan.real_warmup, rounds=plan.real_rounds)
    for proc in (mock, bare, side):
        proc.check()
    res.series = data
    direct, bare_s, side_s = data["direct"], data["bare"], data["sidecar"]

    rows = []
    seen = [set(r["by_bucket"]) for s in data.values() for r in s.rounds]
    buckets = [b for b in (_bucket(lo) for lo, _ in BUCKETS) if seen and all(b in have for have in seen)]
    for b in buckets:
        fn = (lambda r, b=b: r["by_bucket"].get(b, float("nan")))
        bare_added = paired(direct, bare_s, fn, "diff", "ms")
        side_added = paired(direct, side_s, fn, "diff", "ms")
        # the target: the sidecar adds no more than 1.2x what the bare proxy adds (nothing, where it adds nothing)
        excess = _excess(side_added, bare_added)
        met = None if excess.failed else excess.value <= 0
        key = b.replace(" ", "").replace("–", "-").replace("≥", "ge")
        rows.append([f"p50 per call, {b}", res.put(f"{key}.direct", direct.fig(fn, "ms")),
                     res.put(f"{key}.bare_added", bare_added), res.put(f"{key}.sidecar_added", side_added),
                     res.put(f"{key}.excess_over_target", excess,
                             f"sidecar adds <= {TARGET_VS_BARE}x what the bare proxy adds (excess <= 0 ms)", met),
                     _met(met, excess)])
    throughput = {t: s.fig(rps, "req/s") for t, s in data.items()}
    tp_ratio = paired(bare_s, side_s, rps, "ratio", "x")
    rows.append(["throughput (calls/s, all agents)", res.put("rps.direct", throughput["direct"]),
                 res.put("rps.bare", throughput["bare"]), res.put("rps.sidecar", throughput["sidecar"]),
                 res.put("rps.sidecar_vs_bare", tp_ratio, ">= 0.8x the bare proxy's",
                         None if tp_ratio.failed else tp_ratio.value >= 0.8),
                 _met(None if tp_ratio.failed else tp_ratio.value >= 0.8, tp_ratio)])
    stall = {t: s.fig(lambda r: r["stall_ms"], "ms") for t, s in data.items()}
    worst = Fig.of([r["stall_ms"] for r in side_s.rounds], "ms") if not side_s.failed else stall["sidecar"]
    worst = Fig(worst.hi if worst.hi is not None else worst.value, "ms", failed=worst.failed)
    met = None if worst.failed else worst.value <= TARGET_LAG_MS
    rows.append(["worst loop stall (probe: worst − median)", res.put("stall.direct", stall["direct"]),
                 res.put("stall.bare", stall["bare"]), res.put("stall.sidecar", stall["sidecar"]),
                 res.put("stall.sidecar_worst", worst, f"<= {TARGET_LAG_MS:g} ms", met), _met(met, worst)])
    res.table(["measure", "direct", "bare proxy adds", "sidecar adds", "target", "met?"], rows)
    sent = statistics.median(r["sent_bytes"] for r in side_s.rounds) if side_s.rounds else 0
    res.notes.append(f"{len(side_s.rounds)} measured rounds after {plan.real_warmup} warm-up; each round sends "
                     f"{sent / 1e6:.0f} MB of requests per target. 'adds' = median over rounds of (target − direct) "
                     f"per-bucket medians. The stall row's cells are each server's own loop: the mock's (direct), "
                     f"the bare proxy's, the sidecar's (its target uses the worst round).")
    p99s = [pct([c[2] for c in r["calls"]], 99) for r in side_s.rounds]
    if p99s:
        res.notes.append(f"sidecar p99 per call over all sizes: {statistics.median(p99s):.1f} ms")
    return res


def _excess(side_added: Fig, bare_added: Fig) -> Fig:
    """How far the sidecar's added latency is above its target, TARGET_VS_BARE x the bare proxy's."""
    if side_added.failed or bare_added.failed:
        return Fig(float("nan"), "ms", failed=side_added.failed or bare_added.failed)
    return Fig(side_added.value - TARGET_VS_BARE * max(bare_added.value, 0.0), "ms")


def _met(met: bool | None, fig: Fig) -> str:
    from .stats import met_text
    return "n/a" if fig.failed else met_text(met)
