"""Configuration: one schema, loaded once, validated, frozen.

Precedence, lowest first: the defaults below < the config file < `SIDECAR_*`
environment variables < command-line flags. The environment is read here and
nowhere else in the proxy. Every key is documented in the top-level
config.toml; a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .cache_key import field_path


class ConfigError(Exception):
    """A setting is missing, unknown or of the wrong type; the message says which and where."""


def _choice(*values: str) -> dict:
    return {"choices": values}


PORT = {"maximum": 65535, "noun": "a port number (0 to 65535; 0 takes any free port)"}


@dataclass(frozen=True)
class ProxySection:
    host: str = "127.0.0.1"
    port: int = field(default=0, metadata=PORT)
    allow_remote: bool = False
    agent_id: str = ""
    max_body_mb: float = 32.0
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    header_timeout: float = 60.0
    max_connections: int = 1024


@dataclass(frozen=True)
class UpstreamSection:
    anthropic: str = "https://api.anthropic.com"
    openai: str = "https://api.openai.com/v1"
    gemini: str = "https://generativelanguage.googleapis.com"


@dataclass(frozen=True)
class StateSection:
    """The state's home: the local directory (LMDB) and, for a fleet, the shared backend."""
    dir: str = ""
    durable: bool = False
    max_mb: float = 2048.0
    backend: str = field(default="lmdb", metadata=_choice("lmdb", "redis"))
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "sidecar:"
    lease_seconds: float = 30.0


# Gemini's model calls: `*` stands for the model (one path segment); v1 is the google-genai SDK's, v1beta the CLI's.
GEMINI_ROUTES = tuple(f"/{version}/models/*:{method}" for version in ("v1beta", "v1")
                      for method in ("generateContent", "streamGenerateContent", "countTokens", "embedContent",
                                     "batchEmbedContents"))
CACHE_MODES = ("read-write", "read-only", "refresh", "off", "replay")


@dataclass(frozen=True)
class CacheSection:
    mode: str = field(default="read-write", metadata=_choice(*CACHE_MODES))
    routes: tuple[str, ...] = ("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions", "/v1/embeddings",
                               "/v1/responses", *GEMINI_ROUTES)
    ignore_fields: tuple[str, ...] = ("metadata.user_id", "stream", "stream_options", "prompt_cache_key",
                                      "client_metadata", "input[*].internal_chat_message_metadata_passthrough",
                                      "contents[*].parts[*].functionCall.id", "contents[*].parts[*].functionResponse.id")
    key_headers: tuple[str, ...] = ("anthropic-version", "anthropic-beta", "openai-organization", "openai-project")
    credential_headers: tuple[str, ...] = ()
    deterministic_only: bool = False
    max_size_mb: float = 1024.0
    ttl_seconds: float = 0.0
    replay_pacing: bool = False
    single_flight: bool = True


@dataclass(frozen=True)
class LimitsSection:
    max_concurrency: int = 0
    per_agent: int = 0
    per_model: tuple[str, ...] = ()
    max_queue: int = 1000
    queue_timeout: float = 300.0
    adaptive: bool = True
    pace: bool = True
    budget_usd: tuple[str, ...] = ()


BUDGET_SCOPES = ("total", "day", "agent", "session")


def budgets(limits: LimitsSection) -> dict[str, float]:
    """[limits] budget_usd as {scope: dollars}; the entries were checked when the config was loaded."""
    return {scope.strip(): float(amount) for scope, _, amount in (e.partition("=") for e in limits.budget_usd)}


@dataclass(frozen=True)
class RetrySection:
    max_attempts: int = 6
    max_total: float = 120.0
    base_delay: float = 0.5
    max_delay: float = 20.0
    overload_circuit: bool = True


@dataclass(frozen=True)
class StatsSection:
    record: bool = True
    max_records: int = 200000


@dataclass(frozen=True)
class MonitorSection:
    slow_ms: float = 2000.0
    error_rate: float = 0.05
    error_window: int = 100
    memory_percent: float = 80.0
    queue_saturation: float = 0.8
    sample_interval: float = 5.0
    hook: str = ""
    hook_timeout: float = 10.0


@dataclass(frozen=True)
class SharedSection:
    idle_timeout: float = 900.0


