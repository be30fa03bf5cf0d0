"""proxy/body_json.py: a body parsed by reusing an earlier one's messages is exactly `orjson.loads(body)`.

Conversations that grow turn by turn, as agents send them: compact JSON (orjson's bytes, as Claude Code,
Codex and the SDKs write), a cache marker moved to the newest message each turn, a message rewritten in
the middle, messages dropped (compaction), the array's key before or after the others, a nested
`"messages"` key, a duplicate top-level key, spaced or ASCII-escaped JSON (no reuse, still exact),
text with quotes, backslashes, newlines and non-ASCII. Equality is on orjson's bytes of the result: key
order counts (the cache key is made from it).
"""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings, strategies as st

from agent_sidecar.proxy.body_json import BodyParser

text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40) | st.sampled_from(
    ['say "messages" now', 'a\\b', "line\nline", '{"messages":[1]}', "ü€𝄞", ""])
block = st.fixed_dictionaries({"type": st.just("text"), "text": text})
tool_input = st.dictionaries(st.sampled_from(["messages", "path", "n"]),
                             st.one_of(text, st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                                       st.lists(st.integers(0, 9), max_size=3)), max_size=2)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": text}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(block, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.lists(st.fixed_dictionaries(
        {"type": st.just("tool_use"), "id": text, "name": text, "input": tool_input}), min_size=1, max_size=2)}),
)
edit = st.one_of(
    st.tuples(st.just("grow"), st.lists(message, min_size=1, max_size=3)),
    st.tuples(st.just("rewrite"), st.integers(0, 50), message),
    st.tuples(st.just("drop"), st.integers(1, 4)),
    st.tuples(st.just("same")),
    st.tuples(st.just("system"), text),   # the fields before the messages change (a new system prompt)
)
encoding = st.sampled_from(["orjson", "orjson", "orjson", "spaced", "ascii"])


def marked(messages: list) -> list:
    """The newest message carries the cache marker, as Claude Code sends it; earlier ones lose it."""
    out = [dict(m) for m in messages]
    last = out[-1]
    if isinstance(last.get("content"), list):
        last["content"] = [*last["content"][:-1], {**last["content"][-1], "cache_control": {"type": "ephemeral"}}]
    return out


def encode(doc: dict, how: str) -> bytes:
    if how == "orjson":
        return orjson.dumps(doc)
    if how == "spaced":
        return json.dumps(doc, ensure_ascii=False).encode()
    return json.dumps(doc, separators=(",", ":")).encode()   # ASCII escapes: not orjson's bytes


