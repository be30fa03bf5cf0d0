"""proxy.sse: the incremental event parser, and assemble/synthesize as inverses of each other.

The streams the mock sends (which follow the real APIs' event sequences) assemble into the same
message the non-streaming call returns; a message synthesized into events assembles back to itself.
Property tests (hypothesis) show that no split of a stream into chunks and no choice of line endings
changes the events, and that assembling hostile input ends in MalformedStream or an answer, nothing else.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_sidecar.proxy.sse import (EventParser, MalformedStream, assemble_anthropic, assemble_openai, synthesize_anthropic,
                       synthesize_openai)

# no deadline (no timed assertions), no example database written into the working tree
PROPERTY = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def events_of(data: bytes, piece: int | None = None) -> list[tuple[str, bytes]]:
    parser = EventParser()
    if piece is None:
        return parser.feed(data)
    out = []
    for at in range(0, len(data), piece):
        out += parser.feed(data[at:at + piece])
    return out


USAGE = {"input_tokens": 21, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3}
BASE = {"id": "msg_01abc", "type": "message", "role": "assistant", "model": "claude-mock-1",
        "stop_reason": "end_turn", "stop_sequence": None, "usage": USAGE}
MESSAGES = {
    "text": {**BASE, "content": [{"type": "text", "text": "alpha bravo \"charlie\"\nnew line é"}]},
    "tool_use": {**BASE, "stop_reason": "tool_use", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {"word": "x", "n": [1, 2], "deep": {"a": None}}}]},
    "empty tool input": {**BASE, "stop_reason": "tool_use", "content": [
        {"type": "tool_use", "id": "toolu_02", "name": "now", "input": {}}]},
    "thinking": {**BASE, "content": [{"type": "thinking", "thinking": "hmm, let me see", "signature": "sig=="},
                                     {"type": "text", "text": "done"}]},
    "stop sequence": {**BASE, "stop_reason": "stop_sequence", "stop_sequence": "END",
                      "content": [{"type": "text", "text": "until"}]},
    "no content": {**BASE, "stop_reason": "max_tokens", "content": []},
}


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
@pytest.mark.parametrize("piece", [None, 1, 7])
def test_anthropic_synthesized_events_assemble_back(message, piece):
    stream = b"".join(synthesize_anthropic(message))
    events = events_of(stream, piece)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == len(message["content"])
    for name, data in events:  # each event's type matches its name, as the SDKs expect
        assert orjson.loads(data)["type"] == name
    start = orjson.loads(events[0][1])["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert assemble_anthropic(events) == message


# A real event sequence: text, a ping, a tool_use block built from input_json_delta pieces.
ANTHROPIC_STREAM = b"".join([
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":'
    b'"assistant","model":"m","content":[],"stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":5,"output_tokens":1}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
    b'event: ping\ndata: {"type": "ping"}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lo"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,"content_block":'
    b'{"type":"tool_use","id":"t1","name":"f","input":{}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"q\\": "}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"1}"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
    b'"usage":{"output_tokens":9}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
])
ANTHROPIC_MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
    "content": [{"type": "text", "text": "Hello"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": 1}}],
    "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 9}}


def test_anthropic_assemble_of_a_stream_with_pieces_and_pings():
    for crlf in (False, True):
        data = ANTHROPIC_STREAM.replace(b"\n", b"\r\n") if crlf else ANTHROPIC_STREAM
        assert assemble_anthropic(events_of(data, 5)) == ANTHROPIC_MESSAGE


COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
              "system_fingerprint": "fp_mock",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "alpha \"bravo\"\nécho",
                                                   "refusal": None},
                           "logprobs": None, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}
TOOL_COMPLETION = {**COMPLETION, "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
    "role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": 1}"}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}}]}
TWO_CHOICES = {**COMPLETION, "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "one", "refusal": None}, "logprobs": None, "finish_reason": "stop"},
    {"index": 1, "message": {"role": "assistant", "content": "two", "refusal": None}, "logprobs": None, "finish_reason": "length"}]}


@pytest.mark.parametrize("completion", [COMPLETION, TOOL_COMPLETION, TWO_CHOICES], ids=["text", "tools", "two-choices"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_synthesized_chunks_assemble_back(completion, include_usage):
    stream = b"".join(synthesize_openai(completion, include_usage))
    assert stream.endswith(b"data: [DONE]\n\n")
    events = events_of(stream, 3)
    chunks = [orjson.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == completion["id"] for c in chunks)
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == [] and usage_chunks[0] is chunks[-1]
    else:
        assert usage_chunks == []
    expected = completion if include_usage else {k: v for k, v in completion.items() if k != "usage"}
    assert assemble_openai(events) == expected


OPENAI_BASE = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5, "model": "m", "system_fingerprint": None}


def openai_chunk(delta: dict, finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({**OPENAI_BASE, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                                 "finish_reason": finish}]}) + b"\n\n"


# A real chat stream: text, one tool call in pieces, the usage chunk, [DONE].
OPENAI_STREAM = b"".join([
    openai_chunk({"role": "assistant", "content": ""}),
    openai_chunk({"content": "Hel"}), openai_chunk({"content": "lo"}),
    openai_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
    openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}),
    openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
    openai_chunk({}, "tool_calls"),
    b"data: " + orjson.dumps({**OPENAI_BASE, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                                                     "total_tokens": 3}}) + b"\n\n",
    b"data: [DONE]\n\n",
])


def test_openai_assemble_of_pieces():
    completion = assemble_openai(events_of(OPENAI_STREAM, 4))
    assert completion["object"] == "chat.completion" and completion["id"] == "chatcmpl-9"
    assert completion["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    [choice] = completion["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Hello"
    assert choice["message"]["tool_calls"] == [{"id": "call_1", "type": "function",
                                                "function": {"name": "f", "arguments": "{\"a\":1}"}}]


def test_assemble_of_nothing():
    assert assemble_openai([]) is None
    assert assemble_anthropic([]) is None


# ---- the parser, by hand --------------------------------------------------------------------------


def test_parser_keeps_partial_events_and_multiline_data():
    parser = EventParser()
    assert parser.feed(b"event: a\nda") == []
    assert parser.feed(b"ta: 1\ndata: 2\n\n: comment only\n\nevent: b\ndata:3\n") == [("a", b"1\n2")]
    assert parser.feed(b"\n") == [("b", b"3")]
    assert parser.feed(b"data: [DONE]\n\n") == [("message", b"[DONE]")]


def test_parser_follows_the_whatwg_field_rules():
    stream = (b"\xef\xbb\xbfdata: after a byte order mark\n\n"
              b"event: named\n\n"                     # no data: not dispatched, and the name does not carry over
              b"data\n\n"                             # a field name alone: empty data
              b"data:  two spaces\ndata:none\n\n"     # only one leading space goes
              b"event:x\nid: 7\nretry: 10\nDATA: no\nfoo\n:data: a comment\ndata: kept: colon\n\n"
              b"event: unfinished\ndata: never dispatched\n")
    assert events_of(stream) == [("message", b"after a byte order mark"), ("message", b""),
                                 ("message", b" two spaces\nnone"), ("x", b"kept: colon")]


def test_a_cr_ending_one_chunk_and_a_lf_starting_the_next_are_one_line_ending():
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []                   # the rest of \r\n, not a blank line
    assert parser.feed(b"") == []
    assert parser.feed(b"\r") == [("message", b"a")]  # a bare \r is a blank line
    assert parser.feed(b"data: b\r\r") == [("message", b"b")]
    assert parser.feed(b"\ndata: c\n\n") == [("message", b"c")]   # \r\r then \n: the \n ends the second \r


# ---- properties: splits and line endings change nothing -------------------------------------------


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def fed(chunks: list[bytes]) -> list[tuple[str, bytes]]:
    parser = EventParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


def with_endings(lines: list[bytes], endings: list[bytes]) -> bytes:
    """Lines joined with the given endings; after a bare \\r an empty line cannot end in \\n (that is \\r\\n)."""
    out, previous = [], b""
    for line, ending in zip(lines, endings):
        if previous == b"\r" and not line and ending == b"\n":
            ending = b"\r\n"
        out += [line, ending]
        previous = ending
    return b"".join(out)


ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])
REAL_STREAMS = {"anthropic": ANTHROPIC_STREAM, "openai": OPENAI_STREAM}


@pytest.mark.parametrize("api", REAL_STREAMS)
@PROPERTY
@given(data=st.data())
def test_any_split_of_a_real_stream_yields_the_same_events(api, data):
    stream = REAL_STREAMS[api]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=80))
    assert fed(chunked(stream, cuts)) == events_of(stream)


@pytest.mark.parametrize("api", REAL_STREAMS)
@PROPERTY
@given(data=st.data())
def test_any_line_endings_at_any_split_yield_the_same_events(api, data):
    stream = REAL_STREAMS[api]
    lines = stream.split(b"\n")[:-1]
    mixed = with_endings(lines, data.draw(st.lists(ENDINGS, min_size=len(lines), max_size=len(lines))))
    cuts = data.draw(st.lists(st.integers(0, len(mixed)), max_size=80))
    events = fed(chunked(mixed, cuts))
    assert events == events_of(stream)
    assembled = (assemble_anthropic if api == "anthropic" else assemble_openai)(events)
    assert assembled == (ANTHROPIC_MESSAGE if api == "anthropic" else assemble_openai(events_of(OPENAI_STREAM)))


LINE_TEXT = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
NOISE = st.one_of(  # lines that change no event: comments, ignored and look-alike fields
    LINE_TEXT.map(lambda text: b":" + text),
    st.sampled_from([b"id: 42", b"retry: 3000", b"foo: bar", b"foo", b"Data: x", b"DATA", b"data : x", b" data: x",
                     b"eventx: y", b"id"]))


@st.composite
def sse_events(draw):
    """(wire lines, the event the parser must give or None): an event with names, multi-line data and noise."""
    name = draw(st.none() | st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=8))
    values = draw(st.lists(LINE_TEXT, max_size=4))
    lines = []
    for value in values:
        short = draw(st.booleans())
        lines.append(b"data" if short and not value else b"data:" + value if short and not value.startswith(b" ")
                     else b"data: " + value)
    for _ in range(draw(st.integers(0, 3))):
        lines.insert(draw(st.integers(0, len(lines))), draw(NOISE))
    if name is not None:   # the event line may come anywhere among the others
        lines.insert(draw(st.integers(0, len(lines))), b"event: " + name.encode())
    expected = (name or "message", b"\n".join(values)) if values else None
    return lines, expected


@PROPERTY
@given(data=st.data(), events=st.lists(sse_events(), max_size=8), blanks=st.lists(st.integers(1, 3), min_size=8, max_size=8),
       tail=st.lists(st.one_of(NOISE, LINE_TEXT.map(lambda text: b"data: " + text)), max_size=3))
def test_comments_multiline_data_and_fields_at_any_split_and_line_endings(data, events, blanks, tail):
    lines = []
    for (event_lines, _), blank in zip(events, blanks):
        lines += event_lines + [b""] * blank
    lines += tail                     # an unfinished event at the end of the stream is never dispatched
    mixed = with_endings(lines, data.draw(st.lists(ENDINGS, min_size=len(lines), max_size=len(lines))))
    cuts = data.draw(st.lists(st.integers(0, len(mixed)), max_size=40))
    assert fed(chunked(mixed, cuts)) == [expected for _, expected in events if expected is not None]


# ---- assemble is total on hostile input -----------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12)
REAL_EVENTS = events_of(ANTHROPIC_STREAM) + events_of(OPENAI_STREAM)
NAMES = st.sampled_from(sorted({name for name, _ in REAL_EVENTS}) + ["error", "message"]) | st.text(max_size=6)


def assembles_or_refuses(events: list[tuple[str, bytes]]) -> None:
    for assemble in (assemble_anthropic, assemble_openai):
        try:
            result = assemble(events)
        except MalformedStream:
            continue
        assert result is None or isinstance(result, dict)


@st.composite
def mutated(draw, value):
    """`value` with one thing somewhere inside replaced by arbitrary JSON, or removed."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        if draw(st.booleans()):
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: draw(mutated(value[key]))}
    if isinstance(value, list) and value and draw(st.booleans()):
        at = draw(st.integers(0, len(value) - 1))
        return [*value[:at], draw(mutated(value[at])), *value[at + 1:]]
    return draw(JSON)