@dataclass(frozen=True)
class LauncherSection:
    quiet: bool = False
    shared: bool = False
    restart: str = field(default="no", metadata=_choice("no", "on-failure", "always"))
    max_restarts: int = 3
    restart_backoff: float = 1.0
    restart_args: tuple[str, ...] = ()
    restore: str = ""


@dataclass(frozen=True)
class TelemetrySection:
    """OpenTelemetry export (proxy/telemetry.py): the OTLP/HTTP receiver, and whether message content goes too."""
    otlp_endpoint: str = ""
    capture_content: bool = False


@dataclass(frozen=True)
class Config:
    proxy: ProxySection = ProxySection()
    upstream: UpstreamSection = UpstreamSection()
    state: StateSection = StateSection()
    cache: CacheSection = CacheSection()
    limits: LimitsSection = LimitsSection()
    retry: RetrySection = RetrySection()
    stats: StatsSection = StatsSection()
    monitor: MonitorSection = MonitorSection()
    shared: SharedSection = SharedSection()
    launcher: LauncherSection = LauncherSection()
    telemetry: TelemetrySection = TelemetrySection()

    @property
    def state_dir(self) -> Path:
        if self.state.dir:
            return Path(self.state.dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "agent-sidecar"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def replace(self, section: str, **values: Any) -> "Config":
        return load_layers([self.to_dict(), {section: values}], ["effective config", "override"])


SECTIONS: dict[str, type] = {f.name: type(f.default) for f in dataclasses.fields(Config)}

# Sections that were merged into another one: refused loudly, never silently ignored.
MOVED = {"store": "state"}


def _moved(section: str, where: str, keys: list[str]) -> ConfigError:
    """The one-line error for a section that moved, saying where its keys (or variables) go now."""
    home = MOVED[section]
    if where == "environment":
        renames = ", ".join(f"SIDECAR_{section.upper()}_{k.upper()} to SIDECAR_{home.upper()}_{k.upper()}"
                            for k in keys)
        return ConfigError(f"environment: [{section}] moved to [{home}]: rename {renames}")
    return ConfigError(f"{where}: [{section}] moved to [{home}]: put {', '.join(keys) or 'its keys'} under "
                       f"[{home}] instead")


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Check one value against its field's type; strings from the environment are parsed."""
    want = type(f.default)
    name = where if where.startswith("environment: ") else f"{where}: '{f.name}'"   # a variable names itself
    if isinstance(value, str) and want is not str and where.startswith("environment"):
        value = _parse_env(value, want, name)
    if want is bool:
        ok = isinstance(value, bool)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif want is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        kinds = {tuple: "a list of strings", bool: "true or false", int: "an int", float: "a number"}
        raise ConfigError(f"{name} must be {kinds.get(want, 'a string')}, not {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    if want in (int, float) and value < 0:
        raise ConfigError(f"{name} must not be negative, not {value!r}")
    if value > f.metadata.get("maximum", value):
        raise ConfigError(f"{name} must be {f.metadata['noun']}, not {value!r}")
    return value


def _parse_env(text: str, want: type, name: str) -> Any:
    if want is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{name} must be true or false, not {text!r}")
    if want is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        return want(text)
    except ValueError:
        raise ConfigError(f"{name} must be {'an int' if want is int else 'a number'}, not {text!r}") from None


def load_layers(layers: list[Mapping[str, Any]], names: list[str]) -> Config:
    """Merge layers (lowest first) over the defaults, validating every key."""
    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for layer, where in zip(layers, names):
        for section, values in layer.items():
            cls = SECTIONS.get(section)
            if section in MOVED:
                raise _moved(section, where, list(values) if isinstance(values, Mapping) else [])
            if cls is None:
                raise ConfigError(f"{where}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
            if not isinstance(values, Mapping):
                raise ConfigError(f"{where}: [{section}] must be a table")
            fields = {f.name: f for f in dataclasses.fields(cls)}
            for key, value in values.items():
                variable = f"SIDECAR_{section}_{key}".upper() if where == "environment" else ""
                if key not in fields:
                    raise ConfigError(f"{where}: {variable + ' is not a setting: ' if variable else ''}unknown key "
                                      f"'{key}' in [{section}] (known: {', '.join(fields)})")
                merged[section][key] = _coerce(value, fields[key], f"{where}: {variable} ([{section}] {key})"
                                               if variable else f"{where} [{section}]")
    config = Config(**{name: SECTIONS[name](**values) for name, values in merged.items()})
    for entry in config.cache.ignore_fields:
        try:
            field_path(entry)
        except ValueError as exc:
            raise ConfigError(f"{names[-1]} [cache] ignore_fields: {exc}") from None
    for entry in config.limits.per_model:
        model, sep, count = entry.rpartition("=")
        if not (sep and model.strip() and count.strip().isdigit()):
            raise ConfigError(f"{names[-1]} [limits]: 'per_model' entries look like \"MODEL=N\", not {entry!r}")
    endpoint = config.telemetry.otlp_endpoint
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"[telemetry] otlp_endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) must be the OTLP/HTTP "
                          f"receiver's base URL, like http://127.0.0.1:4318, not {endpoint!r}")
    for entry in config.limits.budget_usd:
        scope, sep, amount = entry.partition("=")
        try:
            dollars = float(amount)
        except ValueError:
            dollars = -1.0
        if not (sep and scope.strip() in BUDGET_SCOPES and dollars > 0 and dollars != float("inf")):
            raise ConfigError(f"{names[-1]} [limits]: 'budget_usd' entries look like \"SCOPE=DOLLARS\" with SCOPE one "
                              f"of {', '.join(BUDGET_SCOPES)} and DOLLARS above 0, e.g. \"day=20\", not {entry!r}")
    return config


def read_file(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: give an existing file to --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:   # TOML is UTF-8; a file saved as Latin-1 or UTF-16 is not
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          f"save it as UTF-8") from None


def env_layer(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """`SIDECAR_<SECTION>_<KEY>` variables, plus the base URLs an agent's user already set and the OTLP endpoint."""
    layer: dict[str, dict[str, str]] = {}
    # A base URL the user already points at (another gateway, a mock) becomes the upstream; per API the
    # first variable set counts.
    for var, key in UPSTREAM_VARIABLES:
        if environ.get(var) and key not in layer.get("upstream", {}):
            layer.setdefault("upstream", {})[key] = environ[var]
    # The standard OpenTelemetry variable turns export on, as it does for any instrumented program.
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        layer.setdefault("telemetry", {})["otlp_endpoint"] = environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
    for var, value in environ.items():
        if not var.startswith("SIDECAR_") or var in _NOT_SETTINGS:
            continue
        rest = var[len("SIDECAR_"):].lower()
        section = next((s for s in (*SECTIONS, *MOVED) if rest.startswith(s + "_")), None)
        if section is None:
            continue
        layer.setdefault(section, {})[rest[len(section) + 1:]] = value
    for section in MOVED:
        if section in layer:
            raise _moved(section, "environment", sorted(layer[section]))
    return layer


# The base-URL variables clients read, per API (LangChain reads ANTHROPIC_API_URL and OPENAI_API_BASE, litellm
# ANTHROPIC_API_BASE, the google-genai SDK and the Gemini CLI GOOGLE_GEMINI_BASE_URL), and what each one holds
# beyond the base (OpenAI's include /v1). The launcher sets them all for an agent.
UPSTREAM_VARIABLES = (("ANTHROPIC_BASE_URL", "anthropic"), ("ANTHROPIC_API_URL", "anthropic"),
                      ("ANTHROPIC_API_BASE", "anthropic"), ("OPENAI_BASE_URL", "openai"),
                      ("OPENAI_API_BASE", "openai"), ("GOOGLE_GEMINI_BASE_URL", "gemini"))
VARIABLE_SUFFIX = {"anthropic": "", "openai": "/v1", "gemini": ""}

# Variables the launcher itself sets for agents; they are not settings.
_NOT_SETTINGS = {"SIDECAR_URL", "SIDECAR_CONFIG", "SIDECAR_AGENT_ID", "SIDECAR_PROXY_CONFIG"}


PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


def env_proxy_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an HTTP(S) proxy is set for outgoing calls (then the upstream session honours it)."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in PROXY_VARIABLES)


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None,
         flags: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """The effective configuration: defaults < file < environment < flags."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("SIDECAR_CONFIG") or None
    layers: list[Mapping[str, Any]] = []
    names: list[str] = []
    if path:
        layers.append(read_file(path))
        names.append(str(path))
    layers.append(env_layer(environ))
    names.append("environment")
    layers.append(flags or {})
    names.append("command line")
    return load_layers(layers, names)


def to_toml(config: Config) -> str:
    """The effective configuration as TOML, for `sidecar config`."""
    lines: list[str] = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
