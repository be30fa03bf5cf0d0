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


def dollars(amount: float | None, unknown: int = 0) -> str:
    """A dollar figure; calls with no known price make it "unknown" (alone) or "+unknown", never $0."""
    if amount is None or unknown and not amount:
        return "unknown"
    figure = f"${amount:,.2f}" if amount >= 100 else f"${amount:.4f}"
    return figure + "+unknown" if unknown else figure


NOTED = ("agent_restarted", "sidecar_fault")   # process events worth a word in the summary


def event_words(events: list[dict], agent: str) -> str:
    """The thresholds raised and the restarts and faults seen during the run, e.g. 'slow_response, agent_restarted x2'."""
    counts: dict[str, int] = {}
    for event in events:
        if event.get("agent", agent) != agent:
            continue   # another agent's, on a shared server
        if event.get("state") == "raised" or event.get("kind") in NOTED:
            counts[event["kind"]] = counts.get(event["kind"], 0) + 1
    return ", ".join(k if n == 1 or k not in NOTED else f"{k} x{n}" for k, n in sorted(counts.items())) or "none"


def format_summary(summary: dict, events: list[dict], peak_rss: int, agent: str = "",
                   variables: tuple[str, ...] = ()) -> str:
    calls = summary["calls"]
    if not calls:   # a bypass is never silent: an agent that reads none of these went around the sidecar
        return (f"sidecar: no API calls came through the sidecar (it set {', '.join(variables) or 'no variables'}; "
                f"an agent that called an API read its base URL from elsewhere); agent peak RSS "
                f"{human_bytes(peak_rss)}; events: {event_words(events, agent)}")
    hits = f"{summary['hits']} from cache ({summary['hits'] / calls:.0%})" if summary["hit_rate"] is not None \
        else "none cacheable"
    lines = [
        f"sidecar: {calls} API calls, {hits}; saved {summary['saved_upstream_s']:.1f} s and "
        f"{summary['saved_tokens']:,} tokens",
        f"sidecar: latency p50 {ms(summary['total']['p50'])}, p95 {ms(summary['total']['p95'])}; "
        f"tokens in/out {summary['input_tokens']:,}/{summary['output_tokens']:,}; agent peak RSS "
        f"{human_bytes(peak_rss)}; events: {event_words(events, agent)}",
    ]
    if "cost_usd" in summary:   # (a shared sidecar of an older version has no prices)
        lines.append(f"sidecar: spent {dollars(summary['cost_usd'], summary['cost_unknown'])}, cache saved "
                     f"{dollars(summary['saved_usd'], summary['saved_unknown'])}; prompt cache read/write "
                     f"{summary['cache_read_tokens']:,}/{summary['cache_write_tokens']:,} tokens (hit ratio "
                     f"{'-' if summary['prompt_cache_ratio'] is None else format(summary['prompt_cache_ratio'], '.0%')})"
                     + (f", reasoning {summary['reasoning_tokens']:,}" if summary["reasoning_tokens"] else ""))
    if summary["errors"]:
        lines.append("sidecar: errors: " + ", ".join(f"{k} x{v}" for k, v in summary["errors"].items()))
    return "\n".join(lines)
