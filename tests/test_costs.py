"""Token truth, dollars and budgets: the official SDKs through the proxy, against the mock's prompt caches.

Every figure is checked exactly: the tokens against the usage block the mock
sent (and the SDK parsed), the dollars against a price worked out here from
genai-prices' table, not by the proxy's code.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timezone
from decimal import Decimal

import anthropic
import openai
import orjson
import pytest
from genai_prices.data_snapshot import get_snapshot

from agent_sidecar.bench.mock_upstream import MockUpstream, Profile
from conftest import unique_prompt, upstream_env
from agent_sidecar.proxy import prices as prices_module
from agent_sidecar.proxy.app import make_app
from agent_sidecar.proxy.call import Call
from agent_sidecar.proxy.state import STATE
from agent_sidecar.proxy.config import ConfigError, budgets, load_layers
from agent_sidecar.proxy.routes import Route

SONNET = "claude-sonnet-4-6"
GPT = "gpt-4o"
KEY = "sk-ant-test"
OPENAI_KEY = "sk-test"
# A system prompt of well over 1024 tokens (the cache minimum) whose last line, like Claude Code's, is the date.
INSTRUCTIONS = "You are a careful coding agent. Follow the rules below exactly.\n" + "".join(
    f"Rule {n}: keep every change small, tested and explained in one short sentence.\n" for n in range(90))


def system(date: str = "2026-12-01", ttl: str = "5m") -> list[dict]:
    return [{"type": "text", "text": INSTRUCTIONS + f"Today's date: {date}.",
             "cache_control": {"type": "ephemeral", "ttl": ttl}}]


@pytest.fixture
def start(start_app, mock: MockUpstream):
    mock.profile = Profile(output_tokens=9)
    return lambda **sections: start_app(mock.url, **sections)


def a_client(base: str, retries: int = 0) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key=KEY, max_retries=retries, timeout=15)


def o_client(base: str, retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=OPENAI_KEY, max_retries=retries, timeout=15)


def price(provider: str, model: str, usage: dict) -> Decimal:
    """Dollars for one usage block, from genai-prices' table: per million tokens, each kind at its own price."""
    _, info = get_snapshot().find_provider_model(model, None, provider, None)
    table = info.get_prices(datetime.now(timezone.utc))

    def per_token(name: str) -> Decimal:
        value = getattr(table, name)
        return Decimal(0) if value is None else getattr(value, "base", value) / 1_000_000   # tiers start at 200k

    if provider == "anthropic":
        written_1h = usage["cache_creation"]["ephemeral_1h_input_tokens"]
        written_5m = usage["cache_creation_input_tokens"] - written_1h
        return (usage["input_tokens"] * per_token("input_mtok") + usage["cache_read_input_tokens"] *
                per_token("cache_read_mtok") + written_5m * per_token("cache_write_mtok") +
                written_1h * per_token("cache_write_1h_mtok") + usage["output_tokens"] * per_token("output_mtok"))
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return ((usage["prompt_tokens"] - cached) * per_token("input_mtok") + cached * per_token("cache_read_mtok") +
            usage["completion_tokens"] * per_token("output_mtok"))


async def stats(px, by: str) -> dict:
    await px.state.records.drain()
    status, _, body = await px.get(f"/_sidecar/stats?since=0&by={by}")
    assert status == 200
    return orjson.loads(body)["summary"]


def user(text: str, mark: bool = False) -> dict:
    block = {"type": "text", "text": text, **({"cache_control": {"type": "ephemeral"}} if mark else {})}
    return {"role": "user", "content": [block]}


async def converse(sdk: anthropic.AsyncAnthropic, turns: list[str], dates: list[str] | None = None,
                   stream_every: int = 2, ttl: str = "5m") -> list:
    """A conversation the way Claude Code holds one: the system prompt and the newest turn marked for caching."""
    messages, answers = [], []
    for n, text in enumerate(turns):
        messages = [*[{**m, "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]]}
                      for m in messages], user(text, mark=True)]
        body = dict(model=SONNET, max_tokens=64, system=system(dates[n] if dates else "2026-12-01", ttl),
                    messages=messages)
        if n % stream_every:
            async with sdk.messages.stream(**body) as stream:
                answer = await stream.get_final_message()
        else:
            answer = await sdk.messages.create(**body)
        answers.append(answer)
        messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer.content[0].text}]}]
    return answers


