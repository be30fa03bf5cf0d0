"""Agent-shaped load jobs, run in the load process (`python -m bench.load`).

session: a scripted multi-turn agent; each turn resends the conversation so
far, previous answers included, as raw SDK-shaped POSTs (streamed).
storm: N concurrent agents, each its own `anthropic.AsyncAnthropic` with the
SDK's own retries, M calls each.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from .load import HEADERS, MODEL, Tally, _ms, _one, _session


def _parse_sse(data: bytes) -> tuple[str, int, int]:
    """(text, input tokens, output tokens) of an Anthropic event stream."""
    text, tokens_in, tokens_out = [], 0, 0
    for block in data.split(b"\n\n"):
        for line in block.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            event = orjson.loads(line[6:])
            kind = event.get("type")
            if kind == "message_start":
                tokens_in = event["message"]["usage"].get("input_tokens", 0)
            elif kind == "content_block_delta" and event["delta"].get("type") == "text_delta":
                text.append(event["delta"]["text"])
            elif kind == "message_delta":
                tokens_out = event.get("usage", {}).get("output_tokens", 0)
    return "".join(text), tokens_in, tokens_out


async def session(url: str, turns: int, session_id: str, max_tokens: int = 256, stream: bool = True) -> dict:
    """A scripted agent: each turn sends the whole conversation so far, answers included."""
    http = _session(url)
    tally = Tally()
    system = "You are a coding agent. Fix the failing test in the repository, one step at a time."
    messages = [{"role": "user", "content": "The test tests/test_parser.py::test_dates fails. Fix it."}]
    spent_upstream = spent = 0
    t0 = time.perf_counter()
    for turn in range(turns):
        body = orjson.dumps({"model": MODEL, "max_tokens": max_tokens, "system": system, "messages": messages,
                             "metadata": {"user_id": f"user_bench_session_{session_id}"}, "stream": stream})
        before = dict(tally.cache)
        data = await _one(http, url, body, stream, tally)
        if data is None:
            break
        if stream:
            text, tokens_in, tokens_out = _parse_sse(data)
        else:
            message = orjson.loads(data)
            text = "".join(b.get("text", "") for b in message["content"])
            tokens_in, tokens_out = message["usage"]["input_tokens"], message["usage"]["output_tokens"]
        spent += tokens_in + tokens_out
        if tally.cache.get("hit", 0) == before.get("hit", 0):
            spent_upstream += tokens_in + tokens_out
        messages.append({"role": "assistant", "content": text})
        first = text.split()[0] if text else "nothing"
        messages.append({"role": "user", "content": f"Tool output of step {turn + 1}: ran `{first}`; "
                                                    f"3 tests still fail. Continue."})
    result = tally.result(time.perf_counter() - t0)
    result.update(turns=turns, tokens=spent, tokens_upstream=spent_upstream)
    return result


async def storm(url: str, agents: int, calls: int, max_retries: int = 2, tag: str = "storm",
                max_tokens: int = 256) -> dict:
    """`agents` concurrent clients (each its own anthropic.AsyncAnthropic), `calls` calls each."""
    import anthropic   # no proxies: the orchestrator starts this process without *_proxy variables
    tally = Tally()

    # The agents exist before the storm starts (building a client takes ~20 ms of CPU: not timed).
    clients = [anthropic.AsyncAnthropic(base_url=url, api_key=HEADERS["x-api-key"], max_retries=max_retries)
               for _ in range(agents)]

    async def agent(a: int) -> None:
        async with clients[a] as client:
            for c in range(calls):
                t0 = time.perf_counter()
                try:
                    await client.messages.create(model=MODEL, max_tokens=max_tokens, messages=[
                        {"role": "user", "content": f"{tag} agent {a} call {c}: next step?"}])
                except anthropic.APIStatusError as exc:
                    tally.count(tally.errors, f"http_{exc.status_code}")
                    tally.count(tally.status, str(exc.status_code))
                except Exception as exc:   # connection errors, timeouts: counted by kind
                    tally.count(tally.errors, type(exc).__name__)
                else:
                    tally.ok += 1
                    tally.count(tally.status, "200")
                    tally.latency.append(_ms(time.perf_counter(), t0))

    t0 = time.perf_counter()
    await asyncio.gather(*(agent(a) for a in range(agents)))
    return tally.result(time.perf_counter() - t0)
