"""Each model call as an OpenTelemetry GenAI span, and the GenAI histograms, over OTLP/HTTP.

The call only records: its span is made when its last byte has gone out (the `done` hook), from
the times the call already holds, and handed to the SDK's BatchSpanProcessor; the histograms
aggregate in memory and a PeriodicExportingMetricReader sends them. Both export from their own
threads, so a slow or absent receiver costs no call anything; failed exports are the
`telemetry_unavailable` event, raised once and cleared when an export succeeds again.

A call's span is the child of the `traceparent` the agent sent with it, else of the agent run's
TRACEPARENT (which `sidecar run` gives the agent and tells the sidecar), else a root. Token usage
is measured for the calls the upstream billed: not for cache hits nor for calls that joined one in
flight (the conventions ask for billable tokens); their spans still say what the answer reported.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExportResult, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from . import __version__, genai, telemetry, tracecontext
from .call import Call
from .config import TelemetrySection
from .routes import Upstreams
from .timing import record_of

log = logging.getLogger("sidecar")
SHUTDOWN_WAIT = 5.0   # seconds the proxy's exit waits for the last export
CONNECT_CHECK = 1.0   # seconds the exit spends learning whether the receiver takes connections at all
# The conventions' bucket advice for each histogram.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# The call's phases, as span events at the moment each happened.
PHASES = (("sidecar.cache_lookup", "t_lookup"), ("sidecar.slot_acquired", "t_slot"),
          ("sidecar.upstream_sent", "t_sent"), ("sidecar.first_byte", "t_first_byte"),
          ("sidecar.first_token", "t_first_token"))
# Durations from the call's record, as span attributes (sidecar.<name>).
TIMINGS = ("queue_ms", "upstream_ms", "overhead_ms", "ttfb_ms", "ttft_ms", "total_ms")
UNBILLED = ("hit", "coalesced")   # the cache's answers and joined calls cost no tokens upstream


class Health:
    """Whether the last export of each signal succeeded; a change goes to the loop's `report` (once)."""

    def __init__(self, report: Callable[[bool], None]):
        self.report = report
        self.loop = asyncio.get_running_loop()
        self.failing: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, signal: str, ok: bool) -> None:   # from an export thread
        with self.lock:
            was = bool(self.failing)
            self.failing.discard(signal) if ok else self.failing.add(signal)
            now = bool(self.failing)
        if now != was:
            try:
                self.loop.call_soon_threadsafe(self.report, now)
            except RuntimeError:   # the loop has closed: the proxy is exiting
                pass


def _reporting(exporter: type, success, signal: str, health: Health) -> type:
    """The SDK's exporter, telling `health` how each export went."""
    class Reporting(exporter):
        def export(self, *args, **kwargs):
            result = super().export(*args, **kwargs)
            health(signal, result == success)
            return result
    return Reporting


class RunIds(RandomIdGenerator):
    """Random ids, except for the agent run's span: it takes the ids the agent was given in TRACEPARENT.
    (Spans are only made on the event loop's thread, so `chosen` is never shared.)"""

    chosen: tuple[int, int] | None = None

    def generate_trace_id(self) -> int:
        return self.chosen[0] if self.chosen else super().generate_trace_id()

    def generate_span_id(self) -> int:
        return self.chosen[1] if self.chosen else super().generate_span_id()


