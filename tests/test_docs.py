"""The documentation tells the truth about the settings: config.toml and the README's table list every
setting of proxy/config.py with its default."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from agent_sidecar.proxy.config import SECTIONS, _toml_value

ROOT = Path(__file__).resolve().parent.parent


def settings():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f.name, f.default


def test_config_toml_has_every_setting_with_its_default():
    doc = tomllib.loads((ROOT / "config.toml").read_text())
    for section, key, default in settings():
        assert key in doc.get(section, {}), f"[{section}] {key} is missing from config.toml"
        value = doc[section][key]
        assert (tuple(value) if isinstance(value, list) else value) == default, (section, key, value, default)
    assert set(doc) == set(SECTIONS)


def test_the_readme_table_has_every_setting_with_its_default_and_meaning():
    rows = {m.group(1, 2): (m.group(3), m.group(4)) for m in
            re.finditer(r"^\| `\[(\w+)\] (\w+)` \| `(.*?)` \| (.*) \|$", (ROOT / "README.md").read_text(), re.M)}
    for section, key, default in settings():
        assert (section, key) in rows, f"[{section}] {key} is missing from the README's configuration table"
        shown, meaning = rows[section, key]
        assert shown.replace("\\|", "|") == _toml_value(default), (section, key, shown)
        assert meaning.strip(), f"[{section}] {key} has no meaning in the README"
    assert len(rows) == sum(1 for _ in settings())
