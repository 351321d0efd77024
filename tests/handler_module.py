"""
Python event handlers used by the tests (configured as python = "tests.handler_module:NAME").
"""

from twisted.internet import defer, reactor


def block_66(event):
    """
    Blocks clients from 127.0.0.66; allows everyone else.
    """
    return event["client_ip"] != "127.0.0.66"


def later_allow(event):
    """
    Answers asynchronously: allows after a reactor turn.
    """
    d = defer.Deferred()
    reactor.callLater(0, d.callback, True)
    return d


def explode(event):
    """
    Fails.
    """
    raise RuntimeError("handler exploded")


def never(event):
    """
    Never answers.
    """
    return defer.Deferred()
