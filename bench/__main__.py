"""`python -m bench`: the sidecar's benchmark suite, against the mock API, on 127.0.0.1 only.

Each scenario starts its own processes: the mock (`python -m bench.mock_upstream`),
one or more sidecars (`python -m agent_sidecar.launcher serve --port 0`, upstream = the mock,
a fresh temp state dir) and the load generator (`python -m bench.load --serve`).
Configurations are measured in alternating rounds, the first discarded as
warm-up; each figure is the median over rounds with the min–max of the rounds.

    python -m bench [--quick] [--only overhead,hits] [--json out.json] [--plot out.png]

The imports are absolute, so `python -m bench` from the repository's root runs
the installed agent_sidecar.bench modules, not a second copy of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import time
from pathlib import Path

from agent_sidecar.bench import fleet, footprint, hits, livepage, overhead, overload, realistic, recording, report, storm
from agent_sidecar.bench.plan import Ctx, make_plan
from agent_sidecar.bench.procs import BenchError, Procs
from agent_sidecar.bench.stats import Result

SCENARIOS = {
    "overhead": ("1. Pass-through overhead", overhead.overhead),
    "ttft": ("2. Time to first token, slow stream", overhead.ttft),
    "hits": ("3. Cache hits", hits.hits),
    "session": ("4. Replayed agent session", hits.session),
    "storm": ("5. Rate-limit storm", storm.storm),
    "footprint": ("6. Footprint", footprint.footprint),
    "recording": ("7. Recording cost", recording.recording),
    "redis": ("8. Two sidecars on one Redis", fleet.redis),
    "overload": ("9. Overload wall", overload.overload),
    "realistic": ("10. Realistic agent traffic", realistic.realistic),
    "livepage": ("11. Live page", livepage.livepage),
}


def parse(argv: list[str] | None, prog: str = "python -m bench") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and requests: under a minute")
    p.add_argument("--smoke", action="store_true", help="tiny counts, for the test suite (figures mean little)")
    p.add_argument("--only", metavar="NAME[,NAME]", help=f"scenarios to run: {', '.join(SCENARIOS)}")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG: latency distributions, throughput vs concurrency")
    p.add_argument("--ttft", type=float, help="realistic profile: seconds to first token (default 0.4)")
    p.add_argument("--tps", type=float, help="realistic profile: tokens per second (default 60)")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with every process's log")
    p.add_argument("--sidecar-from", metavar="DIR", type=Path,
                   help="run the sidecars of another checkout (an older commit, say) against this bench's mock, "
                        "load generator and yardsticks: before and after in one harness")
    args = p.parse_args(argv)
    names = [n.strip() for n in (args.only or ",".join(SCENARIOS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.names = names
    if args.sidecar_from is not None:
        args.sidecar_from = args.sidecar_from.resolve()
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    args = parse(argv, prog)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = make_plan(mode, args.ttft, args.tps)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("bench: --plot needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with SIGINT ignored
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    m = report.machine()
    if args.sidecar_from is not None:
        m["sidecar_from"] = str(args.sidecar_from)
    report.say(f"# agent-sidecar benchmark ({mode})\n\n{report.machine_line(m, mode)}\n")
    if args.sidecar_from is not None:
        report.say(f"Sidecars from another checkout: {args.sidecar_from} (mock, load generator and "
                   f"yardsticks from this one)\n")
    try:
        procs = Procs(keep=args.keep_logs, sidecar_from=args.sidecar_from)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    results: list[Result] = []
    started = time.monotonic()
    try:
        for name in args.names:
            title, fn = SCENARIOS[name]
            t0 = time.monotonic()
            try:
                res = fn(Ctx(plan, procs))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a crashed server, a failed job: say so, run the rest
                res = Result(name, title, "")
                text = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
                res.error = text.replace("\n", " ")[:600]
            finally:
                procs.stop()
            res.seconds = time.monotonic() - t0
            results.append(res)
            report.say(report.markdown(res))
        report.say(report.targets_markdown(report.targets(results)))
        report.say(f"Total: {time.monotonic() - started:.1f} s")
        if args.json:
            report.write_json(args.json, m, mode, results)
        if args.plot:
            problem = report.plot(args.plot, results)
            if problem:
                print(f"bench: {problem}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping every process it started", file=sys.stderr)
        return 130
    finally:
        procs.close()
        if args.keep_logs:
            print(f"bench: logs and state dirs kept in {procs.tmp}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
