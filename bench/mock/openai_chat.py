"""The OpenAI chat completions and embeddings APIs as the mock serves them."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time

import orjson
from aiohttp import web

from .common import Fail, deltas, rand, words_of

_OPENAI_STREAM_ERROR = b"data: " + orjson.dumps({"error": {
    "message": "The server is overloaded. Please try again later.", "type": "server_error",
    "param": None, "code": None}}) + b"\n\n"


class OpenAIChatAPI:
    """The OpenAI routes; mixed into MockUpstream, which gives profile, in_flight, _json, _stream."""

    ROUTES = {("POST", "/v1/chat/completions"): "_chat",
              ("POST", "/v1/embeddings"): "_embeddings"}

    def _openai_headers(self, start: float) -> dict[str, str]:
        return {"x-request-id": "req_" + rand(32), "openai-version": "2020-10-01",
                "openai-processing-ms": str(int((time.monotonic() - start) * 1000)),
                **self.rate_limits().openai_headers()}

    @staticmethod
    def openai_input_tokens(data: object) -> int:
        """What a chat call counts against the tokens limit: its usage.prompt_tokens."""
        if not isinstance(data, dict) or "messages" not in data:
            return 1
        return len(orjson.dumps([data.get("model"), data["messages"]], option=orjson.OPT_SORT_KEYS)) // 4 + 1

    @staticmethod
    def _openai_check(data, needs: tuple[str, ...]) -> None:
        for name in ("model", *needs):
            if not isinstance(data, dict) or name not in data:
                raise Fail(400, "invalid_request_error", f"Missing required parameter: '{name}'.",
                            param=name, code="missing_required_parameter")

    async def _chat(self, request, data, kind, start) -> web.StreamResponse:
        self._openai_check(data, ("messages",))
        material = orjson.dumps([data["model"], data["messages"]], option=orjson.OPT_SORT_KEYS)
        prompt = len(material) // 4 + 1
        limit = data.get("max_completion_tokens") or data.get("max_tokens") or 1 << 30
        n = min(self.profile.output_tokens, limit)
        finish = "stop" if n == self.profile.output_tokens else "length"
        words = words_of(material, n)
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        head = {"id": "chatcmpl-" + rand(29), "created": int(time.time()),
                "model": data["model"], "system_fingerprint": "fp_mock"}
        if data.get("stream") is not True:
            message = {"role": "assistant", "content": " ".join(words), "refusal": None}
            return await self._slow_json({**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage}, self._openai_headers(start))
        base = {**head, "object": "chat.completion.chunk"}
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            return b"data: " + orjson.dumps({**base, "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                **extra}) + b"\n\n"

        tail = [chunk({}, finish)]
        if include_usage:
            tail.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        return await self._stream(
            request, self._openai_headers(start),
            chunk({"role": "assistant", "content": "", "refusal": None}), [],
            [chunk({"content": d}) for d in deltas(words)], tail, _OPENAI_STREAM_ERROR, kind)

    async def _embeddings(self, request, data, kind, start) -> web.Response:
        self._openai_check(data, ("input",))
        inputs = data["input"]
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                       and isinstance(inputs[0], int)):
            inputs = [inputs]  # one string or one token array
        if not isinstance(inputs, list) or not inputs:
            raise Fail(400, "invalid_request_error", "'input' must be a non-empty string or array",
                        param="input")
        dims = data.get("dimensions") or 8
        as_base64 = data.get("encoding_format") == "base64"
        items, tokens = [], 0
        for i, item in enumerate(inputs):
            raw = orjson.dumps([data["model"], item])
            tokens += len(raw) // 4 + 1
            vec = [(b - 127.5) / 127.5 for b in hashlib.shake_256(raw).digest(dims)]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            packed = struct.pack(f"<{dims}f", *(v / norm for v in vec))  # little-endian float32
            emb = (base64.b64encode(packed).decode() if as_base64
                   else list(struct.unpack(f"<{dims}f", packed)))
            items.append({"object": "embedding", "index": i, "embedding": emb})
        return await self._slow_json({"object": "list", "data": items, "model": data["model"],
                                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                                     self._openai_headers(start))
