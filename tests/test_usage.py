"""proxy/usage.py alone: the four APIs' usage blocks, as their documentation shows them, in one shape."""

from __future__ import annotations

import pytest

from agent_sidecar.proxy.prompt_cache import PromptCacheWatch
from agent_sidecar.proxy.call import Call
from agent_sidecar.proxy.routes import Route
from agent_sidecar.proxy.usage import Usage, flavor_of, from_meta, merge, of_answer, usage_of

ANTHROPIC = {"input_tokens": 50, "cache_creation_input_tokens": 2000, "cache_read_input_tokens": 30000,
             "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 500},
             "output_tokens": 503, "service_tier": "standard"}
CHAT = {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0}}
RESPONSES = {"input_tokens": 328, "input_tokens_details": {"cached_tokens": 128}, "output_tokens": 52,
             "output_tokens_details": {"reasoning_tokens": 20}, "total_tokens": 380}
GEMINI = {"promptTokenCount": 4200, "cachedContentTokenCount": 4096, "candidatesTokenCount": 80,
          "thoughtsTokenCount": 120, "totalTokenCount": 4400}


@pytest.mark.parametrize("flavor, block, counts", [
    ("anthropic", ANTHROPIC, (32050, 503, 30000, 2000, 500, 0)),
    ("chat", CHAT, (2006, 300, 1920, 0, 0, 256)),
    ("responses", RESPONSES, (328, 52, 128, 0, 0, 20)),
    ("gemini", GEMINI, (4200, 200, 4096, 0, 0, 120)),
])
def test_each_api_usage_in_one_shape(flavor, block, counts):
    usage = usage_of(flavor, block)
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens,
            usage.cache_write_1h_tokens, usage.reasoning_tokens) == counts
    assert usage.raw is block and usage.writes_reported is (flavor == "anthropic")
    key = {"gemini": "usageMetadata"}.get(flavor, "usage")
    assert of_answer(flavor, {key: block}) == usage


@pytest.mark.parametrize("api, path, flavor", [
    ("anthropic", "/v1/messages", "anthropic"), ("openai", "/v1/chat/completions", "chat"),
    ("openai", "/v1/responses", "responses"), ("gemini", "/v1beta/models/gemini-2.5-pro:generateContent", "gemini"),
    ("anthropic", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", "gemini"),
])
def test_the_flavor_of_a_route(api, path, flavor):
    assert flavor_of(api, path) == flavor


def test_a_stream_usage_is_merged_as_the_sdk_merges_it():
    start = {"input_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0,
             "output_tokens": 1}
    block = merge(None, start)
    assert block is not start
    block = merge(block, {"output_tokens": 42, "input_tokens": None})
    assert usage_of("anthropic", block).output_tokens == 42 and block["input_tokens"] == 5


def test_odd_counts_count_as_zero_and_other_blocks_are_none():
    usage = usage_of("chat", {"prompt_tokens": "12", "completion_tokens": -1,
                              "prompt_tokens_details": {"cached_tokens": True}})
    assert usage.tokens == 0 and usage.cache_read_tokens == 0
    assert usage_of("chat", None) is None and of_answer("gemini", []) is None


def test_a_stored_entry_reports_the_usage_it_was_stored_with():
    assert from_meta({"flavor": "anthropic", "usage": ANTHROPIC}) == usage_of("anthropic", ANTHROPIC)
    old = from_meta({"input_tokens": 7, "output_tokens": 3})   # an entry from before the block was kept
    assert (old.input_tokens, old.output_tokens, old.raw) == (7, 3, None)


def watch_call(usage: Usage, session: str = "s1") -> Call:
    call = Call(Route("a", "anthropic", "/v1/messages", ""), "POST")
    call.json, call.session, call.status, call.usage = {"model": "m"}, session, 200, usage
    return call


def anthropic(read: int, write: int) -> Usage:
    return usage_of("anthropic", {"input_tokens": 10, "cache_read_input_tokens": read,
                                  "cache_creation_input_tokens": write, "output_tokens": 5})


def openai(prompt: int, cached: int) -> Usage:
    return usage_of("chat", {"prompt_tokens": prompt, "completion_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": cached}})


@pytest.mark.parametrize("calls, fires", [
    ([anthropic(0, 5000), anthropic(5000, 200), anthropic(5200, 300)], False),    # a conversation that grows
    ([anthropic(0, 5000), anthropic(0, 5200)], True),                              # the prefix was written again
    ([anthropic(0, 5000), anthropic(3000, 2200)], False),                          # most of it was still read
    ([anthropic(0, 500), anthropic(0, 700)], False),                               # too short to be cached
    ([openai(3000, 0), openai(3200, 0)], False),                                   # not known to cache at all
    ([openai(3000, 0), openai(3200, 2944), openai(3400, 0)], True),                # it did, then it did not
])
def test_a_regression_is_a_prefix_written_again(calls, fires):
    events = []
    watch = PromptCacheWatch(events.append, lambda call, usage: 0.0)
    for usage in calls:
        watch.observe(watch_call(usage))
    assert bool(events) is fires
