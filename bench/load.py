"""The load generator: its own process, so its CPU never counts as the sidecar's.

Requests are raw aiohttp POSTs shaped exactly like the official SDK's
(`POST /v1/messages`, JSON body with model, max_tokens, messages; headers
`x-api-key`, `anthropic-version: 2023-06-01`, `content-type: application/json`),
except the storm job (bench.agents), which uses `anthropic.AsyncAnthropic`
itself (its own retries). Every job prints one JSON line of results.

    python -m bench.load --url http://127.0.0.1:9000 --n 200 --concurrency 8 [--stream] [--same]
    python -m bench.load --serve      # one JSON job per stdin line, one JSON result per stdout line

Jobs (see `run_job`): raw (latency, first byte, first SSE event, first token,
statuses, errors, x-sidecar-cache outcomes); session and storm are in
bench/agents.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp
import orjson

MODEL = "claude-sonnet-4-5"
HEADERS = {"x-api-key": "sk-ant-bench-0000", "anthropic-version": "2023-06-01",
           "content-type": "application/json"}
_sessions: dict[str, aiohttp.ClientSession] = {}   # one keep-alive pool per base URL, across jobs


def _session(url: str) -> aiohttp.ClientSession:
    if url not in _sessions or _sessions[url].closed:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        _sessions[url] = aiohttp.ClientSession(connector=connector, trust_env=False,
                                               timeout=aiohttp.ClientTimeout(total=300))
    return _sessions[url]


def _body(content: str, max_tokens: int, stream: bool, **extra) -> bytes:
    body = {"model": MODEL, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}], **extra}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def _ms(t: float, t0: float) -> float:
    return round((t - t0) * 1000, 4)


class Tally:
    """Per-request figures and counts of one job."""

    def __init__(self):
        self.latency, self.head, self.first_event, self.first_token = [], [], [], []
        self.status, self.cache, self.errors = {}, {}, {}
        self.bytes = self.ok = 0

    def count(self, table: dict, key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def result(self, wall: float) -> dict:
        return {"ok": self.ok, "wall_s": round(wall, 6), "rps": self.ok / wall if wall > 0 else 0.0,
                "latency_ms": self.latency, "head_ms": self.head, "first_event_ms": self.first_event,
                "first_token_ms": self.first_token, "status": self.status, "cache": self.cache,
                "errors": self.errors, "avg_bytes": self.bytes / self.ok if self.ok else 0}


async def _one(http: aiohttp.ClientSession, url: str, body: bytes, stream: bool, tally: Tally) -> bytes | None:
    t0 = time.perf_counter()
    try:
        async with http.post(url + "/v1/messages", data=body, headers=HEADERS) as resp:
            t_head = time.perf_counter()
            tally.count(tally.status, str(resp.status))
            tally.count(tally.cache, resp.headers.get("x-sidecar-cache", "none"))
            if not stream:
                data = await resp.read()
            else:
                parts, t_event, t_token = [], None, None
                async for chunk in resp.content.iter_any():
                    parts.append(chunk)
                    now = time.perf_counter()
                    if t_event is None and b"\n\n" in chunk:
                        t_event = now
                    if t_token is None and b"content_block_delta" in chunk:
                        t_token = now
                data = b"".join(parts)
            t_end = time.perf_counter()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        tally.count(tally.errors, type(exc).__name__)
        return None
    if resp.status != 200:
        tally.count(tally.errors, f"http_{resp.status}")
        return None
    if stream and b"message_stop" not in data or not stream and b'"type":"message"' not in data:
        tally.count(tally.errors, "incomplete_answer")
        return None
    tally.ok += 1
    tally.bytes += len(data)
    tally.latency.append(_ms(t_end, t0))
    tally.head.append(_ms(t_head, t0))
    if stream:
        tally.first_event.append(_ms(t_event or t_end, t0))
        tally.first_token.append(_ms(t_token or t_end, t0))
    return data


async def raw(url: str, n: int, concurrency: int, stream: bool = False, same: bool = False,
              tag: str = "bench", max_tokens: int = 1024) -> dict:
    """n requests, `concurrency` at a time; unique bodies (a counter) unless `same`."""
    http = _session(url)
    tally = Tally()
    bodies = [_body(f"{tag}: the same question" if same else f"{tag} #{i}: summarise the build log",
                    max_tokens, stream) for i in range(n)]
    it = iter(bodies)

    async def worker() -> None:
        for body in it:
            await _one(http, url, body, stream, tally)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))
    return tally.result(time.perf_counter() - t0)


def _agent_jobs() -> dict:
    from .agents import session, storm   # agent-shaped jobs: a scripted session, a storm with the SDK
    from .conversation import conversation   # Claude-Code-shaped conversations growing to megabytes
    return {"session": session, "storm": storm, "conversation": conversation}


async def run_job(job: dict) -> dict:
    job = dict(job)
    kind = job.pop("kind", "raw")
    if kind == "ping":
        return {"pong": True}
    try:
        jobs = {"raw": raw} if kind == "raw" else _agent_jobs()
        return await jobs[kind](**job)
    except Exception as exc:  # reported, never fatal: the orchestrator decides
        return {"fatal": f"{type(exc).__name__}: {exc}"}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            result = await run_job(orjson.loads(line))
            sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
            sys.stdout.buffer.flush()
    finally:
        await _close()


async def _close() -> None:
    for http in _sessions.values():
        await http.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    p.add_argument("--serve", action="store_true", help="read JSON jobs from stdin, one per line")
    p.add_argument("--url", help="base URL (the mock or the sidecar)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--same", action="store_true", help="repeat one request (cache hits) instead of unique ones")
    p.add_argument("--tag", default="bench")
    a = p.parse_args(argv)
    if not a.serve and not a.url:
        p.error("--url is required unless --serve")

    async def once() -> None:
        job = {"kind": "raw", "url": a.url, "n": a.n, "concurrency": a.concurrency, "stream": a.stream,
               "same": a.same, "tag": a.tag}
        try:
            print(orjson.dumps(await run_job(job)).decode())
        finally:
            await _close()

    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve() if a.serve else once())


if __name__ == "__main__":
    from agent_sidecar.bench import load   # run as the imported module, whose state bench.agents shares
    load.main()
