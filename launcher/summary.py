"""The few lines `sidecar run` prints on stderr when the agent has exited."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} GB"


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def format_summary(summary: dict, events: list[dict], peak_rss: int, variables: tuple[str, ...] = ()) -> str:
    calls = summary["calls"]
    if not calls:   # a bypass is never silent: an agent that reads none of these went around the sidecar
        return (f"sidecar: no API calls came through the sidecar (it set {', '.join(variables) or 'no variables'}; "
                f"an agent that called an API read its base URL from elsewhere); agent peak RSS "
                f"{human_bytes(peak_rss)}")
    rate = summary["hit_rate"]
    hits = f"{summary['hits']} from cache ({rate:.0%})" if rate is not None else "no cacheable calls"
    raised = sorted({e["kind"] for e in events if e.get("state") == "raised"})
    lines = [
        f"sidecar: {calls} API calls, {hits}; saved {summary['saved_upstream_s']:.1f} s and "
        f"{summary['saved_tokens']:,} tokens",
        f"sidecar: latency p50 {ms(summary['total']['p50'])}, p95 {ms(summary['total']['p95'])}; "
        f"tokens in/out {summary['input_tokens']:,}/{summary['output_tokens']:,}; agent peak RSS "
        f"{human_bytes(peak_rss)}; events: {', '.join(raised) if raised else 'none'}",
    ]
    if summary["errors"]:
        lines.append("sidecar: errors: " + ", ".join(f"{k} x{v}" for k, v in summary["errors"].items()))
    return "\n".join(lines)
