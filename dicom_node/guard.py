"""What a peer can make the node hold before (and after) it authenticates: bounded.

pynetdicom's DUL reads a PDU by trusting its header: ``recv(6)``, then ``recv(length)``
whatever the 4-byte PDU-length says, growing a buffer as bytes arrive (an A-ASSOCIATE-RQ
declaring 4 GiB took the SCP from 118 MB to 906 MB resident), and a blocking read without a
deadline, so a peer dribbling a byte every few seconds holds an association slot forever.
No pynetdicom issue about either was found (searched: "PDU length memory", "_read_pdu_data
unbounded"); fo-dicom had the same flaw (fo-dicom/fo-dicom#327, fixed by #509).

:class:`PduGuard` wraps the accepted TCP socket before pynetdicom sees it and follows the
PDU framing of the byte stream itself (PS3.8 9.3.1: every PDU starts with a 6-byte header,
PDU-type, reserved, 4-byte big-endian PDU-length of what follows):

- a declared PDU-length above :func:`pdu_limit` for its type is answered with A-ABORT
  (PS3.8 9.3.8, source service-provider, reason invalid-PDU-parameter-value) and the
  connection is closed before any of the body is read;
- each PDU must arrive whole within ``read_timeout`` seconds of its first byte.

Either way the DUL sees the connection close (Evt17) and pynetdicom ends the association.

:class:`GuardedRequestHandler` creates no pynetdicom ``Association`` (whose thread is what
pynetdicom counts against ``maximum_associations``) until the connection's first PDU is a
whole, decodable A-ASSOCIATE-RQ (:func:`await_associate_rq`, PS3.8 9.2 Sta2: anything else
there is answered by A-ABORT or A-ASSOCIATE-RJ and the connection closed). pynetdicom's
acceptor waits for that request with ``receive_pdu(timeout=acse_timeout)``, and a connection
that ends in state Sta2 (closed, aborted, junk, cut short) issues no indication to wake it
(AA-5, AA-1 and AA-2 of PS3.8 Table 9-10), so its thread and its association slot used to
linger for the whole ACSE timeout: 16 such connections locked every other peer out for
30 s. pynetdicom/pynetdicom#979 reports the same symptom (sockets of aborted associations
kept, "local limit exceeded" for everyone) and was closed unreproduced.

:class:`Connections` counts live TCP connections (negotiating or associated), not threads:
an address holding ``per_peer`` of them has further connections closed at once, so one peer
cannot take every slot, and the node holds at most :data:`MAX_CONNECTIONS`. A connection is
released the moment it ends (EOF, abort, deadline or close), whatever its thread still does.
Plain TCP only, as the node serves: under TLS an ``SSLSocket``'s buffered bytes would be
invisible to ``select()``.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import RequestHandler

logger = logging.getLogger(__name__)

#: PS3.8 9.3.1: PDU-type (1), reserved (1), PDU-length (4, unsigned big-endian).
HEADER = struct.Struct(">BBL")

#: A-ASSOCIATE-RQ/AC (PS3.8 9.3.2, 9.3.3): 128 presentation contexts of a dozen transfer
#: syntaxes each plus user information stay well under 64 KiB; twice that as a margin.
MAX_ASSOCIATE_PDU = 128 * 1024
#: A-ASSOCIATE-RJ, A-RELEASE-RQ/RP, A-ABORT have a fixed PDU-length of 4 (PS3.8 9.3.4-9.3.8).
MAX_FIXED_PDU = 1024
#: P-DATA-TF bound when no maximum is advertised (max PDU 0 means "no limit" to pynetdicom).
MAX_PDATA_UNLIMITED = 64 * 1024 * 1024

A_ASSOCIATE_RQ_TYPE = 0x01
P_DATA_TF = 0x04
A_ABORT_TYPE = 0x07

#: Live TCP connections the node holds at once (negotiating or associated), whatever their
#: addresses: bounds the threads a crowd of peers can make it keep (the association slots
#: themselves are pynetdicom's ``maximum_associations``).
MAX_CONNECTIONS = 128


def _abort_pdu(reason: int) -> bytes:
    """PS3.8 9.3.8 A-ABORT, source 2 (DICOM UL service-provider) and ``reason``."""
    return bytes([A_ABORT_TYPE, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, reason])


#: PS3.8 9.3.8 A-ABORT reasons: 1 unrecognized-PDU, 2 unexpected-PDU, 6
#: invalid-PDU-parameter-value.
ABORT_UNRECOGNIZED_PDU = _abort_pdu(0x01)
ABORT_UNEXPECTED_PDU = _abort_pdu(0x02)
ABORT_INVALID_PARAMETER = _abort_pdu(0x06)
#: PS3.8 9.3.4 A-ASSOCIATE-RJ: result 1 (rejected-permanent), source 2 (service-provider,
#: ACSE related), reason 2 (protocol-version-not-supported), what pynetdicom's AE-6 answers.
REJECT_PROTOCOL_VERSION = bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x01, 0x02, 0x02])


def pdu_limit(pdu_type: int, max_pdu: int) -> int | None:
    """Largest PDU-length accepted for ``pdu_type``; ``None`` for an unknown type (pynetdicom
    answers those itself, PS3.8 9.3.1 and Evt19).

    P-DATA-TF: the PDU-length counts the variable field, which the Maximum Length the node
    advertised bounds (PS3.8 D.1.1): ``max_pdu`` plus the 6-byte header in all.
    """
    if pdu_type in (0x01, 0x02):
        return MAX_ASSOCIATE_PDU
    if pdu_type == P_DATA_TF:
        return max_pdu if max_pdu > 0 else MAX_PDATA_UNLIMITED
    if pdu_type in (0x03, 0x05, 0x06, 0x07):
        return MAX_FIXED_PDU
    return None


@dataclass(frozen=True)
class Limits:
    max_pdu: int
    #: seconds a PDU may take from its first byte to its last
    read_timeout: float
    #: live connections one peer address may hold
    per_peer: int
    #: seconds from connection to a whole A-ASSOCIATE-RQ (the ACSE timeout)
    associate_timeout: float = 30.0
    #: live connections the node holds in all
    total: int = MAX_CONNECTIONS


class Connections:
    """Live connections per peer address, under :class:`Limits` (see module doc)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()
        self._pending: set[PduGuard] = set()

    def admit(self, address: str) -> str | None:
        """Count a new connection from ``address``; why it is refused instead, or ``None``."""
        with self._lock:
            held = self._held[address]
            if held >= self._limits.per_peer:
                return f"it holds {held} connections already (limit {self._limits.per_peer})"
            total = sum(self._held.values())
            if total >= self._limits.total:
                return f"the node holds {total} connections (limit {self._limits.total})"
            self._held[address] += 1
            return None

    def release(self, address: str) -> None:
        with self._lock:
            self._held[address] -= 1
            if self._held[address] <= 0:
                del self._held[address]

    def held(self, address: str) -> int:
        with self._lock:
            return self._held[address]

    def negotiating(self, guard: PduGuard, waiting: bool) -> None:
        """Track connections still before their A-ASSOCIATE-RQ, to close them at shutdown."""
        with self._lock:
            if waiting:
                self._pending.add(guard)
            else:
                self._pending.discard(guard)

    def close_negotiating(self) -> None:
        """End every connection still before its A-ASSOCIATE-RQ (the server stops)."""
        with self._lock:
            pending = list(self._pending)
        for guard in pending:
            guard.abort(ABORT_UNEXPECTED_PDU)


