"""A refused upstream fails at once, clearly: one API-shaped 502 naming the URL and the setting to fix, an
`upstream_unreachable` event, no retries by the sidecar nor (told by `x-should-retry: false`) by the SDK.
Timeouts and 5xx answers keep their retries (test_limits, test_proxy)."""

from __future__ import annotations

import errno
import socket

import aiohttp
import anthropic
import openai
import pytest

from agent_sidecar.bench.mock_upstream import MockUpstream
from agent_sidecar.proxy.errors import from_library

MODEL = "claude-mock-1"
PROMPT = [{"role": "user", "content": "Say something about the sea."}]


@pytest.fixture
def refused():
    """A port that is bound and never listens: every connection to it is refused."""
    placeholder = socket.socket()
    placeholder.bind(("127.0.0.1", 0))
    yield placeholder
    placeholder.close()


async def test_a_refused_upstream_fails_once_with_the_url_and_the_setting(refused, start_app):
    dead = f"http://127.0.0.1:{refused.getsockname()[1]}"
    proxy = await start_app(dead)   # the default [retry]: 6 attempts, which a refused connect must not take
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-ant-test", timeout=30) as client:
        with pytest.raises(anthropic.InternalServerError) as info:   # the SDK's default 2 retries are on
            await client.messages.create(model=MODEL, max_tokens=8, messages=PROMPT)
    assert info.value.status_code == 502
    assert info.value.response.headers["x-should-retry"] == "false"
    message = info.value.body["error"]["message"]
    assert message.startswith(f"sidecar: upstream {dead} is unreachable: connection refused; fix [upstream] "
                              f"anthropic (or ANTHROPIC_BASE_URL"), message
    assert "ssl:default" not in message
    records = await proxy.records()
    assert [(r["error"], r["retries"]) for r in records] == [("upstream_unreachable", 0)]   # one call, one try
    kinds = [(e["kind"], e["state"]) for e in proxy.events()]
    assert ("upstream_unreachable", "raised") in kinds and ("slow_response", "raised") not in kinds
    raised = next(e for e in proxy.events() if e["kind"] == "upstream_unreachable")
    assert raised["upstream"] == dead and raised["api"] == "anthropic"

    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", timeout=30) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert info.value.code == "upstream_unreachable"
    assert "fix [upstream] openai (or OPENAI_BASE_URL" in info.value.body["message"]
    assert len(await proxy.records()) == 2

    port = refused.getsockname()[1]
    refused.close()
    revived = MockUpstream()
    await revived.start("127.0.0.1", port)
    try:   # the upstream is back: the call goes through and the event clears
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-ant-test", timeout=30) as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=PROMPT)
    finally:
        await revived.stop()
    assert ("upstream_unreachable", "cleared") in [(e["kind"], e["state"]) for e in proxy.events()]


class Key:
    ssl = None
    host, port = "api.example", 443


def test_which_connect_failures_are_final():
    """Refused, no route, no such host: final. A reset, a timeout, a TLS failure: the usual way."""
    from yarl import URL
    url = URL("http://127.0.0.1:9/v1/messages")
    refused = aiohttp.ClientConnectorError(Key(), OSError(errno.ECONNREFUSED, "Connect call failed"))
    no_route = aiohttp.ClientConnectorError(Key(), OSError(errno.EHOSTUNREACH, "No route to host"))
    no_host = aiohttp.ClientConnectorDNSError(Key(), socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    reset = aiohttp.ClientConnectorError(Key(), OSError(errno.ECONNRESET, "Connection reset by peer"))
    assert from_library(refused, url, "anthropic").kind == "upstream_unreachable"
    assert from_library(no_route, url, "openai").kind == "upstream_unreachable"
    assert "does not resolve (Name or service not known)" in from_library(no_host, url, "anthropic").message
    assert from_library(reset, url, "anthropic").kind == "bad_gateway"
    assert from_library(aiohttp.ServerDisconnectedError(), url).kind == "bad_gateway"
    assert from_library(TimeoutError(), url).kind == "timeout"
