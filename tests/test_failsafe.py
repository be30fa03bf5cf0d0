"""Never worse than no sidecar: a hostile upstream and odd clients through a real `sidecar serve`.

The hostile upstream (bench.nasty, `python -m bench.nasty_upstream`) and the
sidecar run as child processes, started once for the module; the agent side
is raw sockets (an HTTP client would normalise what is under test) and, for a
few cases, the official SDKs. Every call must be answered or cut within
BOUND seconds. The cases:

- test_upstream_case[<case>]: each odd upstream answer (bench/nasty/cases.py) is relayed byte for byte
  (or cut, or answered with an API-shaped `sidecar:` error when there is no answer to relay); asked again,
  a well-formed answer comes from the cache byte for byte and anything else reaches the upstream again.
- test_client_case[<case>]: each odd-but-legal client request (CLIENT below, one line each).
- test_sdk_case[<case>]: the official SDKs end (answer or their own exception) as they do without the sidecar.
- test_after_corpus_*: last in the file: the sidecar still serves and nothing malformed is in its cache.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import os
import select
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import orjson
import pytest

from agent_sidecar.bench.nasty import ALL, CASES, NO_HEAD, RELAYED, STORED, Case
from agent_sidecar.bench.nasty.shapes import TEXT, echo_text, nested
from conftest import stop_process

BOUND = 5.0                       # every call answered or cut within this many seconds
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
pytestmark = pytest.mark.timeout(60)
FRAMING = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "proxy-connection"}
A_HEADERS = [("content-type", "application/json"), ("x-api-key", "sk-ant-nasty"), ("anthropic-version", "2023-06-01")]
O_HEADERS = [("content-type", "application/json"), ("authorization", "Bearer sk-nasty")]
G_HEADERS = [("content-type", "application/json"), ("x-goog-api-key", "AIzaNastyGeminiKey0000000000000000000")]


# ---- a raw HTTP/1.1 client ----------------------------------------------------------------------


class Closed(Exception):
    """The peer closed the connection before any answer head."""


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]          # names lower-cased, in order
    body: bytes = b""                        # without chunk framing
    complete: bool = True                    # the body ended as its framing says it ends
    interim: list[int] = field(default_factory=list)   # 1xx statuses before the answer

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k == name), "")

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def json(self):
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return (f"Reply({self.status} {self.reason}, complete={self.complete}, {len(self.body)} bytes "
                f"{self.body[:200]!r}, content-type={self.header('content-type')!r})")


def request_bytes(method: str, target: str | bytes, headers: list[tuple[str, str]], body: bytes = b"", *,
                  port: int | None = None, version: str = "HTTP/1.1", length: bool = True) -> bytes:
    """One request, exactly: Host first (unless port is None), then `headers`, then Content-Length."""
    target = target.encode("latin-1") if isinstance(target, str) else target
    lines = [method.encode() + b" " + target + b" " + version.encode()]
    if port is not None:
        lines.append(f"Host: 127.0.0.1:{port}".encode())
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers]
    if length and (body or method in ("POST", "PUT")):
        lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def read_head(reader: asyncio.StreamReader) -> Reply:
    interim = []
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise Closed(f"connection closed before an answer head (got {exc.partial[:200]!r})") from None
        except ConnectionResetError:
            raise Closed("connection reset before an answer head") from None
        status_line, *lines = head[:-4].split(b"\r\n")
        parts = status_line.split(b" ", 2) + [b""]
        headers = []
        for line in lines:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")))
        status = int(parts[1])
        if 100 <= status < 200:
            interim.append(status)
            continue
        return Reply(status, parts[2].decode("latin-1"), headers, interim=interim)


async def read_body(reader: asyncio.StreamReader, reply: Reply, method: str) -> Reply:
    if method == "HEAD" or reply.status in (204, 304):
        return reply
    parts: list[bytes] = []
    try:
        if "chunked" in reply.header("transfer-encoding").lower():
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                try:
                    parts.append(await reader.readexactly(size))
                except asyncio.IncompleteReadError as exc:
                    parts.append(exc.partial)
                    raise
                await reader.readexactly(2)
        elif reply.header("content-length"):
            try:
                parts.append(await reader.readexactly(int(reply.header("content-length"))))
            except asyncio.IncompleteReadError as exc:
                parts.append(exc.partial)
                raise
        else:
            while data := await reader.read(65536):
                parts.append(data)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        reply.complete = False
    reply.body = b"".join(parts)
    return reply


async def read_reply(reader: asyncio.StreamReader, method: str = "POST") -> Reply:
    return await read_body(reader, await read_head(reader), method)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def exchange(port: int, data: bytes, method: str = "POST") -> Reply:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        writer.write(data)
        await writer.drain()
        return await read_reply(reader, method)
    finally:
        await close(writer)


async def bounded(aw: Awaitable, what: str = "the call"):
    """`aw`, or an AssertionError naming the hang."""
    try:
        return await asyncio.wait_for(aw, BOUND)
    except TimeoutError:
        raise AssertionError(f"HANG: {what} was neither answered nor cut within {BOUND} s") from None


def decode(body: bytes, encoding: str) -> bytes:
    encoding = encoding.lower()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    assert encoding in ("", "identity"), f"unexpected content-encoding {encoding!r}"
    return body


def accepted(accept_encoding: str) -> set[str]:
    named = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",") if part.strip()}
    return named | {"", "identity"}


def assert_sidecar_error(reply: Reply, api: str, statuses: tuple[int, ...]) -> None:
    """An error the sidecar made, in the API's own shape, whose message starts `sidecar:`."""
    assert reply.status in statuses, f"expected a sidecar-made {statuses} error, got {reply!r}"
    assert "json" in reply.header("content-type"), f"error not API-shaped (text/plain?): {reply!r}"
    body = reply.json()
    message = body["error"]["message"]
    if api == "anthropic":
        assert body["type"] == "error" and body["error"]["type"], body
    elif api == "gemini":   # Google's shape
        assert body["error"]["code"] == reply.status and body["error"]["status"], body
    else:
        assert body["error"]["type"], body
    assert message.startswith("sidecar:"), message


