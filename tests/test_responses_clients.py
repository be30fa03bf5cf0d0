"""Real Responses API clients through `sidecar run`: the openai SDK's `responses.create` (JSON and
stream) and `responses.stream()`, and the OpenAI Agents SDK with a function tool (its default model
settings, which use the Responses API), each a child process against the mock.

For each: the output of `sidecar run -- python agent.py` is the output of a direct run; the first run's
calls went through the sidecar (its records count them, as misses) and reached the mock; a second
identical run is answered from the cache and sends the mock nothing. The wall times of the three runs
are printed (`pytest -s`), not asserted.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from conftest import upstream_env

PY = sys.executable
MODEL = "gpt-mock-1"
TOOLS = '''[{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                         "additionalProperties": False}, "strict": True}]'''
HEAD = f'''
import openai
client = openai.OpenAI(api_key="sk-test", max_retries=0, timeout=30)   # base URL from OPENAI_BASE_URL
MODEL = "{MODEL}"
TOOLS = {TOOLS}
'''

# Each prints what the agent learnt (never an id: a direct run and a sidecar run get different ones).
CREATE_JSON = HEAD + '''
first = client.responses.create(model=MODEL, instructions="Be brief.", input="Tell me about rivers.")
print("text:", first.output_text, first.usage.input_tokens, first.usage.output_tokens)
call = client.responses.create(model=MODEL, input="Please use a tool for Paris.", tools=TOOLS,
                               previous_response_id=first.id)
tool = call.output[0]
print("call:", tool.type, tool.name, tool.arguments)
done = client.responses.create(model=MODEL, tools=TOOLS, previous_response_id=call.id, input=[
    {"type": "function_call_output", "call_id": tool.call_id, "output": "sunny"}])
print("chain:", done.output_text, done.usage.input_tokens_details.cached_tokens)
'''

CREATE_STREAM = HEAD + '''
events = client.responses.create(model=MODEL, input="Tell me about lakes.", stream=True)
kinds, text, final = [], "", None
for event in events:
    kinds.append(event.type)
    if event.type == "response.output_text.delta":
        text += event.delta
    if event.type == "response.completed":
        final = event.response
print("events:", kinds)
print("text:", text == final.output_text, text, final.usage.output_tokens)
events = client.responses.create(model=MODEL, input="Please use a tool for Rome.", tools=TOOLS, stream=True,
                                 previous_response_id=final.id)
arguments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
print("arguments:", arguments)
'''

STREAM_HELPER = HEAD + '''
with client.responses.stream(model=MODEL, input="Please use a tool for Oslo.", tools=TOOLS) as stream:
    deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
    call = stream.get_final_response().output[0]
print("call:", call.name, call.arguments, "".join(deltas) == call.arguments)
follow = [{"role": "user", "content": "Please use a tool for Oslo."}, call.model_dump(exclude_none=True),
          {"type": "function_call_output", "call_id": call.call_id, "output": "cold"}]
with client.responses.stream(model=MODEL, input=follow, tools=TOOLS) as stream:
    text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
print("text:", text, text == final.output_text, final.status)
'''

AGENTS_SDK = '''
from agents import Agent, Runner, function_tool


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"It is sunny in {city}."


agent = Agent(name="weather", instructions="You answer questions about the weather.", tools=[get_weather])
result = Runner.run_sync(agent, "Please use a tool to tell me the weather in Paris.")
for item in result.new_items:
    raw = item.raw_item
    print(item.type, getattr(raw, "name", None), getattr(raw, "arguments", None),
          raw.get("output") if isinstance(raw, dict) else None)
print("final:", result.final_output)
usage = result.context_wrapper.usage
print("usage:", usage.requests, usage.input_tokens, usage.output_tokens)
'''

CLIENTS = {"responses.create json": (CREATE_JSON, 3), "responses.create stream": (CREATE_STREAM, 2),
           "responses.stream()": (STREAM_HELPER, 2), "agents sdk": (AGENTS_SDK, 2)}


def client_env(mock) -> dict[str, str]:
    # The Agents SDK posts traces to a fixed api.openai.com address, not through the base URL: off.
    return {**upstream_env(mock), "OPENAI_API_KEY": "sk-test", "OPENAI_AGENTS_DISABLE_TRACING": "1"}


async def stats(sidecar) -> dict:
    done = await sidecar.run("stats", "--json", "--by", "route")
    assert done.returncode == 0, done.err
    return json.loads(done.out)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", CLIENTS)
async def test_client_through_sidecar_matches_direct_and_reruns_from_the_cache(name, sidecar, script, mock):
    source, calls = CLIENTS[name]
    agent = script(source)
    env = client_env(mock)
    times = []

    async def timed(run):
        start = time.monotonic()
        done = await run
        times.append(time.monotonic() - start)
        assert done.returncode == 0, done.err
        return done

    direct = await timed(sidecar.python(agent, env=env, timeout=240))
    assert mock.count("/v1/responses") == calls and mock.count() == calls

    first = await timed(sidecar.run("run", "--quiet", "--", PY, str(agent), env=env, timeout=240))
    assert first.out == direct.out and first.err == ""
    assert mock.count() == 2 * calls   # the first run reached the mock ...
    through = await stats(sidecar)     # ... through the sidecar, which recorded every call
    assert through["groups"]["/v1/responses"]["calls"] == calls and through["all"]["hits"] == 0

    second = await timed(sidecar.run("run", "--quiet", "--", PY, str(agent), env=env, timeout=240))
    assert second.out == direct.out and second.err == ""
    assert mock.count() == 2 * calls   # the second run sent the mock nothing
    again = await stats(sidecar)
    assert again["groups"]["/v1/responses"]["calls"] == 2 * calls and again["all"]["hits"] == calls
    print(f"\n{name}: {calls} calls; mock requests direct {calls}, first run {calls}, second run 0; "
          f"wall direct {times[0]:.2f} s, first {times[1]:.2f} s, second {times[2]:.2f} s")
