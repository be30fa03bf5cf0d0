"""OpenTelemetry export: GenAI spans and metrics reach a real OTLP/HTTP receiver.

The receiver is an aiohttp server on an ephemeral port taking POST /v1/traces and /v1/metrics,
their protobuf bodies decoded with `opentelemetry-proto`. The sidecar runs as a real process
(`sidecar serve`, `sidecar run`) with the endpoint set; the official SDKs call it in front of the
mock API, and what the spans say is compared with what the SDK got from the mock.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import shutil
import signal
import socket
import sys

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (ExportMetricsServiceRequest,
                                                                          ExportMetricsServiceResponse)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)

from agent_sidecar.bench.mock_upstream import MockUpstream
from conftest import unique_prompt, upstream_env
from agent_sidecar.proxy.call import Call
from agent_sidecar.proxy.genai import content_attributes
from agent_sidecar.proxy.otlp_export import DURATION_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS
from agent_sidecar.proxy.routes import Route

MODEL = "claude-mock-1"
OPENAI_MODEL = "gpt-4o-mini"
SPAN_KIND_CLIENT = 3
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_METRIC_EXPORT_INTERVAL": "200",
               "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attributes(pairs) -> dict:
    return {kv.key: value_of(kv.value) for kv in pairs}


class Receiver:
    """An OTLP/HTTP receiver: decodes what the exporters post and keeps it, waking waiters."""

    def __init__(self):
        self.spans: list[dict] = []
        self.metrics: list[dict] = []
        self.changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> "Receiver":
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        app.router.add_post("/v1/metrics", self.metrics_in)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @staticmethod
    async def body(request: web.Request) -> bytes:
        assert request.content_type == "application/x-protobuf"
        data = await request.read()
        return gzip.decompress(data) if request.headers.get("content-encoding") == "gzip" else data

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await self.body(request))
        for resource_spans in export.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append({
                        "name": span.name, "kind": span.kind, "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                        "attrs": attributes(span.attributes), "resource": resource,
                        "events": [e.name for e in span.events], "status": span.status.code,
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano})
        await self.wake()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def metrics_in(self, request: web.Request) -> web.Response:
        export = ExportMetricsServiceRequest.FromString(await self.body(request))
        for resource_metrics in export.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.WhichOneof("data") != "histogram":
                        continue
                    for point in metric.histogram.data_points:
                        self.metrics.append({"name": metric.name, "unit": metric.unit,
                                             "attrs": attributes(point.attributes), "count": point.count,
                                             "sum": point.sum, "bounds": list(point.explicit_bounds)})
        await self.wake()
        return web.Response(body=ExportMetricsServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def wake(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate, timeout: float = 20.0):
        """Until `predicate()` holds (checked whenever an export arrives), within `timeout`."""
        async def wait():
            async with self.changed:
                await self.changed.wait_for(predicate)
        await asyncio.wait_for(wait(), timeout)

    def latest_points(self, name: str) -> list[dict]:
        """The last cumulative data point of each attribute set of metric `name`."""
        points: dict[str, dict] = {}
        for point in self.metrics:
            if point["name"] == name:
                points[json.dumps(point["attrs"], sort_keys=True)] = point
        return list(points.values())


@pytest.fixture
async def receiver():
    server = await Receiver().start()
    try:
        yield server
    finally:
        await server.stop()


async def serve(sidecar, mock: MockUpstream, endpoint: str, **env: str) -> str:
    """`sidecar serve` exporting to `endpoint`; its base URL."""
    proc = await sidecar.spawn("serve", env={**upstream_env(mock), "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                             **FAST_EXPORT, **env})
    banner = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
    return re.search(r"http://127\.0\.0\.1:\d+", banner).group(0)


def a_client(base: str, **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-test", max_retries=0, timeout=15, **kw)


def o_client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0, timeout=15)


def anthropic_input(usage) -> int:
    """gen_ai.usage.input_tokens for Anthropic: its input plus cache read and cache creation."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)


