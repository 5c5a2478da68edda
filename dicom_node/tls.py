"""DICOM over TLS (PS3.15 Annex B, "The Secure Transport Connection Profiles"; BCP 195).

The node serves TLS on its own port (``Settings.tls_port``, 2762 by default, the port IANA
registered for DICOM over TLS) beside the plain one, with ``Settings.tls_cert`` and
``Settings.tls_key``. TLS 1.2 is the least version accepted, with the forward-secret AEAD
cipher suites BCP 195 (RFC 9325 4.2) recommends; TLS 1.3 suites are OpenSSL's defaults,
all of them AEAD. With ``Settings.tls_ca`` a client certificate is required and must
chain to that CA (mutual TLS, the "authenticated" part of PS3.15 B.1).

How a TLS connection is served, and why:

- pynetdicom's own ``ssl_context`` runs the handshake in ``get_request``, on the thread
  that accepts every connection, with no deadline: one peer that connects and sends
  nothing stops the port for everyone. Here the raw connection is handed to its own
  thread first, which does the handshake under ``handshake_timeout``; connections still
  in handshake are capped per peer address and in all (:class:`Handshakes`).
- After the handshake, the decrypted byte stream is relayed (:class:`Relay`) to one end of
  a socket pair whose other end goes to the same request handler the plain port uses
  (:func:`dicom_node.guard.handler`), with the peer's real address. So everything the plain
  port enforces against hostile peers (PDU length bounds, PDU deadlines, the per-address
  cap, ACSE and idle timeouts) applies unchanged, on the plaintext; nothing there has to
  know about ``SSLSocket`` buffering, which ``select()`` cannot see.

The contexts themselves, and the outbound side the SR sender uses, are in
:mod:`fracture_triage.tls_context`.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import RequestHandler

from fracture_triage.tls_context import handshake_failure

logger = logging.getLogger(__name__)

#: Bytes held per direction before the relay stops reading that side (back-pressure).
RELAY_BUFFER = 1024 * 1024
#: Largest TLS record payload (RFC 8446 5.1): what one non-blocking SSL write carries.
TLS_RECORD = 16384


@dataclass(frozen=True)
class TlsLimits:
    #: seconds from connection to a finished handshake
    handshake_timeout: float
    #: seconds the relay waits with neither side moving before it closes both
    idle_timeout: float
    #: connections one peer address may have in handshake at once
    per_peer: int
    #: connections in handshake at once, whatever their address
    total: int = 64


class Handshakes:
    """Connections in TLS handshake, per peer address (each is a thread until it ends)."""

    def __init__(self, limits: TlsLimits) -> None:
        self._limits = limits
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()

    def enter(self, address: str) -> bool:
        with self._lock:
            if self._held[address] >= self._limits.per_peer:
                return False
            if sum(self._held.values()) >= self._limits.total:
                return False
            self._held[address] += 1
            return True

    def leave(self, address: str) -> None:
        with self._lock:
            self._held[address] -= 1
            if self._held[address] <= 0:
                del self._held[address]


def describe(tls: ssl.SSLSocket) -> str:
    """Version, cipher suite and the client certificate's subject CN, for the log."""
    cipher = tls.cipher()
    name = cipher[0] if cipher else "?"
    subject = ""
    cert = tls.getpeercert()
    if cert:
        for rdn in cert.get("subject", ()):
            for pair in rdn:
                if isinstance(pair, tuple) and pair[0] == "commonName":
                    subject = f", client certificate CN={pair[1]}"
    return f"{tls.version()} {name}{subject}"


