"""Scenario 6: the sidecar's footprint.

Memory: peak RSS of the `sidecar serve` process (psutil, sampled every 20 ms)
and, alongside, its private anonymous memory (RSS minus file-backed and shared
pages: LMDB's mapped data pages are file-backed and reclaimable) during a batch at concurrency 32 (half unique JSON misses, a quarter unique
stream misses, a quarter hits). CPU: user+system seconds of that process per
1,000 calls over the batch (and per kind of call), and while idle afterwards.
Start-up: the median wall time of `python -m agent_sidecar.launcher run -- true` (and of the
`sidecar` console script if on PATH) minus that of `true`, with the package's bytecode compiled first,
as `pip install` compiles it (an environment with PYTHONDONTWRITEBYTECODE set, as this machine's, would
otherwise compile every module from source on every start: 90 ms measured here).
"""

from __future__ import annotations

import compileall
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from .overhead import _job, _met
from .plan import Ctx
from .procs import ROOT, BenchError, Sampler, clean_env
from .stats import Fig, Result

MB = 1024 * 1024
TARGET_RSS_MB = 60.0
TARGET_PRIVATE_MB = 50.0     # private (anonymous) memory, at or under
TARGET_IDLE_PCT = 1.0        # of one core
TARGET_STARTUP_MS = 250.0


def _cpu(ps) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def _mapped(pid: int, suffix: str = ".mdb") -> float | None:
    """Resident MB of the process's mappings of files ending in `suffix` (LMDB's data file), Linux only."""
    total, current = 0, ""
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            for line in fh:
                parts = line.split()
                if parts and "-" in parts[0] and len(parts) >= 5:
                    current = parts[5] if len(parts) >= 6 else ""
                elif parts and parts[0] == "Rss:" and current.endswith(suffix):
                    total += int(parts[1])
    except OSError:
        return None
    return total / 1024


def _in_use_mb(lmdb_dir: Path) -> float | None:
    """MB of data.mdb's pages in use (its extent, as last committed), read as one more reader of the store."""
    import lmdb
    from agent_sidecar.proxy.reserve import extent
    try:
        env = lmdb.open(str(lmdb_dir), readonly=True, max_dbs=16)
    except lmdb.Error:
        return None
    try:
        return extent(env) / MB
    finally:
        env.close()


def _wall(cmd: list[str], env: dict, runs: int) -> list[float]:
    out = []
    for i in range(runs + 1):    # the first run (cold page cache) is discarded
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=30)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.decode()[-300:]}")
        if i:
            out.append(elapsed * 1000)
    return out