# ---- the processes ----------------------------------------------------------------------------------


def child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "OPENAI_", "SIDECAR_", "GOOGLE_GEMINI_", "GEMINI_")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONPATH": str(ROOT)}


class Upstream:
    """`python -m bench.nasty_upstream --port 0` as a child process."""

    def __init__(self, workdir: Path):
        self.log = workdir / "nasty.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([PY, "-m", "agent_sidecar.bench.nasty_upstream", "--port", "0"], cwd=ROOT,
                                         env=child_env(workdir / "home"), stdout=subprocess.PIPE, stderr=log,
                                         start_new_session=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http://"):
            stop_process(self.proc)
            raise RuntimeError(f"nasty upstream did not start: {self.log.read_text()}")
        self.url = line
        self.port = int(line.rsplit(":", 1)[1])

    async def mark(self) -> int:
        reply = await bounded(exchange(self.port, request_bytes("GET", "/_nasty/requests?since=999999999", [],
                                                                port=self.port), "GET"), "the upstream's record")
        return reply.json()["next"]

    async def since(self, mark: int, case: str | None = None) -> list[dict]:
        """Requests the upstream received since `mark` (not the tests' own direct ones), of `case` if given."""
        reply = await bounded(exchange(self.port, request_bytes("GET", f"/_nasty/requests?since={mark}", [],
                                                                port=self.port), "GET"), "the upstream's record")
        found = [r for r in reply.json()["requests"]
                 if not any(k.lower() == "x-nasty-direct" for k, _ in r["headers"])]
        return [r for r in found if case is None or r["case"] == case]

    async def direct(self, data: bytes, method: str = "POST") -> Reply:
        """The same request straight to the upstream (marked so that it is not counted as the sidecar's)."""
        head, sep, body = data.partition(b"\r\n\r\n")
        return await bounded(exchange(self.port, head + b"\r\nx-nasty-direct: 1" + sep + body, method), "direct")


CONFIG = """
[proxy]
read_timeout = {read_timeout}
connect_timeout = 2.0
max_body_mb = 8.0
[upstream]
anthropic = "{url}"
openai = "{url}/v1"
gemini = "{url}"
[state]
dir = "{state}"
[retry]
max_attempts = 2
base_delay = 0.05
max_delay = 0.2
max_total = 3.0
"""


class Sidecar:
    """`sidecar serve --port 0` as a child process, its upstreams at the nasty upstream; restarted if it dies."""

    def __init__(self, workdir: Path, upstream: Upstream, extra: str = "", read_timeout: float = 1.0):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.state = workdir / "state"
        self.config = workdir / "config.toml"
        self.config.write_text(CONFIG.format(url=upstream.url, state=self.state, read_timeout=read_timeout) + extra)
        self.env = child_env(workdir / "home")
        self.deaths: list[str] = []
        self.starts = 0
        self._start()

    def _start(self) -> None:
        self.starts += 1
        self.log = self.workdir / f"sidecar-{self.starts}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([PY, "-m", "agent_sidecar.launcher", "serve", "--port", "0", "--config", str(self.config)],
                                         cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while "serving on " not in (text := self.log.read_text(errors="replace")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop_process(self.proc)
                raise RuntimeError(f"sidecar serve did not start: {text}")
            time.sleep(0.02)  # start-up of another process: a short poll with a deadline
        self.url = text.split("serving on ", 1)[1].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1])

    def ensure(self) -> None:
        """Before each test: a sidecar killed by an earlier case is noted and started again."""
        if self.proc.poll() is not None:
            self.deaths.append(f"exit {self.proc.returncode}: {self.log.read_text(errors='replace')[-2000:]}")
            self._start()

    def cli(self, command: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "agent_sidecar.launcher", command, "--config", str(self.config), *args], cwd=ROOT,
                              env=self.env, capture_output=True, timeout=30)

    async def call(self, data: bytes, method: str = "POST", what: str = "the call") -> Reply:
        return await bounded(exchange(self.port, data, method), what)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Upstream:
    nasty = Upstream(tmp_path_factory.mktemp("nasty"))
    yield nasty
    stop_process(nasty.proc)


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory) -> Sidecar:
    sidecar = Sidecar(tmp_path_factory.mktemp("sidecar"), upstream)
    yield sidecar
    stop_process(sidecar.proc)


@pytest.fixture
def limited(upstream, tmp_path) -> Sidecar:
    """A sidecar with one upstream slot for all calls (and a read timeout that lets a generation hold it)."""
    sidecar = Sidecar(tmp_path / "limited", upstream, "[limits]\nmax_concurrency = 1\nqueue_timeout = 30.0\n",
                      read_timeout=30.0)
    yield sidecar
    stop_process(sidecar.proc)


@pytest.fixture
def sidecar(proxy) -> Sidecar:
    proxy.ensure()
    return proxy


_nonces = iter(range(1, 1 << 30))


def nonce() -> str:
    return f"{next(_nonces)}-{time.time_ns()}"


