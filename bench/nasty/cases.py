"""The corpus: odd-but-possible upstream answers, one table entry each.

A request picks a case by its JSON body's model, `"nasty-<case>"` (so each
case has its own cache key at a proxy), or by a `nasty=<case>` query. An
`Answer` says exactly which bytes go on the wire and how the exchange ends;
a `Case` adds what the request looks like and what a correct proxy does with
the answer (`kind`):

- STORED:  well-formed and complete: relayed byte for byte, then served from the cache.
- RELAYED: ends properly at the HTTP level but is malformed or an error: relayed byte for byte, never stored.
- BROKEN:  breaks off after the head: the agent's answer is cut (never looks complete), or, if the
           proxy had not sent its head yet, an API-shaped 5xx `sidecar: ...`; never stored.
- NO_HEAD: no answer head at all: the agent gets an API-shaped 502 whose message starts `sidecar:`.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass

import orjson

from .shapes import (ANTHROPIC_HEADERS, GEMINI_HEADERS, JSON_TYPE, OPENAI_HEADERS, SSE_TYPE, anthropic_error, chat_chunks,
                     chunk, completion, data_lines, dumps, function_call_events, gemini_chunks, gemini_error,
                     gemini_response, gemini_sse, message, message_events, nested, openai_error, response,
                     response_events, sse)

STORED, RELAYED, BROKEN, NO_HEAD = "stored", "relayed", "broken", "no_head"


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    pieces: tuple[bytes, ...] = ()      # the body, in pieces (one chunk each when chunked)
    framing: str = "length"             # length | chunked | close (no length, read until close) | none
    end: str = "keep"                   # keep | close | cut (close mid-body) | rst (reset mid-body)
    #                                     | silence (hold after the pieces)
    #                                     | reset (RST before the head) | fin (close before the head)
    version: str = "HTTP/1.1"
    write_size: int = 0                 # re-slice the framed body into writes of this size (0: one per piece)
    pause: float = 0.0                  # seconds after the head and after each write
    wait: float = 0.0                   # hold this long before the head (ends early if the peer goes away)
    raw_head: bytes = b""               # sent instead of a proper head
    length: int | None = None           # a content-length other than the body's
    tail: bytes = b""                   # raw bytes after the pieces, before the end (bad chunk framing)

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)


@dataclass(frozen=True)
class Case:
    name: str
    doc: str
    kind: str
    answer: Answer
    api: str = "anthropic"              # anthropic: POST /v1/messages; openai: POST /v1/chat/completions;
    #                                     responses: POST /v1/responses
    #                                     gemini: POST /v1beta/models/nasty-<case>:(stream)generateContent
    stream: bool = False                # the request asks for "stream": true
    accept: str = "gzip, deflate"       # the request's Accept-Encoding
    decoded: bytes | None = None        # the body without its content-encoding, for encoded answers
    request: tuple[tuple[str, object], ...] = ()   # extra request body fields


def pieces(body: bytes, size: int) -> tuple[bytes, ...]:
    return tuple(body[i:i + size] for i in range(0, len(body), size)) or (b"",)


def per_event(body: bytes, sep: bytes = b"\n\n") -> tuple[bytes, ...]:
    """One piece per SSE event, as streaming servers write them."""
    parts = body.split(sep)
    out = [p + sep for p in parts[:-1]]
    return tuple(out + ([parts[-1]] if parts[-1] else []))


def a_json(body: bytes, *, ctype: str | None = JSON_TYPE, extra=(), **kw) -> Answer:
    head = ((("content-type", ctype),) if ctype else ()) + ANTHROPIC_HEADERS + tuple(extra)
    return Answer(headers=head, pieces=(body,), **kw)


def a_sse(body: bytes, *, ctype: str = SSE_TYPE, split=per_event, **kw) -> Answer:
    head = (("content-type", ctype), ("cache-control", "no-cache")) + ANTHROPIC_HEADERS
    return Answer(headers=head, pieces=split(body), framing=kw.pop("framing", "chunked"), **kw)


def o_json(body: bytes, **kw) -> Answer:
    return Answer(headers=(("content-type", JSON_TYPE),) + OPENAI_HEADERS, pieces=(body,), **kw)


def r_json(body: bytes, **kw) -> Answer:
    return o_json(body, **kw)


def r_sse(events: list[tuple[str, object]], **kw) -> Answer:
    head = (("content-type", SSE_TYPE),) + OPENAI_HEADERS
    return Answer(headers=head, pieces=per_event(sse(events)), framing="chunked", **kw)


def o_sse(body: bytes, **kw) -> Answer:
    head = (("content-type", SSE_TYPE),) + OPENAI_HEADERS
    return Answer(headers=head, pieces=per_event(body), framing="chunked", **kw)


def g_json(body: bytes, **kw) -> Answer:
    return Answer(headers=(("content-type", "application/json; charset=UTF-8"),) + GEMINI_HEADERS, pieces=(body,), **kw)


def g_sse(body: bytes, **kw) -> Answer:
    head = (("content-type", "text/event-stream"), ("content-disposition", "attachment")) + GEMINI_HEADERS
    return Answer(headers=head, pieces=per_event(body, b"\r\n\r\n"), framing="chunked", **kw)


def error(status: int, body: bytes, ctype: str = JSON_TYPE, extra=(), headers=ANTHROPIC_HEADERS) -> Answer:
    return Answer(status=status, headers=(("content-type", ctype),) + headers + tuple(extra), pieces=(body,))


OK = dumps(message())
EVENTS = message_events()
STREAM = sse(EVENTS)
CHAT = dumps(completion())
CHAT_STREAM = data_lines(chat_chunks())
RESPONSE_EVENTS = response_events()
RATE_LIMITED = anthropic_error(
    "rate_limit_error", "This request would exceed the rate limit for your organization of 2,000,000 input tokens "
                        "per minute. Please reduce the prompt length or try again later.")
OVERLOADED_HTML = (b"<!DOCTYPE html>\n<html><head><title>529 Site is overloaded</title></head>\n"
                   b"<body><h1>Site is overloaded</h1><p>Please try again in a few minutes.</p></body></html>\n")
UNICODE_TEXT = "na\u00efve caf\u00e9 \u6f22\u5b57 \U0001F600 \u2014 done"
BIG_TEXT = "x" * (1 << 20)


def events_with(index: int, name: str, data: object) -> list[tuple[str, object]]:
    """The standard events with event `index` replaced."""
    out = list(EVENTS)
    out[index] = (name, data)
    return out


def multiline(events: list[tuple[str, object]]) -> bytes:
    """Each event's JSON pretty-printed over several `data:` lines (joined with \\n, it is the same JSON)."""
    out = []
    for name, data in events:
        lines = orjson.dumps(data, option=orjson.OPT_INDENT_2).split(b"\n")
        out.append(b"event: " + name.encode() + b"\n" + b"".join(b"data: " + ln + b"\n" for ln in lines) + b"\n")
    return b"".join(out)


