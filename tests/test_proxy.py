"""The proxy in-process, driven by the official async SDKs and raw HTTP, in front of the mock API."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import time

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from agent_sidecar.bench.mock_upstream import MockUpstream

ANTHROPIC_MODEL = "claude-mock-1"  # not in the SDK's deprecation list
OPENAI_MODEL = "gpt-4o-mini"
PROMPT = [{"role": "user", "content": "Say something about the sea."}]
ANTHROPIC_HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
OPENAI_HEADERS = {"authorization": "Bearer sk-test"}
PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
HEADERS = {"anthropic": ANTHROPIC_HEADERS, "openai": OPENAI_HEADERS}
GOOD = {"anthropic": {"model": ANTHROPIC_MODEL, "max_tokens": 32, "messages": PROMPT},
        "openai": {"model": OPENAI_MODEL, "messages": PROMPT}}


def anthropic_client(base: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-test", max_retries=0, timeout=10)


def openai_client(base: str) -> openai.AsyncOpenAI:
    """`base` as OPENAI_BASE_URL is set: ending in /v1."""
    return openai.AsyncOpenAI(base_url=base, api_key="sk-test", max_retries=0, timeout=10)


async def post(url: str, api: str, body: bytes | dict, **kw) -> tuple[int, dict, object]:
    data = orjson.dumps(body) if isinstance(body, dict) else body
    headers = {**HEADERS[api], "content-type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + PATHS[api], data=data, headers=headers, **kw) as resp:
            return resp.status, orjson.loads(await resp.read()), resp.headers


async def assert_serves(url: str, api: str) -> None:
    status, body, _ = await post(url, api, GOOD[api])
    assert status == 200, body
    text = body["content"][0]["text"] if api == "anthropic" else body["choices"][0]["message"]["content"]
    assert text


def error_message(api: str, body: dict, anthropic_type: str, openai_type: str) -> str:
    """Check the API's own error shape; return its message."""
    if api == "anthropic":
        assert body["type"] == "error"
        assert body["error"]["type"] == anthropic_type
        return body["error"]["message"]
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert body["error"]["type"] == openai_type
    return body["error"]["message"]


# ---- round trips ---------------------------------------------------------------------


async def anthropic_json(base: str) -> dict:
    async with anthropic_client(base) as client:
        message = await client.messages.create(model=ANTHROPIC_MODEL, max_tokens=64, messages=PROMPT)
    return message.model_dump(exclude={"id"})


async def openai_json(base: str) -> dict:
    async with openai_client(base) as client:
        completion = await client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT)
    return completion.model_dump(exclude={"id", "created"})


async def anthropic_stream(base: str) -> list[dict]:
    async with anthropic_client(base) as client:
        async with await client.messages.create(model=ANTHROPIC_MODEL, max_tokens=64, messages=PROMPT,
                                                stream=True) as stream:
            return [e.model_dump(exclude={"message": {"id"}}) async for e in stream]


async def openai_stream(base: str) -> list[dict]:
    async with openai_client(base) as client:
        async with await client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT, stream=True,
                                                        stream_options={"include_usage": True}) as stream:
            return [c.model_dump(exclude={"id", "created"}) async for c in stream]


@pytest.mark.parametrize("ask, api", [(anthropic_json, "anthropic"), (openai_json, "openai"),
                                      (anthropic_stream, "anthropic"), (openai_stream, "openai")],
                         ids=["anthropic-json", "openai-json", "anthropic-stream", "openai-stream"])
async def test_round_trip_matches_direct(proxy_url, mock, ask, api):
    suffix = "/v1" if api == "openai" else ""
    direct = await ask(mock.url + suffix)
    proxied = await ask(proxy_url + suffix)
    assert proxied == direct
    assert len(direct) > 3  # a real answer, not two empty ones
    assert mock.count(PATHS[api]) == 2
    assert [r.path for r in mock.received] == [PATHS[api]] * 2


# ---- headers ---------------------------------------------------------------------------

END_TO_END = {"x-api-key": "sk-ant-secret", "authorization": "Bearer sk-secret",
              "anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024-04-04,prompt-caching-2024-07-31",
              "x-custom-header": "custom value 42"}
HOP_BY_HOP = {"connection": "keep-alive, x-drop-me", "x-drop-me": "1", "te": "trailers",
              "proxy-authorization": "Basic dXNlcjpwYXNz"}


async def test_end_to_end_headers_pass_and_hop_by_hop_do_not(proxy_url, mock):
    async with aiohttp.ClientSession() as session:
        for base in (mock.url, proxy_url):
            async with session.post(base + "/v1/messages", json=GOOD["anthropic"],
                                    headers={**END_TO_END, **HOP_BY_HOP}) as resp:
                assert resp.status == 200, await resp.text()
    direct, proxied = (r.headers for r in mock.received)
    # The client really sent them all (else the check below proves nothing).
    for name, value in {**END_TO_END, **HOP_BY_HOP}.items():
        assert direct[name] == value
    for name, value in END_TO_END.items():
        assert proxied.get(name) == value, name
    for name in ("x-drop-me", "te", "proxy-authorization"):
        assert name not in proxied, name
    assert "x-drop-me" not in proxied.get("connection", "")