# ---- token truth and dollars ------------------------------------------------------------------------


async def test_anthropic_session_tokens_and_dollars_are_exact_per_call_and_per_session(start, mock):
    px = await start()
    async with a_client(px.url) as sdk:
        answers = await converse(sdk, ["Plan the change.", "Now write the test.", "Now the code."], ttl="1h")
    records = await px.records()
    assert len(records) == len(mock.sent_usage) == 3
    for record, sent, answer in zip(records, mock.sent_usage, answers):
        assert answer.usage.cache_read_input_tokens == sent["cache_read_input_tokens"]   # what the SDK parsed
        assert answer.usage.cache_creation_input_tokens == sent["cache_creation_input_tokens"]
        assert record["usage"] == sent                                                    # the block, as sent
        assert record["input_tokens"] == (sent["input_tokens"] + sent["cache_read_input_tokens"] +
                                          sent["cache_creation_input_tokens"])
        assert (record["cache_read_tokens"], record["cache_write_tokens"], record["output_tokens"]) == (
            sent["cache_read_input_tokens"], sent["cache_creation_input_tokens"], sent["output_tokens"])
        assert record["cost_usd"] == pytest.approx(float(price("anthropic", SONNET, sent)), abs=1e-9)
    # The first call writes the system prompt and its turn; each later one reads what the previous one left.
    first, second, third = mock.sent_usage
    assert first["cache_read_input_tokens"] == 0 and first["cache_creation_input_tokens"] > 1024
    assert 1024 < first["cache_creation"]["ephemeral_1h_input_tokens"] < first["cache_creation_input_tokens"]
    assert records[0]["cache_write_1h_tokens"] == first["cache_creation"]["ephemeral_1h_input_tokens"]
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert third["cache_read_input_tokens"] == second["cache_read_input_tokens"] + second["cache_creation_input_tokens"]
    assert records[1]["stream"] and not records[0]["stream"]

    [session] = {r["session"] for r in records}
    summary = await stats(px, "session")
    group = summary["groups"][session]
    assert group["calls"] == 3
    assert group["cost_usd"] == pytest.approx(float(sum(price("anthropic", SONNET, s) for s in mock.sent_usage)),
                                              abs=1e-8)
    assert group["cache_read_tokens"] == sum(s["cache_read_input_tokens"] for s in mock.sent_usage)
    assert group["prompt_cache_ratio"] == round(group["cache_read_tokens"] / group["input_tokens"], 4)
    assert group["cost_unknown"] == 0
    assert (await stats(px, "day"))["groups"][datetime.now().strftime("%Y-%m-%d")]["cost_usd"] == group["cost_usd"]


async def test_openai_cached_and_reasoning_tokens_and_dollars_are_exact(start, mock):
    px = await start()
    long = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": "Plan the change."}]
    async with o_client(px.url) as sdk:
        first = await sdk.chat.completions.create(model=GPT, messages=long)
        follow = [*long, {"role": "assistant", "content": first.choices[0].message.content},
                  {"role": "user", "content": "Now write the test."}]
        chunks = [c async for c in await sdk.chat.completions.create(
            model=GPT, messages=follow, stream=True, stream_options={"include_usage": True}, reasoning_effort="low")]
    [usage] = [c.usage for c in chunks if c.usage]
    assert usage.prompt_tokens_details.cached_tokens >= 1024 and usage.completion_tokens_details.reasoning_tokens == 9
    records = await px.records()
    assert [r["usage"] for r in records] == mock.sent_usage
    for record, sent in zip(records, mock.sent_usage):
        assert (record["input_tokens"], record["cache_read_tokens"], record["output_tokens"],
                record["reasoning_tokens"], record["cache_write_tokens"]) == (
            sent["prompt_tokens"], sent["prompt_tokens_details"]["cached_tokens"], sent["completion_tokens"],
            sent["completion_tokens_details"]["reasoning_tokens"], 0)
        assert record["cost_usd"] == pytest.approx(float(price("openai", GPT, sent)), abs=1e-9)
    assert records[0]["cache_read_tokens"] == 0 and records[1]["cache_read_tokens"] == usage.prompt_tokens_details.cached_tokens


