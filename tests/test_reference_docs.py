"""
docs/reference.md is the project's reference: it must name every configuration key the parser
accepts, and nothing the parser would refuse.
"""

from __future__ import annotations

import os
import re

from wingate_map.config._model import key_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documented_keys() -> list[str]:
    """
    The key paths in the first column of the reference's key table.
    """
    with open(os.path.join(ROOT, "docs", "reference.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Configuration keys", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", section, re.MULTILINE)]


def test_every_key_documented_and_nothing_else():
    """
    The reference lists exactly the keys the configuration parser accepts, each once.
    """
    documented = documented_keys()
    assert len(documented) == len(set(documented)), "a key is listed twice"
    accepted = set(key_paths())
    assert sorted(accepted - set(documented)) == [], "accepted by the parser but not in docs/reference.md"
    assert sorted(set(documented) - accepted) == [], "in docs/reference.md but refused by the parser"


def test_every_subpackage_is_installed():
    """
    pyproject.toml lists every package under wingate_map/, so an installed wingatemap (the
    README's command, a venv, pipx) has all of it, not only the checkout.
    """
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {
        os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for folder, _, files in os.walk(os.path.join(ROOT, "wingate_map"))
        if "__init__.py" in files
    }
    assert sorted(found - listed) == []
