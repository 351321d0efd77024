"""
Configured event handlers (C{[[events.ClientConnect]]}, C{[[events.ClientDisconnect]]}): run a
program with the event's fields in its environment, or call a Python function.

A ClientConnect handler allows the session (exit status 0, or a callable returning anything but
C{False}) or blocks it (non-zero exit, C{False}); one that fails or times out is logged and
blocks, unless its C{on_failure} is C{allow}.  ClientDisconnect handlers run after the fact and
never delay or change anything.  Programs get every field as C{WINGATEMAP_<FIELD>} (upper case;
null as the empty string), no stdin, and are killed at C{timeout}.

Handlers never hear sessions refused before them (over a limit, rejected, no destination).  At
most C{[events] max_running} programs run at once; a program waits for a free slot, and one
that cannot start within its C{timeout} is a timeout like any other.
"""

from __future__ import annotations

import importlib
import os
import shutil
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, maybeDeferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import DEFAULT_MAX_RUNNING, Handler
from ..interfaces import IEventSink

_log = Logger(namespace="wingate_map.handlers")  # the name log lines carried before the module moved here

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
    """
    One run of a handler program: C{done} fires with its exit status (C{-signal} if killed);
    C{ended} runs once it is gone.
    """

    def __init__(self, ended: Callable[[], object]) -> None:
        self.done: Deferred[int] = Deferred()
        self.ended = ended
        self.output = b""
        self.process: Any = None

    def kill(self) -> None:
        """
        Kill the program (it has run past its timeout), and every process it started: a
        shell's children would otherwise outlive it.
        """
        import psutil

        pid = getattr(self.process, "pid", None)
        try:
            descendants = psutil.Process(pid).children(recursive=True) if pid else []
        except psutil.Error:
            descendants = []
        try:
            self.process.signalProcess("KILL")
        except Exception:
            pass
        for child in descendants:
            try:
                child.kill()
            except psutil.Error:
                pass

    def outReceived(self, data: bytes) -> None:
        if len(self.output) < OUTPUT_LIMIT:
            self.output += data[: OUTPUT_LIMIT - len(self.output)]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if reason.check(ProcessDone) or hasattr(reason.value, "exitCode") else None
        signal = getattr(reason.value, "signal", None)
        self.ended()
        if not self.done.called:
            self.done.callback(code if code is not None else -(signal or 1))


class _Base:
    # Sessions refused before the handlers (limit, rejected, no destination) start none.
    hears_refused = False

    def __init__(self, handler: Handler, reactor: Any) -> None:
        self.handler = handler
        self.reactor = reactor

    def _call(self, event: dict[str, Any]) -> Deferred[bool]:
        raise NotImplementedError

    def _with_timeout(self, d: Deferred[Any], on_timeout: Callable[[], str]) -> Deferred[Any]:
        """
        C{d}, failing with L{TimeoutError} if it has not fired within the handler's timeout
        (after C{on_timeout} ran, e.g. to kill a program; it returns words for the log).
        """
        what: list[str] = []
        timer = self.reactor.callLater(self.handler.timeout, lambda: (what.append(on_timeout()), d.cancel()))

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure) and result.check(CancelledError):
                raise TimeoutError(f"no answer within {self.handler.timeout:g}s{''.join(what)}")
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

    @ivar slots: shared by every program handler of a configuration: at most that many
        programs run at once (L{None}: no limit).
    """

    reads_events_only = True  # see EventHub: the environment is built from the shared event

    def __init__(self, handler: Handler, reactor: Any, slots: DeferredSemaphore | None = None) -> None:
        super().__init__(handler, reactor)
        self.slots = slots

    def _call(self, event: dict[str, Any]) -> Deferred[bool]:
        program = _Program(self._release)
        waiting = self.slots.acquire() if self.slots is not None else succeed(None)
        waiting.addCallback(lambda _: self._start(program, event))

        def on_timeout() -> str:
            if program.process is None:
                return f" (not started: events.max_running = {self.slots.limit if self.slots else 0} programs were running)"
            program.kill()
            return " (killed)"

        return self._with_timeout(waiting, on_timeout).addCallback(self._verdict, event, program)

    def _release(self) -> None:
        if self.slots is not None:
            self.slots.release()

    def _start(self, program: _Program, event: dict[str, Any]) -> Deferred[int]:
        argv = list(self.handler.run or ())
        executable = argv[0] if os.path.isabs(argv[0]) else (shutil.which(argv[0]) or argv[0])
        try:
            program.process = self.reactor.spawnProcess(program, executable, argv, env=environment(event), childFDs={0: "w", 1: "r", 2: "r"})
        except Exception as e:
            self._release()
            return _failed(e)
        program.process.closeStdin()
        return program.done

    def _verdict(self, code: int, event: dict[str, Any], program: _Program) -> bool:
        if code != 0:
            output = program.output.decode("utf-8", "replace").strip()
            _log.info(
                "{handler} exited {code} for session {session}{output}",
                handler=str(self.handler),
                code=code,
                session=event["session"],
                output=f": {output}" if output else "",
            )
        return code == 0


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

        return self._with_timeout(d, lambda: "").addCallback(lambda result: result is not False)


def build_handlers(handlers: tuple[Handler, ...], reactor: Any, max_running: int = DEFAULT_MAX_RUNNING) -> list[IEventSink]:
    """
    Sinks for the configured handlers, in the order configured; their programs share
    C{max_running} slots.
    """
    slots = DeferredSemaphore(max_running)
    return [ProgramHandler(h, reactor, slots) if h.run is not None else PythonHandler(h, reactor) for h in handlers]
