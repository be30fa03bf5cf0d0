"""One answer, two forms: a JSON body and an SSE stream, each made from the other.

The cache stores whichever form the upstream gave. A request that asks for
the other form gets it converted: a recorded stream assembled into the JSON
body the same request would have got without streaming, or a JSON body turned
into the standard event sequence the official SDKs parse. A conversion that
cannot be made (an entry this version cannot read) is a miss, never an error.
"""

from __future__ import annotations

import orjson

from . import gemini_api, responses_api
from .call import Call
from .encoding import UndecodableBody, decoded
from .entry import Entry
from .sse import AnthropicAssembly, EventParser, OpenAIAssembly, assembled, synthesize_anthropic, synthesize_openai

# Each API's assembly of a stream (sse.py): a stored one here, one going by in the capture (capture.py).
ASSEMBLY = {"anthropic": AnthropicAssembly, "openai": OpenAIAssembly, "gemini": gemini_api.GeminiAssembly}


class Unconvertible(ValueError):
    """This entry cannot be served in the form asked for."""


def form_of(call: Call) -> tuple:
    """What shape of answer the request asks for; a recorded answer of another shape is converted."""
    if call.route.api == "gemini":   # the method and alt=sse say it, not the body
        return ("sse",) if gemini_api.streams(call.route.path, call.route.query) else ("json",)
    if not call.wants_stream:
        return ("json",)
    if responses_api.handles(call.route.api, call.route.path):
        return ("sse",)
    options = call.json.get("stream_options")
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return ("sse", include_usage) if call.route.api == "openai" else ("sse",)


def stored_form(entry: Entry) -> tuple:
    if not entry.stream:
        return ("json",)
    return ("sse", entry.meta["include_usage"]) if "include_usage" in entry.meta else ("sse",)


def message_of(entry: Entry, api: str) -> dict:
    """The stored answer as a JSON body, assembled from its events if it was a stream."""
    try:
        body = decoded(entry.body, entry.header("content-encoding"))
        if not entry.stream:
            message = orjson.loads(body)
        else:
            parser = EventParser()
            events = parser.feed(body) + parser.feed(b"\n\n")
            if entry.meta.get("path") == responses_api.PATH:
                message = responses_api.assemble(events)
            else:
                message = assembled(ASSEMBLY[api](), events)
    except (ValueError, UndecodableBody) as exc:
        raise Unconvertible(f"stored answer unreadable: {exc}") from exc
    if not isinstance(message, dict):
        raise Unconvertible("stored answer is not a JSON object")
    return message


def as_json(message: dict) -> bytes:
    try:
        return orjson.dumps(message)
    except TypeError as exc:   # nested deeper than orjson writes
        raise Unconvertible(str(exc)) from exc


def as_stream(message: dict, api: str, include_usage: bool) -> bytes:
    try:
        if message.get("object") == "response":   # a Responses API answer names itself
            events = responses_api.synthesize(message)
        elif api == "openai":
            events = synthesize_openai(message, include_usage)
        elif api == "gemini":
            events = gemini_api.synthesize(message)
        else:
            events = synthesize_anthropic(message)
        return b"".join(events)
    except (TypeError, ValueError, LookupError, AttributeError) as exc:   # a shape synthesis cannot follow
        raise Unconvertible(str(exc)) from exc
