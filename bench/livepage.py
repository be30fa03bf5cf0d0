"""Scenario 11: what the live page costs, with many calls behind it.

One `sidecar serve` (every feature on) and a viewer on /_sidecar/live (a thread reading the SSE stream)
from the start; `live_calls` unique JSON calls at concurrency 32 go through it, so the recent window (5,000
calls) is full and the call records on disk number `live_calls`. The hub times every push it builds (the
snapshot of the summary, chart, sessions and limits, serialised), on the event loop, in wall time and in the
loop thread's CPU time; GET /_sidecar/overview reports the latest pushes' median and worst. Then a second
viewer connects: the time until its first frame (the figures are already kept) and, after the first viewer
left too, a third one: until its first frame while the window is counted in again, a slice per loop turn.
Target (issue 16): a push under 2 ms. It is checked on the CPU time, the work the push itself does: on a
machine whose cores the load generator and the mock share with the sidecar, a push's wall time also counts
the moments the sidecar waited for a core (shown beside it).
"""

from __future__ import annotations

import http.client
import threading
import time
from urllib.parse import urlsplit

from .overhead import _job
from .plan import Ctx
from .procs import http as http_json
from .stats import Fig, Result, met_text

TARGET_PUSH_MS = 2.0


class Viewer:
    """A reader of /_sidecar/live on a thread; `first_ms`: from connecting to its first frame."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.frames = 0
        self.first_ms: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self.conn.request("GET", "/_sidecar/live")
            reply = self.conn.getresponse()
            while not self._stop.is_set():
                line = reply.fp.readline()
                if not line:
                    return
                if line.startswith(b"data: "):
                    self.frames += 1
                    if self.first_ms is None:
                        self.first_ms = (time.perf_counter() - started) * 1000
        except OSError:
            pass

    def start(self) -> "Viewer":
        self._thread.start()
        return self

    def wait_first(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.first_ms is None and time.monotonic() < deadline:
            time.sleep(0.01)   # a thread of the bench waiting on another: a short poll with a deadline

    def stop(self) -> None:
        self._stop.set()
        try:
            self.conn.sock.shutdown(2)   # unblocks the reader; the sidecar sees the viewer leave
        except (OSError, AttributeError):
            pass
        self.conn.close()
        self._thread.join(timeout=10)


def livepage(ctx: Ctx) -> Result:
    plan, procs = ctx.plan, ctx.procs
    res = Result("livepage", "11. Live page",
                 f"`sidecar serve` (every feature on) with a viewer on /_sidecar/live; {plan.live_calls} unique JSON "
                 f"calls at concurrency 32 (zero-delay mock); the hub's own timing of each push it builds")
    load = procs.load()
    mock = procs.mock()
    procs.ready(mock)
    side = procs.sidecar(mock.url)
    procs.ready(side)
    first = Viewer(side.url).start()
    first.wait_first()
    started = time.monotonic()
    result = load.run(_job(side.url, plan.live_calls, 32, False, f"s11-{time.time()}"), timeout=900)
    took = time.monotonic() - started
    time.sleep(1.0)   # the last push after the last call
    pushed = http_json("GET", side.url + "/_sidecar/overview", timeout=30)["push"]
    second = Viewer(side.url).start()
    second.wait_first()
    second.stop()
    first.stop()
    time.sleep(0.5)   # both gone: the figures are no longer kept
    third = Viewer(side.url).start()
    third.wait_first()
    third.stop()
    side.check()
    overview = http_json("GET", side.url + "/_sidecar/overview", timeout=30)
    worst = Fig(pushed["cpu_max_ms"], "ms") if pushed["cpu_max_ms"] is not None else Fig(float("nan"), "ms", failed=True)
    met = None if worst.failed else worst.value <= TARGET_PUSH_MS
    rows = [["push, median (CPU time)", res.put("push.p50", Fig(pushed["cpu_p50_ms"] or float("nan"), "ms")), "", ""],
            ["push, worst of the latest (CPU time)", res.put("push.max", worst, f"<= {TARGET_PUSH_MS:g} ms", met),
             f"<= {TARGET_PUSH_MS:g} ms", "n/a" if worst.failed else met_text(met)],
            ["push, median (wall time)", res.put("push.wall_p50", Fig(pushed["p50_ms"] or float("nan"), "ms")), "", ""],
            ["push, worst of the latest (wall time)", res.put("push.wall_max", Fig(pushed["max_ms"] or float("nan"), "ms")),
             "", ""],
            ["first frame of a second viewer", res.put("first.kept", Fig(second.first_ms or float("nan"), "ms")), "", ""],
            ["first frame of a viewer after nobody watched", res.put("first.built", Fig(third.first_ms or float("nan"), "ms")),
             "", ""]]
    res.table(["measure", "value", "target", "met?"], rows)
    res.notes.append(f"{pushed['pushes']} pushes timed (the latest 256 at most) over {took:.1f} s of calls "
                     f"({result['ok']} answered, {result.get('rps', 0):.0f} req/s); the window held "
                     f"{overview['summary']['all']['calls']} calls; {first.frames} frames reached the first viewer.")
    res.notes.append("The first frame of a viewer includes its HTTP round trip; after nobody watched, the window "
                     "is counted in first (rolling.py), a slice of 250 records per loop turn.")
    return res
