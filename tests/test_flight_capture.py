"""The flight and the capture, each driven alone with small fakes: no proxy, no network."""

from __future__ import annotations

import asyncio
import gzip

import orjson
import pytest
from multidict import CIMultiDict

from agent_sidecar.proxy.call import Call
from agent_sidecar.proxy.capture import Capture
from agent_sidecar.proxy.flight import Flight, Flights, Head
from agent_sidecar.proxy.routes import Route

HEAD = Head(200, "OK", CIMultiDict(), sse=True, incremental=True)


def call_for(api: str = "anthropic", path: str = "/v1/messages") -> Call:
    return Call(Route("agent", api, path, ""), "POST")


def anthropic_stream(*, end: bool = True, extra: bytes = b"") -> list[bytes]:
    events = [
        ("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                                "content": [], "model": "m", "usage": {"input_tokens": 7, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
    ]
    if end:
        events.append(("message_stop", {"type": "message_stop"}))
    return [b"event: " + n.encode() + b"\ndata: " + orjson.dumps(d) + b"\n\n" for n, d in events] + ([extra] if extra else [])


# ---- Flight ----------------------------------------------------------------------------------------------


async def test_followers_get_the_leaders_error_before_the_head():
    flight = Flight("k")
    waits = [asyncio.create_task(flight.wait_head()) for _ in range(3)]
    await asyncio.sleep(0)
    flight.abort(ValueError("boom"))
    for wait in waits:
        with pytest.raises(ValueError, match="boom"):
            await wait


async def test_a_late_joiner_gets_every_chunk_and_the_same_cut():
    flight = Flight("k")
    flight.start_head(HEAD)
    flight.append(b"a")
    flight.append(b"b")
    late = [chunk async for chunk in _until_done(flight, after=lambda: flight.abort(RuntimeError()))]
    assert late == [b"a", b"b"] and flight.failed


async def _until_done(flight: Flight, after):
    first = True
    async for chunk in flight.stream():
        yield chunk
        if first:
            first = False
            asyncio.get_running_loop().call_soon(after)


async def test_an_ended_or_cancelled_flight_cannot_be_joined():
    flights = Flights()
    ended, cancelled = Flight("a"), Flight("b")
    flights.add(ended)
    flights.add(cancelled)
    ended.finish()
    cancelled.task = asyncio.create_task(asyncio.sleep(10))
    cancelled.join()
    cancelled.leave()          # the last subscriber left: the exchange is cancelled
    assert flights.find("a") is None and flights.find("b") is None and len(flights) == 0
    with pytest.raises(asyncio.CancelledError):
        await cancelled.task


async def test_a_body_relayed_whole_wakes_its_subscribers_once_at_its_end():
    """A JSON answer's subscribers can do nothing with its head or a chunk: they are woken once, at the
    end, with the head and the whole body; a stream's are woken at its head and at each chunk."""
    for incremental, wakes in ((False, 1), (True, 4)):
        flight = CountedFlight("k")
        head = Head(200, "OK", CIMultiDict(), sse=incremental, incremental=incremental)

        async def subscriber():
            got = await flight.wait_head()
            if not got.incremental:
                return got, await flight.body()
            return got, b"".join([chunk async for chunk in flight.stream()])
        task = asyncio.create_task(subscriber())
        await asyncio.sleep(0)
        for step in (lambda: flight.start_head(head), lambda: flight.append(b'{"a":'),
                     lambda: flight.append(b"1}"), flight.finish):
            step()
            await asyncio.sleep(0)
        assert await task == (head, b'{"a":1}')
        assert flight.waits == wakes, incremental   # each wait begun ends in a wake-up


class CountedFlight(Flight):
    """A flight that counts its subscribers' waits."""

    def __init__(self, key):
        super().__init__(key)
        self.waits = 0

    async def _changed(self) -> None:
        self.waits += 1
        await super()._changed()


async def test_a_flight_that_ends_without_head_or_error_still_wakes_its_waiters():
    flight = Flight(None)
    wait = asyncio.create_task(flight.wait_head())
    await asyncio.sleep(0)
    flight.finish(failed=True)
    with pytest.raises(RuntimeError):
        await wait


# ---- Capture ---------------------------------------------------------------------------------------------


def test_a_stream_completes_once_with_its_usage():
    call = call_for()
    capture = Capture(call, sse=True, encoding="", keep_pacing=True)
    completions = [capture.feed(call, chunk) for chunk in anthropic_stream()]
    completions.append(capture.feed(call, b"\n"))            # trailing bytes after the end: no second completion
    assert completions.count(True) == 1 and completions[-2] is True
    capture.end(call, b"")
    assert capture.storable and capture.answer["content"] == [{"type": "text", "text": "hi"}]
    assert (call.input_tokens, call.output_tokens) == (7, 3) and call.t_first_token
    assert len(capture.pacing) == len(anthropic_stream()) + 1


def test_a_long_stream_is_assembled_as_it_goes_not_at_its_end(monkeypatch):
    """Each event is taken into the answer as its chunk passes: the chunk that ends a 2,000-event stream
    parses only its own event, so the end of a long answer does not hold the loop for the whole of it."""
    from agent_sidecar.proxy import sse
    start, *rest = anthropic_stream()
    deltas = [b"event: content_block_delta\ndata: " + orjson.dumps(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"w{i} "}}) + b"\n\n"
        for i in range(2000)]
    chunks = [start, rest[0], *deltas, *rest[2:]]
    call = call_for()
    capture = Capture(call, sse=True, encoding="", keep_pacing=False)
    assert not any(capture.feed(call, chunk) for chunk in chunks[:-1])
    parsed, loads = [], sse.orjson.loads
    monkeypatch.setattr(sse.orjson, "loads", lambda data: parsed.append(data) or loads(data))
    assert capture.feed(call, chunks[-1]) is True
    assert len(parsed) == 1   # message_stop's own data, nothing earlier again
    assert capture.storable
    assert capture.answer["content"] == [{"type": "text", "text": "".join(f"w{i} " for i in range(2000))}]
    assert capture.answer["stop_reason"] == "end_turn" and capture.answer["usage"]["output_tokens"] == 3