def model_request(port: int, model: str, *, api: str = "anthropic", stream: bool = False, accept: str | None = None,
                  text: str | None = None, extra: dict | None = None, target: str | None = None,
                  headers: list[tuple[str, str]] | None = None) -> bytes:
    """A model call, exactly as an SDK would send it (Accept-Encoding only when given)."""
    if api == "gemini":   # the model is in the path; the form is the method
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        body = {"contents": [{"role": "user", "parts": [{"text": text or f"{model} {nonce()}"}]}], **(extra or {})}
        return request_bytes("POST", target or f"/v1beta/models/{model}:{method}",
                             list(headers if headers is not None else G_HEADERS) +
                             ([("accept-encoding", accept)] if accept is not None else []), orjson.dumps(body), port=port)
    body = {"model": model, "messages": [{"role": "user", "content": text or f"{model} {nonce()}"}]}
    if api == "responses":
        body = {"model": model, "input": body["messages"]}
    if api == "anthropic":
        body["max_tokens"] = 64
    if stream:
        body["stream"] = True
    body.update(extra or {})
    head = list(headers if headers is not None else A_HEADERS if api == "anthropic" else O_HEADERS)
    if accept is not None:
        head.append(("accept-encoding", accept))
    path = target or {"anthropic": "/v1/messages", "responses": "/v1/responses"}.get(api, "/v1/chat/completions")
    return request_bytes("POST", path, head, orjson.dumps(body), port=port)


def case_request(case: Case, port: int, text: str) -> bytes:
    return model_request(port, f"nasty-{case.name}", api=case.api, stream=case.stream, accept=case.accept,
                         text=text, extra=dict(case.request))


# ---- a. the upstream corpus ------------------------------------------------------------------------------


def check_relayed(case: Case, reply: Reply) -> None:
    """Status, body and end-to-end headers as the upstream sent them."""
    answer = case.answer
    assert reply.status == answer.status, f"WRONG STATUS: upstream sent {answer.status}, agent got {reply!r}"
    assert reply.complete, f"CUT: a complete upstream answer reached the agent cut: {reply!r}"
    encoding = reply.header("content-encoding")
    upstream_encoding = next((v for k, v in answer.headers if k == "content-encoding"), "")
    if case.decoded is not None and encoding != upstream_encoding:
        # An encoded answer may reach the agent decoded (never re-encoded with something it did not ask for).
        assert encoding in ("", "identity"), f"WRONG ENCODING {encoding!r}: {reply!r}"
        assert reply.body == case.decoded, f"WRONG BYTES (decoded): {reply!r}"
    else:
        assert reply.body == answer.body, (f"WRONG BYTES: upstream sent {len(answer.body)} bytes "
                                           f"{answer.body[:120]!r}..., agent got {reply!r}")
    skip = FRAMING | ({"content-encoding"} if case.decoded is not None else set())
    for name in dict(answer.headers):
        if name in skip:
            continue
        sent = [v for k, v in answer.headers if k == name]
        assert reply.values(name) == sent, f"HEADER {name}: upstream sent {sent}, agent got {reply.values(name)}"


def check_answer(case: Case, reply: Reply) -> None:
    if case.kind in (STORED, RELAYED):
        check_relayed(case, reply)
    elif case.kind == NO_HEAD:
        assert_sidecar_error(reply, case.api, (502,))
    else:  # BROKEN: a sidecar error before its head, or a cut prefix of what the upstream sent
        if reply.status >= 500 and reply.status != case.answer.status:
            assert_sidecar_error(reply, case.api, (502, 504))
            return
        assert reply.status == case.answer.status, f"WRONG STATUS: {reply!r}"
        assert not reply.complete, f"LOOKS COMPLETE: a broken upstream answer reached the agent as complete: {reply!r}"
        assert case.answer.body.startswith(reply.body), f"WRONG BYTES: not a prefix of what was sent: {reply!r}"


def check_replay(case: Case, reply: Reply) -> None:
    assert reply.status == case.answer.status and reply.complete, f"BAD REPLAY: {reply!r}"
    if case.decoded is None:
        assert reply.body == case.answer.body, f"REPLAY WRONG BYTES: {reply!r}"
        return
    encoding = reply.header("content-encoding").lower()
    assert encoding in accepted(case.accept), (f"WRONG ENCODING: a client that sent Accept-Encoding: {case.accept} "
                                               f"got content-encoding {encoding!r} from the cache")
    assert decode(reply.body, encoding) == case.decoded, f"REPLAY WRONG BYTES (decoded): {reply!r}"


@pytest.mark.parametrize("name", list(CASES), ids=[f"{n}" for n in CASES])
async def test_upstream_case(name: str, sidecar: Sidecar, upstream: Upstream) -> None:
    """Relayed exactly (or cut / sidecar 502), then: well-formed = a byte-exact cache hit, else upstream again."""
    case = CASES[name]
    request = case_request(case, sidecar.port, f"{name} {nonce()}")
    mark = await upstream.mark()
    first = await sidecar.call(request, what=f"case {name}: {case.doc}")
    assert await upstream.since(mark, name), "the call never reached the upstream"
    check_answer(case, first)

    mark = await upstream.mark()
    second = await sidecar.call(request, what=f"case {name}, asked again")
    again = await upstream.since(mark, name)
    if case.kind == STORED:
        outcome = second.header("x-sidecar-cache")
        assert not again and outcome in ("hit", "coalesced"), (
            f"NOT CACHED: a well-formed answer was not served from the cache (x-sidecar-cache={outcome!r}, "
            f"upstream asked again {len(again)} times)")
        check_replay(case, second)
        if outcome == "coalesced":   # joined the finished flight before its entry was readable
            third = await sidecar.call(request, what=f"case {name}, third time")
            assert third.header("x-sidecar-cache") == "hit", third.headers
            check_replay(case, third)
    else:
        assert again, (f"STORED MALFORMED: a {case.kind} answer was served from the cache "
                       f"(x-sidecar-cache={second.header('x-sidecar-cache')!r})")
        assert second.header("x-sidecar-cache") != "hit"
        check_answer(case, second)


HIT_HEADER_CASES = ["json_ok", "sse_ok", "chat_ok", "chat_stream_ok", "responses_ok", "responses_stream_ok"]


