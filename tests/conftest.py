"""
Shared fixtures.
"""

from __future__ import annotations

import pytest
from twisted.logger import formatEvent, globalLogPublisher


@pytest.fixture
def caplog_twisted():
    """
    The text of every twisted.logger event emitted during the test.
    """
    lines: list[str] = []

    def observer(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observer)
