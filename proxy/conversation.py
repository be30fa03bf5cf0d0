"""What identifies a conversation: its id, its shape (system prompt and tools), its turns.

An id is the client's own session id where it sends one (Claude Code:
`metadata.user_id`'s session_id), else a hash of the agent and the
conversation's root (system prompt head and first user message). A Responses
API conversation is its `instructions` and `input` items (see `turns_of`); a
turn naming a `previous_response_id` continues the conversation of that
response (sessions.py keeps which one it is).

The turns are a body's `messages` (Anthropic, OpenAI) or `contents` (Gemini,
whose system prompt is `systemInstruction`, whose model turns have the role
`model` and whose tools are `functionDeclarations`): `turns_field` and
`system_of` say which.

A shape tells the conversation an agent continues apart from the side
conversations it opens (a title call, a sub-agent): the same tools, and a
system prompt that is the same apart from its environment. Claude Code's
system prompt changes between two lives of one agent: a billing line that
follows the first prompt, and the git status at the end of its instructions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from . import gemini_api, responses_api

CHAT_ROUTES = {"/v1/messages": "anthropic", "/v1/chat/completions": "openai", responses_api.PATH: "openai"}
SYSTEM_ROLES = ("system", "developer")
ASSISTANT_ROLES = ("assistant", "model")
RESPONSES = "responses"   # a checkpoint's format when its rows are Responses items, not chat messages


def turns_of(path: str, body: dict) -> tuple[Any, list | None]:
    """A request's system prompt and its conversation so far (messages, or Responses input items)."""
    if path == responses_api.PATH:
        return body.get("instructions"), responses_api.input_items(body)
    if gemini_api.is_generate(path):
        contents = body.get("contents")
        return body.get("systemInstruction"), contents if isinstance(contents, list) else None
    messages = body.get("messages")
    return body.get("system"), messages if isinstance(messages, list) else None


def turns_field(path: str) -> str:
    """The name of the top-level array a request of `path` carries its conversation in."""
    if path == responses_api.PATH:
        return "input"
    return "contents" if gemini_api.is_generate(path) else "messages"


def with_turns(path: str, body: dict, turns: list) -> dict:
    if path == responses_api.PATH:
        return responses_api.with_input(body, turns)
    return {**body, "contents" if gemini_api.is_generate(path) else "messages": turns}


def answer_turns(path: str, api: str, answer: dict | None) -> list[dict]:
    """The answer as the next request would carry it: one assistant message, or the Responses output items."""
    if path == responses_api.PATH:
        return responses_api.answer_items(answer)
    reply = answer_message(api, answer)
    return [reply] if reply is not None else []


def digest(value: Any) -> str:
    return hashlib.blake2b(orjson.dumps(value), digest_size=8).hexdigest()


# What a call derives from the large parts of its body (tools, system prompt, first message: 70 KB and more
# for Claude Code), by the part's identity: body_json.py hands the next turn the very same objects while
# their bytes stay the same, and nothing in the proxy changes a parsed body in place. Each entry holds its
# part, so an id is never another object's. Bounded: forgetting only costs working it out again.
_DERIVED: dict[tuple[int, str], tuple[Any, Any]] = {}
MAX_DERIVED = 64


def derived(part: Any, what: str, make) -> Any:
    """make(part), worked out once for this very object (a list or dict; anything else every time)."""
    if not isinstance(part, (list, dict)):
        return make(part)
    key = (id(part), what)
    kept = _DERIVED.get(key)
    if kept is not None and kept[0] is part:
        return kept[1]
    value = make(part)
    if len(_DERIVED) >= MAX_DERIVED:
        _DERIVED.clear()
    _DERIVED[key] = (part, value)
    return value


def forget_derived() -> None:
    """Memory relief (monitor.py): the parts are let go; the next turn works them out again."""
    _DERIVED.clear()


def _unmarked_bytes(value: Any) -> bytes:
    return orjson.dumps(unmarked(value))


def client_session(body: dict, headers) -> str | None:
    """The session id a client sends itself, if any (Claude Code does, two ways)."""
    user_id = (body.get("metadata") or {}).get("user_id")
    if isinstance(user_id, str) and user_id.startswith("{"):
        try:
            session = orjson.loads(user_id).get("session_id")
        except (orjson.JSONDecodeError, AttributeError):
            session = None
        if session:
            return str(session)
    return headers.get("x-claude-code-session-id")


