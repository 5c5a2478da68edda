"""The largest object the node receives (``Settings.max_object_bytes``).

pynetdicom collects a C-STORE's data set in memory, fragment after fragment, however many
P-DATA-TF PDUs it spans, and only then calls the C-STORE handler: the PDU bound of
:mod:`dicom_node.guard` limits each PDU, not the object. This handler of ``EVT_DATA_RECV``
(each PDU as received, before pynetdicom decodes it) counts the data set fragments of the
message being received (PS3.8 9.3.5.1 and Annex E: each PDV item is a 4-byte length, the
presentation context ID, and a message control header whose bit 0 says command or data
set and bit 1 last fragment). Once they exceed the limit, the association is aborted
(A-ABORT, PS3.8 9.3.8: service-provider, invalid-PDU-parameter-value) and the connection
closed, so at most the limit and one PDU are held per association; the log says why.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import weakref
from typing import Any

from pynetdicom.events import Event

logger = logging.getLogger(__name__)

P_DATA_TF = 0x04
#: PS3.8 9.3.8 A-ABORT: source 2 (DICOM UL service-provider), reason 6
#: (invalid-PDU-parameter-value).
ABORT_INVALID_PARAMETER = bytes([0x07, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, 0x06])
_ITEM = struct.Struct(">LBB")  # PDV item length, presentation context ID, control header


def dataset_fragments(pdu: bytes) -> tuple[int, bool]:
    """(data set bytes in a P-DATA-TF PDU, whether one of them ended its data set)."""
    total, ended = 0, False
    offset = 6  # PS3.8 9.3.5: PDU-type, reserved, PDU-length
    while offset + _ITEM.size <= len(pdu):
        length, _context, control = _ITEM.unpack_from(pdu, offset)
        if length < 2:
            break  # malformed: pynetdicom's own decoding answers it
        if not control & 0x01:  # bit 0 clear: a data set fragment
            total += length - 2
            if control & 0x02:  # bit 1 set: its last fragment
                ended = True
        offset += 4 + length
    return total, ended


class ObjectSizeLimit:
    """``EVT_DATA_RECV`` handler state: data set bytes received per association."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._received: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._aborted: weakref.WeakSet[Any] = weakref.WeakSet()

    def on_data(self, event: Event) -> None:
        data: bytes = event.data
        if not data or data[0] != P_DATA_TF:
            return
        size, ended = dataset_fragments(data)
        if not size and not ended:
            return
        assoc = event.assoc
        with self._lock:
            if assoc in self._aborted:
                return  # PDUs read before the connection's end showed
            received = self._received.get(assoc, 0) + size
            self._received[assoc] = 0 if ended else received
            if received <= self.max_bytes:
                return
            self._aborted.add(assoc)
        requestor = assoc.requestor
        logger.warning(
            "%s@%s:%s sent an object of more than %d bytes (FRACTURE_TRIAGE_MAX_OBJECT_BYTES): "
            "aborting the association",
            str(requestor.ae_title).strip(),
            requestor.address,
            requestor.port,
            self.max_bytes,
        )
        self._abort(assoc)

    @staticmethod
    def _abort(assoc: Any) -> None:
        """A-ABORT and close, from the DUL's own thread: the DUL then sees the connection
        end (Evt17) and pynetdicom drops the partial message."""
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.sendall(ABORT_INVALID_PARAMETER)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def handle_data_recv(event: Event, limit: ObjectSizeLimit) -> None:
    """``EVT_DATA_RECV`` (see module doc)."""
    limit.on_data(event)


__all__ = ["ObjectSizeLimit", "dataset_fragments", "handle_data_recv"]
