"""Timestamps, call records, stats, metrics, thresholds and events, hooks, `sidecar stats`/`events`.

The proxy runs in-process in front of the mock API where a call's record or an
event is the subject; `sidecar serve` and `sidecar run` run as real processes
where the behaviour is about processes (idle CPU, the summary, agent exits).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
import time
from pathlib import Path

import aiohttp
import anthropic
import openai
import orjson
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_sidecar.bench.mock_upstream import MockUpstream, Profile
from conftest import AppProxy, unique_prompt, until, upstream_env
from agent_sidecar.proxy.config import load_layers
from agent_sidecar.proxy.events import EventLog, make_event
from agent_sidecar.proxy.records import RecordLog
from agent_sidecar.proxy.state import open_lmdb
from agent_sidecar.proxy.stats import percentile, summarize

MODEL = "claude-mock-1"
OPENAI_MODEL = "gpt-4o-mini"
KEY = "sk-ant-test"
OPENAI_KEY = "sk-test"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}




# ---- the proxy in-process ----------------------------------------------------------------------


Proxy = AppProxy


@pytest.fixture
def start(start_app, mock: MockUpstream):
    """start(monitor={...}, ...) -> a proxy in front of the mock, with its own state dir."""
    return lambda **sections: start_app(mock.url, **sections)




def a_client(base: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key=KEY, max_retries=0, timeout=15)


def o_client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=OPENAI_KEY, max_retries=0, timeout=15)


async def a_call(base: str, tag: str = "") -> None:
    async with a_client(base) as sdk:
        await sdk.messages.create(model=MODEL, max_tokens=32, messages=unique_prompt(tag))


# ---- call records ------------------------------------------------------------------------------


async def test_stream_record_phases_match_the_upstream(start, mock: MockUpstream):
    mock.profile = Profile(ttft=0.2, tokens_per_second=50, output_tokens=10)
    px = await start()
    async with a_client(px.agent("timed")) as sdk:
        async with sdk.messages.stream(model=MODEL, max_tokens=64, messages=unique_prompt()) as stream:
            message = await stream.get_final_message()
    [record] = await px.records()
    assert record["agent"] == "timed" and record["stream"] is True and record["status"] == 200
    phases = [record[k] for k in ("lookup_ms", "sent_ms", "ttfb_ms", "ttft_ms", "total_ms")]
    assert None not in phases, record
    assert phases == sorted(phases), record
    assert 200 <= record["ttfb_ms"] < 200 + 400
    assert record["ttft_ms"] - record["ttfb_ms"] < 100          # the first delta follows the head at once
    assert record["total_ms"] - record["ttft_ms"] >= 9 / 50 * 1000 - 20   # nine paced deltas after the first
    assert record["total_ms"] < 200 + 180 + 500
    assert record["queue_ms"] < 50 and record["upstream_ms"] <= record["total_ms"]
    assert record["output_tokens"] == message.usage.output_tokens == 10
    assert record["input_tokens"] == message.usage.input_tokens > 0

    status, _, raw = await px.get("/_sidecar/stats?agent=timed&since=0")
    assert status == 200
    summary = orjson.loads(raw)["summary"]["all"]
    assert summary["calls"] == 1
    assert (summary["input_tokens"], summary["output_tokens"]) == (record["input_tokens"], 10)
    assert summary["ttft"]["p50"] == pytest.approx(record["ttft_ms"], abs=0.001)
    assert summary["total"]["p50"] == pytest.approx(record["total_ms"], abs=0.001)
    status, _, raw = await px.get("/_sidecar/stats?agent=someone-else&since=0")
    assert orjson.loads(raw)["summary"]["all"]["calls"] == 0

    await px.server.close()             # the app's cleanup flushes the records
    lmdb_env = open_lmdb(px.config)
    try:
        assert list(RecordLog(lmdb_env, px.config.stats.max_records).read(0)) == [record]
    finally:
        lmdb_env.close()


async def anthropic_json(base: str) -> tuple[int, int]:
    async with a_client(base) as sdk:
        m = await sdk.messages.create(model=MODEL, max_tokens=64, messages=unique_prompt())
    return m.usage.input_tokens, m.usage.output_tokens


async def anthropic_stream(base: str) -> tuple[int, int]:
    async with a_client(base) as sdk:
        async with sdk.messages.stream(model=MODEL, max_tokens=64, messages=unique_prompt()) as stream:
            m = await stream.get_final_message()
    return m.usage.input_tokens, m.usage.output_tokens


async def openai_json(base: str) -> tuple[int, int]:
    async with o_client(base) as sdk:
        c = await sdk.chat.completions.create(model=OPENAI_MODEL, messages=unique_prompt())
    return c.usage.prompt_tokens, c.usage.completion_tokens


async def openai_stream(base: str) -> tuple[int, int]:
    async with o_client(base) as sdk:
        chunks = [c async for c in await sdk.chat.completions.create(
            model=OPENAI_MODEL, messages=unique_prompt(), stream=True, stream_options={"include_usage": True})]
    [usage] = [c.usage for c in chunks if c.usage]
    return usage.prompt_tokens, usage.completion_tokens


@pytest.mark.parametrize("ask", [anthropic_json, anthropic_stream, openai_json, openai_stream])
async def test_record_tokens_equal_the_upstream_usage(start, mock: MockUpstream, ask):
    mock.profile = Profile(output_tokens=7)
    px = await start()
    usage = await ask(px.url)
    [record] = await px.records()
    assert (record["input_tokens"], record["output_tokens"]) == usage
    assert usage[0] > 0 and usage[1] == 7
    assert record["stream"] is ask.__name__.endswith("stream")


# ---- headers on every answer ---------------------------------------------------------------------

TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
QUOTED = r'"(?:[^"\\]|\\.)*"'
METRIC = re.compile(rf"^({TOKEN})((?:\s*;\s*{TOKEN}\s*=\s*(?:{TOKEN}|{QUOTED}))*)$")
PARAM = re.compile(rf"\s*;\s*({TOKEN})\s*=\s*({TOKEN}|{QUOTED})")


def parse_server_timing(value: str) -> dict[str, dict[str, str]]:
    """W3C Server-Timing: comma-separated metrics, each `name *(;param=value)`; dur must be a number."""
    metrics: dict[str, dict[str, str]] = {}
    for part in re.findall(rf'(?:[^,"]|{QUOTED})+', value):
        match = METRIC.match(part.strip())
        assert match, f"not a Server-Timing metric: {part!r} in {value!r}"
        params = {name.lower(): val for name, val in PARAM.findall(match.group(2))}
        if "dur" in params:
            assert math.isfinite(float(params["dur"])) and float(params["dur"]) >= 0, value
        metrics[match.group(1)] = params
    assert metrics, value
    return metrics


async def test_every_answer_has_request_id_and_server_timing(start, mock: MockUpstream):
    px = await start()
    stream_body = {"model": MODEL, "max_tokens": 16, "messages": unique_prompt("s"), "stream": True}
    json_body = {"model": MODEL, "max_tokens": 16, "messages": unique_prompt("j")}
    answers = []
    async with aiohttp.ClientSession() as session:
        async def post(data: bytes) -> None:
            async with session.post(px.url + "/v1/messages", data=data, headers=HEADERS) as resp:
                await resp.read()
                answers.append((resp.status, resp.headers))

        await post(orjson.dumps(json_body))                  # miss
        await px.state.cache.drain()
        await post(orjson.dumps(json_body))                  # hit
        await post(orjson.dumps(stream_body))                # a stream
        mock.inject("server_error")
        await post(orjson.dumps({**json_body, "messages": unique_prompt("e")}))   # the upstream's error
        await post(b"{not json")                             # the sidecar's own error
    assert [status for status, _ in answers] == [200, 200, 200, 500, 400]
    assert [headers.get("x-sidecar-cache") for _, headers in answers[:2]] == ["miss", "hit"]
    ids = [headers["x-sidecar-request-id"] for _, headers in answers]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    for _, headers in answers:
        metrics = parse_server_timing(headers["server-timing"])
        assert "dur" in metrics["total"]
    upstream = parse_server_timing(answers[0][1]["server-timing"])["upstream"]
    assert float(upstream["dur"]) >= 0
    assert "upstream" not in parse_server_timing(answers[1][1]["server-timing"])   # a hit never went upstream
    assert {r["id"] for r in await px.records()} == set(ids)


# ---- percentiles and summaries on known data -------------------------------------------------------


def linear_percentile(values: list[float], q: float) -> float:
    """numpy.percentile's default ('linear'), written out."""
    xs = sorted(values)
    h = (len(xs) - 1) * q / 100
    lo = int(h)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (h - lo)


