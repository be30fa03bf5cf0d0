"""Scenario 9: an overload wall.

N agents (each its own `anthropic.AsyncAnthropic` with the SDK's default
retries, `max_retries=2`) make M calls each while the mock answers every call
529 (`overloaded_error`, retry-after 1 s, after 50 ms) for W seconds from the
first call and then recovers. Direct, the SDK's retries are all the agents have; through a fresh
sidecar (default settings: [retry] max_total = 120 s) its overload circuit
sits in between. Reported, from the mock's own counts: client-visible
failures, upstream requests during the wall, the most of them in flight at
once (all of them, and once the first overload answer had gone out: before
it, nobody can know there is a wall), and the completion time.
"""

from __future__ import annotations

from .plan import Ctx
from .procs import http
from .stats import Result, Series

WALL_LATENCY = 0.05


def overload(ctx: Ctx) -> Result:
    plan, procs = ctx.plan, ctx.procs
    n, m, wall_s = plan.overload_agents, plan.overload_calls, plan.overload_wall
    res = Result("overload", "9. Overload wall",
                 f"{n} agents × {m} calls, official SDK (max_retries=2, its default); the mock answers every call "
                 f"529 overloaded_error (retry-after 1 s, {WALL_LATENCY * 1000:.0f} ms each) for {wall_s:g} s from "
                 f"the first call, then recovers ({plan.storm_ttft * 1000:.0f} ms per answer); sidecar with default "
                 f"settings ([retry] max_total 120 s, base_delay 0.5 s, max_delay 20 s); every request unique")
    load = procs.load()
    mock = procs.mock(ttft=plan.storm_ttft, retry_after=1.0, wall_latency=WALL_LATENCY)
    procs.ready(mock)
    runs = {"direct": Series("direct"), "sidecar": Series("sidecar")}

    def one(url: str, tag: str) -> dict:
        http("POST", mock.url + "/_mock/reset", {})
        http("POST", mock.url + "/_mock/wall", {"seconds": wall_s, "status": 529})
        result = load.run({"kind": "storm", "url": url, "agents": n, "calls": m, "max_retries": 2, "tag": tag},
                          timeout=wall_s + 400)
        if "fatal" in result:
            raise RuntimeError(result["fatal"])
        stats = http("GET", mock.url + "/_mock/stats")
        result.update(upstream_requests=stats["count"], wall=stats["wall"],
                      client_errors=sum(result["errors"].values()))
        return result

    runs["direct"].rounds.append(one(mock.url, "s9-direct"))
    side = procs.sidecar(mock.url)
    procs.ready(side)
    result = one(side.url, "s9-sidecar")
    overview = http("GET", side.url + "/_sidecar/overview")
    result.update(held=overview["overload"]["held"], timed_out=overview["overload"]["timed_out"],
                  effective_limit=overview["limits"]["effective_limit"],
                  events=[e["state"] for e in sorted(overview["events"], key=lambda e: e["ts"])
                          if e["kind"] == "upstream_overloaded"])
    side.check()
    procs.stop(side)
    runs["sidecar"].rounds.append(result)
    res.series = runs
    d, s = runs["direct"], runs["sidecar"]
    measures = [("client_errors", "client-visible failures", lambda r: r["client_errors"], "errors", 0),
                ("ok", "successful calls", lambda r: r["ok"], "calls", None),
                ("wall_requests", "upstream requests during the wall", lambda r: r["wall"]["requests"], "calls",
                 None),
                ("wall_peak_in_flight", "most upstream requests in flight at once during the wall",
                 lambda r: r["wall"]["peak_in_flight"], "calls", None),
                ("wall_peak_after_first", "… once the first overload answer was out",
                 lambda r: r["wall"]["peak_in_flight_after_first"], "calls", 1),
                ("upstream_requests", "upstream requests in all", lambda r: r["upstream_requests"], "calls", None),
                ("completion_s", "completion time (all agents done)", lambda r: r["wall_s"], "s", None)]
    rows = []
    for key, label, fn, unit, limit in measures:
        cells = [label, res.put(f"{key}.direct", d.fig(fn, unit)), res.put(f"{key}.sidecar", s.fig(fn, unit))]
        if limit is not None:
            fig = s.fig(fn, unit)
            met = not fig.failed and fig.value <= limit
            target = "0 through the sidecar" if limit == 0 else f"≤ {limit} through the sidecar"
            res.put(f"{key}.target", fig, target, met)
            cells += [target, "yes" if met else "NO"]
        else:
            cells += ["", ""]
        rows.append(cells)
    res.table(["measure", "direct (SDK retries)", "sidecar (SDK retries + sidecar)", "target", "met?"], rows)
    res.notes.append(f"the wall lasted {wall_s:g} s; calls cannot end well before it does: the sidecar's completion "
                     f"time is the wall plus the probe backoff at the moment it ended (≤ 8 s) plus the "
                     f"calls themselves.")
    res.notes.append("in flight during the wall, all: the agents' first calls reach the upstream together, before "
                     "any answer says there is a wall; the target is on the requests sent once the first overload "
                     "answer was out.")
    if s.rounds:
        r = s.rounds[-1]
        res.notes.append(f"sidecar: {r['held']} calls held by the overload circuit, {r['timed_out']} of them "
                         f"answered with the upstream's last 529 at their deadline; effective concurrency limit after "
                         f"recovery {r['effective_limit']}; upstream_overloaded events: {', '.join(r['events']) or 'none'}.")
    if d.rounds:
        res.notes.append("direct errors by kind: " + (", ".join(f"{k}×{v}" for k, v in d.rounds[-1]["errors"].items())
                                                     or "none"))
    return res
