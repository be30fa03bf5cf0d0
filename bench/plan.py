"""How much each scenario runs (full, --quick, --smoke), and the shared round loop.

Every scenario measures its configurations in alternating rounds (direct,
sidecar, ... with the order rotated each round), discards the first
`warmup` rounds, and keeps `rounds` measured ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .procs import Procs
from .stats import Series


@dataclass(frozen=True)
class Plan:
    mode: str = "full"
    warmup: int = 1            # rounds discarded before measuring
    rounds: int = 5            # measured rounds
    n_c1: int = 400            # requests per round at concurrency 1
    n_c8: int = 800
    n_c32: int = 1500
    ttft: float = 0.4          # realistic profile: seconds to first token ...
    tps: float = 60.0          # ... and tokens per second
    ttft_n: int = 8            # slow streams per round (scenario 2), all at once
    ttft_tokens: int = 60
    hit_tokens: int = 100      # ~1 KB answers (scenario 3)
    session_turns: int = 10
    session_tokens: int = 30
    session_reps: int = 3
    storm_agents: int = 32
    storm_calls: int = 4
    storm_k: int = 4
    storm_ttft: float = 0.2
    storm_warmup: int = 1
    storm_rounds: int = 3
    storm_configured: bool = True   # also a sidecar told the limit ([limits] max_concurrency = K)
    fp_calls: int = 2000       # calls in the footprint batch
    idle_s: float = 10.0
    startup_runs: int = 7
    rec_n_c1: int = 1000       # calls per batch, recording on vs off (scenario 7), at concurrency 1 ...
    rec_n_c32: int = 2000      # ... and at concurrency 32
    rec_rounds: int = 11       # measured rounds of scenario 7 (per-batch CPU is noisy on 2 shared cores)
    overload_agents: int = 16  # scenario 9: agents on the official SDK ...
    overload_calls: int = 1    # ... calls each ...
    overload_wall: float = 60.0   # ... against an upstream answering 529 to everything this long
    real_agents: int = 4       # scenario 10: conversations at once ...
    real_turns: int = 40       # ... of this many turns ...
    real_last_kb: int = 4096   # ... growing from 76 KB to this
    real_warmup: int = 1
    real_rounds: int = 3
    live_calls: int = 50000   # scenario 11: calls through a sidecar with a live page viewer


PLANS = {
    "full": Plan(),
    "quick": Plan(mode="quick", rounds=2, n_c1=100, n_c8=200, n_c32=300, ttft_n=4, ttft_tokens=30,
                  session_turns=4, session_reps=1, storm_calls=2, storm_warmup=0, storm_rounds=1,
                  storm_configured=False,
                  fp_calls=500, idle_s=2.0, startup_runs=3, rec_n_c1=200, rec_n_c32=400, rec_rounds=2,
                  real_agents=2, real_turns=12, real_last_kb=1024, real_warmup=0, real_rounds=1, overload_wall=20.0,
                  live_calls=6000),
    "smoke": Plan(mode="smoke", warmup=0, rounds=1, n_c1=10, n_c8=16, n_c32=32, ttft_n=2, ttft_tokens=6,
                  session_turns=3, session_tokens=6, session_reps=1, storm_agents=6, storm_calls=1, storm_k=2,
                  storm_warmup=0, storm_rounds=1, storm_configured=False, fp_calls=60, idle_s=1.0, startup_runs=1,
                  rec_n_c1=150, rec_n_c32=300, rec_rounds=1,
                  overload_agents=4, overload_wall=1.0,
                  real_agents=2, real_turns=3, real_last_kb=200, real_warmup=0, real_rounds=1, live_calls=300),   # enough calls to rise above the 10 ms CPU clock
}


def make_plan(mode: str, ttft: float | None = None, tps: float | None = None) -> Plan:
    plan = PLANS[mode]
    changes = {k: v for k, v in (("ttft", ttft), ("tps", tps)) if v is not None}
    return dataclasses.replace(plan, **changes)


@dataclass
class Ctx:
    plan: Plan
    procs: Procs


def alternate(plan: Plan, jobs: dict[str, Callable[[int], dict]], expect: dict[str, str] | None = None,
              warmup: int | None = None, rounds: int | None = None) -> dict[str, Series]:
    """Run each job once per round, rotating their order; keep the measured rounds."""
    warmup = plan.warmup if warmup is None else warmup
    rounds = plan.rounds if rounds is None else rounds
    series = {name: Series(name) for name in jobs}
    names = list(jobs)
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            result = jobs[name](r)
            if r >= warmup:
                series[name].add(result, (expect or {}).get(name))
    return series
