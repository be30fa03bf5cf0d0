"""`sidecar sessions ...`: the checkpointed conversations.

`export ID --format messages` prints {"model", "system", "messages"} that the
official SDK accepts as-is: `client.messages.create(max_tokens=..., **doc)`; for
a Responses API conversation {"model", "instructions", "input"}, as
`client.responses.create(**doc)` takes it.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson

from agent_sidecar.proxy.config import Config, ConfigError
from agent_sidecar.proxy.conversation import RESPONSES
from agent_sidecar.proxy.restore import trim_for_api, trim_items
from agent_sidecar.proxy.sessions import Sessions
from agent_sidecar.proxy.store import open_lmdb

from .terminal import clean


def _find(sessions: Sessions, ref: str) -> dict:
    found = sessions.find(ref)
    if found is None:
        raise ConfigError(f"no session matches {ref!r} (or the prefix is not unique); see 'sidecar sessions list'")
    return found


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def run(args: argparse.Namespace, config: Config) -> int:
    lmdb_env = open_lmdb(config)
    try:
        sessions = Sessions(lmdb_env)
        action = args.action
        if action == "list":
            rows = sessions.list()
            if not rows:
                print(f"no sessions (state dir {config.state_dir})")
            else:
                print(f"{'session':17} {'updated':19}  {'turns':>5} {'messages':>8}  {'agent':24} model")
                for meta in rows[:args.limit]:
                    print(f"{clean(meta['id']):17} {_when(meta.get('updated'))}  {meta.get('turns', 0):>5} "
                          f"{meta.get('messages', 0):>8}  {clean(meta.get('agent', '')):24} "
                          f"{clean(meta.get('model') or '')}")
                if len(rows) > args.limit:
                    print(f"... {len(rows) - args.limit} more (--limit N)")
        elif action == "show":
            meta = _find(sessions, args.session)
            print(clean(f"session {meta['id']}  agent {meta.get('agent')}  model {meta.get('model')}  "
                        f"turns {meta.get('turns')}  updated {_when(meta.get('updated'))}"))
            for message in sessions.messages(meta["id"]):
                label = message.get("role") or message.get("type")   # a Responses item may have no role
                print(f"\n[{clean(label)}]\n{clean(_text(message), multiline=True)}")
        elif action == "export":
            meta = _find(sessions, args.session)
            messages = sessions.messages(meta["id"])
            if args.format == "messages" and meta.get("format") == RESPONSES:
                doc = {"model": meta.get("model"), "input": trim_items(messages)}
                if meta.get("system") is not None:
                    doc["instructions"] = meta["system"]
            elif args.format == "messages":
                doc = {"model": meta.get("model"), "messages": trim_for_api(messages)}
                if meta.get("system") is not None and meta.get("api") == "anthropic":
                    doc["system"] = meta["system"]
            else:
                doc = {**{k: v for k, v in meta.items() if k != "hashes"}, "messages": messages}
            sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        elif action == "delete":
            meta = _find(sessions, args.session)
            sessions.delete_now(meta["id"])
            print(f"deleted session {meta['id']}")
        elif action == "prune":
            cutoff = time.time() - args.older_than * 86400
            old = [m["id"] for m in sessions.list() if (m.get("updated") or 0) < cutoff]
            for sid in old:
                sessions.delete_now(sid)
            print(f"deleted {len(old)} sessions not updated for {args.older_than:g} days")
    finally:
        lmdb_env.close()
    return 0


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ("text", "input_text", "output_text"):
            parts.append(block.get("text", ""))
        elif kind:
            parts.append(f"<{kind}> " + orjson.dumps({k: v for k, v in block.items() if k != "type"}).decode()[:200])
    for call in message.get("tool_calls") or []:
        parts.append("<tool_call> " + orjson.dumps(call).decode()[:200])
    if "content" not in message and message.get("type"):   # a Responses item: a function call, its output
        parts.append(orjson.dumps({k: v for k, v in message.items() if k not in ("type", "id")}).decode()[:200])
    return "\n".join(parts)


def add_parser(sub, common) -> None:
    from .cli import COUNT, DAYS
    parser = sub.add_parser("sessions", parents=[common], help="checkpointed conversations",
                            description="The conversations the sidecar has checkpointed.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".")

    action("list", "sessions, most recent first").add_argument("--limit", type=COUNT, default=50, metavar="N",
                                                                help="show at most N sessions (default 50)")
    action("show", "one conversation, readable").add_argument("session", help="id, prefix or 'last'")
    export = action("export", "one conversation as JSON")
    export.add_argument("session", help="id, prefix or 'last'")
    export.add_argument("--format", choices=["messages", "full"], default="full",
                        help="full (default): everything checkpointed; messages: {model, system, messages} the "
                             "official SDK accepts as-is")
    action("delete", "forget one conversation").add_argument("session", help="id, prefix or 'last'")
    action("prune", "forget conversations not updated for a while").add_argument(
        "--older-than", type=DAYS, default=30.0, metavar="DAYS", help="not updated for DAYS days (default 30)")