@pytest.mark.parametrize("name", HIT_HEADER_CASES)
async def test_hit_keeps_upstream_headers(name: str, sidecar: Sidecar) -> None:
    """A cache hit carries the upstream's readable headers (ids, organisation, timing, rate limits) as they were."""
    case = CASES[name]
    request = case_request(case, sidecar.port, f"headers {name} {nonce()}")
    await sidecar.call(request)
    hit = await sidecar.call(request)
    if hit.header("x-sidecar-cache") == "coalesced":
        hit = await sidecar.call(request)
    assert hit.header("x-sidecar-cache") == "hit", hit.headers
    readable = [k for k, _ in case.answer.headers
                if k in ("request-id", "x-request-id", "anthropic-organization-id", "openai-organization",
                         "openai-processing-ms") or k.startswith(("anthropic-ratelimit-", "x-ratelimit-"))]
    missing = {k: ([v for n, v in case.answer.headers if n == k], hit.values(k)) for k in readable
               if hit.values(k) != [v for n, v in case.answer.headers if n == k]}
    assert not missing, f"HIT LOST HEADERS (name: (upstream, hit)): {missing}"


# ---- b. odd client requests ---------------------------------------------------------------------------------


@dataclass
class Ctx:
    sidecar: Sidecar
    upstream: Upstream
    limited: Callable[[], Sidecar]

    @property
    def port(self) -> int:
        return self.sidecar.port


CLIENT: dict[str, tuple[str, Callable[[Ctx], Awaitable[None]]]] = {}


def client_case(doc: str):
    def register(func):
        CLIENT[func.__name__] = (doc, func)
        return func
    return register


async def passes_target(ctx: Ctx, target: str, sent_as: str | None = None, method: str = "GET") -> Reply:
    """`target` reaches the upstream byte for byte (as `sent_as` when the sidecar strips an agent prefix)."""
    mark = await ctx.upstream.mark()
    reply = await ctx.sidecar.call(request_bytes(method, target, O_HEADERS[1:], port=ctx.port), method, target)
    seen = await ctx.upstream.since(mark)
    assert [r["target"] for r in seen] == [sent_as or target], f"TARGET REWRITTEN: sent {target!r}, upstream got " \
                                                              f"{[r['target'] for r in seen]}; agent got {reply!r}"
    assert reply.status == 200, reply
    return reply


@client_case("GET /v1/files/a%2Fb: an encoded slash reaches the upstream encoded")
async def target_pct_2f(ctx):
    await passes_target(ctx, "/v1/files/a%2Fb")


@client_case("GET /v1/files/a%20b: an encoded space stays encoded")
async def target_pct_20(ctx):
    await passes_target(ctx, "/v1/files/a%20b")


@client_case("GET /v1/files/caf%C3%A9: encoded UTF-8 stays encoded")
async def target_pct_c3a9(ctx):
    await passes_target(ctx, "/v1/files/caf%C3%A9")


@client_case("GET /v1/files/a%26b: an encoded ampersand stays encoded")
async def target_pct_26(ctx):
    await passes_target(ctx, "/v1/files/a%26b")


@client_case("GET /v1/files/a%2fb: lower-case hex stays lower-case")
async def target_pct_lower(ctx):
    await passes_target(ctx, "/v1/files/a%2fb")


@client_case("GET /a/agent-7/v1/files/a%2Fb: the agent prefix goes, the encoding stays")
async def target_agent_prefix(ctx):
    await passes_target(ctx, "/a/agent-7/v1/files/a%2Fb", "/v1/files/a%2Fb")


@client_case("a query with %2F, %20, a bare flag and an empty value, byte for byte")
async def query_odd(ctx):
    await passes_target(ctx, "/v1/models?after_id=a%2Fb&q=%20x&flag&empty=")


@client_case("duplicate query parameters, in order")
async def query_duplicate(ctx):
    await passes_target(ctx, "/v1/models?limit=1&limit=2&limit=1")


@client_case("'+' and %2B in a query stay as they are")
async def query_plus(ctx):
    await passes_target(ctx, "/v1/models?q=a+b%2Bc")


@client_case("POST /v1/messages?beta=true (Claude Code): target byte for byte, and cached")
async def query_beta_post(ctx):
    data = model_request(ctx.port, "claude-sonnet-4-5", target="/v1/messages?beta=true")
    mark = await ctx.upstream.mark()
    first = await ctx.sidecar.call(data)
    assert [r["target"] for r in await ctx.upstream.since(mark)] == ["/v1/messages?beta=true"]
    assert first.status == 200, first
    second = await ctx.sidecar.call(data)
    assert second.header("x-sidecar-cache") in ("hit", "coalesced") and second.body == first.body


@client_case("GET /v1/files/a%00b: an API-shaped 400 at once, the upstream never asked")
async def target_nul(ctx):
    mark = await ctx.upstream.mark()
    reply = await ctx.sidecar.call(request_bytes("GET", "/v1/files/a%00b", O_HEADERS[1:], port=ctx.port), "GET")
    assert_sidecar_error(reply, "openai", (400,))
    assert not await ctx.upstream.since(mark)


@client_case("a NUL in the query: an API-shaped 400 at once")
async def query_nul(ctx):
    mark = await ctx.upstream.mark()
    reply = await ctx.sidecar.call(request_bytes("GET", "/v1/models?x=%00", A_HEADERS[1:], port=ctx.port), "GET")
    assert_sidecar_error(reply, "anthropic", (400,))
    assert not await ctx.upstream.since(mark)


@client_case("Expect: 100-continue: the agent gets 100 Continue, the upstream never sees Expect")
async def expect_100_continue(ctx):
    body = orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [
        {"role": "user", "content": f"expect {nonce()}"}]})
    head = request_bytes("POST", "/v1/messages", A_HEADERS + [("expect", "100-continue"),
                                                              ("content-length", str(len(body)))],
                         port=ctx.port, length=False)
    mark = await ctx.upstream.mark()
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    try:
        writer.write(head)
        interim = await bounded(reader.readuntil(b"\r\n\r\n"), "100 Continue")
        assert interim.startswith(b"HTTP/1.1 100"), interim
        writer.write(body)
        reply = await bounded(read_reply(reader), "the answer after 100 Continue")
    finally:
        await close(writer)
    assert reply.status == 200, reply
    (seen,) = await ctx.upstream.since(mark)
    assert not [k for k, _ in seen["headers"] if k.lower() == "expect"], f"EXPECT FORWARDED: {seen['headers']}"