async def test_a_cache_hit_costs_nothing_and_saves_what_the_call_cost(start, mock):
    px = await start()
    prompt = [{"role": "user", "content": "the same question twice"}]
    async with a_client(px.url) as sdk:
        await sdk.messages.create(model=SONNET, max_tokens=32, messages=prompt)
        again = await sdk.messages.create(model=SONNET, max_tokens=32, messages=prompt)
    assert len(mock.sent_usage) == 1
    miss, hit = await px.records()
    assert hit["cache"] == "hit" and hit["cost_usd"] == 0.0
    assert hit["saved_usd"] == miss["cost_usd"] == pytest.approx(float(price("anthropic", SONNET, mock.sent_usage[0])))
    assert hit["usage"] == miss["usage"] and again.usage.input_tokens == mock.sent_usage[0]["input_tokens"]
    summary = (await stats(px, "model"))["all"]
    assert summary["cost_usd"] == miss["cost_usd"] and summary["saved_usd"] == miss["cost_usd"]
    status, _, body = await px.get("/_sidecar/metrics")
    text = body.decode()
    assert f"sidecar_cache_saved_usd_total {miss['cost_usd']:.8f}" in text
    assert f'sidecar_cost_usd_total{{agent="default",model="{SONNET}"}} {miss["cost_usd"]:.8f}' in text


async def test_a_model_with_no_known_price_costs_unknown_never_zero(start, mock):
    px = await start()
    async with a_client(px.url) as sdk:
        await sdk.messages.create(model="claude-mock-1", max_tokens=32, messages=unique_prompt())
    [record] = await px.records()
    assert record["input_tokens"] > 0 and record["cost_usd"] is None
    summary = (await stats(px, "model"))["groups"]["claude-mock-1"]
    assert summary["cost_unknown"] == 1 and summary["cost_usd"] == 0
    status, _, body = await px.get("/_sidecar/metrics")
    assert 'sidecar_unpriced_calls_total{agent="default",model="claude-mock-1"} 1' in body.decode()


# ---- the provider's prompt cache ---------------------------------------------------------------------


async def test_a_system_prompt_changed_mid_session_is_a_prompt_cache_regression_naming_the_system(start, mock):
    px = await start()
    async with a_client(px.url) as sdk:
        await converse(sdk, ["Plan the change.", "Now write the test.", "Now the code.", "Now the docs."],
                       dates=["2026-12-01", "2026-12-01", "2026-12-02", "2026-12-02"])
    regressions = [e for e in px.events() if e["kind"] == "prompt_cache_regression"]
    assert len(regressions) == 1, regressions   # the date changed once; the turn after reads again
    [event] = regressions
    third = mock.sent_usage[2]
    assert event["changed"] == "system"
    assert event["cache_read_tokens"] == third["cache_read_input_tokens"] == 0
    assert event["cache_write_tokens"] == third["cache_creation_input_tokens"]
    assert event["cached_before"] == (mock.sent_usage[1]["cache_read_input_tokens"] +
                                      mock.sent_usage[1]["cache_creation_input_tokens"])
    assert event["extra_cost_usd"] > 0
    assert mock.sent_usage[3]["cache_read_input_tokens"] > 0


async def test_a_conversation_that_only_grows_raises_no_regression(start, mock):
    px = await start()
    async with a_client(px.url) as sdk:
        await converse(sdk, [f"Step {n}." for n in range(5)])
    assert not [e for e in px.events() if e["kind"] == "prompt_cache_regression"]
    records = await px.records()
    assert all(r["cache_read_tokens"] > 0 for r in records[1:])


# ---- budgets ---------------------------------------------------------------------------------------


