"""`sidecar top`: the live page's overview in the terminal, redrawn whenever the sidecar pushes.

It reads /_sidecar/live (server-sent events) and waits in select() on that
socket, the keyboard and a resize signal: nothing polls, and an idle sidecar
costs nothing. Plain ANSI (home, clear to end of line/screen) rather than
curses, so it works over SSH and inside tmux; plain text frames when stdout is
not a terminal, and one frame with --once. Which sidecar: --url, else the
shared one (shared.json), else the newest live `sidecar run` (run/<pid>.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import shutil
import signal
import socket
import sys
import termios
import time
import tty
from urllib.parse import urlsplit

from agent_sidecar.proxy.config import Config
from agent_sidecar.proxy.sse import EventParser

from . import client, shared
from .summary import dollars, human_bytes, ms
from .terminal import clean_tree

BARS = " ▁▂▃▄▅▆▇█"
ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"   # alternate screen, cursor hidden/shown


def find_url(args: argparse.Namespace, config: Config) -> str | None:
    """--url, else the shared sidecar, else the newest `sidecar run` whose proxy still answers."""
    if args.url:
        return args.url.rstrip("/")
    info = shared.read_state(config)
    if shared.live(info) is not None:
        return info["url"]
    runs = sorted((config.state_dir / "run").glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in runs:
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if shared.live(run) is not None:
            return run["url"]
    return None


# ---- the overview as text ---------------------------------------------------------------


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def _uptime(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Columns padded to fit; the `left` columns left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in [header, *rows]]


def _spark(values: list[float | None], width: int, log: bool = False) -> str:
    values = values[-width:]
    scaled = [(math.log10(1 + v) if log else v) if v else 0.0 for v in values]
    top = max(scaled) or 1.0
    return "".join(BARS[round(v / top * (len(BARS) - 1))] if v else BARS[0] for v in scaled)


def money(total: dict) -> list[str]:
    """The dollars and the prompt cache, one line (none from a shared sidecar of an older version)."""
    if "cost_usd" not in total:
        return []
    return [f"spent {dollars(total['cost_usd'], total['cost_unknown'])}  cache saved "
            f"{dollars(total['saved_usd'], total['saved_unknown'])}  tokens in/out {total['input_tokens']:,}/"
            f"{total['output_tokens']:,}  prompt cache read/write {total['cache_read_tokens']:,}/"
            f"{total['cache_write_tokens']:,} (hit {_pct(total['prompt_cache_ratio'])})"]


def render(doc: dict, url: str, width: int = 100) -> list[str]:
    """The overview, one string per line, none wider than `width`; no string from the sidecar reaches the
    terminal with a control sequence in it."""
    doc = clean_tree(doc)
    total, limits, cache = doc["summary"]["all"], doc["limits"], doc["cache"]
    limit = "none" if limits["effective_limit"] is None else str(limits["effective_limit"])
    lines = [f"calls {total['calls']}  hit rate {_pct(total['hit_rate'])}, {total['hits']} from cache  "
             f"in flight {limits['in_flight']}  queued {limits['queued']}  limit {limit}  "
             f"errors {sum(total['errors'].values())}  retries {total['retries']}",
             f"cache {cache['entries']} entries, {human_bytes(cache['bytes'])} ({cache['mode']})  "
             f"saved {total['saved_tokens']:,} tokens, {total['saved_upstream_s']:.1f} s upstream  "
             f"memory {doc['system_memory_percent']:.0f}%", *money(total), ""]
    agents = [[a["id"], a["state"] + (f" ({a['exit_status']})" if a["exit_status"] is not None else ""), str(a["pid"]),
               "-" if a["state"] == "exited" else _uptime(a["uptime_s"]), human_bytes(a["peak_rss"]) if a["peak_rss"] else "-",
               "-" if a["state"] == "exited" else f"{a['cpu_percent']:.1f}%", a["cmd"]] for a in doc["agents"]]
    lines += _table(["AGENT", "STATE", "PID", "UPTIME", "PEAK RSS", "CPU", "COMMAND"], agents, left=(0, 1, 6)) if agents \
        else ["AGENT  (none attached)"]
    groups = doc["summary"].get("groups", {})
    rows = [[name, str(s["calls"]), _pct(s["hit_rate"]),
             *(ms(s[phase][q]) for phase in ("total", "ttft", "queue", "overhead") for q in ("p50", "p95")),
             dollars(s.get("cost_usd"), s.get("cost_unknown", 0))]
            for name, s in [*groups.items(), *([("all", total)] if len(groups) != 1 else [])]]
    lines += ["", *_table(["MODEL", "CALLS", "HIT%", "TOTAL p50", "p95", "TTFT p50", "p95", "QUEUE p50", "p95",
                           "OVERHEAD p50", "p95", "COST"], rows)] if total["calls"] else ["", "MODEL  (no calls yet)"]
    lines += upstream_lines(doc)
    chart, span = doc["chart"], max(10, min(len(doc["chart"]["calls"]), width - 24))
    lines += ["", f"{'calls/' + str(chart['step']) + 's':12} |{_spark(chart['calls'], span)}| max {max(chart['calls'])}",
              f"{'p95 latency':12} |{_spark(chart['p95'], span, log=True)}| "
              f"max {ms(max(filter(None, chart['p95']), default=None))}",
              "", "EVENTS" + (f"  (active: {', '.join(doc['active_events'])})" if doc["active_events"] else "")]
    for event in doc["events"][:5] or [{}]:
        detail = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("ts", "kind", "state"))
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(event['ts']))}  {event['kind']:22} "
                     f"{event['state']:8} {detail}" if event else "  (none)")
    sessions = [[s["id"], s["agent"] or "-", s["model"] or "-", str(s["turns"] or 0),
                 time.strftime("%H:%M:%S", time.localtime(s["updated"])) if s["updated"] else "-",
                 dollars(s.get("cost_usd"), s.get("cost_unknown", 0)) if s.get("calls") else "-",
                 _pct(s.get("prompt_cache_ratio"))]
                for s in doc["sessions"][:5]]
    lines += ["", *(_table(["SESSION", "AGENT", "MODEL", "TURNS", "UPDATED", "COST", "PC HIT%"], sessions,
                           left=(0, 1, 2)) if sessions
                    else ["SESSION  (none checkpointed)"])]
    title = f"sidecar {doc['version']}  {url}  pid {doc['pid']}  agent {doc['agent']}  up {_uptime(doc['uptime_s'])}"
    clock = time.strftime("%H:%M:%S", time.localtime(doc["now"]))   # at the right edge of the widest line
    right = min(width, max(len(line) for line in lines))
    return [line[:width] for line in [title + " " * max(2, right - len(title) - len(clock)) + clock, *lines]]


def upstream_lines(doc: dict) -> list[str]:
    """An overload wall, if one is on, and the rate-limit headroom the upstream reports, per budget and bucket."""
    overload, pacing = doc.get("overload") or {}, doc.get("headroom") or {}
    lines = [f"UPSTREAM OVERLOADED  {wall['upstream']} answers {wall['status']} to everything for "
             f"{_uptime(wall['since_s'])}; {wall['held']} calls held, one probe at a time (next in "
             f"{wall['next_probe_in_s']:g} s)" for wall in overload.get("open", [])]
    rows = [[budget, bucket, f"{v['remaining']:,} / {v['limit']:,}", f"{v['reserved']:,}", f"{v['reset_in_s']:g} s"]
            for budget, buckets in (pacing.get("budgets") or {}).items() for bucket, v in buckets.items()]
    if rows:
        lines += _table(["HEADROOM", "BUCKET", "REMAINING / LIMIT", "RESERVED", "RESET IN"], rows, left=(0, 1))
        lines.append(f"paced: {pacing['holding']} held now, {pacing['held']} held in all "
                     f"({pacing['held_s']:.1f} s){'  (one budget for the fleet)' if pacing.get('fleet') else ''}")
    return ["", *lines] if lines else []


# ---- reading /_sidecar/live ---------------------------------------------------------------


class LiveStream:
    """One SSE connection over a plain socket (HTTP/1.0: the body is the raw stream, no chunking)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=5)
        self.sock.sendall(f"GET /_sidecar/live HTTP/1.0\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n\r\n"
                          .encode())
        self.events = EventParser()
        received = b""
        while b"\r\n\r\n" not in received:
            received += self._receive()
        head, body = received.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n")[0].decode(errors="replace")
        if not status.startswith(("HTTP/1.0 200", "HTTP/1.1 200")):
            raise client.SidecarUnreachable(f"{url}/_sidecar/live answered {status}")
        self.sock.settimeout(None)
        self.with_head = self._snapshots(body)   # the first snapshot may have come with the headers

    def _receive(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        return data

    def read(self) -> list[dict]:
        """The snapshots that arrived (after select() said the socket is readable); EOFError once it closed."""
        return self._snapshots(self._receive())

    def _snapshots(self, data: bytes) -> list[dict]:
        return [json.loads(snapshot) for _, snapshot in self.events.feed(data)]


def watch(url: str, once: bool) -> int:
    if once:
        sys.stdout.write("\n".join(render(client.call(url, "/_sidecar/overview"), url, 200)) + "\n")
        return 0
    live = LiveStream(url)
    screen = sys.stdout.isatty()
    keys = screen and sys.stdin.isatty()
    selector = selectors.DefaultSelector()
    selector.register(live.sock, selectors.EVENT_READ, "live")
    wake_r, wake_w = os.pipe()   # SIGWINCH wakes select() through this pipe: redraw at the new size
    os.set_blocking(wake_w, False)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: None)
    selector.register(wake_r, selectors.EVENT_READ, "resize")
    saved = None
    if keys:
        saved = termios.tcgetattr(sys.stdin.fileno())
        tty.setcbreak(sys.stdin.fileno())
        selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "key")
    if screen:
        sys.stdout.write(ENTER)
    doc = None
    try:
        for doc in live.with_head[-1:]:
            _draw(doc, url, screen)
        while True:
            for key, _ in selector.select():
                if key.data == "key" and os.read(sys.stdin.fileno(), 64).lower().startswith(b"q"):
                    return 0
                if key.data == "resize":
                    os.read(wake_r, 64)
                if key.data == "live":
                    try:
                        docs = live.read()
                    except (EOFError, OSError):
                        _restore(screen, saved)
                        saved, screen = None, False
                        print(f"sidecar: the sidecar at {url} stopped", file=sys.stderr)
                        return 1
                    doc = docs[-1] if docs else doc
                    if doc is not None and docs:
                        _draw(doc, url, screen)
                elif doc is not None and key.data == "resize" and screen:
                    _draw(doc, url, screen)
    finally:
        _restore(screen, saved)
        signal.signal(signal.SIGWINCH, old_winch)
        signal.set_wakeup_fd(old_wakeup)
        selector.close()
        live.sock.close()
        os.close(wake_r)
        os.close(wake_w)


