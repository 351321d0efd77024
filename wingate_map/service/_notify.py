"""
systemd's service notification protocol (C{sd_notify(3)}), in a few lines of the standard library.

Under a unit of C{Type=notify}, systemd sets C{NOTIFY_SOCKET} to an C{AF_UNIX} datagram socket
(a path, or C{@name} in the abstract namespace) and reads newline-separated C{KEY=value}
assignments from it: C{READY=1}, C{RELOADING=1} with C{MONOTONIC_USEC=}, C{STOPPING=1} and
C{STATUS=} text for C{systemctl status}.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from twisted.logger import Logger

_log = Logger(namespace="wingate_map.notify")  # the name log lines carried before the module moved here

NOTIFY_ENV = "NOTIFY_SOCKET"


class Notifier:
    """
    Sends state changes to systemd's notification socket; never raises (a lost message only
    makes systemd wait for its timeout, which is no reason to stop serving).
    """

    def __init__(self, address: str) -> None:
        # "@name" is a socket in the abstract namespace: its address starts with a NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._failed: str | None = None
        self._status: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Notifier | None":
        """
        A notifier for C{$NOTIFY_SOCKET}, or L{None} when not run by systemd with notification.
        """
        address = (os.environ if environ is None else environ).get(NOTIFY_ENV, "")
        if not address or address[0] not in "/@":
            return None
        return cls(address)

    def send(self, *assignments: str) -> None:
        """
        Send C{KEY=value} assignments as one datagram.
        """
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as e:
            why = e.strerror or str(e)
            if why != self._failed:
                self._failed = why
                _log.warn("cannot notify systemd at {address}: {why}", address=self.address.replace("\0", "@"), why=why)
            return
        self._failed = None

    def ready(self, status: str) -> None:
        """
        Serving (after start-up or a reload).
        """
        self._status = status
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """
        A reload starts; L{ready} ends it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self, status: str) -> None:
        """
        Shutting down (draining).
        """
        self._status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """
        Update the C{STATUS=} line (sent only when it changed).
        """
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")