@PROPERTY
@given(data=st.data())
def test_assemble_of_a_real_stream_with_one_event_mutated(data):
    events = list(REAL_EVENTS)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(events) - 1))
        name, payload = events[at]
        original = None if payload == b"[DONE]" else orjson.loads(payload)
        events[at] = (data.draw(NAMES) if data.draw(st.booleans()) else name, orjson.dumps(data.draw(mutated(original))))
    assembles_or_refuses(events)


@PROPERTY
@given(st.lists(st.tuples(NAMES, st.binary(max_size=20) | JSON.map(orjson.dumps)
                          | st.sampled_from([data for _, data in REAL_EVENTS])), max_size=12))
def test_assemble_of_arbitrary_event_lists(events):
    assembles_or_refuses(events)


DEEP = b"[" * 5000 + b"]" * 5000


def anthropic_after(*events: tuple[str, dict | bytes]) -> list[tuple[str, bytes]]:
    """A valid start with one text block, then the hostile events."""
    start = events_of(ANTHROPIC_STREAM)[:2]
    return start + [(name, data if isinstance(data, bytes) else orjson.dumps(data)) for name, data in events]


def delta(index, delta_):
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta_}


def block_start(index, block):
    return "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}


def message_start(message):
    return [("message_start", orjson.dumps({"type": "message_start", "message": message}))]