def test_percentile_matches_linear_interpolation():
    data = list(range(1, 101))
    assert percentile(data, 50) == pytest.approx(50.5)
    assert percentile(data, 90) == pytest.approx(90.1)
    assert percentile(data, 99) == pytest.approx(99.01)
    assert percentile(data, 0) == 1 and percentile(data, 100) == 100
    shuffled = [7.5, 1.0, 30.0, 2.0, 2.0, 100.0, 0.5]
    for q in (1, 25, 50, 75, 90, 95, 99):
        assert percentile(data, q) == pytest.approx(linear_percentile(data, q))
        assert percentile(shuffled, q) == pytest.approx(linear_percentile(shuffled, q))
    assert percentile([42.0], 95) == 42.0
    assert percentile([], 50) is None


def record(ts: float, model: str, total: float, *, cache: str = "miss", status: int = 200, error: str = "",
           ttft: float | None = None, tokens: tuple[int, int] = (10, 20), saved_s: float = 0.0,
           retries: int = 0, agent: str = "agent-1") -> dict:
    return {"id": f"{model}-{ts}", "ts": ts, "agent": agent, "api": "anthropic", "route": "/v1/messages",
            "method": "POST", "model": model, "status": status, "cache": cache, "stream": False, "error": error,
            "retries": retries, "input_tokens": tokens[0], "output_tokens": tokens[1], "bytes": 100,
            "lookup_ms": 0.1, "slot_ms": None, "sent_ms": None, "ttfb_ms": None, "ttft_ms": ttft,
            "total_ms": total, "queue_ms": 0.0, "upstream_ms": total, "overhead_ms": 0.5,
            "tokens_per_s": None, "saved_s": saved_s}