@client_case("Expect: 100-continue with a body over max_body_mb: a 413 without waiting for the body")
async def expect_100_too_large(ctx):
    head = request_bytes("POST", "/v1/messages", A_HEADERS + [("expect", "100-continue"),
                                                              ("content-length", str(9 << 20))],
                         port=ctx.port, length=False)
    reply = await ctx.sidecar.call(head)
    assert_sidecar_error(reply, "anthropic", (413,))


@client_case("HTTP/1.0 POST without Host: served")
async def http10_no_host_post(ctx):
    data = model_request(ctx.port, "claude-sonnet-4-5").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    data = data.replace(f"Host: 127.0.0.1:{ctx.port}\r\n".encode(), b"")
    reply = await ctx.sidecar.call(data)
    assert reply.status == 200 and reply.json()["type"] == "message", reply


@client_case("HTTP/1.0 GET /v1/models without Host: served")
async def http10_no_host_get(ctx):
    reply = await ctx.sidecar.call(request_bytes("GET", "/v1/models", A_HEADERS[1:], version="HTTP/1.0"), "GET")
    assert reply.status == 200 and reply.json()["data"], reply


async def odd_body(ctx, body: bytes, headers=A_HEADERS, forwarded_ok: tuple[int, ...] = (200,)) -> Reply:
    """Forwarded (the upstream's answer) or refused with an API-shaped 400; never a text/plain 500."""
    data = request_bytes("POST", "/v1/messages", headers, body, port=ctx.port)
    reply = await ctx.sidecar.call(data)
    assert "json" in reply.header("content-type"), f"NOT API-SHAPED ({reply.status}): {reply!r}"
    if reply.status not in forwarded_ok:
        assert reply.status == 400 and reply.json()["type"] == "error", reply
    return reply


def nested_body(depth: int) -> bytes:
    return (b'{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":"deep '
            + nonce().encode() + b'"}],"nasty_nested":' + nested(depth) + b"}")


@client_case("a body nested 300 levels: forwarded uncached or an API-shaped 400, never text/plain 500")
async def deep_body_300(ctx):
    await odd_body(ctx, nested_body(300))


@client_case("a body nested 5000 levels: forwarded uncached or an API-shaped 400, never text/plain 500")
async def deep_body_5000(ctx):
    await odd_body(ctx, nested_body(5000))


@client_case("invalid JSON: an API-shaped 400 (the sidecar's or the upstream's)")
async def invalid_json(ctx):
    await odd_body(ctx, b'{"model": "claude-sonnet-4-5", "messages": [', forwarded_ok=())


@client_case("invalid UTF-8 in a JSON body: an API-shaped 400")
async def invalid_utf8_body(ctx):
    await odd_body(ctx, b'{"model": "c", "max_tokens": 8, "messages": [{"role": "user", "content": "\xff"}]}',
                   forwarded_ok=())


@client_case("an empty POST body: an API-shaped 400")
async def empty_post(ctx):
    await odd_body(ctx, b"", forwarded_ok=())


@client_case("a JSON array body: forwarded, the upstream's API-shaped 400")
async def json_array_body(ctx):
    await odd_body(ctx, b"[1, 2]", forwarded_ok=())


@client_case("a JSON body without content-type: forwarded byte for byte")
async def no_content_type(ctx):
    body = orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 8,
                         "messages": [{"role": "user", "content": f"no type {nonce()}"}]})
    mark = await ctx.upstream.mark()
    reply = await ctx.sidecar.call(request_bytes("POST", "/v1/messages", A_HEADERS[1:], body, port=ctx.port))
    assert reply.status == 200 and reply.json()["content"][0]["text"] == echo_text(body), reply
    (seen,) = await ctx.upstream.since(mark)
    assert base64.b64decode(seen["body_b64"]) == body


@client_case("content-type application/json; charset=utf-8: served and cached")
async def json_charset(ctx):
    headers = [("content-type", "application/json; charset=utf-8")] + A_HEADERS[1:]
    data = model_request(ctx.port, "claude-sonnet-4-5", headers=headers)
    first = await ctx.sidecar.call(data)
    assert first.status == 200, first
    second = await ctx.sidecar.call(data)
    assert second.header("x-sidecar-cache") in ("hit", "coalesced") and second.body == first.body, second


@client_case("a chunked request body: the upstream gets the same bytes")
async def chunked_request(ctx):
    body = orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 8,
                         "messages": [{"role": "user", "content": f"chunked {nonce()}"}]})
    framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 17]), body[i:i + 17]) for i in range(0, len(body), 17))
    data = request_bytes("POST", "/v1/messages", A_HEADERS + [("transfer-encoding", "chunked")], port=ctx.port,
                         length=False) + framed + b"0\r\n\r\n"
    mark = await ctx.upstream.mark()
    reply = await ctx.sidecar.call(data)
    assert reply.status == 200 and reply.json()["content"][0]["text"] == echo_text(body), reply
    (seen,) = await ctx.upstream.since(mark)
    assert base64.b64decode(seen["body_b64"]) == body


@client_case("a gzip request body: forwarded as it came, with its content-encoding")
async def gzip_request(ctx):
    body = gzip.compress(orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [
        {"role": "user", "content": f"gzip body {nonce()}"}]}), mtime=0)
    mark = await ctx.upstream.mark()
    reply = await ctx.sidecar.call(request_bytes("POST", "/v1/messages", A_HEADERS + [("content-encoding", "gzip")],
                                                 body, port=ctx.port))
    assert reply.status == 200, reply
    (seen,) = await ctx.upstream.since(mark)
    assert base64.b64decode(seen["body_b64"]) == body
    assert ("content-encoding", "gzip") in [(k.lower(), v) for k, v in seen["headers"]]


