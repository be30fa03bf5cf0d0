"""The state of one API call as it moves through the pipeline.

One `Call` is made when a request arrives and handed from stage to stage;
stages write what they learn into it (timestamps, cache outcome, tokens), and
the records, metrics and checkpoints are made from it at the end.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from .gemini_api import model_of
from .routes import Route
from .usage import Usage


def new_request_id() -> str:
    """16 hex digits; Python's generator (seeded from the OS at start) costs no system call per call."""
    return f"{random.getrandbits(64):016x}"


@dataclass(slots=True, eq=False)
class Call:
    route: Route
    method: str
    id: str = field(default_factory=new_request_id)
    body: bytes = b""
    json: Any = None              # the parsed JSON body, when it is one
    # Monotonic timestamps (seconds); 0.0 = that phase did not happen.
    t_received: float = field(default_factory=time.monotonic)
    wall_received: float = field(default_factory=time.time)
    t_lookup: float = 0.0
    t_slot: float = 0.0
    t_sent: float = 0.0
    t_first_byte: float = 0.0
    t_first_token: float = 0.0
    t_done: float = 0.0
    status: int = 0
    model_call: bool = False      # a model route: takes a limiter slot, is cached, counted and checkpointed
    cache_outcome: str = ""       # hit | miss | bypass | coalesced | "" (not cacheable)
    cache_mode: str = ""
    cache_key: bytes | None = None
    request_hash: bytes = b""
    canonical: bytes = b""        # the canonical request the key was made of (no credential in it)
    canonical_parts: list | None = None   # instead, for a large request: its parts (views of the body)
    streamed: bool = False
    usage: Usage | None = None    # the tokens the API reported (proxy/usage.py); a hit: the original call's
    bytes_out: int = 0
    retries: int = 0
    error: str = ""               # error type when the call failed
    rate_limited: bool = False    # the upstream answered 429/529 at least once
    saved_s: float = 0.0          # upstream seconds a hit saved (the original call's duration)
    session: str = ""             # conversation id, once checkpointed
    place: tuple | None = None    # (conversation id, index of its first message), once worked out (sessions.py)
    restored: bool = False        # a checkpointed conversation was put in front of this call's messages
    forwarded_messages: list | None = None
    turn_rows: list | None = None      # orjson's bytes of the request's first turns, when known (body_json.py)
    turns_lineage: tuple | None = None  # which earlier body its first turns repeat (body_json.Parsed.lineage)
    accept_encoding: str = ""     # the client's Accept-Encoding: which stored codings it may be sent
    headers: Any = None           # the request's headers, as the agent sent them
    # What the answer stages learn (proxy/stages.py):
    entry: Any = None             # the stored entry a hit is served from
    head: Any = None              # the upstream answer's head (a miss)
    capture: Any = None           # what the capture stage knows of the upstream answer
    body_out: bytes = b""         # the upstream answer's whole body, once it has ended
    answer: dict | None = None    # the complete, well-formed answer as JSON, for the checkpoint
    checkpointed: bool = False
    prefix_change: list | None = None   # what changed since the conversation's previous turn (sessions.py)
    off: set | None = None        # side stages that failed during this call: run no more for it
    _model: str | None = None
    _model_of: Any = None         # the body `_model` was read from

    @property
    def model(self) -> str:
        """The model asked for (read many times a call: remembered for the body it was read from)."""
        if self._model_of is not self.json or self._model is None:
            if self.route.api == "gemini":   # in the path: /v1beta/models/{model}:generateContent
                self._model = model_of(self.route.path)
            else:
                self._model = self.json.get("model", "") if isinstance(self.json, dict) else ""
            self._model_of = self.json
        return self._model

    @property
    def input_tokens(self) -> int:
        return self.usage.input_tokens if self.usage is not None else 0

    @property
    def output_tokens(self) -> int:
        return self.usage.output_tokens if self.usage is not None else 0

    @property
    def wants_stream(self) -> bool:
        return isinstance(self.json, dict) and self.json.get("stream") is True
