"""
The shared values (wingate_map.values): enums that stay plain words wherever they are seen.
"""

from __future__ import annotations

import json

from wingate_map.values import CONNECT, LEVELS, REASONS, Action, Decision, Reason


def test_reasons_are_the_specs_words_as_plain_strings():
    """
    The session-ending reasons are exactly the SPEC's, in its order, and plain strings (event
    fields and JSON never carry an enum).
    """
    assert REASONS == (
        "client-closed", "destination-closed", "rejected", "no-destination", "connect-failed",
        "connect-timeout", "tls-failed", "idle-timeout", "limit", "blocked", "killed", "shutdown", "lost",
    )
    assert all(type(reason) is str for reason in REASONS)
    assert all(type(level) is str for level in LEVELS)
    assert json.dumps({"reason": Reason.IDLE_TIMEOUT}) == '{"reason": "idle-timeout"}'
    assert f"{Reason.KILLED}" == "killed"


def test_actions_compare_equal_to_their_words():
    """
    A decision's action is an enum member that equals its word, so code and embedders
    comparing with "connect" keep working.
    """
    assert Decision(CONNECT).action == "connect"
    assert Action("reject") is Action.REJECT