def openai(*chunks: dict | bytes) -> list[tuple[str, bytes]]:
    return [("message", c if isinstance(c, bytes) else orjson.dumps({**OPENAI_BASE, **c})) for c in chunks]


TEXT = {"type": "text_delta", "text": "x"}
HOSTILE = {
    "anthropic data not JSON": [("message_start", b"{not json")],
    "anthropic event is a list": [("message_start", b"[1, 2]")],
    "message is a list": message_start([]),
    "message is a list of pairs": message_start([["id", "msg_1"]]),
    "message is null": message_start(None),
    "message nested too deep": [("message_start", b'{"type":"message_start","message":' + DEEP + b"}")],
    "block index far out of range": anthropic_after(delta(10 ** 12, TEXT)),
    "block index negative": anthropic_after(delta(-1, TEXT)),
    "block index a float": anthropic_after(delta(0.0, TEXT)),
    "block index a bool": anthropic_after(delta(True, TEXT)),
    "block index a string": anthropic_after(delta("0", TEXT)),
    "block index missing": anthropic_after(("content_block_delta", {"type": "content_block_delta", "delta": TEXT})),
    "block started at a gap": anthropic_after(block_start(5, {"type": "text", "text": ""})),
    "block started twice": anthropic_after(block_start(0, {"type": "text", "text": ""})),
    "block started at 10**12": anthropic_after(block_start(10 ** 12, {"type": "text", "text": ""})),
    "delta for a block never started": anthropic_after(delta(1, TEXT)),
    "stop for a block never started": anthropic_after(("content_block_stop", {"type": "content_block_stop", "index": 3})),
    "content_block is a list": anthropic_after(block_start(1, [["type", "text"]])),
    "delta is a list": anthropic_after(delta(0, [["type", "text_delta"]])),
    "text delta is a number": anthropic_after(delta(0, {"type": "text_delta", "text": 5})),
    "text delta is a list": anthropic_after(block_start(1, {"type": "text", "text": []}),
                                            delta(1, {"type": "text_delta", "text": ["x"]})),
    "text delta without text": anthropic_after(delta(0, {"type": "text_delta"})),
    "tool input not JSON": anthropic_after(block_start(1, {"type": "tool_use", "id": "t", "name": "f", "input": {}}),
                                           delta(1, {"type": "input_json_delta", "partial_json": "{\"a\": "})),
    "tool input not an object": anthropic_after(block_start(1, {"type": "tool_use", "id": "t", "name": "f", "input": {}}),
                                                delta(1, {"type": "input_json_delta", "partial_json": "[1]"})),
    "message_delta delta is pairs": anthropic_after(("message_delta", {"type": "message_delta",
                                                                       "delta": [["stop_reason", "end_turn"]]})),
    "message_delta usage is a list": anthropic_after(("message_delta", {"type": "message_delta", "delta": {},
                                                                        "usage": [1]})),
    "message usage is null": message_start({"id": "m", "usage": None}) + [
        ("message_delta", orjson.dumps({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 1}}))],
    "openai data: keepalive": openai(b"keepalive"),
    "openai chunk is a list": openai(b"[]"),
    "openai nested too deep": openai(b'{"choices":' + DEEP + b"}"),
    "choices is an object": openai({"choices": {"index": 0}}),
    "choices is a string": openai({"choices": "abc"}),
    "choices is a number": openai({"choices": 5}),
    "choice index a string": openai({"choices": [{"index": "0", "delta": {"content": "x"}}]}),
    "choice index negative": openai({"choices": [{"index": -1, "delta": {"content": "x"}}]}),
    "choice index missing": openai({"choices": [{"delta": {"content": "x"}}]}),
    "choice delta is a list": openai({"choices": [{"index": 0, "delta": ["content"]}]}),
    "content is a number": openai({"choices": [{"index": 0, "delta": {"content": 5}}]}),
    "tool call index 10**12": openai({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 10 ** 12}]}}]}),
    "tool call index negative": openai({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": -1}]}}]}),
    "tool calls is an object": openai({"choices": [{"index": 0, "delta": {"tool_calls": {"index": 0}}}]}),
    "tool call arguments a list": openai({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": ["{}"]}}]}}]}),
    "usage is a list": openai({"choices": [], "usage": [1, 2]}),
}


@pytest.mark.parametrize("events", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_streams_raise_malformed_stream(events):
    api = assemble_openai if events[0][0] == "message" else assemble_anthropic
    with pytest.raises(MalformedStream):
        api(events)
    assembles_or_refuses(events)


# ---- linear work ---------------------------------------------------------------------------------


@pytest.mark.timeout(10)   # linear: well under a second; re-joining the buffer per chunk takes minutes
@pytest.mark.parametrize("size, piece", [(2 << 20, 16), (256 << 10, 1)], ids=["2MB-in-16B", "256KB-in-1B"])
def test_one_large_event_in_small_chunks_is_parsed_in_linear_time(size, piece):
    payload = orjson.dumps({"type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": "x" * size}})
    stream = b"event: content_block_delta\r\ndata: " + payload + b"\r\n\r\n"
    assert events_of(stream, piece) == [("content_block_delta", payload)]
