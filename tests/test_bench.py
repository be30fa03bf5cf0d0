"""Smoke test of the benchmark suite: `python -m bench --quick --smoke` as a subprocess.

Tiny counts, so the figures mean little: it checks that every scenario runs
to the end against real processes (mock, sidecars, load generator) and puts
a number in every figure of the JSON. No timing thresholds.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"overhead", "ttft", "hits", "session", "storm", "footprint"}


def test_bench_smoke_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=55)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc["scenarios"]) == SCENARIOS
    assert doc["machine"]["cores"] and doc["machine"]["python"]
    for name, scenario in doc["scenarios"].items():
        assert scenario["status"] == "ok", (name, scenario["error"])
        assert scenario["figures"], name
        for key, fig in scenario["figures"].items():
            value = fig["value"]
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, key, fig)
            assert fig["unit"] is not None
    assert doc["targets"] and all(isinstance(t["met"], bool) for t in doc["targets"])
    for title in ("Pass-through overhead", "Cache hits", "Rate-limit storm", "Footprint", "Machine:"):
        assert title in done.stdout
