"""Output: markdown tables on stdout, the machine line, --json, --plot.

matplotlib is imported only when a plot is asked for.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys

from .stats import Result, met_text, pct


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    uv = _version("uvloop")
    return {"cores": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "os": f"{platform.system()} {platform.release()}",
            "uvloop": uv, "aiohttp": _version("aiohttp"), "anthropic": _version("anthropic"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def machine_line(m: dict, mode: str) -> str:
    uv = f"uvloop {m['uvloop']} on" if m["uvloop"] else "uvloop off (not installed)"
    cpu = f" ({m['cpu']})" if m["cpu"] else ""
    return (f"Machine: {m['cores']} cores{cpu}, {m['os']}, {m['implementation']} {m['python']}, {uv} "
            f"(sidecar, mock and load generator), aiohttp {m['aiohttp']}, {m['date']}; load average "
            f"{m['loadavg_1m']:.2f} at start (other work on the machine skews figures); run: {mode}")


def markdown(res: Result) -> str:
    out = [f"### {res.title}", ""]
    if res.setup:
        out += [f"_{res.setup}_", ""]
    if res.error:
        out += [f"**FAILED**: {res.error}", ""]
    elif res.skipped:
        out += [f"**SKIPPED**: {res.skipped}", ""]
    for header, rows in res.tables:
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
        out.append("")
    out += [f"- {note}" for note in res.notes]
    out.append(f"- took {res.seconds:.1f} s")
    return "\n".join(out) + "\n"


def targets(results: list[Result]) -> list[dict]:
    found = []
    for res in results:
        for key, fig in res.figures.items():
            if "target" in fig:
                found.append({"scenario": res.name, "figure": key, "value": fig["value"], "unit": fig["unit"],
                              "target": fig["target"], "met": fig["met"]})
        if res.error:
            found.append({"scenario": res.name, "figure": "(scenario)", "value": None, "unit": "",
                          "target": "runs", "met": False})
    return found


def targets_markdown(found: list[dict]) -> str:
    out = ["### Targets", "", "| scenario | figure | value | target | met? |", "|---|---|---|---|---|"]
    for t in found:
        value = "FAILED" if t["value"] is None else f"{t['value']:.3g} {t['unit']}".strip()
        out.append(f"| {t['scenario']} | {t['figure']} | {value} | {t['target']} | {met_text(t['met'])} |")
    return "\n".join(out) + "\n"


def _clean(x):
    """NaN (nothing measured) becomes null: the file stays strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str, m: dict, mode: str, results: list[Result]) -> None:
    doc = {"machine": m, "mode": mode, "scenarios": {r.name: r.to_json() for r in results},
           "targets": targets(results)}
    with open(path, "w") as fh:
        json.dump(_clean(doc), fh, indent=1, allow_nan=False, default=str)


def plot(path: str, results: list[Result]) -> str | None:
    """Latency distributions and throughput vs concurrency; returns an error message or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install -e '.[bench]'"
    by = {r.name: r for r in results if not r.error}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    hits, over = by.get("hits"), by.get("overhead")
    curves = []
    if hits:
        curves = [("direct", hits.series.get("json_c1.direct")), ("bare proxy", hits.series.get("json_c1.bare")),
                  ("sidecar miss", hits.series.get("json_c1.miss")), ("sidecar hit", hits.series.get("json_c1.hit"))]
    elif over:
        curves = [("direct", over.series.get("json_c1.direct")), ("bare proxy", over.series.get("json_c1.bare")),
                  ("sidecar miss", over.series.get("json_c1.sidecar"))]
    for label, series in curves:
        values = sorted(series.pooled("latency_ms")) if series and not series.failed else []
        if values:
            ys = [100 * (i + 1) / len(values) for i in range(len(values))]
            ax1.plot(values, ys, label=f"{label} (p50 {pct(values, 50):.2f} ms)")
    ax1.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax1.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.set_xlabel("latency per call, ms (log)")
    ax1.set_ylabel("% of calls at or below")
    ax1.set_title("Latency, JSON calls at concurrency 1 (zero-delay mock)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    if hits:
        for label, kind in (("direct", "direct"), ("bare proxy", "bare"), ("sidecar miss", "miss"),
                            ("sidecar hit", "hit")):
            xs, ys = [], []
            for c in (1, 8, 32):
                fig_ = hits.figures.get(f"json_c{c}.rps.{kind}")
                if fig_ and fig_["value"] is not None:
                    xs.append(c)
                    ys.append(fig_["value"])
            ax2.plot(xs, ys, marker="o", label=label)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks([1, 8, 32], ["1", "8", "32"])
    ax2.set_xlabel("concurrent requests")
    ax2.set_ylabel("requests per second")
    ax2.set_title("Throughput vs concurrency (~1 KB answers)")
    ax2.grid(True, alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
