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

from db.models import SendStatus, SRDocument
from db.repository import utcnow
from fracture_triage import tls_context
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
    tls_args = None
    if settings.sr_destination_tls:  # PS3.15 Annex B; the node's certificate when it has one
        tls_args = tls_context.client_tls_args(
            host, settings.sr_destination_tls_ca, settings.tls_cert, settings.tls_key
        )
    assoc = ae.associate(
        host, port, ae_title=called_aet, max_pdu=settings.max_pdu, tls_args=tls_args
    )
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
        doc.send_status = SendStatus.sent
        doc.send_error = None
        doc.sent_at = utcnow()
    else:
        doc.send_status = SendStatus.failed if final else SendStatus.pending
        doc.send_error = error[:2000]
    session.commit()
    return doc


def send_sr_document(
    session: Session,
    settings: Settings,
    sr_document_id: int,
    *,
    final_attempt: bool | None = None,
) -> str:
    """Send one recorded SR and record the attempt; what the ``worker.send_report`` task runs.

    Returns "sent"; "exists" if it was sent before (a redelivered task); "failed" when this
    was the last allowed attempt (``settings.sr_send_retries`` attempts in all, or
    ``final_attempt``) or an earlier one gave up; "missing" when the row is gone. Raises
    :class:`SendError` after a failed attempt that may be retried (the row stays
    "pending", so the sweeper also queues it again).
    """
    doc = session.get(SRDocument, sr_document_id)
    if doc is None:
        return "missing"
    if doc.send_status == SendStatus.sent:
        return "exists"
    if doc.send_status == SendStatus.failed:
        return "failed"
    path, attempts = doc.path, doc.send_attempts or 0
    # End the read transaction: no database snapshot held open across the network exchange.
    session.commit()
    if final_attempt is None:
        final_attempt = attempts + 1 >= max(1, settings.sr_send_retries)
    try:
        send_report(settings, path)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        record_send_attempt(session, sr_document_id, error, final=final_attempt)
        if final_attempt:
            log.error(
                "SR document %d not sent, giving up after %d attempts: %s",
                sr_document_id,
                attempts + 1,
                error,
            )
            return "failed"
        if isinstance(exc, SendError):
            raise
        raise SendError(error) from exc
    record_send_attempt(session, sr_document_id, None)
    return "sent"


def send_and_record(
    settings: Settings,
    session_factory: sessionmaker[Session],
    sr_document_id: int,
    *,
    final_attempt: bool | None = None,
) -> str:
    """:func:`send_sr_document` with a session of its own."""
    with session_factory() as session:
        return send_sr_document(session, settings, sr_document_id, final_attempt=final_attempt)
