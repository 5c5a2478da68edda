"""Send a produced SR, with the study's evidence Secondary Captures, to the configured
destination with C-STORE (PS3.4 B.2, PS3.7 9.1.1).

:func:`send_report` raises :class:`SendError` on any failure so the Celery task
``worker.send_report`` retries it; :func:`record_send_attempt` keeps the outcome in the
SR's database row (``send_status``, ``send_attempts``, ``send_error``, ``sent_at``), and
:func:`send_and_record` does both. The evidence captures the SR references go first, in the
same association (:func:`send_files`), each with its own outcome on its ``evidence`` row and
retried like the SR: a capture the destination refuses keeps the task retrying (the SR is
sent and recorded regardless) until ``sr_send_retries`` attempts, then is recorded as failed
with the destination's answer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
)
from sqlalchemy.orm import Session, sessionmaker

from db.evidence import evidence_to_send, record_evidence_send
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
    (error,) = send_files(settings, [sr_path])
    if error is not None:
        raise SendError(error)


def send_files(settings: Settings, paths: list[str | Path]) -> list[str | None]:
    """C-STORE each file (SRs and Secondary Captures) in one association, in order; return
    each one's error (None: stored). Raises :class:`SendError` when there is no association
    (nothing was sent) or none is configured."""
    destination = settings.sr_destination
    if destination is None:
        raise SendError("no SR destination configured (host, port and AE title)")
    host, port, called_aet = destination
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = TIMEOUT_S
    ae.dimse_timeout = TIMEOUT_S
    ae.network_timeout = TIMEOUT_S
    ae.connection_timeout = TIMEOUT_S
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
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
    errors: list[str | None] = []
    try:
        for ds in datasets:
            if not assoc.is_established:
                errors.append(f"association with {called_aet}@{host}:{port} ended early")
                continue
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:  # no accepted presentation context
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == 0x0000 or code in _STORED_WITH_WARNING:
                log.info(
                    "%s stored at %s@%s:%d (status 0x%04X)",
                    ds.SOPInstanceUID,
                    called_aet,
                    host,
                    port,
                    code,
                )
                errors.append(None)
            elif code == -1:
                errors.append(f"no C-STORE response from {called_aet}@{host}:{port}")
            else:
                errors.append(
                    f"C-STORE to {called_aet}@{host}:{port} failed with status 0x{code:04X}"
                )
    finally:
        if assoc.is_established:
            assoc.release()
    return errors


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
    """Send one recorded SR, after the study's evidence captures still to send, and record
    each attempt; what the ``worker.send_report`` task runs.

    Returns "sent"; "exists" if it was sent before (a redelivered task) and no capture is
    left to send; "failed" when this was the last allowed attempt (``settings.sr_send_retries``
    attempts in all, or ``final_attempt``) or an earlier one gave up; "missing" when the row
    is gone. Raises :class:`SendError` after a failed attempt of the SR or of a capture that
    may be retried (the SR row stays "pending", so the sweeper also queues it again; a
    capture stays "pending" on its own row).
    """
    doc = session.get(SRDocument, sr_document_id)
    if doc is None:
        return "missing"
    if doc.send_status == SendStatus.failed:
        return "failed"
    captures = [
        (e.id, e.path, e.send_attempts or 0) for e in evidence_to_send(session, doc.study_id)
    ]
    sr_pending = doc.send_status != SendStatus.sent
    if not sr_pending and not captures:
        return "exists"
    path, attempts = doc.path, doc.send_attempts or 0
    # End the read transaction: no database snapshot held open across the network exchange.
    session.commit()
    retries = max(1, settings.sr_send_retries)
    if final_attempt is None:
        final_attempt = attempts + 1 >= retries
    paths: list[str | Path] = [p for _, p, _ in captures if p is not None]
    if sr_pending:
        paths.append(path)
    try:
        errors = send_files(settings, paths)
    except Exception as exc:  # noqa: BLE001 - any failure (network, unreadable file) is the attempt's outcome
        errors = [f"{type(exc).__name__}: {exc}"] * len(paths)
    capture_errors = []
    for (evidence_id, _, tried), error in zip(captures, errors, strict=False):
        final = final_attempt if sr_pending else tried + 1 >= retries
        record_evidence_send(session, evidence_id, error, final=final)
        if error is not None and not final:
            capture_errors.append(error)
        elif error is not None:
            log.error("evidence %d not sent, giving up: %s", evidence_id, error)
    session.commit()
    if sr_pending:
        error = errors[-1]
        record_send_attempt(session, sr_document_id, error, final=final_attempt)
        if error is not None:
            if final_attempt:
                log.error(
                    "SR document %d not sent, giving up after %d attempts: %s",
                    sr_document_id,
                    attempts + 1,
                    error,
                )
                return "failed"
            raise SendError(error)
    if capture_errors:
        raise SendError(f"evidence capture not stored: {capture_errors[0]}")
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
