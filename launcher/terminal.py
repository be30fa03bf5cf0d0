"""Untrusted text made safe for a terminal: the one function every printer passes it through.

Agent command lines, model names, event details and conversation text come
from agents and upstreams; printed raw, an `ESC]0;title BEL` retitles the
window, `ESC[2J` clears it, and worse sequences exist. `clean` removes whole
escape sequences (CSI, OSC, DCS/SOS/PM/APC, two-byte ESC, their 8-bit C1 forms)
and then every remaining C0/C1 control and DEL, keeping printable text; tabs
and newlines stay only where the output is multi-line, else become spaces.
"""

from __future__ import annotations

import re
from typing import Any

SEQUENCES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"                    # CSI ... final byte
    r"|(?:\x1b[\]PX^_]|[\x9d\x90\x98\x9e\x9f])"              # OSC, DCS, SOS, PM, APC ...
    r"[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"                 # ... up to BEL or ST (or the end)
    r"|\x1b[ -/]*[0-~]?")                                    # any other ESC sequence
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")     # C0 but tab and newline, DEL, C1
LINE_BREAKS = re.compile(r"[\t\n]")


def clean(text: Any, multiline: bool = False) -> str:
    """`text` as a string with no terminal control sequence or control character left."""
    text = CONTROLS.sub("", SEQUENCES.sub("", str(text)))
    return text if multiline else LINE_BREAKS.sub(" ", text)


def clean_tree(value: Any) -> Any:
    """Every string in a JSON-like document (keys too) cleaned, single-line."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean_tree(k): clean_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_tree(v) for v in value]
    return value