def commented(body: bytes) -> bytes:
    return b": keep-alive\n\n" + body.replace(b"\n\nevent:", b"\n\n: ping from the edge\n:\nevent:")


_CASES = [
    # ---- Anthropic JSON answers ----
    Case("json_ok", "a normal JSON message with the real headers", STORED, a_json(OK)),
    Case("json_chunked", "a normal JSON message sent with Transfer-Encoding: chunked", STORED,
         Answer(headers=(("content-type", JSON_TYPE),) + ANTHROPIC_HEADERS, pieces=(OK[:40], OK[40:200], OK[200:]),
                framing="chunked")),
    Case("json_gzip", "gzip-encoded JSON to a client that asked for gzip", STORED,
         a_json(gzip.compress(OK, mtime=0), extra=(("content-encoding", "gzip"),)), decoded=OK),
    Case("json_gzip_unasked", "gzip-encoded JSON to a client that sent Accept-Encoding: identity", STORED,
         a_json(gzip.compress(OK, mtime=0), extra=(("content-encoding", "gzip"),)), accept="identity", decoded=OK),
    Case("json_deflate", "deflate-encoded JSON", STORED,
         a_json(zlib.compress(OK), extra=(("content-encoding", "deflate"),)), decoded=OK),
    Case("json_gzip_not_gzip", "content-encoding: gzip on a body that is not gzip", RELAYED,
         a_json(OK, extra=(("content-encoding", "gzip"),))),
    Case("json_gzip_truncated", "gzip JSON whose gzip stream is cut short (the length is right)", RELAYED,
         a_json(gzip.compress(OK, mtime=0)[:-12], extra=(("content-encoding", "gzip"),))),
    Case("json_trailing_garbage", "a JSON message followed by junk", RELAYED, a_json(OK + b'}\n{"x"')),
    Case("json_deep_300", "a JSON answer nested 300 levels deep", RELAYED, a_json(nested(300))),
    Case("json_deep_2000", "a JSON answer nested 2000 levels deep", RELAYED, a_json(nested(2000))),
    Case("json_usage_null", "a message whose usage is null", STORED, a_json(dumps(message(usage=None)))),
    Case("json_usage_strings", "a message whose token counts are strings", STORED,
         a_json(dumps(message(usage={"input_tokens": "12", "output_tokens": "9"})))),
    Case("json_usage_missing", "a message without usage", STORED, a_json(dumps(message(usage="missing")))),
    Case("json_error_200", "status 200 with an error body", RELAYED,
         a_json(anthropic_error("api_error", "Internal server error"))),
    Case("status_204", "204 No Content to a model call", RELAYED,
         Answer(status=204, headers=ANTHROPIC_HEADERS, framing="none")),
    Case("empty_200", "status 200 with an empty body", RELAYED, a_json(b"")),
    Case("no_content_type", "a JSON message without content-type", STORED, a_json(OK, ctype=None)),
    Case("sse_type_on_json", "text/event-stream content-type on a JSON body", RELAYED, a_json(OK, ctype=SSE_TYPE)),
    Case("json_type_on_sse", "application/json content-type on an SSE body", RELAYED,
         a_sse(STREAM, ctype=JSON_TYPE), stream=True),
    Case("invalid_utf8", "a JSON message with invalid UTF-8 bytes in its text", RELAYED,
         a_json(OK.replace(b"bends", b"be\xff\xfends"))),
    Case("utf8_bom", "a JSON message preceded by a UTF-8 BOM", RELAYED, a_json(b"\xef\xbb\xbf" + OK)),
    # ---- error answers ----
    Case("err_429_garbage_retry_after", "429 with retry-after: soon", RELAYED,
         error(429, RATE_LIMITED, extra=(("retry-after", "soon"), ("x-should-retry", "true")))),
    Case("err_429_http_date", "429 with an HTTP-date retry-after", RELAYED,
         error(429, RATE_LIMITED, extra=(("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),))),
    Case("err_429_huge_retry_after", "429 with retry-after of a thousand years", RELAYED,
         error(429, RATE_LIMITED, extra=(("retry-after", "31536000000"),))),
    Case("err_529_html", "529 with an HTML body", RELAYED, error(529, OVERLOADED_HTML, "text/html; charset=UTF-8")),
    Case("err_500_text", "500 text/plain", RELAYED, error(500, b"Internal Server Error", "text/plain; charset=utf-8")),
    Case("err_503_retry_after_ms", "503 with retry-after-ms: NaN", RELAYED,
         error(503, anthropic_error("api_error", "Service Unavailable"), extra=(("retry-after-ms", "NaN"),))),
    Case("err_401", "401 with the real authentication_error body", RELAYED,
         error(401, anthropic_error("authentication_error", "invalid x-api-key"))),
    Case("err_400", "400 with the real invalid_request_error body", RELAYED,
         error(400, anthropic_error("invalid_request_error", "max_tokens: Field required"))),
    # ---- Anthropic streams ----
    Case("sse_ok", "a normal event stream", STORED, a_sse(STREAM), stream=True),
    Case("sse_crlf_split", "\\r\\n line endings, written 3 bytes at a time", STORED,
         a_sse(sse(EVENTS, b"\r\n"), split=lambda b: per_event(b, b"\r\n\r\n"), write_size=3), stream=True),
    Case("sse_cr", "bare \\r line endings", STORED, a_sse(sse(EVENTS, b"\r"), split=lambda b: per_event(b, b"\r\r")),
         stream=True),
    Case("sse_comments", "': comment' keep-alive lines between events", STORED, a_sse(commented(STREAM)),
         stream=True),
    Case("sse_multiline_data", "each event's JSON spread over several data: lines", STORED,
         a_sse(multiline(EVENTS)), stream=True),
    Case("sse_1mb_event", "one 1 MB delta event arriving in 4 KB writes", STORED,
         a_sse(sse(message_events(BIG_TEXT, pieces=[BIG_TEXT])), write_size=4096), stream=True),
    Case("sse_drip", "a stream drip-fed 2 bytes at a time", STORED,
         a_sse(sse(message_events("drip", pieces=["dr", "ip"])), write_size=2, pause=0.001), stream=True),
    Case("sse_utf8_split", "multi-byte UTF-8 text split across 5-byte writes", STORED,
         a_sse(sse(message_events(UNICODE_TEXT)), write_size=5), stream=True),
    Case("sse_bom", "a stream that starts with a UTF-8 BOM (SSE clients skip it)", STORED,
         a_sse(b"\xef\xbb\xbf" + STREAM), stream=True),
    Case("sse_gzip", "a normal stream, gzip-encoded, to a client that asked for gzip", STORED,
         Answer(headers=(("content-type", SSE_TYPE), ("content-encoding", "gzip")) + ANTHROPIC_HEADERS,
                pieces=pieces(gzip.compress(STREAM, mtime=0), 100), framing="chunked"),
         stream=True, decoded=STREAM),
    Case("sse_close_framing", "a complete stream without length or chunking, ended by closing", STORED,
         a_sse(STREAM, framing="close"), stream=True),
    Case("sse_usage_strings", "a stream whose token counts are strings", STORED,
         a_sse(sse(message_events(delta_usage={"output_tokens": "9"}))), stream=True),
    Case("sse_delta_not_json", "a content_block_delta whose data is not JSON", RELAYED,
         a_sse(sse(events_with(3, "content_block_delta", b"{not json"))), stream=True),
    Case("sse_message_delta_not_json", "a message_delta whose data is not JSON", RELAYED,
         a_sse(sse(events_with(7, "message_delta", b"oops"))), stream=True),
    Case("sse_message_start_list", "message_start whose message is a list", RELAYED,
         a_sse(sse(message_events(start=[1, 2]))), stream=True),
    Case("sse_message_start_null", "message_start whose message is null", RELAYED,
         a_sse(sse(message_events(start=None))), stream=True),
    Case("sse_index_out_of_range", "a delta for content block 7 of 1", RELAYED,
         a_sse(sse(events_with(4, "content_block_delta", {"type": "content_block_delta", "index": 7,
                                                          "delta": {"type": "text_delta", "text": "?"}}))),
         stream=True),
    Case("sse_error_mid_stream", "event: error (overloaded) after the first delta, then a proper end", RELAYED,
         a_sse(sse(EVENTS[:4] + [("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                       "message": "Overloaded"}})])), stream=True),
    Case("sse_cut", "the connection closes before message_stop", BROKEN,
         a_sse(sse(EVENTS[:5]), end="cut"), stream=True),
    Case("sse_reset_mid_stream", "the connection is reset (RST) before message_stop", BROKEN,
         a_sse(sse(EVENTS[:5]), end="rst", pause=0.02), stream=True),
    Case("sse_two_message_stop", "two message_stop events", RELAYED,
         a_sse(STREAM + sse(EVENTS[-1:])), stream=True),
    Case("sse_event_after_stop", "an event after message_stop", RELAYED,
         a_sse(STREAM + sse([("ping", {"type": "ping"})])), stream=True),
    Case("sse_junk_after_stop", "junk bytes after message_stop", RELAYED,
         a_sse(STREAM + b"junk after the end\n"), stream=True),
    Case("sse_no_final_blank_line", "message_stop without the blank line that dispatches it", RELAYED,
         a_sse(STREAM[:-1]), stream=True),
    Case("sse_head_then_silence", "message_start, then silence past the read timeout", BROKEN,
         a_sse(sse(EVENTS[:1]), end="silence"), stream=True),
    # ---- OpenAI chat ----
    Case("chat_ok", "a normal chat completion with the real headers", STORED, o_json(CHAT), api="openai"),
    Case("chat_stream_ok", "a normal chat stream ending in [DONE]", STORED, o_sse(CHAT_STREAM), api="openai",
         stream=True),
    Case("chat_stream_usage", "a chat stream with a usage chunk (include_usage)", STORED,
         o_sse(data_lines(chat_chunks(usage={"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}))),
         api="openai", stream=True, request=(("stream_options", {"include_usage": True}),)),
    Case("chat_stream_keepalive", "a 'data: keepalive' line inside a chat stream", RELAYED,
         o_sse(data_lines(chat_chunks()[:2] + [b"keepalive"] + chat_chunks()[2:])), api="openai", stream=True),
    Case("chat_stream_no_done", "a chat stream without [DONE], then the connection closes", RELAYED,
         o_sse(data_lines(chat_chunks(), done=False), end="close"), api="openai", stream=True),
    Case("chat_stream_cut", "a chat stream cut (no last chunk, no [DONE]) by closing", BROKEN,
         o_sse(data_lines(chat_chunks()[:3], done=False), end="cut"), api="openai", stream=True),
    Case("chat_choices_null", "a chat completion with choices: null", RELAYED,
         o_json(dumps(completion(choices=None))), api="openai"),
    Case("chat_stream_choices_null", "a chat chunk with choices: null", RELAYED,
         o_sse(data_lines(chat_chunks()[:2] + [chunk({}, choices=None)] + chat_chunks()[2:])), api="openai",
         stream=True),
    Case("chat_usage_strings", "a chat completion whose token counts are strings", STORED,
         o_json(dumps(completion(usage={"prompt_tokens": "12", "completion_tokens": "9", "total_tokens": "21"}))),
         api="openai"),
    Case("chat_401", "401 with the real invalid_api_key body", RELAYED,
         error(401, openai_error("invalid_request_error", "Incorrect API key provided: sk-test. You can find your "
                                 "API key at https://platform.openai.com/account/api-keys.", "invalid_api_key"),
               headers=OPENAI_HEADERS), api="openai"),
    Case("chat_stream_error_mid", "an error object inside a chat stream, no [DONE]", RELAYED,
         o_sse(data_lines(chat_chunks()[:2] + [orjson.loads(openai_error(
             "server_error", "The server had an error while processing your request.", None))], done=False)),
         api="openai", stream=True),
    # ---- OpenAI Responses ----
    Case("responses_ok", "a normal Responses API answer", STORED, r_json(dumps(response())), api="responses"),
    Case("responses_stream_ok", "a normal Responses stream ending in response.completed", STORED,
         r_sse(RESPONSE_EVENTS), api="responses", stream=True),
    Case("responses_stream_function_call", "a streamed function call with its argument deltas", STORED,
         r_sse(function_call_events()), api="responses", stream=True),
    Case("responses_stream_failed", "a Responses stream ending in response.failed", RELAYED,
         r_sse(response_events(end="response.failed", final=response(
             status="failed", output=[], error={"code": "server_error", "message": "The model failed."}))),
         api="responses", stream=True),
    Case("responses_stream_incomplete", "a Responses stream ending in response.incomplete (max_output_tokens)",
         RELAYED, r_sse(response_events(end="response.incomplete", final=response(
             status="incomplete", incomplete_details={"reason": "max_output_tokens"}))), api="responses",
         stream=True),
    Case("responses_stream_error_event", "an error event after the first delta, then a proper HTTP end", RELAYED,
         r_sse(RESPONSE_EVENTS[:5] + [("error", {"type": "error", "sequence_number": 5, "code": "server_error",
                                                 "param": None, "message": "The server had an error."})]),
         api="responses", stream=True),
    Case("responses_stream_no_completed", "a Responses stream that ends after output_item.done", RELAYED,
         r_sse(RESPONSE_EVENTS[:-1]), api="responses", stream=True),
    Case("responses_stream_event_after_completed", "an event after response.completed", RELAYED,
         r_sse(RESPONSE_EVENTS + RESPONSE_EVENTS[-1:]), api="responses", stream=True),
    Case("responses_stream_cut", "a Responses stream cut before response.completed", BROKEN,
         r_sse(RESPONSE_EVENTS[:6], end="cut"), api="responses", stream=True),
    Case("responses_incomplete_json", "a JSON response whose status is incomplete", RELAYED,
         r_json(dumps(response(status="incomplete", incomplete_details={"reason": "max_output_tokens"}))),
         api="responses"),
    Case("responses_failed_json", "a JSON response whose status is failed, with its error", RELAYED,
         r_json(dumps(response(status="failed", output=[], error={"code": "server_error", "message": "failed"}))),
         api="responses"),
    # ---- connections and framing ----
    Case("conn_close_after", "a normal message with Connection: close, then close", STORED, a_json(OK, end="close")),
    Case("http10_until_close", "an HTTP/1.0 answer without content-length, read until close", STORED,
         a_json(OK, version="HTTP/1.0", framing="close")),
    Case("reset_before_head", "the connection is reset before any answer", NO_HEAD, Answer(end="reset")),
    Case("close_before_head", "the connection is closed before any answer", NO_HEAD, Answer(end="fin")),
    Case("garbage_head", "a status line that is not HTTP", NO_HEAD,
         Answer(raw_head=b"HELLO this is not http\r\n\r\n", end="close")),
    Case("json_head_then_silence", "a JSON head, then silence past the read timeout", BROKEN,
         a_json(b"", length=len(OK), end="silence")),
    Case("json_short_body", "content-length larger than the body, then close", BROKEN,
         a_json(OK[:100], length=len(OK), end="cut", pause=0.05)),
    Case("json_bad_chunk", "chunked JSON whose second chunk size is garbage", BROKEN,
         Answer(headers=(("content-type", JSON_TYPE),) + ANTHROPIC_HEADERS, pieces=(OK[:50],), framing="chunked",
                tail=b"zz\r\nnot a chunk\r\n", end="cut", pause=0.05)),
    # ---- Gemini (no end marker: complete when the stream ends properly with a finishReason) ----
    Case("gemini_json_ok", "a normal generateContent answer", STORED, g_json(dumps(gemini_response())), api="gemini"),
    Case("gemini_sse_ok", "a normal streamGenerateContent?alt=sse stream", STORED,
         g_sse(gemini_sse(gemini_chunks())), api="gemini", stream=True),
    Case("gemini_sse_error_mid", "an error chunk after two text chunks, then the stream ends", RELAYED,
         g_sse(gemini_sse([*gemini_chunks()[:2], orjson.loads(gemini_error(
             503, "UNAVAILABLE", "The model is overloaded. Please try again later."))])), api="gemini", stream=True),
    Case("gemini_sse_no_finish", "a stream whose chunks never carry a finishReason", RELAYED,
         g_sse(gemini_sse(gemini_chunks(finish=None))), api="gemini", stream=True),
    Case("gemini_sse_cut", "a stream cut after two chunks", BROKEN,
         g_sse(gemini_sse(gemini_chunks()[:2]), end="cut"), api="gemini", stream=True),
    Case("gemini_sse_open_event", "the finishReason chunk without its blank line, then the end", RELAYED,
         g_sse(gemini_sse(gemini_chunks())[:-4]), api="gemini", stream=True),
    Case("gemini_malformed_call", "finishReason MALFORMED_FUNCTION_CALL (the Gemini CLI retries it)", RELAYED,
         g_sse(gemini_sse(gemini_chunks(finish="MALFORMED_FUNCTION_CALL"))), api="gemini", stream=True),
    Case("gemini_err_429", "429 RESOURCE_EXHAUSTED with a RetryInfo detail", RELAYED,
         Answer(status=429, headers=(("content-type", "application/json; charset=UTF-8"),) + GEMINI_HEADERS,
                pieces=(gemini_error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),))
         , api="gemini"),
    Case("dup_headers", "several set-cookie and duplicate rate-limit headers", STORED,
         a_json(OK, extra=(("set-cookie", "__cf_bm=a; path=/; HttpOnly"), ("set-cookie", "_cfuvid=b; path=/"),
                           ("set-cookie", "third=c"), ("anthropic-ratelimit-requests-remaining", "3998"),
                           ("vary", "Accept-Encoding"), ("vary", "Origin")))),
    Case("big_headers", "a 7 KB header and 40 more of 100 bytes", STORED,
         a_json(OK, extra=(("x-nasty-big", "b" * 7000),) + tuple((f"x-nasty-pad-{i}", "p" * 100)
                                                              for i in range(40)))),
]

# Not part of the corpus: answers the client-side tests need.
_HELPERS = [
    Case("hold", "a normal message after 20 s (or nothing, once the caller left)", STORED, a_json(OK, wait=20.0)),
    Case("sse_slow", "a normal stream of 40 events, 25 ms apart", STORED,
         a_sse(sse(message_events("slow " * 40, pieces=["slow "] * 40)), pause=0.025), stream=True),
]

CASES: dict[str, Case] = {c.name: c for c in _CASES}
HELPERS: dict[str, Case] = {c.name: c for c in _HELPERS}
ALL: dict[str, Case] = {**CASES, **HELPERS}
assert len(CASES) == len(_CASES), "case names must be unique"