@client_case("two pipelined requests on one connection: two answers, in order")
async def pipelined(ctx):
    first, second = (model_request(ctx.port, "claude-sonnet-4-5") for _ in range(2))
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    try:
        writer.write(first + second)
        replies = [await bounded(read_reply(reader), "pipelined answer 1"),
                   await bounded(read_reply(reader), "pipelined answer 2")]
    finally:
        await close(writer)
    for data, reply in zip((first, second), replies):
        assert reply.status == 200, reply
        assert reply.json()["content"][0]["text"] == echo_text(data.partition(b"\r\n\r\n")[2])


@client_case("a client that disconnects mid-stream: the sidecar keeps serving")
async def disconnect_mid_stream(ctx):
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    try:
        writer.write(model_request(ctx.port, "nasty-sse_slow", stream=True))
        reply = await bounded(read_head(reader), "the slow stream's head")
        assert reply.status == 200
        await bounded(reader.read(100), "the slow stream's first bytes")
    finally:
        await close(writer)
    after = await ctx.sidecar.call(model_request(ctx.port, "claude-sonnet-4-5"))
    assert after.status == 200, after
    health = await ctx.sidecar.call(request_bytes("GET", "/_sidecar/health", [], port=ctx.port), "GET")
    assert health.status == 200, health


async def same_connection(ctx, first: bytes, first_method: str = "POST") -> tuple[Reply, Reply]:
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    try:
        writer.write(first)
        one = await bounded(read_reply(reader, first_method), "the first answer")
        writer.write(model_request(ctx.port, "claude-sonnet-4-5"))
        two = await bounded(read_reply(reader), "the next answer on the same connection")
    except Closed as exc:
        raise AssertionError(f"CONNECTION CLOSED after an error: {exc}") from None
    finally:
        await close(writer)
    return one, two


@client_case("keep-alive after an error: a bad request, then a good one on the same connection")
async def keepalive_after_error(ctx):
    one, two = await same_connection(ctx, request_bytes("POST", "/v1/messages", A_HEADERS, b"{bad", port=ctx.port))
    assert one.status == 400 and two.status == 200, (one, two)


@client_case("keep-alive after an upstream error: a 500, then a good call on the same connection")
async def keepalive_after_upstream_error(ctx):
    one, two = await same_connection(ctx, model_request(ctx.port, "nasty-err_500_text"))
    assert one.status == 500 and two.status == 200, (one, two)


async def passes_like_direct(ctx, method: str, target: str, headers=A_HEADERS[1:]) -> Reply:
    data = request_bytes(method, target, headers, port=ctx.port)
    direct = await ctx.upstream.direct(data, method)
    mark = await ctx.upstream.mark()
    reply = await ctx.sidecar.call(data, method, f"{method} {target}")
    assert (reply.status, reply.body) == (direct.status, direct.body), f"direct {direct!r}, via sidecar {reply!r}"
    assert len(await ctx.upstream.since(mark)) == 1
    return reply


@client_case("HEAD / (Claude Code's preflight): passed through as the upstream answers it")
async def head_root(ctx):
    await passes_like_direct(ctx, "HEAD", "/")


@client_case("GET /v1/models: passed through byte for byte")
async def get_models(ctx):
    await passes_like_direct(ctx, "GET", "/v1/models")


@client_case("OPTIONS /v1/messages: passed through")
async def options(ctx):
    await passes_like_direct(ctx, "OPTIONS", "/v1/messages")


@client_case("HEAD / while the only limiter slot is held by a generation: answered at once")
async def head_not_behind_limiter(ctx):
    await not_behind_limiter(ctx, "HEAD", "/")


@client_case("GET /v1/models while the only limiter slot is held by a generation: answered at once")
async def models_not_behind_limiter(ctx):
    await not_behind_limiter(ctx, "GET", "/v1/models")


async def not_behind_limiter(ctx, method: str, target: str) -> None:
    limited = ctx.limited()
    mark = await ctx.upstream.mark()
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    try:
        writer.write(model_request(limited.port, "nasty-hold"))
        await writer.drain()
        deadline = time.monotonic() + BOUND
        while not await ctx.upstream.since(mark, "hold"):   # the generation holds the slot once it is upstream
            assert time.monotonic() < deadline, "the held generation never reached the upstream"
            await asyncio.sleep(0.01)
        reply = await bounded(exchange(limited.port, request_bytes(method, target, A_HEADERS[1:],
                                                                   port=limited.port), method),
                              f"{method} {target} while a generation holds the only slot")
        assert reply.status < 500, reply
    finally:
        await close(writer)


@client_case("an absolute-form target: refused, API-shaped, the upstream never asked")
async def absolute_form(ctx):
    mark = await ctx.upstream.mark()
    reply = await ctx.sidecar.call(request_bytes("GET", "http://example.com/v1/models", A_HEADERS[1:],
                                                 port=ctx.port), "GET")
    assert_sidecar_error(reply, "anthropic", (400,))
    assert not await ctx.upstream.since(mark)


@client_case("Host: evil.example (DNS rebinding): refused, API-shaped")
async def host_foreign(ctx):
    data = model_request(ctx.port, "claude-sonnet-4-5").replace(f"127.0.0.1:{ctx.port}".encode(), b"evil.example")
    assert_sidecar_error(await ctx.sidecar.call(data), "anthropic", (400,))


@client_case("Host: [::1]:port: served")
async def host_ipv6(ctx):
    data = model_request(ctx.port, "claude-sonnet-4-5").replace(f"127.0.0.1:{ctx.port}".encode(),
                                                                f"[::1]:{ctx.port}".encode())
    reply = await ctx.sidecar.call(data)
    assert reply.status == 200, reply


