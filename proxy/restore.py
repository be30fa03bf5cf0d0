"""Putting a checkpointed conversation in front of the conversation that continues it.

A restarted agent opens new conversations. The first one that continues the
checkpointed conversation (the same shape: tools and system prompt, see
`conversation.Shape`; after a supervised restart, the same agent too) takes
the checkpointed messages, trimmed back to a point the API accepts, in front
of its own, on each of its calls. Side conversations (a title call, a
sub-agent) pass unchanged, and so does an agent that replays its old
conversation: its repeated calls are cache hits (fast-forward, no tokens).
A Responses API checkpoint (items) goes only to a Responses call, and only to
one that sends its history itself: a turn naming a `previous_response_id`
has its history upstream already.
"""

from __future__ import annotations

import orjson

from .call import Call
from .conversation import ASSISTANT_ROLES, RESPONSES, SYSTEM_ROLES, Shape, digest, system_texts, turns_of, with_turns
from .responses_api import PATH as RESPONSES_PATH


def _tool_uses(message: dict) -> set[str]:
    content = message.get("content")
    ids = {b.get("id") for b in content if isinstance(b, dict) and b.get("type") == "tool_use"} \
        if isinstance(content, list) else set()
    ids |= {c.get("id") for c in message.get("tool_calls") or []}
    parts = message.get("parts")   # Gemini's functionCall parts
    if isinstance(parts, list):
        ids |= {str(p["functionCall"].get("name")) for p in parts
                if isinstance(p, dict) and isinstance(p.get("functionCall"), dict)}
    return ids


def trim_for_api(messages: list[dict]) -> list[dict]:
    """The longest prefix the API accepts as history: it ends with an assistant turn that asks for no
    tool result (so the agent's own next user message can follow), with no tool call left unanswered."""
    end = len(messages)
    while end > 0:
        last = messages[end - 1]
        if last.get("role") in ASSISTANT_ROLES and not _tool_uses(last):
            break
        end -= 1
    prefix = messages[:end]
    while prefix and prefix[0].get("role") not in ("user", "system"):
        prefix = prefix[1:]
    return prefix


def trim_items(items: list[dict]) -> list[dict]:
    """The longest prefix of Responses items that ends with an assistant message: every function call
    before it has had its output (a model answers in text only once its calls are done)."""
    end = len(items)
    while end > 0 and not (isinstance(items[end - 1], dict) and items[end - 1].get("role") == "assistant"
                           and items[end - 1].get("type", "message") == "message"):
        end -= 1
    return items[:end]


class Restore:
    """One armed restore: the history to put in front, the shape it continues, and, once a conversation
    took it, that conversation's first user message."""

    def __init__(self, meta: dict, stored: list[dict], agent: str | None):
        self.path = RESPONSES_PATH if meta.get("format") == RESPONSES else None   # None: chat messages
        self.messages = trim_items(stored) if self.path else trim_for_api(stored)
        # A call bringing its own system messages (OpenAI) gets the history without the old ones.
        self._without_system = [m for m in self.messages if m.get("role") not in SYSTEM_ROLES]
        self._old_roots = {digest(h[0]) for h in (self.messages, self._without_system) if h}
        self.shape = Shape(tuple(system_texts(meta.get("system"), stored)), meta.get("tools_digest"))
        self.agent = agent    # set for a supervised restart: the agent whose conversation this was
        self.root: str | None = None

    def apply(self, call: Call) -> None:
        path = call.route.path
        if (path == RESPONSES_PATH) != (self.path is not None) or call.json.get("previous_response_id"):
            return   # another API's conversation, or one whose history the upstream keeps
        messages = turns_of(path, call.json)[1]
        lead = 0   # OpenAI-style system messages stay first
        while lead < len(messages) and isinstance(messages[lead], dict) \
                and messages[lead].get("role") in SYSTEM_ROLES:
            lead += 1
        if not self.messages or lead >= len(messages) or not isinstance(messages[lead], dict) \
                or messages[lead].get("role") != "user":
            return
        root = digest(messages[lead])
        if self.root is None and root in self._old_roots:
            return   # the agent replays its old conversation: leave it to the cache
        if self.root is not None and root != self.root:
            return
        if self.agent is not None and call.route.agent != self.agent:
            return
        if not self._continued_by(Shape.of(call.json, path)):
            return   # a side conversation (a title call, a sub-agent), even with the same first message
        old = self._without_system if lead else self.messages
        forwarded = messages[:lead] + old + messages[lead:]
        body = with_turns(path, call.json, forwarded)
        raw = orjson.dumps(body)   # first: should it fail, the call goes on as it came, whole
        call.forwarded_messages, call.json, call.body, call.restored = forwarded, body, raw, True
        call.turn_rows = call.turns_lineage = None   # the request as it came: not the restored one
        self.root = root

    def _continued_by(self, shape: Shape) -> bool:
        # tools_digest is missing from checkpoints written before it was kept: any tools continue those.
        expected = self.shape if self.shape.tools is not None else Shape(self.shape.system, shape.tools)
        return expected.continued_by(shape)