def known_records(now: float) -> list[dict]:
    return [
        record(now - 7200, "model-b", 200.0, tokens=(5, 5)),                        # two hours ago
        record(now - 10, "model-a", 100.0, ttft=50.0, retries=2),
        record(now - 5, "model-a", 2.0, cache="hit", ttft=1.0, saved_s=0.5),
        record(now - 3, "model-b", 300.0, status=500),
    ]


def test_summarize_known_records():
    records = known_records(time.time())
    result = summarize(records, by="model")
    overall = result["all"]
    assert (overall["calls"], overall["hits"], overall["hit_rate"]) == (4, 1, 0.25)
    assert (overall["input_tokens"], overall["output_tokens"], overall["saved_tokens"]) == (35, 65, 30)
    assert overall["saved_upstream_s"] == 0.5 and overall["retries"] == 2
    assert overall["errors"] == {"http_500": 1}
    totals = [200.0, 100.0, 2.0, 300.0]
    assert overall["total"] == {f"p{q}": pytest.approx(linear_percentile(totals, q), abs=1e-3)
                                for q in (50, 90, 95, 99)}
    assert overall["total"]["p50"] == 150.0
    assert overall["ttft"]["p50"] == 25.5 and overall["ttft"]["p99"] == pytest.approx(49.51)
    assert set(result["groups"]) == {"model-a", "model-b"}
    assert result["groups"]["model-a"]["hit_rate"] == 0.5 and result["groups"]["model-a"]["calls"] == 2
    assert result["groups"]["model-b"]["total"]["p50"] == 250.0
    assert result["groups"]["model-b"]["ttft"]["p50"] is None
    assert summarize([])["all"]["calls"] == 0 and summarize([])["all"]["hit_rate"] is None


# ---- Prometheus metrics --------------------------------------------------------------------------------