def _draw(doc: dict, url: str, screen: bool) -> None:
    if not screen:   # a pipe or a file: one plain frame per update, like `top -b`
        sys.stdout.write("\n".join(render(doc, url, 200)) + "\n\n")
    else:
        size = shutil.get_terminal_size()
        lines = render(doc, url, size.columns)[:size.lines - 1] + ["", "q quits"[:size.columns]]
        sys.stdout.write("\x1b[H" + "\x1b[K\n".join(lines[-size.lines:]) + "\x1b[K\x1b[J")
    sys.stdout.flush()


def _restore(screen: bool, saved) -> None:
    if saved is not None:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    if screen:
        sys.stdout.write(LEAVE)
        sys.stdout.flush()


def run(args: argparse.Namespace, config: Config) -> int:
    if args.url:
        client.check_url(args.url, "--url")
    url = find_url(args, config)
    if url is None:
        print("sidecar: no running sidecar found (no shared sidecar, no live 'sidecar run'); "
              "start one, or name it with --url http://127.0.0.1:PORT", file=sys.stderr)
        return 2
    try:
        return watch(url, args.once)
    except client.SidecarUnreachable as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # our reader went away (`sidecar top | head`): the CLI's entry ends quietly
        raise
    except OSError as exc:
        print(f"sidecar: cannot reach the sidecar at {url} ({exc})", file=sys.stderr)
        return 2