async def test_past_its_budget_a_session_is_refused_once_not_retried_and_hits_still_served(start, mock):
    px = await start(limits={"budget_usd": ["session=0.001"]})
    prompt = [{"role": "user", "content": "How big is the budget?"}]
    async with a_client(px.url, retries=2) as sdk:   # the SDK's default retries
        await sdk.messages.create(model=SONNET, max_tokens=32, system=INSTRUCTIONS, messages=prompt)
        first_cost = float(price("anthropic", SONNET, mock.sent_usage[0]))
        assert first_cost > 0.001
        with pytest.raises(anthropic.APIStatusError) as refused:
            await sdk.messages.create(model=SONNET, max_tokens=32, system=INSTRUCTIONS,
                                      messages=[*prompt, {"role": "assistant", "content": "Small."},
                                                {"role": "user", "content": "And now?"}])
        hit = await sdk.messages.create(model=SONNET, max_tokens=32, system=INSTRUCTIONS, messages=prompt)
    assert refused.value.status_code == 402
    error = refused.value.body["error"]
    assert error["type"] == "billing_error" and error["message"].startswith("sidecar: the session budget of ")
    assert f"${first_cost:.4f} of $0.001" in error["message"] and 'budget_usd "session=..."' in error["message"]
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert hit.content
    assert mock.count("/v1/messages") == 1                  # the refused call never went upstream, nor again
    records = await px.records()
    assert [(r["status"], r["cache"]) for r in records] == [(200, "miss"), (402, "miss"), (200, "hit")]
    kinds = [(e["kind"], e["budget"]) for e in px.events() if e["kind"].startswith("budget_")]
    assert kinds == [("budget_exceeded", f"session budget of {records[0]['session']}")]


async def test_openai_sdk_is_refused_in_its_own_shape_and_does_not_retry(start, mock):
    px = await start(limits={"budget_usd": ["total=0.0001"]})
    async with o_client(px.url, retries=2) as sdk:
        await sdk.chat.completions.create(model=GPT, messages=[{"role": "user", "content": INSTRUCTIONS}])
        with pytest.raises(openai.APIStatusError) as refused:
            await sdk.chat.completions.create(model=GPT, messages=unique_prompt())
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "budget_exceeded" and "total budget" in refused.value.body["message"]
    assert mock.count("/v1/chat/completions") == 1
    assert [r["status"] for r in await px.records()] == [200, 402]


async def test_budget_warning_at_80_percent_then_exceeded(start, mock):
    px = await start(limits={"budget_usd": ["agent=1"]})
    async with a_client(px.agent("spender")) as sdk:
        await sdk.messages.create(model=SONNET, max_tokens=32, messages=unique_prompt())
    cost = (await px.records())[0]["cost_usd"]
    # Spend the rest of the budget in two steps, as two more calls would: 80 % first, then 100 %.
    call = Call(Route("spender", "anthropic", "/v1/messages", ""), "POST")
    px.state.budgets.add(call, 0.8 - cost)
    px.state.budgets.add(call, 0.2)
    kinds = [(e["kind"], e["spent_usd"]) for e in px.events() if e["kind"].startswith("budget_")]
    assert kinds == [("budget_warning", pytest.approx(0.8)), ("budget_exceeded", pytest.approx(1.0))]


async def test_a_broken_budget_stage_fails_open(start, mock, monkeypatch):
    px = await start(limits={"budget_usd": ["total=0.000001"]})

    def broken(call):
        raise RuntimeError("budget table broken")

    monkeypatch.setattr(px.state.budgets, "check", broken)
    async with a_client(px.url) as sdk:
        for _ in range(2):
            await sdk.messages.create(model=SONNET, max_tokens=32, messages=unique_prompt())
    assert mock.count("/v1/messages") == 2
    assert any(e["kind"] == "sidecar_fault" and e["stage"] == "budget" for e in px.events())


def test_budget_settings_are_checked(tmp_path):
    for bad in (["week=3"], ["day=0"], ["day=x"], ["day"], ["session=nan"]):
        with pytest.raises(ConfigError, match="budget_usd"):
            load_layers([{"limits": {"budget_usd": bad}}], ["test"])
    config = load_layers([{"limits": {"budget_usd": ["day=20", "session=2.5"]}}], ["test"])
    assert budgets(config.limits) == {"day": 20.0, "session": 2.5}