async def until_async(read, expected, timeout: float, what: str) -> None:
    """Bounded polling of another process's state (read over HTTP), for what no awaitable announces."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}: {got}"
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- spans ---------------------------------------------------------------------------------------------


async def test_anthropic_calls_are_genai_spans(sidecar, mock: MockUpstream, receiver: Receiver):
    url = await serve(sidecar, mock, receiver.url)
    prompt, streamed_prompt = unique_prompt("json"), unique_prompt("stream")
    async with a_client(url) as sdk:
        answers = [await sdk.messages.create(model=MODEL, max_tokens=32, messages=prompt) for _ in range(2)]
        for _ in range(2):
            async with sdk.messages.stream(model=MODEL, max_tokens=32, messages=streamed_prompt) as stream:
                answers.append(await stream.get_final_message())
    await receiver.wait_for(lambda: len(receiver.spans) >= 4)
    spans = sorted(receiver.spans, key=lambda s: s["start"])
    assert [s["attrs"]["sidecar.cache.outcome"] for s in spans] == ["miss", "hit", "miss", "hit"]
    sessions = (await sidecar.run("sessions", "list")).out
    for span, answer, streamed in zip(spans, answers, (False, False, True, True)):
        attrs = span["attrs"]
        assert span["name"] == f"chat {MODEL}" and span["kind"] == SPAN_KIND_CLIENT
        assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.provider.name"] == "anthropic"
        assert attrs["gen_ai.request.model"] == MODEL and attrs["gen_ai.response.model"] == answer.model
        assert attrs["gen_ai.response.id"] == answer.id
        assert attrs["gen_ai.response.finish_reasons"] == [answer.stop_reason]
        assert attrs["gen_ai.usage.input_tokens"] == anthropic_input(answer.usage)
        assert attrs["gen_ai.usage.output_tokens"] == answer.usage.output_tokens
        for name, reported in (("cache_read", answer.usage.cache_read_input_tokens),
                               ("cache_creation", answer.usage.cache_creation_input_tokens)):
            # present once the call's record carries the cache counts; never a wrong number
            assert attrs.get(f"gen_ai.usage.{name}.input_tokens", reported or 0) == (reported or 0)
        assert attrs["gen_ai.request.max_tokens"] == 32
        assert attrs.get("gen_ai.request.stream", False) is streamed
        assert attrs["gen_ai.conversation.id"] in sessions
        assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == int(mock.url.rsplit(":", 1)[1])
        assert span["resource"]["service.name"] == "agent-sidecar"
        assert not any(key.startswith(("gen_ai.input", "gen_ai.output", "gen_ai.system_instructions"))
                       for key in attrs), "content is exported only when switched on"
        assert "sidecar.first_byte" in span["events"] and attrs["sidecar.total_ms"] > 0
        assert span["parent"] == ""   # no traceparent, no launcher: a root
    miss, hit, stream_miss, stream_hit = spans
    assert {"sidecar.upstream_sent", "sidecar.cache_lookup"} <= set(miss["events"])
    assert "sidecar.upstream_sent" not in hit["events"] and hit["attrs"]["sidecar.saved_s"] > 0
    assert "sidecar.first_token" in stream_miss["events"] and "sidecar.upstream_ms" in stream_miss["attrs"]
    assert miss["attrs"]["gen_ai.conversation.id"] == hit["attrs"]["gen_ai.conversation.id"]
    assert miss["attrs"]["gen_ai.conversation.id"] != stream_miss["attrs"]["gen_ai.conversation.id"]


async def test_openai_calls_are_genai_spans(sidecar, mock: MockUpstream, receiver: Receiver):
    url = await serve(sidecar, mock, receiver.url)
    prompt, streamed_prompt = unique_prompt("json"), unique_prompt("stream")
    async with o_client(url) as sdk:
        answers = [await sdk.chat.completions.create(model=OPENAI_MODEL, messages=prompt) for _ in range(2)]
        for _ in range(2):
            chunks = [c async for c in await sdk.chat.completions.create(
                model=OPENAI_MODEL, messages=streamed_prompt, stream=True, stream_options={"include_usage": True})]
            answers.append(chunks)
    await receiver.wait_for(lambda: len(receiver.spans) >= 4)
    spans = sorted(receiver.spans, key=lambda s: s["start"])
    assert [s["attrs"]["sidecar.cache.outcome"] for s in spans] == ["miss", "hit", "miss", "hit"]
    for span, answer in zip(spans, answers):
        attrs = span["attrs"]
        if isinstance(answer, list):   # streamed: id, model and finish reason from the chunks, usage from the last
            ident, model, usage = answer[0].id, answer[0].model, answer[-1].usage
            reasons = [c.finish_reason for chunk in answer for c in chunk.choices if c.finish_reason]
        else:
            ident, model, usage = answer.id, answer.model, answer.usage
            reasons = [c.finish_reason for c in answer.choices]
        assert span["name"] == f"chat {OPENAI_MODEL}"
        assert attrs["gen_ai.provider.name"] == "openai" and attrs["gen_ai.response.model"] == model
        assert attrs["gen_ai.response.id"] == ident and attrs["gen_ai.response.finish_reasons"] == reasons
        assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens
        assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens
        assert "gen_ai.conversation.id" in attrs


async def test_a_failed_call_is_an_error_span(sidecar, mock: MockUpstream, receiver: Receiver):
    url = await serve(sidecar, mock, receiver.url)
    async with a_client(url) as sdk:
        with pytest.raises(anthropic.BadRequestError):   # the API refuses max_tokens 0
            await sdk.messages.create(model=MODEL, max_tokens=0, messages=unique_prompt())
    await receiver.wait_for(lambda: receiver.spans)
    span = receiver.spans[0]
    assert span["status"] == 2 and span["attrs"]["error.type"] == "400"   # STATUS_CODE_ERROR
    assert span["attrs"]["http.response.status_code"] == 400
    assert not any(key.startswith("gen_ai.usage.") for key in span["attrs"])
    await receiver.wait_for(lambda: receiver.latest_points("gen_ai.client.operation.duration"))
    (point,) = receiver.latest_points("gen_ai.client.operation.duration")
    assert point["attrs"]["error.type"] == "400" and not receiver.latest_points("gen_ai.client.token.usage")


async def test_genai_metrics_are_exported(sidecar, mock: MockUpstream, receiver: Receiver):
    url = await serve(sidecar, mock, receiver.url)
    prompt = unique_prompt()
    async with a_client(url) as sdk:
        billed = [await sdk.messages.create(model=MODEL, max_tokens=32, messages=prompt)]
        await sdk.messages.create(model=MODEL, max_tokens=32, messages=prompt)   # a hit: no tokens billed
        async with sdk.messages.stream(model=MODEL, max_tokens=32, messages=unique_prompt()) as stream:
            billed.append(await stream.get_final_message())
    names = ("gen_ai.client.token.usage", "gen_ai.client.operation.duration", "gen_ai.server.time_to_first_token")

    def complete() -> bool:
        tokens = receiver.latest_points(names[0])
        return sum(p["count"] for p in receiver.latest_points(names[1])) == 3 and \
            sum(p["count"] for p in tokens if p["attrs"]["gen_ai.token.type"] == "input") == 2

    await receiver.wait_for(complete)
    tokens = {p["attrs"]["gen_ai.token.type"]: p for p in receiver.latest_points(names[0])}
    assert tokens["input"]["sum"] == sum(anthropic_input(a.usage) for a in billed)
    assert tokens["output"]["sum"] == sum(a.usage.output_tokens for a in billed)
    assert tokens["input"]["unit"] == "{token}" and tokens["input"]["bounds"] == list(TOKEN_BUCKETS)
    for point in tokens.values():
        assert {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": MODEL, "gen_ai.response.model": MODEL}.items() <= point["attrs"].items()
    durations = receiver.latest_points(names[1])
    assert {p["attrs"]["sidecar.cache.outcome"]: p["count"] for p in durations} == {"miss": 2, "hit": 1}
    assert all(p["unit"] == "s" and p["bounds"] == list(DURATION_BUCKETS) for p in durations)
    first_tokens = receiver.latest_points(names[2])   # only the streamed call has a first token of its own
    assert sum(p["count"] for p in first_tokens) == 1 and first_tokens[0]["bounds"] == list(TTFT_BUCKETS)


async def test_message_content_only_when_switched_on(sidecar, mock: MockUpstream, receiver: Receiver):
    url = await serve(sidecar, mock, receiver.url, SIDECAR_TELEMETRY_CAPTURE_CONTENT="true")
    prompt = unique_prompt("content")
    async with a_client(url) as sdk:
        answer = await sdk.messages.create(model=MODEL, max_tokens=32, system="Be brief.", messages=prompt)
    await receiver.wait_for(lambda: receiver.spans)
    attrs = receiver.spans[0]["attrs"]
    assert json.loads(attrs["gen_ai.system_instructions"]) == [{"type": "text", "content": "Be brief."}]
    assert json.loads(attrs["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": prompt[0]["content"]}]}]
    assert json.loads(attrs["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": answer.content[0].text}],
         "finish_reason": answer.stop_reason}]


# ---- trace context ---------------------------------------------------------------------------------------


async def test_an_incoming_traceparent_makes_the_span_its_child(sidecar, mock: MockUpstream, receiver: Receiver):
    url = await serve(sidecar, mock, receiver.url)
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with a_client(url, default_headers={"traceparent": f"00-{trace_id}-{parent}-01"}) as sdk:
        await sdk.messages.create(model=MODEL, max_tokens=16, messages=unique_prompt())
    await receiver.wait_for(lambda: receiver.spans)
    span = receiver.spans[0]
    assert (span["trace_id"], span["parent"]) == (trace_id, parent)


AGENT = """
import os, sys, anthropic
print(os.environ.get("TRACEPARENT", ""), flush=True)
client = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0)
client.messages.create(model="claude-mock-1", max_tokens=16, messages=[{"role": "user", "content": sys.argv[1]}])
"""


async def test_sidecar_run_gives_the_agent_traceparent_and_its_calls_join_the_trace(
        sidecar, script, mock: MockUpstream, receiver: Receiver):
    agent = script(AGENT)
    env = {**upstream_env(mock), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, **FAST_EXPORT}
    done = await sidecar.run("run", "--quiet", "--", sys.executable, str(agent), unique_prompt()[0]["content"],
                             env=env)
    assert done.returncode == 0, done.err
    version, trace_id, span_id, flags = done.out.strip().split("-")
    assert (version, len(trace_id), len(span_id), flags) == ("00", 32, 16, "01")
    await receiver.wait_for(lambda: len(receiver.spans) >= 2)
    call = next(s for s in receiver.spans if s["name"] == f"chat {MODEL}")
    run = next(s for s in receiver.spans if s["name"].startswith("invoke_agent "))
    assert (call["trace_id"], call["parent"]) == (trace_id, span_id)
    assert (run["trace_id"], run["span_id"], run["parent"]) == (trace_id, span_id, "")   # the run is the root
    assert run["attrs"]["gen_ai.operation.name"] == "invoke_agent" and run["attrs"]["process.exit.code"] == 0
    assert run["start"] <= call["start"] and call["end"] <= run["end"]
    # a launcher that itself runs inside a trace hands the agent that trace; its span is not ours to export
    outer = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    done = await sidecar.run("run", "--quiet", "--", sys.executable, str(agent), unique_prompt()[0]["content"],
                             env={**env, "TRACEPARENT": outer})
    assert done.out.strip() == outer
    await receiver.wait_for(lambda: any(s["trace_id"] == outer.split("-")[1] for s in receiver.spans))
    joined = [s for s in receiver.spans if s["trace_id"] == outer.split("-")[1]]
    assert [(s["name"], s["parent"]) for s in joined] == [(f"chat {MODEL}", outer.split("-")[2])]


async def test_an_agent_attached_to_sidecar_serve_gets_its_run_traced_too(
        sidecar, script, mock: MockUpstream, receiver: Receiver):
    url = await serve(sidecar, mock, receiver.url)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    done = await sidecar.run("run", "--quiet", "--connect", url, "--", sys.executable, str(script(AGENT)),
                             unique_prompt()[0]["content"], env=env)
    assert done.returncode == 0, done.err
    _, trace_id, span_id, _ = done.out.strip().split("-")
    await receiver.wait_for(lambda: len(receiver.spans) >= 2)   # the server exports the run when the agent exits
    run = next(s for s in receiver.spans if s["name"].startswith("invoke_agent python-"))
    call = next(s for s in receiver.spans if s["name"] == f"chat {MODEL}")
    assert (run["trace_id"], run["span_id"]) == (trace_id, span_id)
    assert (call["trace_id"], call["parent"]) == (trace_id, span_id) and call["attrs"]["sidecar.agent"] in run["name"]


CLAUDE = shutil.which("claude")


@pytest.mark.skipif(CLAUDE is None, reason="Claude Code is not installed (npm i -g @anthropic-ai/claude-code)")
@pytest.mark.timeout(120)
async def test_claude_code_calls_are_spans_under_its_run(sidecar, mock: MockUpstream, receiver: Receiver, tmp_path):
    mock.profile.validate = False   # Claude Code sends a mid-conversation "system" role the strict mock refuses
    workdir = tmp_path / "work"
    workdir.mkdir()
    sidecar.cwd = workdir
    env = {**upstream_env(mock), "HOME": str(tmp_path / "home"), "ANTHROPIC_API_KEY": "sk-ant-test-key-not-real",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
           "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, **FAST_EXPORT}
    done = await sidecar.run("run", "--quiet", "--", CLAUDE, "-p", "say hi", env=env, timeout=60)
    assert done.returncode == 0, done.err
    sent = [r for r in mock.received if r.path == "/v1/messages"]
    await receiver.wait_for(lambda: len(receiver.spans) >= len(sent) + 1)
    run = next(s for s in receiver.spans if s["name"].startswith("invoke_agent claude-"))
    calls = [s for s in receiver.spans if s["attrs"].get("gen_ai.operation.name") == "chat"]
    assert len(calls) == len(sent) >= 1
    sessions = (await sidecar.run("sessions", "list")).out
    for span, request in zip(sorted(calls, key=lambda s: s["start"]), sent):
        attrs = span["attrs"]
        assert span["name"] == f"chat {request.json['model']}" and span["trace_id"] == run["trace_id"]
        assert attrs["gen_ai.provider.name"] == "anthropic" and attrs["gen_ai.request.stream"] is True
        assert attrs["gen_ai.response.id"].startswith("msg_") and attrs["gen_ai.response.finish_reasons"]
        assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
        assert attrs["gen_ai.conversation.id"].startswith("c") and attrs["gen_ai.conversation.id"] in sessions
        assert span["parent"] == (request.headers["traceparent"].split("-")[2] if "traceparent" in request.headers
                                  else run["span_id"])


async def test_no_traceparent_without_telemetry(sidecar, script, mock: MockUpstream):
    done = await sidecar.run("run", "--quiet", "--", sys.executable, str(script(AGENT)), "hi", env=upstream_env(mock))
    assert done.returncode == 0 and done.out.strip() == ""


# ---- failing open ----------------------------------------------------------------------------------------


async def test_a_receiver_that_is_down_changes_no_call(sidecar, mock: MockUpstream):
    port = free_port()
    url = await serve(sidecar, mock, f"http://127.0.0.1:{port}")
    async with a_client(url) as sdk:
        for _ in range(3):
            answer = await sdk.messages.create(model=MODEL, max_tokens=16, messages=unique_prompt())
            assert answer.content[0].text
        async with sdk.messages.stream(model=MODEL, max_tokens=16, messages=unique_prompt()) as stream:
            assert (await stream.get_final_message()).stop_reason == "end_turn"

    async def states() -> list[str]:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/_sidecar/stats") as resp:
                found = [e for e in (await resp.json())["events"] if e["kind"] == "telemetry_unavailable"]
        assert all(str(port) in e["endpoint"] for e in found if e["state"] == "raised")
        return [e["state"] for e in found]

    # the exporter gives up on a batch after OTEL_EXPORTER_OTLP_TIMEOUT (2 s) of retries
    await until_async(lambda: states(), ["raised"], 20, "the telemetry_unavailable event")
    back = await Receiver().start(port)   # the receiver comes back: exports resume, the event clears
    async with a_client(url) as sdk:
        await sdk.messages.create(model=MODEL, max_tokens=16, messages=unique_prompt())
    await back.wait_for(lambda: back.spans)
    await until_async(lambda: states(), ["raised", "cleared"], 20, "the event cleared")
    await back.stop()   # down again, with a span pending: the proxy still stops when told, within its bound
    async with a_client(url) as sdk:
        await sdk.messages.create(model=MODEL, max_tokens=16, messages=unique_prompt())
    server = sidecar.procs[-1]
    server.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.wait(), 30) == 0
    # refused outright: the exit did not sit out the SDK's retries, it said what it dropped
    said = (await server.stderr.read()).decode()
    assert f"the OTLP receiver at http://127.0.0.1:{port} refuses connections" in said, said


BLOCKED = ("import sys; sys.modules['opentelemetry.sdk'] = None; "
           "from agent_sidecar.launcher.cli import main; sys.argv[0] = 'sidecar'; sys.exit(main())")


async def test_without_the_extra_one_line_says_how_to_install_it(sidecar, mock: MockUpstream, script):
    proc = await sidecar.spawn("serve", env={**upstream_env(mock), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
                               program=(sys.executable, "-c", BLOCKED))
    lines = [(await asyncio.wait_for(proc.stderr.readline(), 20)).decode() for _ in range(2)]
    hint = [line for line in lines if "pip install 'agent-sidecar[otel]'" in line]
    assert len(hint) == 1 and "served as usual" in hint[0], lines
    url = re.search(r"http://127\.0\.0\.1:\d+", next(line for line in lines if "serving on" in line)).group(0)
    async with a_client(url) as sdk:
        answer = await sdk.messages.create(model=MODEL, max_tokens=16, messages=unique_prompt())
    assert answer.content[0].text
    done = await sidecar.run("run", "--quiet", "--", sys.executable, str(script(AGENT)), "hi",
                             env={**upstream_env(mock), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
                             program=(sys.executable, "-c", BLOCKED))
    assert done.returncode == 0 and done.err.count("pip install 'agent-sidecar[otel]'") == 1, done.err


# ---- the conventions' message form, for both APIs --------------------------------------------------------


def content_of(api: str, path: str, body: dict, answer: dict) -> dict:
    call = Call(Route("a", api, path, ""), "POST")
    call.json = body
    return {k: json.loads(v) for k, v in content_attributes(call, answer).items()}


def test_anthropic_tool_round_trip_in_the_conventions_form():
    body = {"model": MODEL, "system": [{"type": "text", "text": "Use tools."}], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "ask the tool"},
                                          {"type": "tool_use", "id": "toolu_1", "name": "weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "rainy"},
                                     {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]}]}
    answer = {"content": [{"type": "text", "text": "It rains."}], "stop_reason": "end_turn"}
    got = content_of("anthropic", "/v1/messages", body, answer)
    assert got["gen_ai.system_instructions"] == [{"type": "text", "content": "Use tools."}]
    assert got["gen_ai.input.messages"] == [
        {"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]},
        {"role": "assistant", "parts": [{"type": "reasoning", "content": "ask the tool"},
                                        {"type": "tool_call", "id": "toolu_1", "name": "weather",
                                         "arguments": {"city": "Paris"}}]},
        {"role": "user", "parts": [{"type": "tool_call_response", "id": "toolu_1", "response": "rainy"},
                                   {"type": "image"}]}]   # an image is named, its data left out
    assert got["gen_ai.output.messages"] == [
        {"role": "assistant", "parts": [{"type": "text", "content": "It rains."}], "finish_reason": "end_turn"}]


def test_openai_tool_round_trip_in_the_conventions_form():
    body = {"model": OPENAI_MODEL, "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            "not a call"]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rainy"}]}
    answer = {"choices": [{"message": {"role": "assistant", "content": "It rains."}, "finish_reason": "stop"},
                          {"message": "odd", "finish_reason": "length"}]}
    got = content_of("openai", "/v1/chat/completions", body, answer)
    assert "gen_ai.system_instructions" not in got   # OpenAI's system message is part of the chat history
    assert got["gen_ai.input.messages"] == [
        {"role": "system", "parts": [{"type": "text", "content": "Use tools."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "call_1", "name": "weather",
                                         "arguments": {"city": "Paris"}}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "rainy"}]}]
    assert got["gen_ai.output.messages"] == [
        {"role": "assistant", "parts": [{"type": "text", "content": "It rains."}], "finish_reason": "stop"},
        {"role": "assistant", "parts": [], "finish_reason": "length"}]
