"""A call in the words of the OpenTelemetry GenAI semantic conventions: its attributes and its messages.

Pure functions of a finished `Call` (no SDK here; proxy/telemetry.py records
what they return). Names follow the conventions' registry (the
semantic-conventions-genai repository): `gen_ai.provider.name`, the request
and response attributes, `gen_ai.usage.*` (for Anthropic, `input_tokens` is
the API's input plus cache read and cache creation, as the conventions say),
and the message content in their JSON form (`role` + `parts`), for the
opt-in content capture.
"""

from __future__ import annotations

from typing import Any

import orjson

from .call import Call
from .conversation import CHAT_ROUTES, session_id
from .convert import Unconvertible, message_of

PROVIDERS = {"anthropic": "anthropic", "openai": "openai", "gemini": "gcp.gemini"}
OPERATIONS = {"/v1/messages": "chat", "/v1/chat/completions": "chat", "/v1/responses": "chat",
              "/v1/completions": "text_completion", "/v1/embeddings": "embeddings",
              "/v1/messages/count_tokens": "count_tokens"}
# Usage on the call -> its attribute. A field the call does not carry (yet) is left out; the cache fields
# of Anthropic also count into gen_ai.usage.input_tokens (CACHE_INPUT).
USAGE = (
    ("output_tokens", "gen_ai.usage.output_tokens"),
    ("cache_read_input_tokens", "gen_ai.usage.cache_read.input_tokens"),
    ("cache_creation_input_tokens", "gen_ai.usage.cache_creation.input_tokens"),
    ("reasoning_tokens", "gen_ai.usage.reasoning.output_tokens"),
)
CACHE_INPUT = ("cache_read_input_tokens", "cache_creation_input_tokens")
UNMETERED = ("count_tokens",)   # operations that spend no tokens
REQUEST_SETTINGS = (("max_tokens", "gen_ai.request.max_tokens"), ("max_completion_tokens", "gen_ai.request.max_tokens"),
                    ("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
                    ("top_k", "gen_ai.request.top_k"), ("seed", "gen_ai.request.seed"))


def operation(call: Call) -> str:
    return OPERATIONS.get(call.route.path) or call.route.path.rstrip("/").rpartition("/")[2] or "chat"


def model_of(call: Call) -> str:
    return call.model if isinstance(call.model, str) else ""   # whatever a client sent, a name or nothing


def span_name(call: Call) -> str:
    return f"{operation(call)} {model_of(call)}" if model_of(call) else operation(call)


def base_attributes(call: Call, answer: dict | None, server: tuple[str, int] | None) -> dict[str, Any]:
    """What the metrics share with the span: operation, provider, models, server, error."""
    attrs: dict[str, Any] = {"gen_ai.operation.name": operation(call),
                             "gen_ai.provider.name": PROVIDERS.get(call.route.api, call.route.api)}
    if model_of(call):
        attrs["gen_ai.request.model"] = model_of(call)
    model = (answer or {}).get("model")
    if isinstance(model, str) and model:
        attrs["gen_ai.response.model"] = model
    if server is not None:
        attrs["server.address"], attrs["server.port"] = server
    if error_type(call):
        attrs["error.type"] = error_type(call)
    return attrs


def error_type(call: Call) -> str:
    if call.error:
        return call.error
    return str(call.status) if call.status >= 400 else ""


def usage(call: Call) -> dict[str, int]:
    """The usage attributes the call's record knows."""
    if operation(call) in UNMETERED:
        return {}
    attrs = {name: getattr(call, field) for field, name in USAGE if getattr(call, field, None) is not None}
    cached = sum(getattr(call, field, 0) or 0 for field in CACHE_INPUT) if call.route.api == "anthropic" else 0
    attrs["gen_ai.usage.input_tokens"] = call.input_tokens + cached
    return attrs


def span_attributes(call: Call, answer: dict | None, base: dict[str, Any]) -> dict[str, Any]:
    """The span's attributes: the shared ones, the request's settings, the answer's id and finish reasons,
    the usage, the conversation, and the sidecar's own view (cache outcome, agent, request id)."""
    attrs = dict(base)
    body = call.json if isinstance(call.json, dict) else {}
    for key, name in REQUEST_SETTINGS:
        value = body.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attrs[name] = value
    if call.wants_stream:
        attrs["gen_ai.request.stream"] = True
    if answer:
        if isinstance(answer.get("id"), str):
            attrs["gen_ai.response.id"] = answer["id"]
        reasons = finish_reasons(call.route.api, answer)
        if reasons:
            attrs["gen_ai.response.finish_reasons"] = reasons
    if 200 <= call.status < 400:
        attrs.update(usage(call))
    conversation = conversation_id(call)
    if conversation:
        attrs["gen_ai.conversation.id"] = conversation
    if call.status:
        attrs["http.response.status_code"] = call.status
    attrs.update({"sidecar.cache.outcome": call.cache_outcome or "none", "sidecar.agent": call.route.agent,
                  "sidecar.request_id": call.id, "sidecar.retries": call.retries})
    if call.saved_s:
        attrs["sidecar.saved_s"] = call.saved_s
    return attrs


def answer_of(call: Call) -> dict | None:
    """The complete answer as JSON: captured from the upstream, or the stored one a hit was served."""
    if call.answer is None and call.entry is not None:
        try:
            return message_of(call.entry, call.route.api)
        except (Unconvertible, ValueError):
            return None
    return call.answer if isinstance(call.answer, dict) else None


def finish_reasons(api: str, answer: dict) -> list[str]:
    if api == "anthropic":
        reason = answer.get("stop_reason")
        return [reason] if isinstance(reason, str) else []
    return [c["finish_reason"] for c in answer.get("choices") or () if isinstance(c, dict)
            and isinstance(c.get("finish_reason"), str)]


def conversation_id(call: Call) -> str:
    """The sidecar's session id: the checkpoint's, or the same id computed for a call not checkpointed."""
    if call.session:
        return call.session
    if call.route.path in CHAT_ROUTES and isinstance(call.json, dict) and isinstance(call.json.get("messages"), list):
        return session_id(call.route.agent, call.json, call.headers)
    return ""


# ---- content, only when [telemetry] capture_content is on ---------------------------------------------------


def content_attributes(call: Call, answer: dict | None) -> dict[str, str]:
    """gen_ai.system_instructions, gen_ai.input.messages and gen_ai.output.messages, as JSON strings
    (the Python SDK takes no structured span attributes; the conventions allow JSON strings there)."""
    body = call.json if isinstance(call.json, dict) else {}
    if not isinstance(body.get("messages"), list):
        return {}
    out: dict[str, str] = {}
    system = body.get("system")
    if system:
        out["gen_ai.system_instructions"] = _json(_parts(system))
    out["gen_ai.input.messages"] = _json([_message(m) for m in body["messages"] if isinstance(m, dict)])
    if answer:
        out["gen_ai.output.messages"] = _json(output_messages(call.route.api, answer))
    return out


def output_messages(api: str, answer: dict) -> list[dict]:
    if api == "anthropic":
        return [{"role": "assistant", "parts": _parts(answer.get("content")),
                 "finish_reason": answer.get("stop_reason")}]
    return [{**_message(c.get("message"), "assistant"), "finish_reason": c.get("finish_reason")}
            for c in answer.get("choices") or () if isinstance(c, dict)]


def _message(message: Any, role: str = "") -> dict:
    message = message if isinstance(message, dict) else {}
    parts = _parts(message.get("content"))
    for call in message.get("tool_calls") or ():   # OpenAI: the assistant's function calls
        if not isinstance(call, dict):
            continue
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        parts.append({"type": "tool_call", "id": call.get("id"), "name": function.get("name", ""),
                      "arguments": _arguments(function.get("arguments"))})
    if message.get("role") == "tool":   # OpenAI: a tool's result is the whole message
        parts = [{"type": "tool_call_response", "id": message.get("tool_call_id"),
                  "response": message.get("content")}]
    return {"role": message.get("role") or role, "parts": parts}


def _parts(content: Any) -> list[dict]:
    """A message's content (a string or a list of blocks, either API) as the conventions' parts."""
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("text", "input_text", "output_text"):
            parts.append({"type": "text", "content": block.get("text", "")})
        elif kind == "tool_use":
            parts.append({"type": "tool_call", "id": block.get("id"), "name": block.get("name", ""),
                          "arguments": block.get("input")})
        elif kind == "tool_result":
            parts.append({"type": "tool_call_response", "id": block.get("tool_use_id"),
                          "response": block.get("content")})
        elif kind == "thinking":
            parts.append({"type": "reasoning", "content": block.get("thinking", "")})
        else:   # images, documents...: named, their data left out
            parts.append({"type": str(kind)})
    return parts


def _arguments(text: Any) -> Any:
    try:
        return orjson.loads(text) if isinstance(text, str) else text
    except orjson.JSONDecodeError:
        return text


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
