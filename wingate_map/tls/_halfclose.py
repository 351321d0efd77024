"""
TLS with half-close.

Twisted's TLSMemoryBIOProtocol closes the whole connection when the peer sends close_notify, and
has no loseWriteConnection: a relay over it cannot pass a half-close on.  OpenSSL can (TLS 1.2
and 1.3 both allow sending after receiving close_notify, and receiving after sending it), so
this subclass exposes it: the peer's close_notify (or a bare TCP FIN) becomes
readConnectionLost, and loseWriteConnection sends close_notify then a TCP FIN.  It only does so
for wrapped protocols that are IHalfCloseableProtocol; anything else gets Twisted's behaviour.

This is the one place that depends on TLSMemoryBIOProtocol's private methods and attributes
(C{_flushReceiveBIO}, C{_shutdownTLS}, C{_unbufferPendingWrites}, C{_tlsConnection},
C{_appSendBuffer}...): Twisted has no public hook for half-close over TLS.  pyproject.toml pins
Twisted below its next major version; tests/test_tls_endings.py covers every path here.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class HalfCloseTLSProtocol(TLSMemoryBIOProtocol):
    """
    TLSMemoryBIOProtocol with half-close both ways; optionally writes a plaintext preamble
    (a PROXY header) before the handshake.
    """

    _read_shut = False
    _write_shut = False
    _write_shut_pending = False

    def _half_closeable(self) -> bool:
        return IHalfCloseableProtocol.providedBy(self.wrappedProtocol)

    def makeConnection(self, transport: Any) -> None:
        preamble = getattr(self.factory, "preamble", b"")
        if preamble:
            transport.write(preamble)
        super().makeConnection(transport)

    def _flushReceiveBIO(self) -> None:
        if not self._half_closeable():
            return super()._flushReceiveBIO()
        while not self._lostTLSConnection and not self._read_shut:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                self._peer_finished()
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        if self._tlsConnection is not None:  # None once the connection is gone
            self._flushSendBIO()

    def _peer_finished(self) -> None:
        """
        The peer will send no more (close_notify, or a TCP FIN).
        """
        if self._read_shut:
            return
        self._read_shut = True
        self.wrappedProtocol.readConnectionLost()
        if self._write_shut:
            self._close_transport()

    def readConnectionLost(self) -> None:
        """
        TCP FIN from the peer (without close_notify, if none was seen).
        """
        if self._lostTLSConnection:
            return
        if not self._half_closeable() or not self._handshakeDone:
            # As Twisted does for protocols without half-close: the connection is over.
            self.transport.loseConnection()
            return
        self._peer_finished()

    def writeConnectionLost(self) -> None:
        pass

    def loseWriteConnection(self) -> None:
        """
        Send close_notify once buffered data is out, then a TCP FIN; keep reading.
        """
        if self._write_shut or self._lostTLSConnection:
            return
        if self._appSendBuffer:
            self._write_shut_pending = True
            return
        self._write_shut = True
        try:
            self._tlsConnection.shutdown()
        except Error:
            pass
        self._flushSendBIO()
        if self._read_shut:
            self._close_transport()
        else:
            self.transport.loseWriteConnection()

    def _unbufferPendingWrites(self) -> None:
        super()._unbufferPendingWrites()
        if self._write_shut_pending and not self._appSendBuffer:
            self._write_shut_pending = False
            self.loseWriteConnection()

    def _close_transport(self) -> None:
        self.disconnecting = True
        self.transport.loseConnection()

    def _shutdownTLS(self) -> None:
        """
        Send close_notify and close the TCP connection behind it, as a TCP close sends a FIN:
        do not wait for the peer's close_notify.  (Twisted waits for it, and a peer that
        closed its TCP connection without one, or one that never answers, held the socket and
        its session for ever.  RFC 8446 6.1 requires neither side to wait.)
        """
        if not self._half_closeable() or self._aborted:
            return super()._shutdownTLS()
        try:
            self._tlsConnection.shutdown()
        except Error:
            pass
        self._flushSendBIO()
        self._close_transport()

    def loseConnection(self) -> None:
        if self._write_shut and not self._lostTLSConnection:
            self._close_transport()
            return
        super().loseConnection()

class HalfCloseTLSFactory(TLSMemoryBIOFactory):
    """
    A TLSMemoryBIOFactory building L{HalfCloseTLSProtocol}s.

    @ivar preamble: bytes written in plaintext before the handshake (a PROXY header).
    """

    protocol = HalfCloseTLSProtocol
    noisy = False
    preamble = b""
