"""
Configured event handlers (C{[[events.ClientConnect]]}, C{[[events.ClientDisconnect]]}): run a
program with the event's fields in its environment, or call a Python function.

A ClientConnect handler allows the session (exit status 0, or a callable returning anything but
C{False}) or blocks it (non-zero exit, C{False}); one that fails or times out is logged and
blocks, unless its C{on_failure} is C{allow}.  ClientDisconnect handlers run after the fact and
never delay or change anything.  Programs get every field as C{WINGATEMAP_<FIELD>} (upper case;
null as the empty string), no stdin, and are killed at C{timeout}.
"""

from __future__ import annotations

import importlib
import os
import shutil
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .config import Handler
from .interfaces import IEventSink

_log = Logger()

OUTPUT_LIMIT = 4096


def environment(event: dict[str, Any]) -> dict[str, str]:
    """
    The event's fields as C{WINGATEMAP_*} environment variables (plus PATH, LANG).
    """
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
    for key, value in event.items():
        if value is None:
            text = ""
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"WINGATEMAP_{key.upper()}"] = text
    return env


class _Program(ProcessProtocol):
    def __init__(self, done: Deferred[int]) -> None:
        self.done = done
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        if len(self.output) < OUTPUT_LIMIT:
            self.output += data[: OUTPUT_LIMIT - len(self.output)]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if reason.check(ProcessDone) or hasattr(reason.value, "exitCode") else None
        signal = getattr(reason.value, "signal", None)
        if not self.done.called:
            self.done.callback(code if code is not None else -(signal or 1))


class _Base:
    def __init__(self, handler: Handler, reactor: Any) -> None:
        self.handler = handler
        self.reactor = reactor

    def _call(self, event: dict[str, Any]) -> Deferred[bool]:
        raise NotImplementedError

    def _with_timeout(self, d: Deferred[Any], on_timeout: Callable[[], None], what: str = "") -> Deferred[Any]:
        """
        C{d}, failing with L{TimeoutError} if it has not fired within the handler's timeout
        (after C{on_timeout} ran, e.g. to kill a program).
        """
        timer = self.reactor.callLater(self.handler.timeout, lambda: (on_timeout(), d.cancel()))

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure) and result.check(CancelledError):
                raise TimeoutError(f"no answer within {self.handler.timeout:g}s{what}")
            return result

        return d.addBoth(settled)

    def client_connect(self, event: dict[str, Any]) -> Deferred[bool] | None:
        """
        Allow or block the session.
        """
        if self.handler.event != "ClientConnect":
            return None
        d = self._call(event)

        def failed(failure: Failure) -> bool:
            allow = self.handler.on_failure == "allow"
            _log.warn(
                "{handler} failed for session {session}: {why}; {verdict}",
                handler=str(self.handler),
                session=event["session"],
                why=failure.getErrorMessage() or failure.type.__name__,
                verdict="allowing it (on_failure = allow)" if allow else "blocking it",
            )
            return allow

        return d.addErrback(failed)

    def client_disconnect(self, event: dict[str, Any]) -> None:
        """
        Run after the session; failures are logged.
        """
        if self.handler.event != "ClientDisconnect":
            return None
        self._call(event).addErrback(
            lambda f: _log.warn("{handler} failed for session {session}: {why}", handler=str(self.handler), session=event["session"], why=f.getErrorMessage())
        )
        return None


@implementer(IEventSink)
class ProgramHandler(_Base):
    """
    Runs C{handler.run} with the event in its environment; exit status 0 allows.
    """

    def _call(self, event: dict[str, Any]) -> Deferred[bool]:
        argv = list(self.handler.run or ())
        executable = argv[0] if os.path.isabs(argv[0]) else (shutil.which(argv[0]) or argv[0])
        done: Deferred[int] = Deferred()
        protocol = _Program(done)
        try:
            process = self.reactor.spawnProcess(protocol, executable, argv, env=environment(event), childFDs={0: "w", 1: "r", 2: "r"})
        except Exception as e:
            return _failed(e)
        process.closeStdin()

        def kill() -> None:
            try:
                process.signalProcess("KILL")
            except Exception:
                pass

        def verdict(code: int) -> bool:
            if code != 0:
                output = protocol.output.decode("utf-8", "replace").strip()
                _log.info(
                    "{handler} exited {code} for session {session}{output}",
                    handler=str(self.handler),
                    code=code,
                    session=event["session"],
                    output=f": {output}" if output else "",
                )
            return code == 0

        return self._with_timeout(done, kill, " (killed)").addCallback(verdict)


def _failed(e: BaseException) -> Deferred[bool]:
    d: Deferred[bool] = Deferred()
    d.errback(e)
    return d


@implementer(IEventSink)
class PythonHandler(_Base):
    """
    Calls C{handler.python}(event); C{False} (or a Deferred firing C{False}) blocks.
    """

    def __init__(self, handler: Handler, reactor: Any) -> None:
        super().__init__(handler, reactor)
        module_name, _, name = (handler.python or "").partition(":")
        self.function = getattr(importlib.import_module(module_name), name)

    def _call(self, event: dict[str, Any]) -> Deferred[bool]:
        d = maybeDeferred(self.function, dict(event))

        return self._with_timeout(d, lambda: None).addCallback(lambda result: result is not False)


def build_handlers(handlers: tuple[Handler, ...], reactor: Any) -> list[IEventSink]:
    """
    Sinks for the configured handlers, in the order configured.
    """
    return [(ProgramHandler if h.run is not None else PythonHandler)(h, reactor) for h in handlers]