class Telemetry:
    def __init__(self, settings: TelemetrySection, upstreams: Upstreams, health: Health):
        base = self.base = settings.otlp_endpoint.rstrip("/")
        self.endpoint = telemetry.shown(base)
        self.capture_content = settings.capture_content
        self.servers = {api: server_of(url) for api, url in upstreams.bases.items()}
        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):   # no OTEL_SERVICE_NAME
            resource = resource.merge(Resource({"service.name": "agent-sidecar"}))
        spans = _reporting(OTLPSpanExporter, SpanExportResult.SUCCESS, "traces", health)(endpoint=base + "/v1/traces")
        metrics = _reporting(OTLPMetricExporter, MetricExportResult.SUCCESS, "metrics", health)(
            endpoint=base + "/v1/metrics")
        self.ids = RunIds()
        self.tracer_provider = TracerProvider(resource=resource, id_generator=self.ids, shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(spans))
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(metrics)],
                                            shutdown_on_exit=False)
        self.tracer = self.tracer_provider.get_tracer("agent-sidecar", __version__)
        meter = self.meter_provider.get_meter("agent-sidecar", __version__)
        self.tokens = meter.create_histogram("gen_ai.client.token.usage", "{token}", "Number of input and output "
                                             "tokens used.", explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.duration = meter.create_histogram("gen_ai.client.operation.duration", "s", "GenAI operation duration.",
                                               explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.first_token = meter.create_histogram("gen_ai.server.time_to_first_token", "s", "Time to generate first "
                                                  "token for successful responses.",
                                                  explicit_bucket_boundaries_advisory=TTFT_BUCKETS)
        self.propagator = TraceContextTextMapPropagator()

    def export(self, call: Call, run_traceparent: str = "") -> None:
        """Record one finished call: its span (to the batch) and its measurements (in memory)."""
        answer = genai.answer_of(call)
        base = genai.base_attributes(call, answer, self.servers.get(call.route.api))
        attrs = genai.span_attributes(call, answer, base)
        record = record_of(call)
        attrs.update({f"sidecar.{name}": record[name] for name in TIMINGS if record.get(name) is not None})
        if self.capture_content:
            attrs.update(genai.content_attributes(call, answer))
        start = int(call.wall_received * 1e9)
        end = call.t_done or time.monotonic()

        def at(t: float) -> int:
            return start + int((t - call.t_received) * 1e9)

        span = self.tracer.start_span(genai.span_name(call), context=self.parent(call, run_traceparent),
                                      kind=SpanKind.CLIENT, attributes=attrs, start_time=start)
        for name, phase in PHASES:
            if getattr(call, phase):
                span.add_event(name, timestamp=at(getattr(call, phase)))
        if "error.type" in base:
            span.set_status(Status(StatusCode.ERROR, base["error.type"]))
        span.end(end_time=at(end))
        self.measure(call, base, attrs, end)

    def measure(self, call: Call, base: dict, attrs: dict, end: float) -> None:
        outcome = {**base, "sidecar.cache.outcome": attrs["sidecar.cache.outcome"]}
        self.duration.record(end - call.t_received, outcome)
        if "error.type" in base:
            return
        if call.t_first_token:
            self.first_token.record(call.t_first_token - call.t_received, outcome)
        if call.cache_outcome not in UNBILLED and "gen_ai.usage.input_tokens" in attrs:
            self.tokens.record(attrs["gen_ai.usage.input_tokens"], {**base, "gen_ai.token.type": "input"})
            if base["gen_ai.operation.name"] != "embeddings":   # embeddings have input only
                self.tokens.record(attrs.get("gen_ai.usage.output_tokens", 0), {**base, "gen_ai.token.type": "output"})

    def export_run(self, agent) -> None:
        """The agent run's span, from its start to its exit: the root of the trace the launcher began."""
        attrs = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": agent.id, "gen_ai.agent.name": agent.id,
                 "process.pid": agent.pid}
        if agent.exit_status is not None:
            attrs["process.exit.code"] = agent.exit_status
        self.ids.chosen = tracecontext.ids_of(agent.traceparent)
        try:
            span = self.tracer.start_span(f"invoke_agent {agent.id}", context=Context(), kind=SpanKind.INTERNAL,
                                          attributes=attrs, start_time=int(agent.started * 1e9))
        finally:
            self.ids.chosen = None
        if agent.exit_status:
            span.set_status(Status(StatusCode.ERROR, f"exit status {agent.exit_status}"))
        span.end()

    def parent(self, call: Call, run_traceparent: str) -> "Context":
        """The agent's span for this call (its traceparent header), else the agent run's, else none."""
        if call.headers is not None and "traceparent" in call.headers:
            context = self.propagator.extract(call.headers)
            if get_current_span(context).get_span_context().is_valid:
                return context
        if run_traceparent:
            return self.propagator.extract({"traceparent": run_traceparent})
        return Context()

    async def close(self) -> None:
        """Send what is pending, waiting at most SHUTDOWN_WAIT: a receiver that is down must not hold the exit.
        One that refuses the connection outright is not waited for at all (the SDK would retry it with
        backoff for the whole bound, holding the agent's exit for nothing)."""
        if not await self._reachable():
            log.warning("sidecar: the OTLP receiver at %s refuses connections; the last spans and metrics are "
                        "dropped", self.endpoint)
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut_down() -> None:
            try:
                self.tracer_provider.shutdown()
                self.meter_provider.shutdown(timeout_millis=SHUTDOWN_WAIT * 1000)
            finally:
                try:
                    loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
                except RuntimeError:
                    pass
        threading.Thread(target=shut_down, name="sidecar-otel-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, SHUTDOWN_WAIT)
        except TimeoutError:
            log.warning("sidecar: the OTLP receiver at %s did not take the last spans and metrics in %.0f s; "
                        "they are dropped", self.endpoint, SHUTDOWN_WAIT)

    async def _reachable(self) -> bool:
        url = URL(self.base)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(url.host, url.port), CONNECT_CHECK)
        except (OSError, TimeoutError, ValueError):
            return False
        writer.close()
        return True


def server_of(url: str) -> tuple[str, int] | None:
    """server.address and server.port of an upstream base URL."""
    parsed = URL(url)
    return (parsed.host, parsed.port) if parsed.host and parsed.port else None
