"""Scenario 5: a rate-limit storm.

N agents (concurrent clients, each its own `anthropic.AsyncAnthropic` with the
SDK's default `max_retries=2`) make M calls each against a mock that admits
K calls at once and answers the rest 429 with `retry-after`. Direct, the SDK's
own retries are all the agents have; through the sidecar (same SDK, same
settings) its queue, adaptive limit and retries sit in between. Each sidecar
round starts a fresh sidecar on a fresh state dir (it learns the limit cold).
Reported: client-visible errors, upstream 429s (the mock's own count),
completion time and goodput (successful calls per second).
"""

from __future__ import annotations

import threading
import time

from .overhead import _met
from .plan import Ctx
from .procs import http
from .stats import Result, Series, paired, pct

TARGET_GOODPUT = 2.0


def storm(ctx: Ctx) -> Result:
    plan, procs = ctx.plan, ctx.procs
    n, m, k = plan.storm_agents, plan.storm_calls, plan.storm_k
    res = Result("storm", "5. Rate-limit storm",
                 f"{n} agents × {m} calls, official SDK (max_retries=2), mock admits {k} at once "
                 f"({plan.storm_ttft * 1000:.0f} ms each, 429 with retry-after 1 s beyond); ideal completion "
                 f"{n * m / k * plan.storm_ttft:.1f} s; every request unique")
    load = procs.load()
    mock = procs.mock(ttft=plan.storm_ttft, max_concurrency=k, retry_after=1.0)
    procs.ready(mock)
    runs = {"direct": Series("direct"), "sidecar": Series("sidecar")}

    def one(url: str, tag: str) -> dict:
        http("POST", mock.url + "/_mock/reset", {})
        result = load.run({"kind": "storm", "url": url, "agents": n, "calls": m, "max_retries": 2, "tag": tag},
                          timeout=400)
        stats = http("GET", mock.url + "/_mock/stats")
        result.update(upstream_requests=stats["count"], upstream_429=stats["rate_limited"],
                      client_errors=sum(result["errors"].values()))
        return result

    targets = ["direct", "sidecar"] + (["sidecar_k"] if plan.storm_configured else [])
    if plan.storm_configured:
        runs["sidecar_k"] = Series("sidecar_k")
    for r in range(plan.storm_warmup + plan.storm_rounds):
        for target in targets[r % len(targets):] + targets[:r % len(targets)]:
            if target == "direct":
                result = one(mock.url, f"s5-direct-r{r}")
            else:
                settings = {"limits_max_concurrency": k} if target == "sidecar_k" else {}
                side = procs.sidecar(mock.url, **settings)
                procs.ready(side)
                with LimitWatch(side.url) as watch:
                    result = one(side.url, f"s5-{target}-r{r}")
                limits = http("GET", side.url + "/_sidecar/limits")
                result.update(retries=limits.get("retries", 0), decreases=limits.get("adaptive_decreases", 0),
                              effective_limit=limits.get("effective_limit"), watch=watch.summary(k))
                side.check()
                procs.stop(side)
            if r >= plan.storm_warmup:
                runs[target].rounds.append(result)
    res.series = runs
    d, s = runs["direct"], runs["sidecar"]
    sk = runs.get("sidecar_k")
    total = n * m

    def goodput(r: dict) -> float:
        return r["ok"] / r["wall_s"] if r["wall_s"] else 0.0

    measures = [("client_errors", "client-visible errors", lambda r: r["client_errors"], "errors"),
                ("ok", "successful calls", lambda r: r["ok"], "calls"),
                ("upstream_429", "upstream 429s (mock)", lambda r: r["upstream_429"], "429s"),
                ("upstream_requests", "upstream requests (mock)", lambda r: r["upstream_requests"], "calls"),
                ("completion_s", "completion time", lambda r: r["wall_s"], "s"),
                ("goodput", "goodput", goodput, "calls/s"),
                ("call_p50_s", "p50 call latency (successes)", lambda r: pct(r["latency_ms"], 50) / 1000, "s"),
                ("call_max_s", "max call latency (successes)", lambda r: max(r["latency_ms"] or [0]) / 1000, "s"),
                ("utilization", "upstream slots used (successes × ttft / (K × time))",
                 lambda r: 100 * r["ok"] * plan.storm_ttft / (k * r["wall_s"]) if r["wall_s"] else 0.0, "%")]
    rows = []
    for key, label, fn, unit in measures:
        cells = [label, res.put(f"{key}.direct", d.fig(fn, unit)), res.put(f"{key}.sidecar", s.fig(fn, unit))]
        if sk is not None:
            cells.append(res.put(f"{key}.sidecar_max_concurrency", sk.fig(fn, unit)))
        if key == "client_errors":
            fig = s.fig(fn, unit)
            met = fig.hi == 0 if fig.hi is not None else fig.value == 0
            res.put("client_errors.target", fig, "0 through the sidecar", met)
            cells += ["", "0 through the sidecar", _met(fig, met)]
        elif key == "goodput":
            fig = paired(d, s, fn, "ratio", "x")
            met = fig.value >= TARGET_GOODPUT
            cells += [res.put("goodput.ratio", fig, f">= {TARGET_GOODPUT:g}x direct", met),
                      f"≥ {TARGET_GOODPUT:g}× direct", _met(fig, met)]
        else:
            cells += ["", "", ""]
        rows.append(cells)
    res.table(["measure", "direct (SDK retries)", "sidecar (SDK retries + sidecar)"]
              + ([f"sidecar, limits.max_concurrency={k}"] if sk is not None else []) + ["sidecar / direct",
                                                                                       "target", "met?"], rows)
    res.notes.append(f"goodput can be at most K / ttft = {k / plan.storm_ttft:g} calls/s (the mock's cap); "
                     f"the ratio target needs direct ≤ half of the sidecar's.")
    for name, series in (("sidecar", s), ("sidecar with max_concurrency", sk)):
        if series is not None and series.rounds:
            extra = series.rounds[-1]
            res.notes.append(f"{name} (last round): {extra.get('retries')} upstream retries, "
                             f"{extra.get('decreases')} adaptive limit decreases, effective limit at the end "
                             f"{extra.get('effective_limit')}; {extra.get('watch')}.")
    if d.rounds:
        res.notes.append(f"of {total} calls per round; direct errors by kind (last round): "
                         + (", ".join(f"{k}×{v}" for k, v in d.rounds[-1]["errors"].items()) or "none"))
    return res


class LimitWatch:
    """Polls /_sidecar/limits every 100 ms during a round: how the effective limit moved."""

    def __init__(self, url: str):
        self.url, self.samples = url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                doc = http("GET", self.url + "/_sidecar/limits", timeout=2)
            except OSError:
                continue
            self.samples.append((time.monotonic(), doc.get("effective_limit"), doc.get("in_flight", 0)))

    def __enter__(self) -> "LimitWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, k: int) -> str:
        s = self.samples
        if len(s) < 2:
            return "limit not sampled"
        span = s[-1][0] - s[0][0]
        above = sum(b[0] - a[0] for a, b in zip(s, s[1:]) if a[1] is None or a[1] > k)
        below = sum(b[0] - a[0] for a, b in zip(s, s[1:]) if a[1] is not None and a[1] < k)
        busy = sum((b[0] - a[0]) * min(a[2], k) for a, b in zip(s, s[1:])) / span
        return (f"effective limit above K={k} (or none) {100 * above / span:.0f} % of the time, below K "
                f"{100 * below / span:.0f} %; mean upstream calls in flight {busy:.1f} of {k}")
