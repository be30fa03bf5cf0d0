"""Codex CLI behind the sidecar: its base URL is a config value, given per run on its command line.

Codex does not read OPENAI_BASE_URL: its built-in `openai` provider takes the
`openai_base_url` config value, and `-c key=value` overrides a value for one
run. So `sidecar run -- codex ...` runs `codex -c openai_base_url="<sidecar>/v1"
...`: nothing of the user's Codex state changes (CODEX_HOME, config.toml,
auth, sessions stay theirs). A base URL the user set themselves (in
config.toml or their own `-c openai_base_url=`) becomes the sidecar's OpenAI
upstream, so the calls still end up where they went before.

Left alone (the agent runs as it would without the sidecar, and the summary
shows no call went through): a ChatGPT sign-in (its backend is not the OpenAI
API), another `model_provider`, and a base URL of the user's own with `--connect`
(a shared sidecar's upstream is its own).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Mapping, NamedTuple

NAMES = frozenset({"codex"})
# Codex gives every input item a new id on every run. An id is the request only in an `item_reference`
# item, which Codex never sends (it runs with store: false, where there is nothing stored to refer to):
# so its own sidecar leaves the ids out of its keys; a shared one keeps the rules it was given.
ITEM_IDS = ("input[*].id",)
SETTING = "openai_base_url"
CONFIG_FLAGS = ("-c", "--config")


def is_codex(cmd: list[str]) -> bool:
    return bool(cmd) and Path(cmd[0]).name in NAMES


def home(env: Mapping[str, str]) -> Path:
    return Path(env["CODEX_HOME"]) if env.get("CODEX_HOME") else Path(env.get("HOME", "~")).expanduser() / ".codex"


def _toml_value(text: str):
    """A `-c` value as Codex reads it: TOML, or the raw string when it is not."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def overrides(cmd: list[str]) -> tuple[dict[str, object], list[int]]:
    """The `-c key=value` settings on the command line (the last wins), and where the base URL ones are."""
    found: dict[str, object] = {}
    at: list[int] = []
    i = 1
    while i < len(cmd):
        arg = cmd[i]
        if arg == "--":
            break
        value, span = None, 1
        if arg in CONFIG_FLAGS and i + 1 < len(cmd):
            value, span = cmd[i + 1], 2
        elif arg.startswith("--config="):
            value = arg.removeprefix("--config=")
        elif arg.startswith("-c") and len(arg) > 2 and "=" in arg:
            value = arg[2:]
        if value is not None and "=" in value:
            key, _, raw = value.partition("=")
            found[key.strip()] = _toml_value(raw.strip())
            if key.strip() == SETTING:
                at.extend(range(i, i + span))
        i += span
    return found, at


def user_config(env: Mapping[str, str]) -> dict:
    """The user's config.toml, read only (an unreadable one counts as empty: Codex will say so itself)."""
    try:
        with open(home(env) / "config.toml", "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def signs_in_with_chatgpt(env: Mapping[str, str]) -> bool:
    """Codex uses a ChatGPT sign-in unless CODEX_API_KEY is set or auth.json holds an API key.

    Only the mode is read from auth.json; nothing of it is kept."""
    if env.get("CODEX_API_KEY"):
        return False
    try:
        with open(home(env) / "auth.json", "rb") as fh:
            auth = json.load(fh)
    except (OSError, ValueError):
        return False
    if not isinstance(auth, dict):
        return False
    mode = auth.get("auth_mode")
    if mode is None:   # written by an older Codex: a key, or ChatGPT tokens
        return not auth.get("OPENAI_API_KEY") and bool(auth.get("tokens"))
    return mode != "apikey"


class Launch(NamedTuple):
    cmd: list[str]                  # the command to run
    upstream: str | None = None     # the user's own OpenAI base URL: the sidecar's upstream for this run
    ignore_fields: tuple[str, ...] = ()   # more per-run noise for this agent's own sidecar to leave out of keys


def repoint(cmd: list[str], base: str, env: Mapping[str, str], own_proxy: bool) -> Launch:
    """How to run `cmd` through the sidecar at `base`: unchanged unless it is Codex."""
    if not is_codex(cmd):
        return Launch(cmd)
    given, at = overrides(cmd)
    config = user_config(env)
    provider = given.get("model_provider", config.get("model_provider"))
    if provider not in (None, "openai") or signs_in_with_chatgpt(env):
        return Launch(cmd)
    own = given.get(SETTING, config.get(SETTING))
    if own is not None and not own_proxy:
        return Launch(cmd)
    rest = [arg for i, arg in enumerate(cmd) if i not in set(at)]
    url = base.rstrip("/") + "/v1"
    return Launch([rest[0], "-c", f'{SETTING}="{url}"', *rest[1:]], own if isinstance(own, str) else None,
                  ITEM_IDS if own_proxy else ())
