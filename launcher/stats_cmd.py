"""`sidecar stats` and `sidecar events`: what the stored records and events say.

Both read the state directory, so they work while no sidecar runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from agent_sidecar.proxy.config import Config, ConfigError
from agent_sidecar.proxy.events import EventLog, format_event
from agent_sidecar.proxy.records import RecordLog, since_seconds
from agent_sidecar.proxy.stats import summarize
from agent_sidecar.proxy.store import open_lmdb

from .summary import dollars, ms
from .terminal import clean

COLUMNS = [("calls", 6), ("hit%", 5), ("total p50", 10), ("p90", 9), ("p99", 9), ("ttft p50", 9), ("queue p50", 9),
           ("overhead p50", 12), ("tokens in", 10), ("tokens out", 10), ("cache read", 10), ("cache write", 11),
           ("pc hit%", 7), ("cost", 8), ("saved $", 8), ("saved tok", 10), ("saved s", 8), ("errors", 6)]


def _row(name: str, s: dict) -> list[str]:
    rate = "-" if s["hit_rate"] is None else f"{s['hit_rate'] * 100:.0f}"
    return [clean(name), str(s["calls"]), rate, ms(s["total"]["p50"]), ms(s["total"]["p90"]), ms(s["total"]["p99"]),
            ms(s["ttft"]["p50"]), ms(s["queue"]["p50"]), ms(s["overhead"]["p50"]), f"{s['input_tokens']:,}",
            f"{s['output_tokens']:,}", f"{s['cache_read_tokens']:,}", f"{s['cache_write_tokens']:,}",
            "-" if s["prompt_cache_ratio"] is None else f"{s['prompt_cache_ratio'] * 100:.0f}",
            dollars(s["cost_usd"], s["cost_unknown"]), dollars(s["saved_usd"], s["saved_unknown"]),
            f"{s['saved_tokens']:,}", f"{s['saved_upstream_s']:.1f}",
            str(sum(s["errors"].values()))]


def table(result: dict) -> str:
    rows = [_row(name, s) for name, s in result.get("groups", {}).items()] + [_row("all", result["all"])]
    first = max(len(r[0]) for r in rows + [[result.get("by", "")]])
    header = [result.get("by", "")] + [c for c, _ in COLUMNS]
    widths = [first] + [max(w, *(len(r[i + 1]) for r in rows)) for i, (_, w) in enumerate(COLUMNS)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    errors = result["all"]["errors"]
    if errors:
        lines.append("errors: " + ", ".join(f"{clean(k)} x{v}" for k, v in sorted(errors.items())))
    return "\n".join(lines)


def run_stats(args: argparse.Namespace, config: Config) -> int:
    """Calls, hit rate, latency percentiles, tokens and savings from the stored records."""
    try:
        since = since_seconds(args.since)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    lmdb_env = open_lmdb(config)
    try:
        records = list(RecordLog(lmdb_env, config.stats.max_records).read(since))
    finally:
        lmdb_env.close()
    result = summarize(records, by=args.by)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not records:
        print(f"no calls recorded{' in the last ' + args.since if args.since else ''} (state dir {config.state_dir})")
    else:
        print(table(result))
    return 0


def run_events(args: argparse.Namespace, config: Config) -> int:
    """The events log; --follow keeps printing new events as they are appended."""
    log = EventLog(config.state_dir)
    try:
        since = since_seconds(args.since)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    shown = 0
    for event in log.read(since):
        print(json.dumps(event) if args.json else clean(format_event(event)), flush=True)
        shown += 1
    if not shown:   # with --json on stderr: the output stays JSON lines, none
        recent = f" in the last {args.since}" if args.since else ""
        print(f"no events{recent} (state dir {config.state_dir})" + ("; waiting for new ones, Ctrl-C stops"
              if args.follow else ""), file=sys.stderr if args.json or args.follow else sys.stdout)
    if not args.follow:
        return 0
    position = log.path.stat().st_size if log.path.exists() else 0
    try:
        while True:   # a command-line tail: the sidecar itself never polls
            time.sleep(0.5)
            if not log.path.exists():
                continue
            size = log.path.stat().st_size
            if size < position:     # rotated
                position = 0
            with open(log.path, "rb") as fh:
                fh.seek(position)
                data = fh.read()
            complete = data.rfind(b"\n") + 1
            position += complete
            for line in data[:complete].splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                print(json.dumps(event) if args.json else clean(format_event(event)), flush=True)
    except KeyboardInterrupt:
        return 0


def add_parsers(sub, common) -> None:
    stats = sub.add_parser("stats", parents=[common], help="calls, hit rate, latency, tokens, dollars, savings",
                           description="Calls, hit rate, latency percentiles, tokens (prompt cache included), dollars "
                                       "spent and saved, from the records in the state directory.")
    stats.add_argument("--since", default="", help="only calls this recent: 90s, 15m, 1h, 2d (default: all)")
    stats.add_argument("--by", choices=["model", "agent", "session", "day", "route"],
                       help="one row per model, agent, session (conversation), day or route")
    stats.add_argument("--json", action="store_true", help="JSON for scripts (with no calls: zero counts)")
    events = sub.add_parser("events", parents=[common], help="threshold crossings and agent events",
                            description="Threshold crossings (raised/cleared) and agent events from the events log.")
    events.add_argument("--since", default="", help="only events this recent: 15m, 1h, 2d")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
