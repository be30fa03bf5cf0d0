"""The Gemini CLI behind the sidecar: the auth type it would have picked on its own.

The launcher sets GOOGLE_GEMINI_BASE_URL. The Gemini CLI (0.44 and later)
reads it as its base URL, but, when its settings name no auth type, that
variable also makes it pick its "gateway" auth type, which it refuses headless
("Invalid auth method selected.", exit 41). Without the sidecar the same user,
with GEMINI_API_KEY set, gets the "gemini-api-key" type. So when the user's
own environment would have picked that type, the agent is given a
system-defaults file saying so: the CLI's lowest settings layer, under the
user's and the system's own settings. The CLI reads such a file only where no
directory above it is writable by others; elsewhere, or when the user has
system defaults of their own, nothing is added.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import orjson

DEFAULTS = {"security": {"auth": {"selectedType": "gemini-api-key"}}}
VARIABLE = "GEMINI_CLI_SYSTEM_DEFAULTS_PATH"
SYSTEM_DEFAULTS = (Path("/etc/gemini-cli/system-defaults.json"),
                   Path("/Library/Application Support/GeminiCli/system-defaults.json"))


def picks_api_key(environ: Mapping[str, str]) -> bool:
    """Whether the CLI, left to its environment, would use the Gemini API key (its own order of checks)."""
    return not (environ.get("GOOGLE_GENAI_USE_GCA") == "true" or environ.get("GOOGLE_GENAI_USE_VERTEXAI") == "true"
                or environ.get("GOOGLE_GEMINI_BASE_URL")) and bool(environ.get("GEMINI_API_KEY"))


def secure(path: Path) -> bool:
    """No directory from here to / is writable by group or others (the CLI's rule for a system file)."""
    return all(not os.stat(p).st_mode & 0o022 for p in (path, *path.parents))


def agent_env(environ: Mapping[str, str], state_dir: Path) -> dict[str, str]:
    """What the agent's environment gets besides the base URLs: the defaults file, when it is needed."""
    if not picks_api_key(environ) or VARIABLE in environ or any(p.exists() for p in SYSTEM_DEFAULTS):
        return {}
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not secure(state_dir):
            return {}
        path = state_dir / "gemini-cli-defaults.json"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(orjson.dumps(DEFAULTS))
    except OSError:   # no file: the CLI runs as it would, the agent is not held up for this
        return {}
    return {VARIABLE: str(path)}