@given(start=st.lists(message, min_size=1, max_size=6), edits=st.lists(edit, min_size=1, max_size=8),
       messages_last=st.booleans(), how=encoding, nested=st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_growing_conversation_parses_as_orjson_does(start, edits, messages_last, how, nested):
    parser = BodyParser(min_bytes=0)
    messages = list(start)
    tools = [{"name": "t", "input_schema": {"messages": {"type": "array"}} if nested else {"type": "object"}}]
    system = "You are."
    for step in [("same",), *edits]:
        if step[0] == "system":
            system = step[1]
        if step[0] == "grow":
            messages += step[1]
        elif step[0] == "rewrite":
            messages[step[1] % len(messages)] = step[2]
        elif step[0] == "drop":
            messages = messages[:max(1, len(messages) - step[1])]
        fields = {"model": "claude-x", "max_tokens": 100, "system": [{"type": "text", "text": system}],
                  "tools": tools}
        doc = {**fields, "messages": marked(messages)} if messages_last else {"messages": marked(messages), **fields}
        body = encode(doc, how)
        parsed = parser.parse(body, "messages")
        assert orjson.dumps(parsed.json) == orjson.dumps(orjson.loads(body))
        rows = parsed.rows or []
        assert rows == [orjson.dumps(m) for m in parsed.json["messages"][:len(rows)]]
        if how == "orjson" and not nested:
            assert len(rows) == len(messages)   # a compact client: every message's bytes are known


def test_reuse_happens_and_is_exact_at_agent_sizes():
    """A 76 KB to 1 MB conversation of orjson bodies: from the second turn on, the earlier messages are not
    parsed again; every result is what orjson gives."""
    from agent_sidecar.bench.conversation import bodies
    parser = BodyParser()
    sent = bodies("reuse", 12, 1024)
    for n, body in enumerate(sent):
        parsed = parser.parse(body, "messages")
        assert orjson.dumps(parsed.json) == orjson.dumps(orjson.loads(body))
        if n:
            assert parsed.reused >= len(orjson.loads(sent[n - 1])["messages"]) - 1, n
    assert parser.reused > 0


def test_a_body_says_which_earlier_body_it_repeats_and_relief_forgets_them():
    """Each remembered body has its serial; the next turn's lineage names it and how many messages it repeats.
    Under memory relief (forget) nothing is kept: the next turn is parsed whole, with no lineage to trust."""
    from agent_sidecar.bench.conversation import bodies
    parser = BodyParser()
    _, first, second, third = bodies("lineage", 4, 512)   # (the first turn's one message moves its marker)
    one, two = parser.parse(first, "messages"), parser.parse(second, "messages")
    assert one.lineage[1:] == (0, 0) and two.lineage[1] == one.lineage[0] != two.lineage[0]
    assert two.lineage[2] == two.reused >= len(orjson.loads(first)["messages"]) - 1
    parser.forget()
    assert parser.snapshot()["bodies_kept"] == 0
    three = parser.parse(third, "messages")
    assert three.reused == 0 and three.lineage[1:] == (0, 0) and three.json == orjson.loads(third)


def test_a_duplicate_top_level_key_is_parsed_whole():
    """Two top-level "messages" keys: orjson keeps the last; reusing the first one's messages would be wrong."""
    parser = BodyParser(min_bytes=0)
    first = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "a" * 100}]})
    parser.parse(first, "messages")
    body = first[:-1] + b',"messages":[{"role":"user","content":"other"}]}'
    assert parser.parse(body, "messages").json == orjson.loads(body)


def test_a_nested_key_before_the_top_level_one_is_not_taken_for_it():
    parser = BodyParser(min_bytes=0)
    prior = [{"role": "user", "content": "x" * 50}]
    first = orjson.dumps({"messages": prior})
    parser.parse(first, "messages")
    body = orjson.dumps({"tools": [{"messages": prior}], "messages": [{"role": "user", "content": "y"}]})
    parsed = parser.parse(body, "messages")
    assert orjson.dumps(parsed.json) == orjson.dumps(orjson.loads(body))
    assert parsed.reused == 0


def test_memory_is_bounded():
    parser = BodyParser(max_kept=3, max_kept_bytes=1 << 30, min_bytes=0)
    for n in range(10):
        parser.parse(orjson.dumps({"messages": [{"role": "user", "content": f"conversation {n}"}]}), "messages")
    assert len(parser._seen) == 3
    parser = BodyParser(max_kept=100, max_kept_bytes=5000, min_bytes=0)
    for n in range(10):
        parser.parse(orjson.dumps({"messages": [{"role": "user", "content": f"{n}" * 1000}]}), "messages")
    assert sum(len(seen.body) for seen in parser._seen) <= 5000


def test_a_spaced_top_level_key_before_a_compact_nested_one_is_not_missed():
    """`"messages": [` (spaced) at the top level, then a compact nested `"messages":[` later: the nested
    one is found first, and what precedes it holds the real key."""
    parser = BodyParser(min_bytes=0)
    prior = [{"role": "user", "content": "x" * 50}]
    parser.parse(orjson.dumps({"messages": prior}), "messages")
    body = b'{"messages": [{"role":"user","content":"y"}],"tools":[' + orjson.dumps({"messages": prior}) + b']}'
    parsed = parser.parse(body, "messages")
    assert orjson.dumps(parsed.json) == orjson.dumps(orjson.loads(body))


