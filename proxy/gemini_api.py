"""The Gemini API's own rules: how its calls are told apart, keyed, completed, assembled and answered.

`POST /v1beta/models/{model}:generateContent` answers JSON;
`:streamGenerateContent?alt=sse` answers `data:` chunks with no end marker: a
stream is complete when it ends properly (no cut, no event left open) and each
candidate has a `finishReason`. The model is in the path, not the body, and
one answer serves both forms: the cache key names the JSON method
(`:generateContent`, without `alt=sse`). A stored stream is served as JSON by
merging its chunks (consecutive text parts joined, as the SDKs join them); a
stored JSON body is served as a stream of one chunk, a shape the real API sends
for short answers.

An answer the Gemini CLI rejects and retries (`MALFORMED_FUNCTION_CALL`, no
text and no call) is relayed but never stored: a stored one would hand the
retry the same answer. Keys (`x-goog-api-key`, `?key=`) pass upstream and
only partition the cache (proxy/cache_key.py).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

import orjson

from .sse import Assembly, MalformedStream, _object, assembled

# /v1beta/models/{model}:{method} (the google-genai SDK 3 calls /v1/..., the Gemini CLI /v1beta/...)
MODEL_METHOD = re.compile(r"^/(?:v1beta|v1alpha|v1)/(?:models|tunedModels)/([^/:]+):([A-Za-z]+)$")
PREFIXES = ("/v1beta/", "/v1alpha/", "/upload/v1beta/", "/upload/v1/")
GENERATE = ("generateContent", "streamGenerateContent")
STREAM = "streamGenerateContent"
# Finish reasons of a generation that failed: the Gemini CLI retries the same request after them.
FAILED = frozenset({"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "FINISH_REASON_UNSPECIFIED"})
# The sidecar's error kinds (proxy/errors.py) as Google's status names; Google has no 529.
STATUS = {"invalid_request": (400, "INVALID_ARGUMENT"), "forbidden": (403, "PERMISSION_DENIED"),
          "not_found": (404, "NOT_FOUND"), "replay_miss": (404, "NOT_FOUND"),
          "too_large": (413, "INVALID_ARGUMENT"), "rate_limit": (429, "RESOURCE_EXHAUSTED"),
          "overloaded": (503, "UNAVAILABLE"), "api_error": (500, "INTERNAL"),
          "bad_gateway": (502, "UNAVAILABLE"), "timeout": (504, "DEADLINE_EXCEEDED")}


def is_gemini(path: str, headers, query: str) -> bool:
    """Gemini's own paths; `/v1/models...` (every API's) with a Gemini key."""
    if path.startswith(PREFIXES) or ":" in path and MODEL_METHOD.match(path) is not None:
        return True
    return path.startswith("/v1/models") and ("x-goog-api-key" in headers or query.startswith("key=")
                                              or "&key=" in query)


def method_of(path: str) -> tuple[str, str] | None:
    """(model, method) of a model call's path."""
    match = MODEL_METHOD.match(path) if ":" in path else None   # every other API's path: no regex
    return (match.group(1), match.group(2)) if match else None


def model_of(path: str) -> str:
    found = method_of(path)
    return found[0] if found else ""


def streams(path: str, query: str) -> bool:
    """An SSE answer: streamGenerateContent with alt=sse (without it the API streams a JSON array)."""
    return path.endswith(":" + STREAM) and "alt=sse" in query.split("&")


def is_generate(path: str) -> bool:
    found = method_of(path)
    return found is not None and found[1] in GENERATE


def key_target(path: str, query: str) -> tuple[str, str]:
    """The path and query a call is keyed by: the JSON form's, so one answer serves both forms."""
    if not streams(path, query):
        return path, query
    rest = "&".join(part for part in query.split("&") if part != "alt=sse")
    return path[:-len(STREAM)] + "generateContent", rest


# -- answers -----------------------------------------------------------------------------------------------

def well_formed(path: str, doc: Any) -> bool:
    """A complete answer of the shape its method returns, and one worth keeping (see FAILED)."""
    if not isinstance(doc, dict) or "error" in doc:
        return False
    found = method_of(path)
    method = found[1] if found else ""
    if method == "countTokens":
        return isinstance(doc.get("totalTokens"), int)
    if method not in GENERATE:
        return True
    candidates = doc.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        return False
    for candidate in candidates:
        if not isinstance(candidate, dict) or not candidate.get("finishReason") \
                or candidate["finishReason"] in FAILED:
            return False
    parts = ((candidates[0].get("content") or {}).get("parts")) or []
    return any(isinstance(p, dict) and ("functionCall" in p or p.get("text") and not p.get("thought"))
               for p in parts)


