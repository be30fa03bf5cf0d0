"""proxy.sse: the incremental event parser, and assemble/synthesize as inverses of each other.

The streams the mock sends (which follow the real APIs' event sequences) assemble into the same
message the non-streaming call returns; a message synthesized into events assembles back to itself.
"""

from __future__ import annotations

import orjson
import pytest

from proxy.sse import (EventParser, assemble_anthropic, assemble_openai, parse_event, synthesize_anthropic,
                       synthesize_openai)


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


def test_anthropic_assemble_of_a_stream_with_pieces_and_pings():
    stream = b"".join([
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
    for crlf in (False, True):
        data = stream.replace(b"\n", b"\r\n") if crlf else stream
        assert assemble_anthropic(events_of(data, 5)) == {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "text", "text": "Hello"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": 1}}],
            "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 9}}


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


def test_openai_assemble_of_pieces():
    base = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5, "model": "m", "system_fingerprint": None}

    def chunk(delta, finish=None, **extra):
        return b"data: " + orjson.dumps({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                               "finish_reason": finish}], **extra}) + b"\n\n"

    stream = b"".join([
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}), chunk({"content": "lo"}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({}, "tool_calls"),
        b"data: " + orjson.dumps({**base, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                                                  "total_tokens": 3}}) + b"\n\n",
        b"data: [DONE]\n\n",
    ])
    completion = assemble_openai(events_of(stream, 4))
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


def test_parser_keeps_partial_events_and_multiline_data():
    parser = EventParser()
    assert parser.feed(b"event: a\nda") == []
    assert parser.feed(b"ta: 1\ndata: 2\n\n: comment only\n\nevent: b\ndata:3\n") == [("a", b"1\n2")]
    assert parser.feed(b"\n") == [("b", b"3")]
    assert parse_event(b"event: x") is None  # no data: not an event
    assert parse_event(b"data: [DONE]") == ("message", b"[DONE]")