class Relay(threading.Thread):
    """Copies bytes between the TLS connection and the plaintext socket the DICOM handler
    reads, in one thread (an ``SSLSocket`` must not be read and written from two threads
    at once), non-blocking in both directions so that neither side can stall the other.

    Ends, closing both, when either side closes or fails (after passing on what the other
    side still had to say, e.g. an A-RELEASE-RP or A-ABORT), or when nothing moved for
    ``idle_timeout`` seconds.
    """

    def __init__(
        self, tls: ssl.SSLSocket, plain: socket.socket, peer: str, idle_timeout: float
    ) -> None:
        super().__init__(name=f"TlsRelay@{peer}", daemon=True)
        self.tls, self.plain, self.peer, self.idle_timeout = tls, plain, peer, idle_timeout

    def run(self) -> None:
        tls, plain = self.tls, self.plain
        try:
            self._pump(tls, plain)
        except Exception:  # a relay failure ends this connection only
            logger.exception("TLS relay for %s failed", self.peer)
        finally:
            for sock in (plain, tls):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def _pump(self, tls: ssl.SSLSocket, plain: socket.socket) -> None:
        tls.setblocking(False)
        plain.setblocking(False)
        to_plain, to_tls = bytearray(), bytearray()
        tls_open = plain_open = True
        while True:
            if not plain_open and not to_tls:
                return  # the DICOM side ended and all it said was sent
            if not tls_open and not to_plain:
                return  # the peer ended and all it sent was handed on
            readers: list[Any] = []
            writers: list[Any] = []
            if tls_open and plain_open and len(to_plain) < RELAY_BUFFER:
                readers.append(tls)
            if plain_open and tls_open and len(to_tls) < RELAY_BUFFER:
                readers.append(plain)
            if to_plain and plain_open:
                writers.append(plain)
            if to_tls and tls_open:
                writers.append(tls)
            if not readers and not writers:
                return
            # Plaintext already decrypted inside the SSL object is invisible to select().
            ready_now = tls in readers and tls.pending() > 0
            readable, writable, _ = select.select(
                readers, writers, [], 0 if ready_now else self.idle_timeout
            )
            if ready_now and tls not in readable:
                readable.append(tls)
            if not readable and not writable:
                logger.warning(
                    "TLS connection with %s idle for %.0f s: closing", self.peer, self.idle_timeout
                )
                return
            if tls in readable:
                tls_open = self._from_tls(tls, to_plain)
            if plain in readable:
                try:
                    data = plain.recv(RELAY_BUFFER)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    plain_open = False
                elif data:
                    to_tls += data
            if plain in writable and to_plain:
                try:
                    sent = plain.send(to_plain)
                    del to_plain[:sent]
                except BlockingIOError:
                    pass
                except OSError:
                    plain_open = False
                    to_plain.clear()
            if tls in writable and to_tls:
                try:
                    # The same bytes again after SSLWantWrite (OpenSSL requires it).
                    sent = tls.send(to_tls[:TLS_RECORD])
                    del to_tls[:sent]
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
                except OSError:
                    tls_open = False
                    to_tls.clear()

    def _from_tls(self, tls: ssl.SSLSocket, to_plain: bytearray) -> bool:
        """Read what the TLS connection has decrypted (a record at a time); whether it is
        still open."""
        while len(to_plain) < RELAY_BUFFER:
            try:
                data = tls.recv(TLS_RECORD)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return True
            except (ssl.SSLError, OSError) as exc:
                logger.info("TLS connection with %s ended: %s", self.peer, exc)
                return False
            if not data:
                return False
            to_plain += data
            if not tls.pending():
                return True
        return True


class TlsRequestHandler(RequestHandler):
    """Handshake under a deadline in the connection's own thread, then hand the decrypted
    stream to :attr:`inner`, the plain port's request handler (see module doc)."""

    # Replaced by :func:`handler`.
    context: ssl.SSLContext
    limits: TlsLimits
    handshakes: Handshakes
    inner: type[RequestHandler]

    def setup(self) -> None:
        """Nothing here: the inner handler sets its socket up on the plaintext."""

    def handle(self) -> None:
        raw = self.request
        assert isinstance(raw, socket.socket)
        address = str(self.client_address[0])
        peer = f"{address}:{self.client_address[1]}"
        if not self.handshakes.enter(address):
            logger.warning("refused a TLS connection from %s: too many handshakes at once", peer)
            _close(raw)
            return
        try:
            tls = self._handshake(raw, peer)
        finally:
            self.handshakes.leave(address)
        if tls is None:
            return
        logger.info("TLS connection from %s: %s", peer, describe(tls))
        ours, theirs = socket.socketpair()
        Relay(tls, ours, peer, self.limits.idle_timeout).start()
        # The plain port's handler, on the plaintext, under the peer's real address.
        self.inner(theirs, self.client_address, self.server)

    def _handshake(self, raw: socket.socket, peer: str) -> ssl.SSLSocket | None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(self.limits.handshake_timeout)
            tls = self.context.wrap_socket(raw, server_side=True)
            tls.settimeout(None)
            return tls
        except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError) as exc:
            # Closed before saying anything (a port probe such as `up`'s start-up check).
            logger.info("connection from %s closed during the TLS handshake: %s", peer, exc)
            _close(raw)
            return None
        except (OSError, ValueError) as exc:  # ssl.SSLError, TimeoutError are OSErrors
            reason = handshake_failure(exc)
            if isinstance(exc, TimeoutError):
                reason = f"no handshake within {self.limits.handshake_timeout:.0f} s"
            logger.warning("TLS handshake with %s failed: %s", peer, reason)
            _close(raw)
            return None

    def finish(self) -> None:
        """Nothing here: the relay and the inner handler close what they own."""


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def handler(
    context: ssl.SSLContext, limits: TlsLimits, inner: type[RequestHandler]
) -> type[TlsRequestHandler]:
    """A request handler class for ``AE.make_server(request_handler=...)`` on the TLS port."""

    class Handler(TlsRequestHandler):
        pass

    Handler.context = context
    Handler.limits = limits
    Handler.handshakes = Handshakes(limits)
    Handler.inner = inner
    return Handler


__all__ = [
    "Handshakes",
    "Relay",
    "TlsLimits",
    "TlsRequestHandler",
    "handler",
]