async def test_a_day_budget_counts_what_earlier_sidecars_spent_today(start_app, mock, tmp_path):
    state = tmp_path / "shared-state"
    layer = {"state": {"dir": str(state)}, "limits": {"budget_usd": ["day=0.001"]}}
    first = await start_app(mock.url, **layer)
    async with a_client(first.url) as sdk:
        await sdk.messages.create(model=SONNET, max_tokens=32, system=INSTRUCTIONS, messages=unique_prompt())
    await first.server.close()                       # its records are on disk
    second = await start_app(mock.url, **layer)      # a new sidecar, the same state directory, the same day
    async with a_client(second.url) as sdk:
        with pytest.raises(anthropic.APIStatusError, match="day budget of "):
            await sdk.messages.create(model=SONNET, max_tokens=32, messages=unique_prompt())
    assert mock.count("/v1/messages") == 1


# ---- where the figures show ---------------------------------------------------------------------------

AGENT = r'''
import anthropic
client = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0, timeout=20)
ask = dict(model="claude-sonnet-4-6", max_tokens=32, messages=[{"role": "user", "content": "Name a river."}])
client.messages.create(**ask)
client.messages.create(**ask)          # the same call again: from the cache
'''


async def test_exit_summary_stats_table_and_top_show_the_dollars(sidecar, script, mock):
    done = await sidecar.run("run", "--", sys.executable, str(script(AGENT)), env=upstream_env(mock))
    assert done.returncode == 0, done.err
    cost = f"${float(price('anthropic', SONNET, mock.sent_usage[0])):.4f}"
    assert f"sidecar: spent {cost}, cache saved {cost}; prompt cache read/write 0/0 tokens" in done.err, done.err
    table = await sidecar.run("stats", "--by", "session")
    [row] = [line for line in table.out.splitlines() if line.startswith("r")]
    assert row.split()[1:3] == ["2", "50"] and cost in row.split()   # spent once, saved once

    server = await sidecar.spawn("serve", env=upstream_env(mock))
    banner = await asyncio.wait_for(server.stderr.readline(), 20)
    url = banner.decode().split("serving on ")[1].split(" ")[0]
    async with a_client(url) as sdk:
        await sdk.messages.create(model=SONNET, max_tokens=32, messages=[{"role": "user", "content": "Hi there."}])
    top = await sidecar.run("top", "--once", "--url", url)
    cost = f"${float(price('anthropic', SONNET, mock.sent_usage[-1])):.4f}"
    assert f"spent {cost}  cache saved $0.0000" in top.out, top.out
    assert cost in next(line for line in top.out.splitlines() if line.startswith(SONNET)).split()
    session = next(line for line in top.out.splitlines() if line.startswith("SESSION"))
    assert "COST" in session and "PC HIT%" in session


async def test_the_proxy_serves_while_the_price_table_loads_and_prices_those_calls_after(aiohttp_server, mock,
                                                                                     tmp_path, monkeypatch):
    loaded = asyncio.Event()
    real = prices_module._load

    def slow_load():
        asyncio.run_coroutine_threadsafe(loaded.wait(), loop).result(10)   # held until the call has ended
        return real()

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(prices_module, "_load", slow_load)
    app = make_app(load_layers([{"upstream": {"anthropic": mock.url}, "state": {"dir": str(tmp_path / "s")}}],
                               ["test"]))
    server = await aiohttp_server(app, access_log=None)
    async with a_client(f"http://127.0.0.1:{server.port}") as sdk:
        await sdk.messages.create(model=SONNET, max_tokens=32, messages=unique_prompt())
    state = app[STATE]
    assert not state.priced.done() and not state.stats.recent   # served; its record waits for the prices
    loaded.set()
    await state.settled()
    [record] = state.stats.recent
    assert record["cost_usd"] == pytest.approx(float(price("anthropic", SONNET, mock.sent_usage[0])), abs=1e-9)


async def test_a_stream_that_reports_no_usage_costs_unknown(start, mock):
    px = await start()
    async with o_client(px.url) as sdk:
        chunks = [c async for c in await sdk.chat.completions.create(model=GPT, messages=unique_prompt(), stream=True)]
        await sdk.embeddings.create(model="text-embedding-3-small", input="priced from its usage")
    assert not any(c.usage for c in chunks)               # no stream_options.include_usage: no usage sent
    stream, embedding = await px.records()
    assert stream["cost_usd"] is None and stream["input_tokens"] == 0
    assert embedding["input_tokens"] > 0 and embedding["cost_usd"] > 0
