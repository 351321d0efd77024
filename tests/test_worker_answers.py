"""
How the primary reads a worker's answer body (wingate_map.admin._api._read_body): whole on a
normal end, refused when too large or cut off, and without Twisted's readBody warning.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from wingate_map.admin import _api


class _Response:
    """
    Just enough of an IResponse: delivers the given chunks, then the given ending.
    """

    def __init__(self, chunks: list[bytes], ending: Exception) -> None:
        self.chunks = chunks
        self.ending = ending
        self.stopped = False

    def deliverBody(self, protocol) -> None:
        protocol.makeConnection(self)
        for chunk in self.chunks:
            protocol.dataReceived(chunk)
        protocol.connectionLost(Failure(self.ending))

    def stopProducing(self) -> None:
        self.stopped = True


def _result(d):
    results = []
    d.addBoth(results.append)
    assert results, "the body Deferred should have fired"
    return results[0]


def test_body_is_joined_on_response_done() -> None:
    """
    A body that ends normally (or without a length, PotentialDataLoss) arrives whole.
    """
    assert _result(_api._read_body(_Response([b'{"a":', b" 1}"], ResponseDone()))) == b'{"a": 1}'
    assert _result(_api._read_body(_Response([b"[]"], PotentialDataLoss()))) == b"[]"


def test_cut_off_body_fails() -> None:
    """
    A worker that goes away mid-answer gives a failure, not a truncated body.
    """
    result = _result(_api._read_body(_Response([b'{"a":'], ConnectionLost())))
    assert isinstance(result, Failure) and result.check(ConnectionLost)


def test_too_large_body_is_refused(monkeypatch) -> None:
    """
    An answer over the limit stops the transfer and fails, instead of growing without bound.
    """
    monkeypatch.setattr(_api, "_WORKER_BODY_LIMIT", 8)
    response = _Response([b"12345", b"67890"], ResponseDone())
    result = _result(_api._read_body(response))
    assert isinstance(result, Failure) and result.check(ValueError)
    assert response.stopped