@pytest.mark.parametrize("chunks", [
    anthropic_stream(end=False),                                              # cut before message_stop
    anthropic_stream(extra=b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),   # two ends
    anthropic_stream(extra=b"data: trailing garbage\n\n"),                    # bytes after the end
    [b"event: message_start\ndata: not json\n\n", *anthropic_stream()[1:]],   # an event that is not JSON
    [b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":[]}\n\n", *anthropic_stream()[1:]],
    [b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":null}\n\n", *anthropic_stream()[1:]],
    [*anthropic_stream()[:3], b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n",
     *anthropic_stream()[3:]],
], ids=["cut", "two-ends", "after-end", "not-json", "message-list", "message-null", "error-event"])
def test_a_malformed_or_partial_stream_is_never_storable(chunks):
    call = call_for()
    capture = Capture(call, sse=True, encoding="", keep_pacing=False)
    for chunk in chunks:
        capture.feed(call, chunk)
    capture.end(call, b"")
    assert not capture.storable


def test_openai_keepalive_data_is_malformed_but_usage_still_counts():
    call = call_for("openai", "/v1/chat/completions")
    capture = Capture(call, sse=True, encoding="", keep_pacing=False)
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
    for data in (b"data: keepalive\n\n", b"data: " + orjson.dumps(chunk) + b"\n\n", b"data: [DONE]\n\n"):
        capture.feed(call, data)
    assert not capture.storable and (call.input_tokens, call.output_tokens) == (4, 2)


@pytest.mark.parametrize("body,encoding,storable", [
    (orjson.dumps({"type": "message", "content": [], "usage": {"input_tokens": 1, "output_tokens": 2}}), "", True),
    (gzip.compress(orjson.dumps({"type": "message", "content": []})), "gzip", True),
    (b"not gzip at all", "gzip", False),
    (orjson.dumps({"type": "error", "error": {"type": "api_error", "message": "x"}}), "", False),
    (b"[" * 300 + b"]" * 300, "", False),
    (b"[" * 2000 + b"]" * 2000, "", False),
    (b"\xff\xfe garbage", "", False),
    (orjson.dumps({"type": "message", "content": []}), "br", False),
], ids=["plain", "gzip", "bad-gzip", "error-body", "deep-300", "deep-2000", "not-utf8", "br"])
def test_a_json_answer_is_storable_only_when_well_formed_and_readable(body, encoding, storable):
    call = call_for()
    capture = Capture(call, sse=False, encoding=encoding, keep_pacing=False)
    capture.feed(call, body)
    assert capture.end(call, body) is storable and capture.storable is storable
    if storable and not encoding:
        assert (call.input_tokens, call.output_tokens) == (1, 2)


def test_usage_of_the_wrong_type_counts_as_zero():
    call = call_for()
    body = orjson.dumps({"type": "message", "content": [], "usage": {"input_tokens": "12", "output_tokens": None}})
    capture = Capture(call, sse=False, encoding="", keep_pacing=False)
    assert capture.end(call, body) and (call.input_tokens, call.output_tokens) == (0, 0)