@client_case("a 9 MB body over max_body_mb = 8: an API-shaped 413")
async def body_too_large(ctx):
    body = b'{"model":"c","max_tokens":8,"messages":[{"role":"user","content":"' + b"x" * (9 << 20) + b'"}]}'
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(request_bytes("POST", "/v1/messages", A_HEADERS, body, port=ctx.port))
            await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        reply = await bounded(read_reply(reader), "the 413")
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await close(writer)
    assert_sidecar_error(reply, "anthropic", (413,))


@client_case("a 4 MB body: forwarded whole")
async def body_4mb(ctx):
    body = orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 8,
                         "messages": [{"role": "user", "content": nonce() + "y" * (4 << 20)}]})
    mark = await ctx.upstream.mark()
    reply = await ctx.sidecar.call(request_bytes("POST", "/v1/messages", A_HEADERS, body, port=ctx.port))
    assert reply.status == 200, reply
    (seen,) = await ctx.upstream.since(mark)
    assert seen["body_len"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


async def gzip_entry_then(ctx, second_accept: str | None, stream: bool = False) -> Reply:
    """Store json_gzip's answer (asked with gzip), then ask again with `second_accept`; returns the hit."""
    text = f"gzip entry {nonce()}"
    first = await ctx.sidecar.call(model_request(ctx.port, "nasty-json_gzip", accept="gzip", text=text))
    assert first.status == 200, first
    second = await ctx.sidecar.call(model_request(ctx.port, "nasty-json_gzip", accept=second_accept, text=text,
                                                  stream=stream))
    assert second.status == 200 and second.header("x-sidecar-cache") in ("hit", "coalesced"), second
    encoding = second.header("content-encoding").lower()
    assert encoding in accepted(second_accept or ""), (
        f"WRONG ENCODING: Accept-Encoding {second_accept!r}, got content-encoding {encoding!r} from the cache")
    return second


@client_case("a gzip entry served to Accept-Encoding: identity: not gzip")
async def identity_hit_of_gzip_entry(ctx):
    reply = await gzip_entry_then(ctx, "identity")
    assert reply.body == CASES["json_gzip"].decoded


@client_case("a gzip entry served to a client without Accept-Encoding: not gzip")
async def no_accept_hit_of_gzip_entry(ctx):
    reply = await gzip_entry_then(ctx, None)
    assert reply.body == CASES["json_gzip"].decoded


@client_case("a gzip entry hit by a gzip client, then by one without Accept-Encoding: the later is not gzip")
async def gzip_hit_then_plain_hit(ctx):
    text = f"gzip entry {nonce()}"
    for accept in ("gzip", "gzip", None, "identity"):   # the replay a hit prepared is kept per coding
        reply = await ctx.sidecar.call(model_request(ctx.port, "nasty-json_gzip", accept=accept, text=text))
        encoding = reply.header("content-encoding").lower()
        assert reply.status == 200 and encoding in accepted(accept or ""), (accept, encoding, reply)
        assert decode(reply.body, encoding) == CASES["json_gzip"].decoded
    assert reply.header("x-sidecar-cache") == "hit" and reply.body == CASES["json_gzip"].decoded


@client_case("a gzip entry served to a gzip client: decodes to the answer")
async def gzip_hit_of_gzip_entry(ctx):
    reply = await gzip_entry_then(ctx, "gzip, deflate")
    assert decode(reply.body, reply.header("content-encoding")) == CASES["json_gzip"].decoded


def sse_events(body: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        fields = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"data" in fields:
            out.append((fields.get(b"event", b"").decode(), orjson.loads(fields[b"data"])))
    return out


@client_case("a streamed request answered from a stored gzip JSON entry: a proper event stream")
async def stream_from_gzip_entry(ctx):
    reply = await gzip_entry_then(ctx, "identity", stream=True)
    assert reply.complete and reply.header("content-type").startswith("text/event-stream"), reply
    events = sse_events(reply.body)
    assert events[-1][0] == "message_stop", events
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert text == TEXT


@client_case("a JSON request answered from a stored stream: the assembled message")
async def json_from_stream_entry(ctx):
    text = f"stream entry {nonce()}"
    first = await ctx.sidecar.call(model_request(ctx.port, "nasty-sse_ok", stream=True, text=text))
    assert first.status == 200 and first.complete, first
    second = await ctx.sidecar.call(model_request(ctx.port, "nasty-sse_ok", text=text))
    assert second.status == 200 and second.header("x-sidecar-cache") in ("hit", "coalesced"), second
    assert second.json()["content"][0]["text"] == TEXT


@client_case("x-sidecar-cache: bypass: the upstream is asked, and never sees the header")
async def bypass_header(ctx):
    data = model_request(ctx.port, "claude-sonnet-4-5")
    await ctx.sidecar.call(data)
    head, sep, body = data.partition(b"\r\n\r\n")
    mark = await ctx.upstream.mark()
    reply = await ctx.sidecar.call(head + b"\r\nx-sidecar-cache: bypass" + sep + body)
    assert reply.status == 200 and reply.header("x-sidecar-cache") == "bypass", reply.headers
    (seen,) = await ctx.upstream.since(mark)
    assert not [k for k, _ in seen["headers"] if k.lower().startswith("x-sidecar")], seen["headers"]


@pytest.mark.parametrize("name", list(CLIENT), ids=list(CLIENT))
async def test_client_case(name: str, sidecar: Sidecar, upstream: Upstream, request) -> None:
    """Each odd client request (see CLIENT: one line each) is served as the issue asks, within the bound."""
    started: list[Sidecar] = []

    def limited() -> Sidecar:
        started.append(request.getfixturevalue("limited"))
        return started[-1]

    doc, run = CLIENT[name]
    try:
        await run(Ctx(sidecar, upstream, limited))
    except AssertionError as exc:
        raise AssertionError(f"{name} ({doc}): {exc}") from None


# ---- the official SDKs ------------------------------------------------------------------------------


async def anthropic_stream(base: str, case: str):
    import anthropic
    async with anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-nasty", max_retries=1, timeout=30) as client:
        stream = await client.messages.create(model=f"nasty-{case}", max_tokens=64, stream=True,
                                              messages=[{"role": "user", "content": f"sdk {case} {nonce()}"}])
        return [event.type async for event in stream]


async def anthropic_stream_helper(base: str, case: str):
    import anthropic
    async with anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-nasty", max_retries=1, timeout=30) as client:
        async with client.messages.stream(model=f"nasty-{case}", max_tokens=64, messages=[
                {"role": "user", "content": f"sdk {case} {nonce()}"}]) as stream:
            return (await stream.get_final_message()).content[0].text


async def anthropic_json(base: str, case: str):
    import anthropic
    async with anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-nasty", max_retries=1, timeout=30) as client:
        message = await client.messages.create(model=f"nasty-{case}", max_tokens=64,
                                               messages=[{"role": "user", "content": f"sdk {case} {nonce()}"}])
        return message.content[0].text


async def openai_stream(base: str, case: str):
    import openai
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-nasty", max_retries=1, timeout=30) as client:
        stream = await client.chat.completions.create(model=f"nasty-{case}", stream=True, messages=[
            {"role": "user", "content": f"sdk {case} {nonce()}"}])
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


SDK = {
    "anthropic_malformed_stream": (anthropic_stream_helper, "sse_message_start_list"),
    "anthropic_message_delta_not_json": (anthropic_stream, "sse_message_delta_not_json"),
    "anthropic_cut_stream": (anthropic_stream, "sse_cut"),
    "anthropic_529_wall": (anthropic_json, "err_529_html"),
    "anthropic_ok_stream": (anthropic_stream_helper, "sse_ok"),
    "openai_keepalive_stream": (openai_stream, "chat_stream_keepalive"),
    "openai_stream_no_done": (openai_stream, "chat_stream_no_done"),
}


async def outcome(call: Awaitable) -> tuple[str, object]:
    try:
        return "ok", await asyncio.wait_for(call, BOUND)
    except TimeoutError:
        return "hang", None
    except Exception as exc:  # the SDK's own exception is an outcome like any other
        return "error", getattr(exc, "status_code", type(exc).__name__)


@pytest.mark.parametrize("name", list(SDK), ids=list(SDK))
async def test_sdk_case(name: str, sidecar: Sidecar, upstream: Upstream) -> None:
    """The official SDK ends within the bound through the sidecar, as it ends without it."""
    func, case = SDK[name]
    direct = await outcome(func(upstream.url, case))
    via = await outcome(func(sidecar.url, case))
    assert via[0] != "hang", f"HANG: the SDK call through the sidecar did not end within {BOUND} s (direct: {direct})"
    assert via[0] == direct[0], f"direct {direct}, through the sidecar {via}"
    if via[0] == "ok" or isinstance(direct[1], int):
        assert via[1] == direct[1], f"direct {direct}, through the sidecar {via}"


# ---- c. after the corpus (last in the file) -------------------------------------------------------------


async def test_after_corpus_sidecar_still_serves(proxy: Sidecar) -> None:
    """The sidecar survived the corpus (never restarted), answers health and a normal call."""
    assert not proxy.deaths, f"CRASHED during the corpus: {proxy.deaths}"
    assert proxy.proc.poll() is None, proxy.log.read_text()[-2000:]
    health = await proxy.call(request_bytes("GET", "/_sidecar/health", [], port=proxy.port), "GET")
    assert health.status == 200, health
    reply = await proxy.call(model_request(proxy.port, "claude-sonnet-4-5"))
    assert reply.status == 200 and reply.json()["type"] == "message", reply
    stream = await proxy.call(model_request(proxy.port, "claude-sonnet-4-5", stream=True))
    assert stream.complete and sse_events(stream.body)[-1][0] == "message_stop", stream


def well_formed(body: bytes, stream: bool) -> bool:
    if stream:
        events = sse_events(body)
        return bool(events) and (events[-1][0] in ("message_stop", "response.completed")
                                 or body.rstrip().endswith(b"data: [DONE]"))
    answer = orjson.loads(body)
    return isinstance(answer, dict) and answer.get("type") != "error" and (
        answer.get("type") == "message" or isinstance(answer.get("choices"), list)
        or answer.get("object") == "response" and answer.get("status") == "completed")


async def test_after_corpus_nothing_malformed_stored(proxy: Sidecar, tmp_path: Path) -> None:
    """Every cache entry is a well-formed, complete 2xx answer: only STORED cases, with the upstream's body."""
    from agent_sidecar.proxy.entry import Entry
    done = proxy.cli("cache", "export", str(tmp_path / "export.jsonl"))
    assert done.returncode == 0, done.stderr
    bad = []
    lines = (tmp_path / "export.jsonl").read_text().splitlines()
    if not lines:
        pytest.skip("the cache is empty: run this after the corpus (the whole file)")
    for line in lines:
        entry = Entry.decode(base64.b64decode(orjson.loads(line)["entry"]))
        model = entry.meta.get("model", "")
        case = ALL.get(model.removeprefix("nasty-")) if model.startswith("nasty-") else None
        try:
            body = decode(entry.body, entry.header("content-encoding"))
        except (OSError, zlib.error, AssertionError) as exc:
            body = exc
        if not 200 <= entry.status < 300:
            bad.append((model, f"status {entry.status}"))
        elif case is not None and case.kind != STORED:
            bad.append((model, f"a {case.kind} answer"))
        elif isinstance(body, Exception):
            bad.append((model, f"a body that does not decode: {body}"))
        elif case is not None and body != (case.decoded or case.answer.body):
            bad.append((model, f"not the upstream's body: {body[:100]!r}"))
        elif case is None and not well_formed(body, entry.stream):
            bad.append((model, f"malformed: {body[:100]!r}"))
    assert not bad, f"STORED MALFORMED OR PARTIAL: {bad}"