async def test_metrics_parse_and_count(start, mock: MockUpstream):
    px = await start()
    calls = 5
    for _ in range(calls):
        await a_call(px.agent("metered"))
    async with a_client(px.agent("metered")) as sdk:           # and one refused by the upstream
        mock.inject("server_error")
        with pytest.raises(anthropic.InternalServerError):
            await sdk.messages.create(model=MODEL, max_tokens=32, messages=unique_prompt())
    status, headers, raw = await px.get("/_sidecar/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}

    calls_total = families["sidecar_calls"]
    assert calls_total.type == "counter"
    by_status: dict[str, float] = {}
    for sample in calls_total.samples:
        assert sample.name == "sidecar_calls_total"
        assert sample.labels["agent"] == "metered" and sample.labels["model"] == MODEL
        by_status[sample.labels["status"]] = by_status.get(sample.labels["status"], 0) + sample.value
    assert by_status == {"200": calls, "500": 1}
    errors = {s.labels["type"]: s.value for s in families["sidecar_errors"].samples}
    assert errors == {"http_500": 1}

    duration = families["sidecar_call_duration_seconds"]
    assert duration.type == "histogram"
    series: dict[tuple, dict] = {}
    for sample in duration.samples:
        labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        entry = series.setdefault(labels, {"buckets": []})
        if sample.name.endswith("_bucket"):
            entry["buckets"].append((float(sample.labels["le"]), sample.value))
        else:
            entry[sample.name.rsplit("_", 1)[1]] = sample.value
    assert sum(s["count"] for s in series.values()) == calls + 1
    for entry in series.values():
        bounds = [b for b, _ in entry["buckets"]]
        counts = [c for _, c in entry["buckets"]]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf
        assert counts == sorted(counts)                  # cumulative
        assert counts[-1] == entry["count"] and entry["sum"] > 0
    gauges = {name: families[name].samples[0].value for name in ("sidecar_in_flight", "sidecar_queued")}
    assert gauges == {"sidecar_in_flight": 0, "sidecar_queued": 0}


# ---- thresholds, events, hooks ------------------------------------------------------------------------


def of_kind(events: list[dict], kind: str) -> list[str]:
    return [e["state"] for e in events if e["kind"] == kind]


async def test_slow_response_raised_once_and_cleared_once(start, mock: MockUpstream):
    mock.profile = Profile(ttft=0.2)
    px = await start(monitor={"slow_ms": 100})
    for _ in range(3):
        await a_call(px.url)
    assert of_kind(px.events(), "slow_response") == ["raised"]
    [raised] = [e for e in px.events() if e["kind"] == "slow_response"]
    assert raised["response_ms"] >= 200 and raised["threshold_ms"] == 100
    mock.profile.ttft = 0.0
    await a_call(px.url)
    await a_call(px.url)
    assert of_kind(px.events(), "slow_response") == ["raised", "cleared"]
    mock.profile.ttft = 0.2
    await a_call(px.url)
    assert of_kind(px.events(), "slow_response") == ["raised", "cleared", "raised"]
    _, _, raw = await px.get("/_sidecar/stats")
    assert of_kind(orjson.loads(raw)["events"], "slow_response") == ["raised", "cleared", "raised"]


async def test_error_rate_raised_once_and_cleared_once(start, mock: MockUpstream):
    px = await start(monitor={"error_window": 10, "error_rate": 0.3})
    async with a_client(px.url) as sdk:
        async def call(fail: bool) -> None:
            if fail:
                mock.inject("server_error")
                with pytest.raises(anthropic.InternalServerError):
                    await sdk.messages.create(model=MODEL, max_tokens=16, messages=unique_prompt())
            else:
                await sdk.messages.create(model=MODEL, max_tokens=16, messages=unique_prompt())

        for _ in range(5):
            await call(fail=True)
        for _ in range(4):
            await call(fail=False)
        assert of_kind(px.events(), "error_rate_high") == []        # the window is not full yet
        await call(fail=False)                                      # 5 of 10 failed
        assert of_kind(px.events(), "error_rate_high") == ["raised"]
        await call(fail=False)                                      # 4 of 10
        assert of_kind(px.events(), "error_rate_high") == ["raised"]
        await call(fail=False)                                      # 3 of 10: not above 0.3
        assert of_kind(px.events(), "error_rate_high") == ["raised", "cleared"]
        for _ in range(3):
            await call(fail=False)
    events = [e for e in px.events() if e["kind"] == "error_rate_high"]
    assert [e["state"] for e in events] == ["raised", "cleared"]
    assert events[0]["error_rate"] == 0.5 and events[0]["window"] == 10
    assert mock.count() == 15                                       # 500 is not retried


HOOK = r'''
import os, sys
data = sys.stdin.buffer.read()
out = os.path.join(sys.argv[1], f"{os.getpid()}.json")
with open(out + ".tmp", "wb") as fh:
    fh.write(data)
os.replace(out + ".tmp", out)
'''

HANGING_HOOK = r'''
import os, sys, time
open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
time.sleep(3600)
'''


async def test_hook_gets_the_event_json(start, mock: MockUpstream, tmp_path: Path):
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    out = tmp_path / "hook-out"
    out.mkdir()
    mock.profile = Profile(ttft=0.2)
    px = await start(monitor={"slow_ms": 100, "hook": f"{sys.executable} {hook} {out}", "hook_timeout": 10.0})
    await a_call(px.url)

    def slow_events() -> list[dict]:
        found = [json.loads(p.read_bytes()) for p in out.glob("*.json")]
        return [e for e in found if e.get("kind") == "slow_response"]

    await until(lambda: slow_events(), what="the hook to write the event")
    [event] = slow_events()
    assert event["state"] == "raised" and event["response_ms"] >= 200
    assert event in px.events()


async def test_hanging_hook_is_killed_and_proxy_keeps_serving(start, mock: MockUpstream, tmp_path: Path):
    hook = tmp_path / "hang.py"
    hook.write_text(HANGING_HOOK)
    pids = tmp_path / "hook-pids"
    pids.mkdir()
    mock.profile = Profile(ttft=0.2)
    px = await start(monitor={"slow_ms": 100, "hook": f"{sys.executable} {hook} {pids}", "hook_timeout": 0.5})
    await a_call(px.url)
    await until(lambda: any(pids.iterdir()), what="the hook to start")
    procs = [psutil.Process(int(p.name)) for p in pids.iterdir()]
    mock.profile.ttft = 0.0
    await asyncio.wait_for(a_call(px.url), 2)          # served while the hook hangs

    def gone() -> bool:
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    await until(gone, timeout=60, what="the hanging hook to be killed")   # it sleeps for an hour unless killed
    await asyncio.wait_for(a_call(px.url), 2)
    assert len([r for r in await px.records() if r["status"] == 200]) == 3


# ---- nothing runs while idle ---------------------------------------------------------------------------


async def test_idle_serve_uses_no_cpu(sidecar, mock: MockUpstream):
    server = await sidecar.spawn("serve", env=upstream_env(mock))
    banner = (await asyncio.wait_for(server.stderr.readline(), 20)).decode()
    url = re.search(r"http://127\.0\.0\.1:\d+", banner).group(0)
    async with a_client(url) as sdk:
        for n in range(5):
            await sdk.messages.create(model=MODEL, max_tokens=16, messages=unique_prompt(str(n)))
        async with sdk.messages.stream(model=MODEL, max_tokens=16, messages=unique_prompt()) as stream:
            await stream.get_final_message()
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/_sidecar/stats") as resp:
            assert (await resp.json())["summary"]["all"]["calls"] == 6
    proc = psutil.Process(server.pid)
    before = proc.cpu_times()
    await asyncio.sleep(2.0)      # the measurement window, not synchronisation
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    assert used < 0.05, f"{used:.3f} s of CPU in 2 s idle"


# ---- `sidecar stats` / `sidecar events` / the run summary --------------------------------------------------


async def write_records(state_dir: Path, records: list[dict]) -> None:
    config = load_layers([{"state": {"dir": str(state_dir)}}], ["test"])
    lmdb_env = open_lmdb(config)
    try:
        log = RecordLog(lmdb_env, config.stats.max_records)
        for r in records:
            log.add(r)
        await log.drain()
    finally:
        lmdb_env.close()


async def test_stats_cli_on_known_records(sidecar, isolated_env: Path):
    await write_records(isolated_env, known_records(time.time()))

    done = await sidecar.run("stats", "--json")
    assert done.returncode == 0, done.err
    overall = json.loads(done.out)["all"]
    assert (overall["calls"], overall["hits"], overall["hit_rate"]) == (4, 1, 0.25)
    assert (overall["input_tokens"], overall["output_tokens"], overall["saved_tokens"]) == (35, 65, 30)
    assert overall["total"]["p50"] == 150.0 and overall["total"]["p90"] == 270.0
    assert overall["errors"] == {"http_500": 1} and overall["retries"] == 2

    done = await sidecar.run("stats", "--json", "--since", "1h")
    recent = json.loads(done.out)["all"]
    assert recent["calls"] == 3 and recent["total"]["p50"] == 100.0

    done = await sidecar.run("stats")
    assert done.returncode == 0, done.err
    header, *rows = done.out.splitlines()
    columns = ["calls", "hit%", "total p50", "p90", "p99", "ttft p50", "queue p50", "overhead p50",
               "tokens in", "tokens out", "saved tok", "saved s", "errors"]
    positions = [header.index(c) for c in columns]
    assert positions == sorted(positions), header
    all_row = next(r for r in rows if r.startswith("all"))
    assert all_row.split()[1:3] == ["4", "25"]
    assert "150.0 ms" in all_row
    assert "errors: http_500 x1" in done.out

    done = await sidecar.run("stats", "--by", "model")
    lines = done.out.splitlines()
    assert lines[0].startswith("model")
    by_name = {line.split()[0]: line.split() for line in lines[1:] if line.split()}
    assert by_name["model-a"][1:3] == ["2", "50"]
    assert by_name["model-b"][1:3] == ["2", "0"]
    assert by_name["all"][1] == "4"

    done = await sidecar.run("stats", "--by", "model", "--json", "--since", "1h")
    groups = json.loads(done.out)["groups"]
    assert {name: g["calls"] for name, g in groups.items()} == {"model-a": 2, "model-b": 1}


async def test_stats_cli_with_no_records(sidecar, isolated_env: Path):
    done = await sidecar.run("stats")
    assert done.returncode == 0 and "no calls recorded" in done.out
    done = await sidecar.run("stats", "--since", "soon")
    assert done.returncode == 2 and done.err.startswith("sidecar:") and "--since" in done.err


async def test_events_cli(sidecar, isolated_env: Path):
    log = EventLog(isolated_env)
    isolated_env.mkdir(parents=True, exist_ok=True)
    events = [make_event("slow_response", "raised", response_ms=2500.0, threshold_ms=2000.0),
              make_event("slow_response", "cleared", response_ms=20.0),
              make_event("agent_exited", agent="a-1", status=3)]
    for event in events:
        log.append(event)
    done = await sidecar.run("events")
    assert done.returncode == 0, done.err
    lines = done.out.splitlines()
    assert len(lines) == 3
    assert "slow_response" in lines[0] and "raised" in lines[0] and "response_ms=2500.0" in lines[0]
    assert "cleared" in lines[1] and "agent_exited" in lines[2] and "status=3" in lines[2]
    done = await sidecar.run("events", "--json")
    assert [json.loads(line) for line in done.out.splitlines()] == events


AGENT = r'''
import sys
import anthropic
client = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, timeout=20)
ask = dict(model="claude-mock-1", max_tokens=32, messages=[{"role": "user", "content": "Name a river."}])
client.messages.create(**ask)
client.messages.create(**ask)          # the same call again: from the cache
sys.exit(3)
'''


async def test_run_summary_and_agent_exit_event(sidecar, script, mock: MockUpstream, isolated_env: Path):
    agent = script(AGENT)
    done = await sidecar.run("run", "--", sys.executable, str(agent), env=upstream_env(mock))
    assert done.returncode == 3, done.err
    assert mock.count() == 1
    summary = [line for line in done.err.splitlines() if line.startswith("sidecar:")]
    assert summary and "2 API calls, 1 from cache (50%)" in summary[0], done.err
    exited = [e for e in EventLog(isolated_env).read() if e["kind"] == "agent_exited"]
    assert len(exited) == 1 and exited[0]["status"] == 3 and exited[0]["agent"].startswith("python"), (exited, done.err)

    quiet = await sidecar.run("run", "--quiet", "--", sys.executable, str(agent), env=upstream_env(mock))
    assert quiet.returncode == 3
    assert "sidecar:" not in quiet.err and "API calls" not in quiet.err
    assert mock.count() == 1     # both answered from the cache this time
    exited = [e for e in EventLog(isolated_env).read() if e["kind"] == "agent_exited"]
    assert [e["status"] for e in exited] == [3, 3]


def test_error_rate_over_its_window_as_calls_come_and_go(tmp_path):
    """The monitor keeps the window's failure count as calls enter and leave it; the event follows the rate."""
    import random
    from agent_sidecar.proxy.config import LimitsSection, MonitorSection
    from agent_sidecar.proxy.limits import Limiter
    from agent_sidecar.proxy.monitor import Monitor
    monitor = Monitor(MonitorSection(error_window=20, error_rate=0.25), EventLog(tmp_path), Limiter(LimitsSection()))
    rng = random.Random(7)
    seen: list[bool] = []
    for i in range(400):
        failed = rng.random() < (0.6 if (i // 50) % 2 else 0.05)   # quiet and stormy stretches in turn
        seen.append(failed)
        monitor.on_call({"ttfb_ms": 1.0, "stream": False, "total_ms": 1.0, "status": 529 if failed else 200,
                         "error": None, "route": "/v1/messages", "model": "m", "agent": "a", "api": "anthropic",
                         "cache": "miss"}, False)
        window = seen[-20:]
        assert monitor.failed_in_window == sum(window)
        assert ("error_rate_high" in monitor.active) == (len(window) >= 20 and sum(window) / 20 > 0.25), i
    kinds = [(e["kind"], e["state"]) for e in monitor.recent_events if e["kind"] == "error_rate_high"]
    assert ("error_rate_high", "raised") in kinds and ("error_rate_high", "cleared") in kinds