def error_in(data: bytes) -> bool:
    """A chunk that is an error (`{"error": ...}`), which the API sends mid-stream."""
    return b'"error"' in data and isinstance(doc := orjson.loads(data), dict) and "error" in doc


class GeminiAssembly(Assembly):
    """The GenerateContentResponse a generateContent call returns, from a stream's chunks."""

    __slots__ = ("response", "candidates")

    def __init__(self) -> None:
        self.response: dict[str, Any] | None = None
        self.candidates: dict[int, dict] = {}

    def add(self, name: str, data: bytes) -> None:
        chunk = _object(orjson.loads(data), "chunk")
        if "error" in chunk:
            raise MalformedStream("an error chunk")
        if self.response is None:
            self.response = {}
        response = self.response
        for field, value in chunk.items():
            if field != "candidates":
                response[field] = value   # usageMetadata, modelVersion, responseId, promptFeedback: the last
        for position, piece in enumerate(chunk.get("candidates") or []):
            piece = _object(piece, "candidate")
            index = piece.get("index", position)
            if type(index) is not int or index < 0:
                raise MalformedStream(f"candidate index {index!r}")
            _merge(self.candidates.setdefault(index, {}), piece)

    def result(self) -> dict[str, Any] | None:
        if self.response is None or not self.candidates:
            return self.response
        return {"candidates": [self.candidates[i] for i in sorted(self.candidates)], **self.response}


def assemble(events: list[tuple[str, bytes]]) -> dict[str, Any] | None:
    """The GenerateContentResponse a generateContent call returns, from a stream's chunks."""
    return assembled(GeminiAssembly(), events)


def _merge(candidate: dict, piece: dict) -> None:
    for field, value in piece.items():
        if field != "content":
            candidate[field] = value
            continue
        content = _object(value, "content")
        held = candidate.setdefault("content", {"parts": []})
        if "role" in content:
            held["role"] = content["role"]
        parts = content.get("parts") or []
        if not isinstance(parts, list):
            raise MalformedStream("parts is not a list")
        for part in parts:
            _add_part(held["parts"], _object(part, "part"))


TEXT_FIELDS = frozenset({"text", "thought", "thoughtSignature"})


def _add_part(parts: list[dict], part: dict) -> None:
    """Consecutive text parts of one kind (thought or not) are one part, as in a JSON answer."""
    last = parts[-1] if parts else None
    if last is not None and _plain_text(part) and _plain_text(last) \
            and bool(part.get("thought")) == bool(last.get("thought")) \
            and not ("thoughtSignature" in part and "thoughtSignature" in last):
        parts[-1] = {**last, **part, "text": last["text"] + part["text"]}
    else:
        parts.append(dict(part))


def _plain_text(part: dict) -> bool:
    return isinstance(part.get("text"), str) and part.keys() <= TEXT_FIELDS


def synthesize(response: dict[str, Any]) -> Iterator[bytes]:
    """A JSON answer as a stream: one chunk holding it all, framed as Google frames chunks."""
    if not isinstance(response.get("candidates"), list):
        raise ValueError("no candidates to stream")
    yield b"data: " + orjson.dumps(response) + b"\r\n\r\n"


def answer_turn(answer: dict | None) -> dict | None:
    """The model's turn as the next request's `contents` carries it."""
    candidates = (answer or {}).get("candidates")
    content = candidates[0].get("content") if isinstance(candidates, list) and candidates else None
    if not isinstance(content, dict):
        return None
    return {"role": content.get("role") or "model", "parts": content.get("parts") or []}


def error_body(kind: str, message: str, retry_after: float | None = None) -> tuple[int, bytes]:
    """A sidecar error in Google's shape, with the RetryInfo the Gemini CLI reads for its backoff."""
    status, name = STATUS[kind]
    error: dict[str, Any] = {"code": status, "message": message, "status": name}
    if retry_after is not None:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                             "retryDelay": f"{max(1, math.ceil(retry_after))}s"}]
    return status, orjson.dumps({"error": error})
