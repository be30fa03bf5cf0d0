"""The header rules (proxy/upstream.py, proxy/entry.py) against their definition, on any headers.

What goes upstream is every header but the hop-by-hop ones, those the Connection header names, `host`,
`content-length`, `expect` and the sidecar's own `x-sidecar-*`; what a cache entry keeps is every header
but framing, the moment, cookies and ours. Names in any case, repeated, in any order: the fast forms
(copy, then delete in C) must give exactly what the plain filter below gives, order and case kept.
And what leaves /_sidecar/: redact's quick pass (a document without any trigger is not scanned) masks exactly
what the full pattern masks.
"""

from __future__ import annotations

from hypothesis import given, strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from agent_sidecar.proxy.entry import NOT_KEPT, kept_headers
from agent_sidecar.proxy.headers import NOT_FORWARDED, end_to_end, request_headers

NAMES = sorted(NOT_FORWARDED | NOT_KEPT | {"x-sidecar-cache", "x-sidecar-agent", "x-api-key", "request-id",
                                            "anthropic-version", "x-sidecarish", "content-type", "x-custom"})


def any_case(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda upper: "".join(c.upper() if u else c for c, u in zip(name, upper)))


header = st.sampled_from(NAMES).flatmap(any_case)
value = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=12)
connection = st.lists(st.sampled_from(["close", "keep-alive", "X-Custom", " request-id ", "upgrade", ""]),
                      max_size=3).map(", ".join)
headers = st.tuples(st.lists(st.tuples(header, value), max_size=12), st.lists(connection, max_size=2)).map(
    lambda pair: CIMultiDictProxy(CIMultiDict(pair[0] + [("Connection", c) for c in pair[1]])))


def plain_end_to_end(headers) -> list[tuple[str, str]]:
    drop = set(NOT_FORWARDED)
    for connection in headers.getall("connection", ()):
        drop |= {token.strip().lower() for token in connection.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


@given(headers)
def test_end_to_end_is_the_filter(given_headers):
    assert list(end_to_end(given_headers).items()) == plain_end_to_end(given_headers)


@given(headers)
def test_request_headers_drop_the_sidecars_own_too(given_headers):
    expected = [(k, v) for k, v in plain_end_to_end(given_headers) if not k.lower().startswith("x-sidecar-")]
    assert list(request_headers(given_headers).items()) == expected


@given(headers)
def test_kept_headers_is_the_filter(given_headers):
    expected = [(k, v) for k, v in given_headers.items()
                if k.lower() not in NOT_KEPT and not k.lower().startswith("x-sidecar-")]
    assert kept_headers(given_headers) == expected


fragment = st.sampled_from([b"sk-" + b"test-" + b"q" * 16, b"SK-" + b"TEST-" + b"xyz" * 4, b"AIza" + b"x" * 35, b"aiza" + b"y" * 35,
                            b"api_key=", b"API-KEY: ", b"Access_Token ", b"authkey=", b"secret-token:", b"password=",
                            b"Bearer ", b"bearer", b'"api": "anthropic"', b"input_tokens", b"hunter2secretvalue",
                            b"tok_123456789", b" ", b'"', b"=", b":", b"-", b"_", b"a", b"Z", b"9"])


@given(st.lists(fragment, max_size=20).map(b"".join))
def test_redact_masks_what_the_pattern_masks(data):
    """proxy/redact.py's quick pass (no trigger, no scan) changes nothing the full pattern would mask."""
    from agent_sidecar.proxy.redact import SECRETS, redact
    assert redact(data) == SECRETS.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + b"***", data)