class PduGuard:
    """A ``socket.socket`` stand-in that reads PDUs under :class:`Limits` (see module doc).

    Only what pynetdicom's ``AssociationSocket`` and ``socketserver`` use is provided.
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        limits: Limits,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self._sock = sock
        self._peer = peer
        self._limits = limits
        self._remaining = 0  # bytes of the current PDU's body not yet read
        self._pending = b""  # header bytes checked but not yet handed out
        self._deadline = 0.0
        self._closed = False
        #: called once, when the connection ends (EOF, abort, deadline or close)
        self._on_end = on_end
        self._end_lock = threading.Lock()
        #: the same release, should this object be collected without ending (detached then)
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def _ended(self) -> None:
        """The connection is over: release its count (once)."""
        self._closed = True
        with self._end_lock:
            on_end, self._on_end = self._on_end, None
            finalizer, self._finalizer = self._finalizer, None
        if on_end is not None:
            on_end()
        if finalizer is not None:
            finalizer.detach()

    # --- reading --------------------------------------------------------------------------

    def recv(self, bufsize: int) -> bytes:
        if self._closed or bufsize <= 0:
            return b""
        if not self._pending and self._remaining == 0 and not self._next_header():
            return b""
        if self._pending:
            out, self._pending = self._pending[:bufsize], self._pending[bufsize:]
            return out
        data = self._read(min(bufsize, self._remaining))
        self._remaining -= len(data)
        return data

    def _next_header(self) -> bool:
        """Read and check the next PDU header; ``False`` when the connection is over."""
        self._deadline = time.monotonic() + self._limits.read_timeout
        header = b""
        while len(header) < HEADER.size:
            chunk = self._read(HEADER.size - len(header))
            if not chunk:
                return False
            header += chunk
        pdu_type, _reserved, length = HEADER.unpack(header)
        limit = pdu_limit(pdu_type, self._limits.max_pdu)
        if limit is not None and length > limit:
            logger.warning(
                "peer %s declared a PDU of type 0x%02X and %d bytes (limit %d): aborting",
                self._peer,
                pdu_type,
                length,
                limit,
            )
            self._abort()
            return False
        # An unknown type is passed on with no body: pynetdicom answers it with A-ABORT.
        self._remaining = length if limit is not None else 0
        self._pending = header
        return True

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes before the PDU's deadline, ``b""`` at its end or at EOF."""
        left = self._deadline - time.monotonic()
        try:
            if left <= 0:
                return self._late()
            try:  # what has arrived already, without a select() per 4 KiB read
                data = self._sock.recv(size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not select.select([self._sock], [], [], left)[0]:
                    return self._late()
                data = self._sock.recv(size)
        except (OSError, ValueError):
            data = b""
        if not data:
            self._ended()
        return data

    def _late(self) -> bytes:
        logger.warning(
            "peer %s sent no whole PDU within %.0f s: closing",
            self._peer,
            self._limits.read_timeout,
        )
        self._abort()
        return b""

    def _abort(self) -> None:
        self.abort(ABORT_INVALID_PARAMETER)

    def abort(self, pdu: bytes | None) -> None:
        """Send ``pdu`` (an A-ABORT or A-ASSOCIATE-RJ; ``None``: nothing) and end the
        connection; pynetdicom, if it has it, sees EOF (Evt17)."""
        if pdu is not None:
            with contextlib.suppress(OSError):  # the peer may be gone already
                self._sock.sendall(pdu)
        with contextlib.suppress(OSError):
            # Unread bytes at close make the kernel reset the connection, which can reach
            # the peer ahead of the A-ABORT: drop what is buffered first (best effort).
            self._sock.recv(4 * MAX_ASSOCIATE_PDU, socket.MSG_DONTWAIT)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._ended()

    @property
    def raw(self) -> socket.socket:
        """The TCP socket itself (for :func:`await_associate_rq`, which only peeks)."""
        return self._sock

    # --- the rest of the socket -----------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, data: bytes) -> int:
        return self._sock.send(data)

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._ended()
        self._sock.close()

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()


_quiet = threading.local()


class _QuietWhileChecking(logging.Filter):
    """pynetdicom logs an ERROR with a traceback for every undecodable AE title or UID
    (``pynetdicom.utils.decode_bytes``); while :func:`await_associate_rq` checks a request,
    in its own thread, the one warning it logs says enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "on", False)


logging.getLogger("pynetdicom.utils").addFilter(_QuietWhileChecking())


def _wait_for(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    """The first ``size`` bytes buffered on ``sock``, left there (``MSG_PEEK``), once they
    have all arrived; fewer if the peer closed first; ``None`` at ``deadline``.

    ``SO_RCVLOWAT`` makes ``poll()`` on a TCP socket wait for ``size`` bytes (or the peer's
    close) without a busy loop; Linux grows the receive buffer to fit. A Unix socket (the TLS
    port's relay, a ``socketpair``) ignores it, so a short peek is retried every 10 ms until
    the bytes are there or ``POLLRDHUP`` says the peer closed. Nothing is consumed, so
    pynetdicom's DUL and :class:`PduGuard` read the PDU afterwards as if this had not happened.
    """
    closed = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    with contextlib.suppress(OSError):  # not every socket family takes it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            events = poller.poll(max(1, int(left * 1000)))
            if not events:
                return None
            data = sock.recv(size, socket.MSG_PEEK)
            if len(data) >= size or not data or events[0][1] & closed:
                return data
            time.sleep(0.01)
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


@dataclass(frozen=True)
class FirstPdu:
    """What :func:`await_associate_rq` found: ``answer`` is ``None`` for a usable request,
    else what to send before closing (``b""``: nothing), with ``reason`` for the log."""

    answer: bytes | None
    reason: str = ""


def await_associate_rq(sock: socket.socket, limits: Limits) -> FirstPdu:
    """Wait, in the connection's own thread and before pynetdicom has it, until its first PDU
    is a whole A-ASSOCIATE-RQ that pynetdicom will decode and answer (PS3.8 9.2, state Sta2).

    Mirrors what pynetdicom's DUL would do with anything else in Sta2, but without an
    association thread waiting out the ACSE timeout meanwhile: another PDU type gets A-ABORT
    (AA-1; an A-ABORT is just closed, AA-2), an undecodable request A-ABORT, a protocol
    version other than 1 A-ASSOCIATE-RJ (AE-6); a peer that closes, or sends no whole request
    within ``associate_timeout`` of connecting (and ``read_timeout`` of its first byte), is
    closed (the ARTIM timer's job).
    """
    opened = time.monotonic()
    try:
        first = _wait_for(sock, 1, opened + limits.associate_timeout)
        if first is None:
            return FirstPdu(b"", f"sent nothing within {limits.associate_timeout:.0f} s")
        if not first:
            return FirstPdu(b"", "closed before sending anything")
        deadline = min(opened + limits.associate_timeout, time.monotonic() + limits.read_timeout)
        head = _wait_for(sock, HEADER.size, deadline)
        if head is None or len(head) < HEADER.size:
            return FirstPdu(b"", "sent no whole PDU header" if head is None else "closed early")
        pdu_type, _reserved, length = HEADER.unpack(head)
        if pdu_type == A_ABORT_TYPE:
            return FirstPdu(b"", "sent A-ABORT before associating")
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            known = pdu_limit(pdu_type, limits.max_pdu) is not None
            return FirstPdu(
                ABORT_UNEXPECTED_PDU if known else ABORT_UNRECOGNIZED_PDU,
                f"sent a PDU of type 0x{pdu_type:02X} before A-ASSOCIATE-RQ",
            )
        if length > MAX_ASSOCIATE_PDU:
            return FirstPdu(
                ABORT_INVALID_PARAMETER,
                f"declared a PDU of type 0x01 and {length} bytes (limit {MAX_ASSOCIATE_PDU})",
            )
        whole = _wait_for(sock, HEADER.size + length, deadline)
        if whole is None:
            return FirstPdu(ABORT_INVALID_PARAMETER, "sent no whole A-ASSOCIATE-RQ in time")
        if len(whole) < HEADER.size + length:
            return FirstPdu(b"", "closed before its A-ASSOCIATE-RQ was whole")
    except (OSError, ValueError) as exc:
        return FirstPdu(b"", f"connection failed ({type(exc).__name__})")
    try:  # what pynetdicom's DUL does with it (_decode_pdu, then AE-6's to_primitive)
        _quiet.on = True
        request = A_ASSOCIATE_RQ()
        request.decode(whole)
        request.to_primitive()
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the peer is wrong
        reason = f"sent an undecodable A-ASSOCIATE-RQ ({type(exc).__name__})"
        return FirstPdu(ABORT_INVALID_PARAMETER, reason)
    finally:
        _quiet.on = False
    if request.protocol_version != 0x0001:
        return FirstPdu(REJECT_PROTOCOL_VERSION, "asked for an unsupported protocol version")
    return FirstPdu(None)


class _ReleaseOnce:
    """Release one connection's count, once, whoever calls first."""

    def __init__(self, connections: Connections, address: str) -> None:
        self._connections = connections
        self._address = address
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._connections.release(self._address)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler on a :class:`PduGuard`, under :class:`Connections`."""

    limits = Limits(max_pdu=0, read_timeout=30.0, per_peer=8)  # replaced by :func:`handler`
    connections = Connections(limits)

    def setup(self) -> None:
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        self._admitted = False
        # The DUL and socketserver use the guard as the connection's socket.
        self.request = cast(socket.socket, PduGuard(self.request, peer, self.limits))

    def handle(self) -> None:
        address = self.client_address[0]
        guard = cast(PduGuard, self.request)
        refused = self.connections.admit(address)
        if refused is not None:
            logger.warning("refused a connection from %s: %s", address, refused)
            guard.abort(None)
            guard.close()
            return
        release = _ReleaseOnce(self.connections, address)
        guard._on_end = release
        # Should pynetdicom ever drop the connection without closing it, it is released
        # when the socket object goes (the count must not outlive the connection). Detached
        # when the connection ends normally: a finalizer runs wherever the collector happens
        # to run, deep in a recursive parse maybe, and is best left for that rare case.
        guard._finalizer = weakref.finalize(guard, release)
        self.connections.negotiating(guard, True)
        try:
            first = await_associate_rq(guard.raw, self.limits)
        finally:
            self.connections.negotiating(guard, False)
        if first.answer is not None:
            logger.warning("closed a connection from %s: it %s", address, first.reason)
            guard.abort(first.answer or None)
            guard.close()
            return
        # The request is buffered whole: pynetdicom's acceptor gets it at once.
        super().handle()


def handler(limits: Limits) -> type[GuardedRequestHandler]:
    """A request handler class for ``AE.make_server(request_handler=...)`` under ``limits``."""

    class Handler(GuardedRequestHandler):
        pass

    Handler.limits = limits
    Handler.connections = Connections(limits)
    return Handler


__all__ = [
    "Connections",
    "FirstPdu",
    "GuardedRequestHandler",
    "Limits",
    "PduGuard",
    "await_associate_rq",
    "handler",
    "pdu_limit",
]