def session_id(agent: str, body: dict, headers, path: str = "") -> str:
    own = client_session(body, headers)
    if own:
        return "c" + digest(["client", own])[:15]
    system, messages = turns_of(path, body)
    first_user = next((m for m in messages or () if isinstance(m, dict) and m.get("role") == "user"), None)
    head = system[:4096] if isinstance(system, str) else \
        derived(system, "head", _unmarked_bytes)[:4096].decode("utf-8", "ignore")
    # digest([agent, head, unmarked(first_user)]), its JSON array written from parts: the same bytes
    root = b"[" + orjson.dumps(agent) + b"," + orjson.dumps(head) + b"," + \
        derived(first_user, "unmarked", _unmarked_bytes) + b"]"
    return "r" + hashlib.blake2b(root, digest_size=8).hexdigest()[:15]


def unmarked(value: Any) -> Any:
    """A value without its prompt-cache markers: a client moves `cache_control` to the newest turn each time,
    and the conversation stays the same one."""
    if isinstance(value, dict):
        return {k: unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [unmarked(v) for v in value]
    return value


def answer_message(api: str, answer: dict | None) -> dict | None:
    """The assistant's turn as it would appear in the next request's messages."""
    if not answer:
        return None
    if api == "anthropic":
        return {"role": "assistant", "content": answer.get("content") or []}
    if api == "gemini":
        return gemini_api.answer_turn(answer)
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    turn = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        turn["tool_calls"] = message["tool_calls"]
    return turn


def tools_digest(body: dict) -> str:
    """The tool set by kind and name: a sub-agent or a title call has another; descriptions may change
    with the agent's version between two lives, and hashing only names keeps this cheap per turn."""
    return derived(body.get("tools"), "names", _tool_names_digest)


def _tool_names_digest(tools: Any) -> str:
    names = [(t.get("type"), t.get("name") or (t.get("function") or {}).get("name"))
             for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
    names += [("function", d.get("name")) for t in tools if isinstance(t, dict)   # Gemini's
              for d in t.get("functionDeclarations") or () if isinstance(d, dict)] if isinstance(tools, list) else []
    return digest(names)


def system_texts(system: Any, messages: list) -> list[str]:
    """The system prompt as one text per block: Anthropic's `system`, Gemini's `systemInstruction` parts, else
    OpenAI's leading system messages."""
    if isinstance(system, dict) and isinstance(system.get("parts"), list):
        blocks = system["parts"]
    elif system is None:
        blocks = []
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in SYSTEM_ROLES:
                break
            blocks.append(message.get("content"))
    else:
        blocks = system if isinstance(system, list) else [system]
    return [_text(block) for block in blocks]


def _text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if isinstance(block, dict) and isinstance(block.get("text"), str):
        return block["text"]
    return orjson.dumps(block).decode()


def _shared(a: str, b: str) -> int:
    """Characters two texts share at their start plus at their end."""
    if a == b:
        return len(a)
    start = _longest(min(len(a), len(b)), lambda n: a[:n] == b[:n])
    end = _longest(min(len(a), len(b)) - start, lambda n: a[len(a) - n:] == b[len(b) - n:])
    return start + end


def _longest(limit: int, same) -> int:
    """The largest n <= limit with same(n), for a same() true up to some n: a binary search, so a few
    slice comparisons at C speed instead of a Python loop over characters."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if same(mid):
            low = mid
        else:
            high = mid - 1
    return low


@dataclass(frozen=True, slots=True)
class Shape:
    """A conversation apart from its messages: its system prompt, one text per block, and its tool set."""
    system: tuple[str, ...]
    tools: str | None   # None: a checkpoint from before the tool set was kept

    @classmethod
    def of(cls, body: dict, path: str = "") -> Shape:
        system, turns = turns_of(path, body)
        return cls(tuple(system_texts(system, turns or [])), tools_digest(body))

    def continued_by(self, other: Shape) -> bool:
        """Same tools, and a system prompt whose every block keeps at least half of its text, at its start
        and end: an environment that changed passes, another agent's instructions do not."""
        return self.tools == other.tools and len(self.system) == len(other.system) and all(
            2 * _shared(a, b) >= max(len(a), len(b)) for a, b in zip(self.system, other.system))
