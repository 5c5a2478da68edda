"""Send a produced SR to the configured destination with C-STORE (PS3.4 B.2, PS3.7 9.1.1).

:func:`send_report` raises :class:`SendError` on any failure so the Celery task
``worker.send_report`` retries it; :func:`record_send_attempt` keeps the outcome in the
SR's database row (``send_status``, ``send_attempts``, ``send_error``, ``sent_at``), and
:func:`send_and_record` does both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from db.models import SRDocument
from db.repository import utcnow
from fracture_triage.settings import Settings

log = logging.getLogger(__name__)

#: Seconds to wait for association, DIMSE replies and network activity.
TIMEOUT_S = 30.0

#: Warning statuses still mean "stored" (PS3.4 Table B.2-1): B000 coercion of data
#: elements, B007 data set does not match SOP class, B006 elements discarded.
_STORED_WITH_WARNING = {0xB000, 0xB006, 0xB007}


class SendError(RuntimeError):
    """The SR could not be stored at the destination; retrying may help."""


def send_report(settings: Settings, sr_path: str | Path) -> None:
    """C-STORE the SR at ``sr_path`` to ``settings.sr_destination``; raise on failure.

    The calling AE title is ``settings.ae_title``. Success is status 0x0000 or one of the
    B0xx warnings; anything else (association rejected or aborted, no accepted
    presentation context, a failure status, no reply) raises :class:`SendError`.
    """
    destination = settings.sr_destination
    if destination is None:
        raise SendError("no SR destination configured (host, port and AE title)")
    host, port, called_aet = destination
    ds = pydicom.dcmread(sr_path)
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = TIMEOUT_S
    ae.dimse_timeout = TIMEOUT_S
    ae.network_timeout = TIMEOUT_S
    ae.connection_timeout = TIMEOUT_S
    ae.add_requested_context(
        Comprehensive3DSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    assoc = ae.associate(host, port, ae_title=called_aet, max_pdu=settings.max_pdu)
    if not assoc.is_established:
        raise SendError(f"association with {called_aet}@{host}:{port} not established")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code == 0x0000 or code in _STORED_WITH_WARNING:
        log.info(
            "SR %s stored at %s@%s:%d (status 0x%04X)",
            ds.SOPInstanceUID,
            called_aet,
            host,
            port,
            code,
        )
        return
    if code == -1:
        raise SendError(f"no C-STORE response from {called_aet}@{host}:{port}")
    raise SendError(f"C-STORE to {called_aet}@{host}:{port} failed with status 0x{code:04X}")


def record_send_attempt(
    session: Session, sr_document_id: int, error: str | None, *, final: bool = False
) -> SRDocument | None:
    """Record one send attempt: success when ``error`` is None.

    A failed attempt leaves ``send_status`` "pending" (it will be retried) unless ``final``
    (retries exhausted), which makes it "failed". Commits; returns the row (None if gone).
    """
    doc = session.get(SRDocument, sr_document_id)
    if doc is None:
        return None
    doc.send_attempts = (doc.send_attempts or 0) + 1
    if error is None:
        doc.send_status = "sent"
        doc.send_error = None
        doc.sent_at = utcnow()
    else:
        doc.send_status = "failed" if final else "pending"
        doc.send_error = error[:2000]
    session.commit()
    return doc


def send_and_record(
    settings: Settings,
    session_factory: sessionmaker[Session],
    sr_document_id: int,
    *,
    final_attempt: bool = False,
) -> None:
    """Send the SR of ``sr_document_id`` and record the attempt; re-raise a failure.

    Already-sent documents are not sent again (a redelivered task). ``final_attempt``: the
    caller will not retry, so a failure marks the row "failed".
    """
    with session_factory() as session:
        doc = session.get(SRDocument, sr_document_id)
        if doc is None:
            raise SendError(f"no SR document with id {sr_document_id}")
        if doc.send_status == "sent":
            return
        path = doc.path
    try:
        send_report(settings, path)
    except Exception as exc:
        with session_factory() as session:
            record_send_attempt(
                session, sr_document_id, f"{type(exc).__name__}: {exc}", final=final_attempt
            )
        raise
    with session_factory() as session:
        record_send_attempt(session, sr_document_id, None)
