"""
The shape of a child service that holds something open (ports, a file, a firewall table,
worker processes): it opens it once, as early as it can, and closes it when stopped.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service


class Resource(Service):
    """
    A child service that opens what it holds in L{privilegedStartService} (under twistd:
    before the privilege drop), or in L{startService} when nothing called that first, and
    closes it in L{stopService}, also when it was opened but never started (the root closes
    what it opened when a later child fails, so that start-up is all or nothing).

    Subclasses define L{open} (raising when it cannot) and L{close}.

    @ivar opened: whether L{open} succeeded and L{close} has not run since.
    """

    opened = False

    def open(self) -> None:
        """
        Open what this service holds; raise if it cannot (nothing is left open then).
        """

    def close(self) -> Any:
        """
        Close what this service holds: L{None}, or a Deferred firing once it is closed.
        """

    def privilegedStartService(self) -> None:
        """
        Open (before twistd drops privileges).
        """
        if not self.opened:
            self.open()
            self.opened = True
        super().privilegedStartService()

    def startService(self) -> None:
        """
        Open, unless already open, and run.
        """
        if not self.opened:
            self.open()
            self.opened = True
        super().startService()

    def stopService(self) -> Any:
        """
        Close: L{None}, or a Deferred firing once closed.
        """
        super().stopService()
        if not self.opened:
            return None
        self.opened = False
        return self.close()