def test_scalar_elements_end_where_their_bytes_end():
    """An earlier array [1, ...] does not make [12, 3] start with 1: a value ends at `,` or `]`."""
    parser = BodyParser(min_bytes=0)
    parser.parse(b'{"messages":[1,5]}', "messages")
    for body in (b'{"messages":[12,3]}', b'{"messages":[1 ,3]}', b'{"messages":[1]}', b'{"messages":[1,5,7]}'):
        assert parser.parse(body, "messages").json == orjson.loads(body), body


@given(start=st.lists(message, min_size=1, max_size=6), more=st.lists(message, min_size=1, max_size=3),
       ignore=st.sampled_from([(), ("metadata.user_id",), ("messages[*].id",), ("temperature",)]))
@settings(max_examples=150, deadline=None)
def test_the_cache_key_spliced_from_known_rows_is_the_written_one(start, more, ignore):
    """KeyMaker.canonical with the parse's rows spliced in gives the bytes it writes without them; its parts,
    hashed one after the other, the same key."""
    from agent_sidecar.proxy.cache_key import KeyMaker
    keys = KeyMaker(b"s" * 32, ignore, ["anthropic-version"])
    parser = BodyParser(min_bytes=0)
    for messages in (start, start + more):
        body = orjson.dumps({"model": "m", "metadata": {"user_id": "u"}, "messages": marked(messages), "temperature": 0})
        parsed = parser.parse(body, "messages")
        headers = {"anthropic-version": "2023-06-01"}
        plain = keys.canonical("POST", "/v1/messages", "", headers, parsed.json)
        assert keys.canonical("POST", "/v1/messages", "", headers, parsed.json, ("messages", parsed.rows)) == plain
        parts = keys.canonical_parts("POST", "/v1/messages", "", headers, parsed.json, ("messages", parsed.rows))
        assert b"".join(parts) == plain and keys.request_hash(parts) == keys.request_hash(plain)   # never joined


@given(message, st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_row_without_markers_is_the_unmarked_message(msg, first):
    """sessions.without_markers on orjson's bytes is orjson's bytes of conversation.unmarked, markers first
    or last in their object, on blocks and on the message."""
    from agent_sidecar.proxy.conversation import unmarked
    from agent_sidecar.proxy.sessions import without_markers
    marker = {"cache_control": {"type": "ephemeral", "ttl": "5m"}}
    value = ({**marker, **msg} if first else {**msg, **marker})
    if isinstance(value.get("content"), list):
        value["content"] = [{**marker, **b} if first else {**b, **marker} for b in value["content"]]
    assert without_markers(orjson.dumps(value)) == orjson.dumps(unmarked(value))
    assert without_markers(orjson.dumps(msg)) == orjson.dumps(unmarked(msg))


def test_a_key_repeated_around_the_array_keeps_orjsons_place_and_value():
    parser = BodyParser(min_bytes=0)
    messages = [{"role": "user", "content": "a" * 100}]
    parser.parse(orjson.dumps({"model": "m", "messages": messages}), "messages")
    body = b'{"model":"first","stream":true,"messages":' + orjson.dumps(messages + [{"role": "user", "content": "b"}]) \
        + b',"model":"second","max_tokens":5}'
    parsed = parser.parse(body, "messages")
    assert parsed.reused == 1
    assert orjson.dumps(parsed.json) == orjson.dumps(orjson.loads(body))


@given(agent=text, system=st.one_of(st.none(), text, st.lists(block, max_size=2)), messages=st.lists(message, max_size=4))
@settings(max_examples=200, deadline=None)
def test_a_conversation_id_is_the_digest_of_its_root_however_it_is_worked_out(agent, system, messages):
    """session_id writes its root's JSON from parts kept per object (conversation.derived): the same id as
    the digest of [agent, system head, first user message] written whole, the first time and the next."""
    from agent_sidecar.proxy.conversation import digest, session_id, unmarked
    body = {"system": system, "messages": marked(messages) if messages else []}
    first_user = next((m for m in body["messages"] if m.get("role") == "user"), None)
    head = system[:4096] if isinstance(system, str) else \
        orjson.dumps(unmarked(system))[:4096].decode("utf-8", "ignore")
    expected = "r" + digest([agent, head, unmarked(first_user)])[:15]
    assert session_id(agent, body, {}) == expected == session_id(agent, body, {})