async def test_gzip_answer_passes_compressed_with_correct_length(aiohttp_server, start_proxy):
    message = {"id": "msg_01gz", "type": "message", "role": "assistant", "model": ANTHROPIC_MODEL,
               "content": [{"type": "text", "text": "squeezed " * 200}], "stop_reason": "end_turn",
               "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 200}}
    compressed = gzip.compress(orjson.dumps(message))
    asked: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        asked.append(request.headers.get("accept-encoding"))
        return web.Response(body=compressed, content_type="application/json", headers={"Content-Encoding": "gzip"})

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/messages", answer)
    upstream = await aiohttp_server(upstream_app)
    base = f"http://127.0.0.1:{upstream.port}"
    url = await start_proxy(base, base + "/v1")

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(url + "/v1/messages", json=GOOD["anthropic"],
                                headers={**ANTHROPIC_HEADERS, "accept-encoding": "gzip"}) as resp:
            raw = await resp.read()
            assert resp.status == 200
            assert resp.headers["content-encoding"] == "gzip"
            assert int(resp.headers["content-length"]) == len(compressed)
    assert raw == compressed
    assert asked == ["gzip"]
    # And an SDK (which decompresses) reads the answer.
    async with anthropic_client(url) as client:
        got = await client.messages.create(model=ANTHROPIC_MODEL, max_tokens=32, messages=PROMPT)
    assert got.content[0].text == message["content"][0]["text"]


# ---- streaming --------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_first_event_arrives_while_upstream_holds_the_rest(proxy_url, mock, api):
    hold = mock.hold_after_first_event = asyncio.Event()
    if api == "anthropic":
        client = anthropic_client(proxy_url)
        create = client.messages.create(model=ANTHROPIC_MODEL, max_tokens=64, messages=PROMPT, stream=True)
    else:
        client = openai_client(proxy_url + "/v1")
        create = client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT, stream=True)
    async with client, await create as stream:
        events = aiter(stream)
        first = await asyncio.wait_for(anext(events), 5)
        assert not hold.is_set() and mock.in_flight == 1  # the mock has sent only the first event
        hold.set()
        rest = [event async for event in events]
    if api == "anthropic":
        assert first.type == "message_start"
        text = "".join(e.delta.text for e in rest if e.type == "content_block_delta")
        assert rest[-1].type == "message_stop"
    else:
        assert first.choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in rest if c.choices)
        assert rest[-1].choices[0].finish_reason == "stop"
    assert len(text.split()) == mock.profile.output_tokens


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_client_disconnect_mid_stream_cancels_upstream(proxy_url, mock, api):
    mock.profile.output_tokens = 200
    mock.profile.tokens_per_second = 20  # a 10 s stream
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy_url + PATHS[api], json={**GOOD[api], "stream": True, "max_tokens": 500},
                                  headers=HEADERS[api])
        assert resp.status == 200
        assert await asyncio.wait_for(resp.content.readany(), 5)
        assert mock.in_flight == 1
        resp.close()  # the agent goes away mid-stream
    # Cross-task condition on the mock's counter: bounded polling, far below the stream's 10 s.
    deadline = time.monotonic() + 3
    while mock.in_flight:
        assert time.monotonic() < deadline, "the upstream stream kept running after the client left"
        await asyncio.sleep(0.02)


