"""The Gemini API (generativelanguage.googleapis.com, v1beta) as the mock serves it.

generateContent (JSON), streamGenerateContent?alt=sse (`data:` chunks framed with
CRLF as Google frames them, no end marker: the last chunk carries `finishReason`
and the full `usageMetadata`), countTokens, and the models list. A functionCall
part answers when tools are declared and the last user turn asks to "use a tool"
(naming a declared tool picks it; else the first). Errors are Google's
`{"error": {"code", "message", "status"}}`; a 429 carries a RetryInfo detail.
"""

from __future__ import annotations

import re
import time

import orjson
from aiohttp import web

from .common import Fail, deltas, rand, words_of

# /v1beta/models/{model}:{method} (google-genai 3 uses /v1, the Gemini CLI /v1beta)
MODEL_METHOD = re.compile(r"^/(v1beta|v1alpha|v1)/(models|tunedModels)/([^/:]+):([A-Za-z]+)$")
MODEL_GET = re.compile(r"^/(v1beta|v1alpha|v1)/(models|tunedModels)(?:/([^/:]+))?$")
PREFIXES = ("/v1beta/", "/v1alpha/", "/upload/v1beta/")
MODELS = [("gemini-2.5-flash", "Gemini 2.5 Flash", 1048576, 65536),
          ("gemini-2.5-pro", "Gemini 2.5 Pro", 1048576, 65536),
          ("gemini-2.5-flash-lite", "Gemini 2.5 Flash-Lite", 1048576, 65536)]
# HTTP status -> Google's canonical status name
STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
          500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
# injected failure kind -> (status, message): Google has no 529, an overloaded model is a 503
FAILURES = {"rate_limit": (429, "Resource has been exhausted (e.g. check quota)."),
            "overloaded": (503, "The model is overloaded. Please try again later."),
            "server_error": (500, "An internal error has occurred. Please retry or report in "
                                  "https://developers.generativeai.google/guide/troubleshooting"),
            "bad_gateway": (502, "Bad Gateway")}
CALL_PARTS = ("functionCall", "functionResponse", "function_call", "function_response")
FILL = {"string": None, "integer": 1, "number": 1, "boolean": True}


def field(doc: object, name: str, default: object = None) -> object:
    """A request field by its JSON name or its proto name (`functionDeclarations` or `function_declarations`):
    the API takes both, and the Python SDK sends some fields in snake case."""
    if not isinstance(doc, dict):
        return default
    if name in doc:
        return doc[name]
    return doc.get(re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), name), default)


def is_gemini(path: str, headers, query: str) -> bool:
    """Gemini's own paths; /v1/models... (every API's) with a Gemini key."""
    return path.startswith(PREFIXES) or MODEL_METHOD.match(path) is not None or path.startswith("/v1/models") \
        and ("x-goog-api-key" in headers or query.startswith("key=") or "&key=" in query)


def error_payload(status: int, message: str, retry_after: float | None = None) -> dict:
    error = {"code": status, "message": message, "status": STATUS.get(status, "UNKNOWN")}
    if retry_after is not None:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                             "retryDelay": f"{max(1, round(retry_after))}s"}]
    return {"error": error}


def chunk(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"


def _texts(content: object) -> str:
    parts = content.get("parts") if isinstance(content, dict) else None
    return " ".join(p["text"] for p in parts or () if isinstance(p, dict) and isinstance(p.get("text"), str))


def _declarations(tools: object) -> list[dict]:
    if not isinstance(tools, list):
        return []
    return [d for tool in tools if isinstance(tool, dict) for d in field(tool, "functionDeclarations") or ()
            if isinstance(d, dict)]


def _function_call(data: dict, words: list[str]) -> dict | None:
    """A functionCall part when tools are declared and the last user turn asks to 'use a tool'."""
    declared = _declarations(data.get("tools"))
    contents = data["contents"]
    last = contents[-1] if contents else None
    if not declared or not isinstance(last, dict) or last.get("role", "user") != "user":
        return None
    text = _texts(last)
    if "use a tool" not in text.lower():
        return None
    tool = next((d for d in declared if d.get("name") and d["name"] in text), declared[0])
    schema = field(tool, "parametersJsonSchema") or tool.get("parameters") or {}
    args = {}
    for name, spec in (schema.get("properties") or {}).items():
        kind = str(spec.get("type", "")).lower() if isinstance(spec, dict) else ""
        if kind in FILL:
            args[name] = FILL[kind] if kind != "string" else (words[0] if words else "x")
    return {"functionCall": {"name": tool.get("name", "tool"), "args": args}}


def _fill(schema: object, words: list[str], depth: int = 0) -> object:
    """A value of a response schema (OpenAPI or JSON Schema), as the real API answers in JSON mode."""
    if not isinstance(schema, dict) or depth > 8:
        return None
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "object")
    kind = str(kind[0] if isinstance(kind, list) and kind else kind).lower()
    if kind == "object":
        return {name: _fill(spec, words, depth + 1) for name, spec in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_fill(schema.get("items"), words, depth + 1)]
    if kind in ("integer", "number"):
        return max(1, len(words))
    if kind == "boolean":
        return True
    return " ".join(words)


