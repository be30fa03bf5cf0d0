"""OpenTelemetry export, switched on or off: `[telemetry] otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`.

The export itself (proxy/otlp_export.py) needs the optional extra, `pip install
'agent-sidecar[otel]'` (the official `opentelemetry-sdk` and its OTLP/HTTP exporter), and is
imported only when an endpoint is set. Without the extra, one startup line says how to install it
and the proxy serves as usual. This module imports no SDK, so the launcher can ask cheaply.
"""

from __future__ import annotations

import logging
from importlib.util import find_spec
from typing import Callable

from .config import TelemetrySection
from .routes import Upstreams

log = logging.getLogger("sidecar")
INSTALL = "pip install 'agent-sidecar[otel]'"
NEEDED = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")


def shown(endpoint: str) -> str:
    """The endpoint as events and logs may show it: without any credentials in its user part or query."""
    from yarl import URL   # here: the launcher imports this module, and yarl costs it 10 ms at every start
    try:
        return str(URL(endpoint).with_user(None).with_query(None))
    except (ValueError, TypeError):
        return "(unparsable endpoint)"


def missing() -> str | None:
    """The startup line when export is asked for but the SDK is not installed; None when it is."""
    try:
        if all(find_spec(name) is not None for name in NEEDED):
            return None
    except (ImportError, ValueError):   # a parent package that is not there, or a broken one
        pass
    return (f"[telemetry] otlp_endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) is set, but OpenTelemetry is not "
            f"installed: {INSTALL}. Calls are served as usual, without export.")


def start(settings: TelemetrySection, upstreams: Upstreams, on_health: Callable[[bool], None]):
    """The exporter for these settings, or None (off, or the SDK missing: said in one log line)."""
    if not settings.otlp_endpoint:
        return None
    problem = missing()
    if problem is None:
        try:
            from . import otlp_export
        except ImportError as exc:   # installed, but broken (a version that does not fit)
            problem = f"OpenTelemetry could not be loaded ({exc}); reinstall it: {INSTALL}"
    if problem:
        log.warning("sidecar: %s", problem)
        return None
    try:
        return otlp_export.Telemetry(settings, upstreams, otlp_export.Health(on_health))
    except Exception as exc:   # a bad OTEL_* variable, say: the proxy starts all the same
        log.error("sidecar: OpenTelemetry export could not start (%r); calls are served without it", exc)
        return None
