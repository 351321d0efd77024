"""
wingatemap's version, for C{wingatemap --version} and the metrics' build info.
"""

from __future__ import annotations

import os
import re


def version() -> str:
    """
    The installed wingatemap's version (the checkout's pyproject.toml when not installed).
    """
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("wingatemap")
    except PackageNotFoundError:
        pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
        try:
            with open(pyproject, encoding="utf-8") as f:
                match = re.search(r'^version = "([^"]+)"', f.read(), re.MULTILINE)
        except OSError:
            match = None
        return match.group(1) if match else "unknown"
