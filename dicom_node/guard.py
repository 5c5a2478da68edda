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
:class:`GuardedRequestHandler` also refuses a connection from an address that already holds
``per_peer`` associations, so one peer cannot take every slot. Plain TCP only, as the node
serves: under TLS an ``SSLSocket``'s buffered bytes would be invisible to ``select()``.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

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

P_DATA_TF = 0x04

#: PS3.8 9.3.8 A-ABORT: source 2 (DICOM UL service-provider), reason 6
#: (invalid-PDU-parameter-value).
ABORT_INVALID_PARAMETER = bytes([0x07, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, 0x06])


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
    read_timeout: float
    per_peer: int


class PduGuard:
    """A ``socket.socket`` stand-in that reads PDUs under :class:`Limits` (see module doc).

    Only what pynetdicom's ``AssociationSocket`` and ``socketserver`` use is provided.
    """

    def __init__(self, sock: socket.socket, peer: str, limits: Limits) -> None:
        self._sock = sock
        self._peer = peer
        self._limits = limits
        self._remaining = 0  # bytes of the current PDU's body not yet read
        self._pending = b""  # header bytes checked but not yet handed out
        self._deadline = 0.0
        self._closed = False

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
            self._closed = True
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
        with contextlib.suppress(OSError):  # the peer may be gone already
            self._sock.sendall(ABORT_INVALID_PARAMETER)
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

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
        self._closed = True
        self._sock.close()

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()


#: Serialises "how many associations does this address hold?" with starting one.
_count_lock = threading.Lock()


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, on a :class:`PduGuard`, with a per-address cap."""

    limits = Limits(max_pdu=0, read_timeout=30.0, per_peer=8)  # replaced by :func:`handler`

    def setup(self) -> None:
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        # The DUL and socketserver use the guard as the connection's socket.
        self.request = cast(socket.socket, PduGuard(self.request, peer, self.limits))

    def handle(self) -> None:
        address = self.client_address[0]
        with _count_lock:
            held = sum(1 for a in self.server.active_associations if a.requestor.address == address)
            if held >= self.limits.per_peer:
                logger.warning(
                    "refused a connection from %s: it holds %d associations already (limit %d)",
                    address,
                    held,
                    self.limits.per_peer,
                )
                self.server.shutdown_request(self.request)
                return
            super().handle()  # the association's thread is alive (counted) from here on


def handler(limits: Limits) -> type[GuardedRequestHandler]:
    """A request handler class for ``AE.make_server(request_handler=...)`` under ``limits``."""

    class Handler(GuardedRequestHandler):
        pass

    Handler.limits = limits
    return Handler


__all__ = ["GuardedRequestHandler", "Limits", "PduGuard", "handler", "pdu_limit"]