def _without_ids(part: object) -> object:
    if not isinstance(part, dict):
        return part
    return {k: {f: v for f, v in value.items() if f != "id"} if k in CALL_PARTS and isinstance(value, dict) else value
            for k, value in part.items()}


def problem(data: object, strict: bool) -> str | None:
    """The message the real API gives for a malformed GenerateContentRequest, or None."""
    if not isinstance(data, dict):
        return "Invalid JSON payload received. Expected an object."
    contents = data.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified\n"
    for i, content in enumerate(contents):
        if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
            return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n"
        if strict and content.get("role", "user") not in ("user", "model", "function"):
            return (f"Please use a valid role: user, model. (contents[{i}].role "
                    f"{content.get('role')!r})")
        if not strict or i == 0:
            continue
        called = any(field(p, "functionCall") for p in contents[i - 1]["parts"])
        answers = any(field(p, "functionResponse") for p in content["parts"])
        if called and not answers:
            return ("Please ensure that function response turn comes immediately after a function "
                    "call turn.")
    return None


class GeminiAPI:
    """The Gemini routes; mixed into MockUpstream, which gives profile, in_flight, _json, _stream."""

    METHODS = {"generateContent": "_gemini_generate", "streamGenerateContent": "_gemini_generate",
               "countTokens": "_gemini_count_tokens"}

    def _gemini_route(self, method: str, path: str):
        """The handler of a Gemini request, or None."""
        if method == "GET" and (listing := MODEL_GET.match(path)):
            return self._gemini_model if listing.group(3) else self._gemini_models
        match = MODEL_METHOD.match(path)
        name = self.METHODS.get(match.group(4)) if match and method == "POST" else None
        return getattr(self, name) if name else None

    def _gemini_headers(self, start: float) -> dict[str, str]:
        return {"vary": "Origin, X-Origin, Referer", "server": "scaffolding on HTTPServer2",
                "x-xss-protection": "0", "x-frame-options": "SAMEORIGIN", "x-content-type-options": "nosniff",
                "server-timing": f"gfet4t7; dur={int((time.monotonic() - start) * 1000)}",
                "alt-svc": 'h3=":443"; ma=2592000,h3-29=":443"; ma=2592000'}

    def _gemini_error(self, status: int, message: str, *, retry_after: float | None = None,
                      headers: dict | None = None) -> web.Response:
        return self._json(error_payload(status, message, retry_after),
                          {**self._gemini_headers(time.monotonic()), **(headers or {})}, status)

    def _gemini_failure(self, kind: str, kw: dict) -> web.Response:
        status, message = FAILURES[kind]
        retry_after = float(kw.get("retry_after", self.profile.retry_after)) if status == 429 else None
        return self._gemini_error(status, message, retry_after=retry_after)

    @staticmethod
    def _gemini_model_entry(name: str, display: str, limit_in: int, limit_out: int) -> dict:
        return {"name": f"models/{name}", "version": "001", "displayName": display,
                "description": f"Mock of {display}", "inputTokenLimit": limit_in, "outputTokenLimit": limit_out,
                "supportedGenerationMethods": ["generateContent", "countTokens", "createCachedContent",
                                               "batchGenerateContent"],
                "temperature": 1, "topP": 0.95, "topK": 64, "maxTemperature": 2, "thinking": True}

    async def _gemini_models(self, request, data, kind, start) -> web.Response:
        if request.path.endswith("/tunedModels"):   # none: Google leaves an empty list out
            return self._json({}, self._gemini_headers(start))
        return self._json({"models": [self._gemini_model_entry(*m) for m in MODELS]},
                          self._gemini_headers(start))

    async def _gemini_model(self, request, data, kind, start) -> web.Response:
        name = request.path.rsplit("/", 1)[-1]
        found = next((m for m in MODELS if m[0] == name), None)
        if found is None:
            raise Fail(404, "NOT_FOUND", f"models/{name} is not found for API version v1beta, or is not "
                                         f"supported for generateContent.")
        return self._json(self._gemini_model_entry(*found), self._gemini_headers(start))

    def _gemini_material(self, model: str, data: dict) -> bytes:
        """What a reply is a function of: the conversation, not the ids a client gives its function calls
        (the Gemini CLI makes them from the clock), as a model's answer would not depend on them."""
        contents = data.get("contents")
        if isinstance(contents, list):
            contents = [{**c, "parts": [_without_ids(p) for p in c["parts"]]}
                        if isinstance(c, dict) and isinstance(c.get("parts"), list) else c for c in contents]
        return orjson.dumps([model, field(data, "systemInstruction"), contents], option=orjson.OPT_SORT_KEYS)

    async def _gemini_count_tokens(self, request, data, kind, start) -> web.Response:
        inner = field(data, "generateContentRequest")
        body = inner if isinstance(inner, dict) else data
        if message := problem(body, strict=False):
            raise Fail(400, "INVALID_ARGUMENT", message.replace("GenerateContentRequest", "CountTokensRequest"))
        n = len(self._gemini_material(MODEL_METHOD.match(request.path).group(3), body)) // 4 + 1
        return self._json({"totalTokens": n},
                          self._gemini_headers(start))

    async def _gemini_generate(self, request, data, kind, start) -> web.StreamResponse:
        if message := problem(data, self.profile.validate):
            raise Fail(400, "INVALID_ARGUMENT", message)
        match = MODEL_METHOD.match(request.path)
        model, streaming = match.group(3), match.group(4) == "streamGenerateContent"
        if streaming and request.query.get("alt") != "sse":
            raise Fail(400, "INVALID_ARGUMENT", "this mock streams only with ?alt=sse (as the SDKs ask)")
        config = field(data, "generationConfig", {})
        material = self._gemini_material(model, data)
        limit = field(config, "maxOutputTokens")
        n = min(self.profile.output_tokens, limit if isinstance(limit, int) and limit > 0 else 1 << 30)
        words = words_of(material, n)
        call = _function_call(data, words)
        schema = field(config, "responseJsonSchema") or field(config, "responseSchema")
        if field(config, "responseMimeType") == "application/json" and call is None:   # JSON mode: one JSON text
            words = [orjson.dumps(_fill(schema, words) if schema else {"text": " ".join(words)}).decode()]
        finish = "STOP" if call or n == self.profile.output_tokens else "MAX_TOKENS"
        prompt = len(material) // 4 + 1
        thinking = field(config, "thinkingConfig", {})
        budget = field(thinking, "thinkingBudget", -1 if field(thinking, "thinkingLevel") else 0)   # Gemini 3: a level
        thoughts = (2 * n if budget == -1 else min(budget, 2 * n)) if isinstance(budget, int) else 0
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": n if not call else 4,
                 "totalTokenCount": 0, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
        if field(data, "cachedContent"):   # an explicit cache: most of the prompt was read from it
            cached = prompt * 3 // 4
            usage["cachedContentTokenCount"] = cached
            usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        usage["totalTokenCount"] = prompt + usage["candidatesTokenCount"] + thoughts
        head = {"modelVersion": model, "responseId": rand(23)}
        thought = [{"text": "Thinking it over.", "thought": True}] if field(thinking, "includeThoughts") else []
        headers = self._gemini_headers(start)
        if not streaming:
            parts = [*thought, call or {"text": " ".join(words)}]
            return await self._slow_json({"candidates": [{"content": {"parts": parts, "role": "model"},
                                                          "finishReason": finish, "index": 0}],
                                          "usageMetadata": usage, **head}, headers)
        running = {"promptTokenCount": prompt, "totalTokenCount": prompt,
                   "promptTokensDetails": usage["promptTokensDetails"]}

        def piece(parts: list[dict], last: bool = False) -> bytes:
            candidate = {"content": {"parts": parts, "role": "model"}}
            if last:
                candidate.update(finishReason=finish, index=0)
            return chunk({"candidates": [candidate], "usageMetadata": usage if last else running, **head})

        pieces = [[{"text": d}] for d in deltas(words)] if call is None else [[call]]
        if thought:
            pieces.insert(0, thought)
        events = [piece(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces)]
        error = chunk(error_payload(503, FAILURES["overloaded"][1]))
        return await self._stream(request, {**headers, "content-disposition": "attachment"}, events[0], [], events[1:-1], events[1:][-1:], error, kind)