async def test_client_leaving_before_the_answer_does_not_wedge_identical_requests(proxy_url, mock):
    """An agent that gives up while the upstream is still thinking: the same request afterwards is served."""
    mock.profile.ttft = 0.5
    body = {**GOOD["anthropic"], "stream": True}

    async def ask() -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.post(proxy_url + "/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as resp:
                return resp.status, await resp.read()

    first = asyncio.create_task(ask())
    deadline = time.monotonic() + 5
    while mock.count() == 0:  # cross-task: wait until the request is upstream
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    first.cancel()  # the agent disconnects before any byte of the answer
    with contextlib.suppress(asyncio.CancelledError):
        await first
    while mock.in_flight:  # the mock's slow answer is over
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    mock.profile.ttft = 0.0
    status, answer = await asyncio.wait_for(ask(), 5)
    assert status == 200
    assert b"message_stop" in answer


# ---- bad input and upstream failures ----------------------------------------------------

EXPECTED = {  # case -> (status, anthropic error type, openai error type)
    "malformed_json": (400, "invalid_request_error", "invalid_request_error"),
    "invalid_utf8": (400, "invalid_request_error", "invalid_request_error"),
    "too_large": (413, "request_too_large", "invalid_request_error"),
    "too_large_chunked": (413, "request_too_large", "invalid_request_error"),
    "unreachable": (502, "api_error", "server_error"),
    "timeout": (504, "api_error", "server_error"),
}


@pytest.mark.parametrize("api", ["anthropic", "openai"])
@pytest.mark.parametrize("case", list(EXPECTED))
async def test_bad_input_gets_api_shaped_error(case, api, mock, start_proxy):
    upstream = mock.url
    sections: dict[str, dict] = {"proxy": {}}
    body: bytes | dict = GOOD[api]
    placeholder = None
    if case == "malformed_json":
        body = b'{"model": "x", "messages": ['
    elif case == "invalid_utf8":
        body = b'{"model": "\xff\xfe", "messages": []}'
    elif case.startswith("too_large"):
        sections["proxy"]["max_body_mb"] = 0.01  # 10485 bytes
        big = orjson.dumps({**GOOD[api], "messages": [{"role": "user", "content": "x" * 20000}]})
        body = big
        if case == "too_large_chunked":
            async def chunks():
                for i in range(0, len(big), 4096):
                    yield big[i:i + 4096]
            body = chunks()
    elif case == "unreachable":
        placeholder = socket.socket()
        placeholder.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        upstream = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
        sections["retry"] = {"max_attempts": 1}  # the error itself, not the proxy's retries, is under test
    elif case == "timeout":
        sections["proxy"]["read_timeout"] = 0.2
        mock.profile.ttft = 1.0
    url = await start_proxy(upstream, upstream + "/v1", **sections)

    status, answer, headers = await post(url, api, body)
    want_status, anthropic_type, openai_type = EXPECTED[case]
    assert status == want_status, answer
    assert headers["content-type"].startswith("application/json")
    message = error_message(api, answer, anthropic_type, openai_type)
    assert message.startswith("sidecar:"), message
    if case == "invalid_utf8":
        assert "UTF-8" in message
    if case in ("malformed_json", "invalid_utf8", "too_large", "too_large_chunked"):
        assert mock.count() == 0  # refused before anything went upstream

    # The proxy still serves a good request afterwards.
    if case == "unreachable":
        port = placeholder.getsockname()[1]
        placeholder.close()
        revived = MockUpstream()
        await revived.start("127.0.0.1", port)
        try:
            await assert_serves(url, api)
            assert revived.count(PATHS[api]) == 1
        finally:
            await revived.stop()
    else:
        mock.profile.ttft = 0.0
        before = mock.count()
        await assert_serves(url, api)
        assert mock.count() == before + 1


async def test_sdk_sees_sidecar_error_as_api_error(start_proxy):
    placeholder = socket.socket()
    placeholder.bind(("127.0.0.1", 0))
    try:
        dead = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
        url = await start_proxy(dead, dead + "/v1", retry={"max_attempts": 1})
        async with anthropic_client(url) as client:
            with pytest.raises(anthropic.InternalServerError) as info:
                await client.messages.create(model=ANTHROPIC_MODEL, max_tokens=8, messages=PROMPT)
        assert info.value.status_code == 502
        assert info.value.body["error"]["message"].startswith("sidecar:")
        async with openai_client(url + "/v1") as client:
            with pytest.raises(openai.InternalServerError) as info:
                await client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT)
        assert info.value.status_code == 502
        assert info.value.body["message"].startswith("sidecar:")  # the SDK unwraps {"error": ...}
        assert info.value.code == "upstream_unreachable"
    finally:
        placeholder.close()


# ---- not an open proxy --------------------------------------------------------------------


async def raw_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # Connection: close -> read to EOF
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("target", ["absolute-example", "absolute-mock", "host-example", "host-other-port"])
async def test_open_proxy_requests_refused(proxy_url, mock, target):
    port = int(proxy_url.rsplit(":", 1)[1])
    body = orjson.dumps(GOOD["anthropic"])
    if target == "absolute-example":
        request = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
    else:
        line, host = {
            "absolute-mock": (f"POST {mock.url}/v1/messages", f"127.0.0.1:{port}"),
            "host-example": ("POST /v1/messages", "example.com"),
            "host-other-port": ("POST /v1/messages", f"attacker.example:{port}"),
        }[target]
        request = (f"{line} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nanthropic-version: 2023-06-01\r\n"
                   f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    status, answer = await raw_exchange(port, request)
    assert status == 400
    message = error_message("anthropic", orjson.loads(answer), "invalid_request_error", "")
    assert message.startswith("sidecar:")
    assert mock.count() == 0
    # A proper request on the same proxy passes.
    request = (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
               f"anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    status, _ = await raw_exchange(port, request)
    assert status == 200
    assert mock.count() == 1


# ---- agents, admin -------------------------------------------------------------------------


async def test_agent_prefix_is_stripped(proxy_url, mock):
    async with anthropic_client(proxy_url + "/a/agent-7") as client:
        message = await client.messages.create(model=ANTHROPIC_MODEL, max_tokens=16, messages=PROMPT)
    async with openai_client(proxy_url + "/a/agent-7/v1") as client:
        completion = await client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT)
    assert message.content[0].text and completion.choices[0].message.content
    assert [r.path for r in mock.received] == ["/v1/messages", "/v1/chat/completions"]


async def test_health(proxy_url):
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url + "/_sidecar/health") as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            health = await resp.json()
    assert health["status"] == "ok"