def footprint(ctx: Ctx) -> Result:
    plan, procs = ctx.plan, ctx.procs
    res = Result("footprint", "6. Footprint",
                 f"`sidecar serve` under {plan.fp_calls} calls at concurrency 32 (½ JSON misses, ¼ stream "
                 f"misses, ¼ hits; zero-delay mock, ~1 KB answers), then idle {plan.idle_s:g} s")
    load = procs.load()
    mock = procs.mock(output_tokens=plan.hit_tokens)
    procs.ready(mock)
    side = procs.sidecar(mock.url)
    procs.ready(side)
    load.run(_job(side.url, 1, 1, False, "s6-hit", same=True))
    mem_start = side.ps.memory_info()
    rss_start, anon_start = mem_start.rss, mem_start.rss - getattr(mem_start, "shared", 0)
    batch = [("json_miss", False, False, plan.fp_calls // 2), ("stream_miss", True, False, plan.fp_calls // 4),
             ("hit", False, True, plan.fp_calls // 4)]
    calls, per_kind = 0, {}
    cpu0, mock_cpu0 = _cpu(side.ps), _cpu(mock.ps)
    with Sampler(side.ps) as sampler:
        for kind, stream, same, n in batch:
            before = _cpu(side.ps)
            result = load.run(_job(side.url, n, 32, stream, "s6-hit" if same else f"s6-{kind}", same=same))
            if result["errors"]:
                raise BenchError(f"{kind}: errors {result['errors']}")
            per_kind[kind] = (_cpu(side.ps) - before) / result["ok"] * 1000
            calls += result["ok"]
    cpu_batch, mock_cpu = _cpu(side.ps) - cpu0, _cpu(mock.ps) - mock_cpu0
    side.check()
    time.sleep(1.0)
    idle0, t0 = _cpu(side.ps), time.monotonic()
    time.sleep(plan.idle_s)
    idle_cpu, idle_wall = _cpu(side.ps) - idle0, time.monotonic() - t0
    mem_end = side.ps.memory_info()
    rss_end, anon_end = mem_end.rss, mem_end.rss - getattr(mem_end, "shared", 0)
    uss_end = side.ps.memory_full_info().uss
    lmdb_rss = _mapped(side.popen.pid)
    data = side.state / "lmdb" / "data.mdb"
    # the pages in use, and the blocks allocated: a writemap store's whole map is (store.py, reserve.py)
    data_mb = data.stat().st_blocks * 512 / MB if data.exists() else None
    in_use_mb = _in_use_mb(data.parent) if data.exists() else None

    peak, peak_anon = sampler.peak / MB, sampler.peak_anon / MB
    rows = [["peak RSS under load", res.put("rss_peak_mb", Fig(peak, "MB"), f"< {TARGET_RSS_MB:g} MB",
                                            peak < TARGET_RSS_MB), f"< {TARGET_RSS_MB:g} MB",
             _met(Fig(peak, "MB"), peak < TARGET_RSS_MB)],
            ["RSS after start / after the batch and idle", f"{res.put('rss_start_mb', Fig(rss_start / MB, 'MB'))} / "
             f"{res.put('rss_end_mb', Fig(rss_end / MB, 'MB'))}", "", ""],
            ["peak private anonymous memory under load (RSS minus file-backed/shared pages)",
             res.put("anon_peak_mb", Fig(peak_anon, "MB"), f"<= {TARGET_PRIVATE_MB:g} MB",
                     peak_anon <= TARGET_PRIVATE_MB), f"<= {TARGET_PRIVATE_MB:g} MB",
             _met(Fig(peak_anon, "MB"), peak_anon <= TARGET_PRIVATE_MB)],
            ["anonymous memory after start / after the batch and idle",
             f"{res.put('anon_start_mb', Fig(anon_start / MB, 'MB'))} / "
             f"{res.put('anon_end_mb', Fig(anon_end / MB, 'MB'))}", "", ""],
            ["USS (pages mapped by this process only, incl. its LMDB pages) at the end",
             res.put("uss_end_mb", Fig(uss_end / MB, "MB")), "", ""],
            ["RSS growth per 1,000 calls", res.put("rss_growth_mb_per_1000",
                                                    Fig((rss_end - rss_start) / MB / calls * 1000, "MB")), "", ""]]
    if lmdb_rss is not None and data_mb is not None and in_use_mb is not None:
        rows += [["of the RSS at the end: LMDB data file pages mapped / the rest",
                  f"{res.put('rss_lmdb_mapped_mb', Fig(lmdb_rss, 'MB'))} / "
                  f"{res.put('rss_without_lmdb_mb', Fig(rss_end / MB - lmdb_rss, 'MB'))}", "", ""],
                 ["LMDB data file (data.mdb) after the batch: pages in use / allocated on disk (a writemap "
                  "store's reserved map)",
                  f"{res.put('lmdb_in_use_mb', Fig(in_use_mb, 'MB'))} ({in_use_mb * MB / calls / 1024:.1f} KB "
                  f"per call) / {res.put('lmdb_file_mb', Fig(data_mb, 'MB'))}", "", ""]]
    rows.append(["CPU per 1,000 calls (whole batch)", res.put("cpu_s_per_1000", Fig(cpu_batch / calls * 1000, "s")),
                 "", ""])
    for kind, value in per_kind.items():
        rows.append([f"CPU per 1,000 calls: {kind.replace('_', ' ')}",
                     res.put(f"cpu_s_per_1000.{kind}", Fig(value, "s")), "", ""])
    rows.append(["CPU per 1,000 calls of the mock (same batch, for scale)",
                 res.put("mock_cpu_s_per_1000", Fig(mock_cpu / calls * 1000, "s")), "", ""])
    idle_pct = 100 * idle_cpu / idle_wall
    rows.append([f"CPU while idle for {plan.idle_s:g} s",
                 f"{res.put('idle_cpu_s', Fig(idle_cpu, 's'))} ({idle_pct:.2f} % of a core)",
                 f"< {TARGET_IDLE_PCT:g} % of a core", _met(Fig(idle_pct, "%"), idle_pct < TARGET_IDLE_PCT)])
    res.put("idle_cpu_pct", Fig(idle_pct, "%"), f"< {TARGET_IDLE_PCT:g} % of a core", idle_pct < TARGET_IDLE_PCT)
    procs.stop(side)

    env = clean_env(SIDECAR_STATE_DIR=str(procs.tmp / "startup-state"), ANTHROPIC_BASE_URL=mock.url,
                    OPENAI_BASE_URL=mock.url + "/v1")
    for folder in ("proxy", "launcher"):   # what pip install does; quiet, and a no-op when compiled already
        compileall.compile_dir(str(ROOT / folder), quiet=2)
    base = _wall(["true"], env, plan.startup_runs)
    res.put("true_ms", Fig.of(base, "ms"))
    commands = [("python -m agent_sidecar.launcher run -- true", [sys.executable, "-m", "agent_sidecar.launcher", "run", "--", "true"])]
    script = shutil.which("sidecar", path=env.get("PATH"))
    if script:
        commands.append((f"sidecar run -- true ({script})", [script, "run", "--", "true"]))
        real = os.path.join(sysconfig.get_path("scripts"), "sidecar")
        if os.path.realpath(real) != os.path.realpath(script) and os.path.exists(real):
            commands.append((f"sidecar run -- true ({real})", [real, "run", "--", "true"]))
    for i, (label, cmd) in enumerate(commands):
        times = _wall(cmd, env, plan.startup_runs)
        added = [t - statistics.median(base) for t in times]
        fig = Fig.of(added, "ms")
        key = "startup_added_ms" if i == 0 else f"startup_added_ms.script{i}"
        text = res.put(key, fig, f"< {TARGET_STARTUP_MS:g} ms", fig.value < TARGET_STARTUP_MS)
        rows.append([f"start-up added to `true`: {label}", f"+{text} (true: {statistics.median(base):.1f} ms)",
                     f"< {TARGET_STARTUP_MS:g} ms", _met(fig, fig.value < TARGET_STARTUP_MS)])
    if not script:
        res.notes.append("no `sidecar` console script on PATH: pip install -e . to measure it.")
    res.table(["measure", "value", "target", "met?"], rows)
    res.notes.append(f"{calls} calls in the batch; start-up: median of {plan.startup_runs} runs after one "
                     f"discarded, minus the median of `true` (min–max of the runs), the bytecode compiled "
                     f"first as pip install does.")
    return res
