"""Scenario 7: what recording (call records, live metrics, monitor thresholds) costs per call.

Two `sidecar serve` processes against one zero-delay mock, both with the
cache off so every call goes upstream: one recording (the default), one with
`[stats] record = false` (SIDECAR_STATS_RECORD=false: no record, no live
aggregates, no threshold checks). Batches of unique JSON calls go to each in
alternating rounds (order rotated, first round discarded); per batch, the
serve process's user+system CPU (psutil) per 1,000 calls, read after a short
settle so the batched record writes are counted. Reported: on, off, the
difference and the difference as a share of the recording-on CPU per call.
Target (the issue): recording costs < 5 % of the proxy's own CPU per call.
"""

from __future__ import annotations

import time

from .overhead import _job, _met
from .plan import Ctx, alternate
from .stats import Fig, Result, Series, p50, paired

TARGET_PCT = 5.0
SETTLE_S = 0.2    # after a batch: the last records are written by a background flush


def _cpu(ps) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def recording(ctx: Ctx) -> Result:
    plan, procs = ctx.plan, ctx.procs
    res = Result("recording", "7. Recording cost",
                 "zero-delay mock, 12-token answers; two sidecars, cache off (every call goes upstream), unique "
                 "JSON calls; recording on (default) vs off (SIDECAR_STATS_RECORD=false); CPU of the serve "
                 "process per batch")
    load = procs.load()
    mock = procs.mock()
    procs.ready(mock)
    on = procs.sidecar(mock.url, cache_mode="off")
    off = procs.sidecar(mock.url, cache_mode="off", stats_record="false")
    procs.ready(on, off)

    def job(side, w: str, c: int, n: int):
        def run(r: int) -> dict:
            before = _cpu(side.ps)
            result = load.run(_job(side.url, n, c, False, f"s7-{w}-{side.name}-r{r}"))
            time.sleep(SETTLE_S)
            result["cpu_s_per_1000"] = (_cpu(side.ps) - before) / max(result["ok"], 1) * 1000
            return result
        return run

    workloads = [("json_c1", 1, plan.rec_n_c1), ("json_c32", 32, plan.rec_n_c32)]
    data: dict[str, dict[str, Series]] = {}
    for w, c, n in workloads:
        data[w] = alternate(plan, {"on": job(on, w, c, n), "off": job(off, w, c, n)}, rounds=plan.rec_rounds)
        on.check()
        off.check()
    res.series = {f"{w}.{t}": s for w, d in data.items() for t, s in d.items()}

    def cpu(r: dict) -> float:
        return r["cpu_s_per_1000"]

    rows = []
    for w, label in (("json_c1", "JSON, c=1"), ("json_c32", "JSON, c=32")):
        d = data[w]
        diff = paired(d["off"], d["on"], cpu, "diff", "s")
        if d["on"].failed or d["off"].failed:
            share = Fig(float("nan"), "%", failed=d["on"].failed or d["off"].failed)
        else:
            share = Fig.of([100 * (a["cpu_s_per_1000"] - b["cpu_s_per_1000"]) / a["cpu_s_per_1000"]
                            for a, b in zip(d["on"].rounds, d["off"].rounds) if a["cpu_s_per_1000"] > 0], "%")
        met = share.value < TARGET_PCT
        sign = "+" if diff.value >= 0 else "−"
        rows.append([label, "CPU per 1,000 calls", res.put(f"{w}.cpu_s_per_1000.on", d["on"].fig(cpu, "s")),
                     res.put(f"{w}.cpu_s_per_1000.off", d["off"].fig(cpu, "s")),
                     sign + res.put(f"{w}.cpu_s_per_1000.diff", diff).lstrip("-"),
                     f"{share.value:.1f} %" + (f" ({share.lo:.1f}–{share.hi:.1f})" if share.lo is not None
                                                and share.hi > share.lo else "")
                     if not share.failed else share.text(),
                     f"< {TARGET_PCT:g} %", _met(share, met)])
        res.put(f"{w}.cpu_pct_of_on", share, f"< {TARGET_PCT:g} % of the recording-on CPU per call", met)
    d = data["json_c1"]
    lat = p50("latency_ms")
    diff = paired(d["off"], d["on"], lat, "diff", "ms")
    ratio = paired(d["off"], d["on"], lat, "ratio", "x")
    rows.append(["JSON, c=1", "p50 latency", res.put("json_c1.p50_ms.on", d["on"].fig(lat, "ms")),
                 res.put("json_c1.p50_ms.off", d["off"].fig(lat, "ms")),
                 ("+" if diff.value >= 0 else "−") + res.put("json_c1.p50_ms.diff", diff).lstrip("-"),
                 f"×{ratio.value:.2f}" if not ratio.failed else "n/a", "", ""])
    res.table(["workload", "measure", "recording on", "recording off", "difference (on − off)",
               "difference, % of on", "target", "met?"], rows)
    res.notes.append(f"{plan.rec_rounds} measured rounds after {plan.warmup} warm-up, on and off alternated; "
                     f"batches of {plan.rec_n_c1} calls at c=1 and {plan.rec_n_c32} at c=32; figure = median of "
                     f"the per-round values (min–max); difference and % = median of per-round values. CPU read "
                     f"{SETTLE_S:g} s after each batch (batched record writes included); psutil's CPU times "
                     f"tick at 10 ms.")
    res.notes.append("recording off skips the call record (LMDB), the live aggregates (/metrics, dashboard) "
                     "and the monitor's per-call thresholds; the per-call timing itself and the session "
                     "checkpoints run either way.")
    return res
