"""Smoke test of the benchmark suite: `python -m bench --quick --smoke` as a subprocess.

Tiny counts, so the figures mean little: it checks that every scenario runs
to the end against real processes (mock, sidecars, load generator) and puts
a number in every figure of the JSON. No timing thresholds. The Redis
scenario may say SKIPPED only where /usr/bin/redis-server is missing.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"overhead", "ttft", "hits", "session", "storm", "footprint", "recording", "redis", "realistic", "overload",
             "livepage"}
NEW_FIGURES = {
    "recording": [f"{w}.{k}" for w in ("json_c1", "json_c32")
                  for k in ("cpu_s_per_1000.on", "cpu_s_per_1000.off", "cpu_s_per_1000.diff", "cpu_pct_of_on")],
    "redis": [f"{w}.{m}.{t}" for w, m in (("json_c1", "p50_ms"), ("json_c1", "p99_ms"), ("json_c32", "rps"))
              for t in ("direct", "redis", "lmdb", "redis_vs_lmdb")] + ["cross_hits.first_fetch", "cross_hits.rounds"],
    "realistic": ["0-256KB.sidecar_added", "0-256KB.excess_over_target", "rps.sidecar_vs_bare", "stall.sidecar_worst"],
    "overload": [f"{k}.{t}" for k in ("client_errors", "wall_requests", "wall_peak_in_flight", "wall_peak_after_first",
                                      "completion_s") for t in ("direct", "sidecar")],
    "livepage": ["push.p50", "push.max", "first.kept", "first.built"],
    "hits": ["json_c1.p50_ms.cache_hit", "json_c1.p50_ms.hit_vs_cache", "json_c32.rps.hit_vs_cache"],
}
REDIS_SERVER = Path("/usr/bin/redis-server")


@pytest.mark.timeout(400)   # eleven scenarios of real processes: on a loaded machine, minutes
def test_bench_smoke_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "agent_sidecar.bench", "--quick", "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc["scenarios"]) == SCENARIOS
    assert doc["machine"]["cores"] and doc["machine"]["python"]
    for name, scenario in doc["scenarios"].items():
        if name == "redis" and not REDIS_SERVER.exists():
            assert scenario["status"] == "skipped", scenario
            continue
        assert scenario["status"] == "ok", (name, scenario["error"])
        assert scenario["figures"], name
        for key, fig in scenario["figures"].items():
            value = fig["value"]
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, key, fig)
            assert fig["unit"] is not None
    for name, keys in NEW_FIGURES.items():
        if doc["scenarios"][name]["status"] == "skipped":
            continue
        figures = doc["scenarios"][name]["figures"]
        for key in keys:
            assert key in figures, (name, key, sorted(figures))
            assert isinstance(figures[key]["value"], (int, float)) and math.isfinite(figures[key]["value"]), \
                (name, key, figures[key])
    assert doc["targets"] and all(isinstance(t["met"], bool) for t in doc["targets"])
    for title in ("Pass-through overhead", "Cache hits", "Rate-limit storm", "Footprint", "Recording cost",
                  "Two sidecars on one Redis", "Realistic agent traffic", "Overload wall", "Machine:"):
        assert title in done.stdout


def _checkout(root: Path, new_layout: bool) -> Path:
    """A checkout whose launcher says where it runs from instead of serving."""
    (root / "proxy").mkdir(parents=True)
    (root / "proxy" / "__init__.py").write_text("")
    (root / "launcher").mkdir()
    (root / "launcher" / "__init__.py").write_text("")
    (root / "launcher" / "cli.py").write_text("")
    (root / "launcher" / "__main__.py").write_text(
        "import os, sys\nprint('ran', __spec__.name, os.path.realpath(__file__), sys.argv[1:],"
        " os.environ['SIDECAR_STATE_DIR'] != '',"
        " file=sys.stderr)\n")
    if new_layout:
        (root / "pyproject.toml").write_text('[tool.setuptools]\npackages = ["agent_sidecar.launcher"]\n')
    return root


@pytest.mark.parametrize("new_layout", [True, False])
def test_sidecar_from_starts_the_other_checkouts_sidecar(tmp_path: Path, new_layout: bool) -> None:
    from agent_sidecar.bench.procs import Procs
    tree = _checkout(tmp_path / "tree", new_layout)
    procs = Procs(sidecar_from=tree)
    try:
        proc = procs.sidecar("http://127.0.0.1:9")
        proc.popen.wait(30)
        log = proc.log.read_text()
    finally:
        procs.close()
    module = "agent_sidecar.launcher.__main__" if new_layout else "launcher.__main__"
    # that tree's launcher (not the installed one), the way the bench starts a sidecar
    assert f"ran {module} " in log and "['serve', '--port', '0'] True" in log, log
    assert f" {tree.resolve() / 'launcher' / '__main__.py'} " in log, log


def test_sidecar_from_a_directory_that_is_no_checkout_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "agent_sidecar.bench", "--smoke", "--only", "overhead",
                           "--sidecar-from", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "not a checkout of this repository" in done.stderr, done.stderr
