"""Deliver one produced SR to one destination: what the ``worker.deliver`` task runs.

A dicom destination gets the study's evidence Secondary Captures and the SR in one
association (``worker.sr_send``, C-STORE); an hl7 one the report's ORU^R01 over MLLP
(``worker.hl7``). Every attempt, whatever the kind, is recorded the same way
(``db.deliveries.record_attempt``: sent, retried at ``fracture_triage.backoff``'s time, or
gave up), so the task never retries by itself: the sweeper queues what is due. A dicom
delivery is sent only when the SR and every capture were stored (a capture refused keeps
it retrying, the error naming the capture; storing the SR again is harmless, the PACS
keeps one instance per SOP Instance UID).

Idempotent: an attempt claims its row first (``db.deliveries.claim``), so a duplicate
message, or one for a delivery already sent or given up, does nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import deliveries
from db.evidence import study_evidence
from db.models import Delivery, DeliveryState, SendStatus, SRDocument, Study
from db.repository import utcnow
from fracture_triage.settings import Destination, Settings
from worker.hl7 import ResultForRis, loggable, send_oru
from worker.sr_send import SendError, send_files

log = logging.getLogger(__name__)

#: Why an HL7 delivery of a superseded SR is not made (its state: gave up).
SUPERSEDED = "superseded by a newer report of the study before it was delivered (that one is sent)"


def _dicom_attempt(
    session: Session, doc: SRDocument
) -> tuple[list[str | Path], list[tuple[int, str]]]:
    """The files of one dicom attempt: the study's produced captures, then the SR."""
    captures = [
        (e.id, e.path, e.sop_instance_uid or "?")
        for e in study_evidence(session, doc.study_id)
        if e.path is not None and e.send_status != SendStatus.none
    ]
    paths: list[str | Path] = [p for _, p, _ in captures if p is not None]
    paths.append(doc.path)
    return paths, [(i, uid) for i, _, uid in captures]


def _ris_result(
    session: Session, settings: Settings, destination: Destination, row: Delivery
) -> ResultForRis:
    doc = row.sr_document
    study: Study = doc.study
    return ResultForRis(
        control_id=row.message_control_id or deliveries.new_control_id(),
        sending_application=settings.ae_title,
        receiving_application=destination.name,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        patient_birth_date=study.patient_birth_date,
        patient_sex=study.patient_sex,
        accession_number=study.accession_number,
        study_instance_uid=study.study_instance_uid,
        sr_sop_instance_uid=doc.sop_instance_uid,
        decision=doc.decision,
        probability=doc.probability,
        reported_at=utcnow(),
        correction=_corrects_a_sent_result(session, doc, destination.name),
    )


def _corrects_a_sent_result(session: Session, doc: SRDocument, destination: str) -> bool:
    """Whether this destination already has an earlier report of the study: this one is
    then a correction (OBR-25 and OBX-11 ``C``), not a first final result."""
    earlier = session.scalars(
        select(Delivery.id)
        .join(SRDocument, Delivery.sr_document_id == SRDocument.id)
        .where(
            SRDocument.study_id == doc.study_id,
            SRDocument.id < doc.id,
            Delivery.destination == destination,
            Delivery.state == DeliveryState.sent,
        )
    ).first()
    return earlier is not None


def deliver(session: Session, settings: Settings, delivery_id: int, *, force: bool = False) -> str:
    """Make one attempt of a delivery if it is due (any time with ``force``); return what
    happened: ``sent``, ``retry`` (failed, tried again later), ``gave up``, or without an
    attempt ``exists`` (sent already), ``missing``, ``not due`` (claimed by another attempt
    or not due yet), ``unknown destination`` (no longer configured: left as it is),
    ``superseded`` (an HL7 result replaced by a newer report before it was sent: given up,
    so that the RIS never gets an older result after a newer one)."""
    row = session.get(Delivery, delivery_id)
    if row is None:
        return "missing"
    if row.state == DeliveryState.sent:
        return "exists"
    if row.state == DeliveryState.gave_up:
        return "gave up"
    destination = settings.destination(row.destination)
    if destination is None or destination.kind != row.kind:
        log.warning("delivery %d: destination %r is not configured", row.id, row.destination)
        return "unknown destination"
    claimed = deliveries.claim(session, delivery_id, force=force)
    session.commit()  # the claim is seen by any other message naming this delivery
    if claimed is None:
        return "not due"
    doc = claimed.sr_document
    sr_uid = doc.sop_instance_uid
    capture_errors: dict[int, str | None] = {}
    error: str | None
    if destination.kind == "dicom":
        paths, captures = _dicom_attempt(session, doc)
        session.commit()  # no read transaction held across the network exchange
        try:
            errors = send_files(settings, paths, destination)
        except Exception as exc:  # noqa: BLE001 - any failure (network, unreadable file) is the attempt's outcome
            errors = [f"{type(exc).__name__}: {exc}"] * len(paths)
        capture_errors = {cid: err for (cid, _), err in zip(captures, errors, strict=False)}
        error = errors[-1]
        if error is None:
            refused = [(uid, err) for (_, uid), err in zip(captures, errors, strict=False) if err]
            if refused:
                error = f"evidence capture {refused[0][0]} not stored: {refused[0][1]}"
    elif doc.superseded_by_id is not None:
        # A newer report of the study exists, with its own delivery: this older result must
        # not reach the RIS after it (a RIS keeps the last result it got for an order).
        error = SUPERSEDED
        claimed.next_attempt_at = None
        claimed.state = DeliveryState.gave_up
        claimed.last_error = error
        session.flush()
        deliveries.settle(session, doc.id, capture_errors={})
        session.commit()
        log.info("SR %s: not sent to %s, superseded", sr_uid, claimed.destination)
        return "superseded"
    else:
        result = _ris_result(session, settings, destination, claimed)
        session.commit()
        error = send_oru(destination.host, destination.port, result)
    done = deliveries.record_attempt(session, delivery_id, error, settings, capture_errors)
    session.commit()
    if done is None:
        return "missing"
    control = f" (HL7 {done.message_control_id})" if done.message_control_id else ""
    if error is not None and done.kind == "hl7":
        error = loggable(error)
    if done.state == DeliveryState.sent:
        log.info("SR %s delivered to %s%s", sr_uid, done.destination, control)
        return "sent"
    if done.state == DeliveryState.gave_up:
        log.error(
            "SR %s: delivery to %s%s gave up after %d attempts: %s",
            sr_uid,
            done.destination,
            control,
            done.attempts,
            error,
        )
        return "gave up"
    log.warning(
        "SR %s: delivery to %s%s failed (attempt %d), next at %s: %s",
        sr_uid,
        done.destination,
        control,
        done.attempts,
        done.next_attempt_at,
        error,
    )
    return "retry"


def deliver_document(
    session: Session, settings: Settings, sr_document_id: int, *, force: bool = False
) -> list[str]:
    """:func:`deliver` each delivery of one SR; the outcomes, in delivery order."""
    ids = [d.id for d in deliveries.document_deliveries(session, sr_document_id)]
    return [deliver(session, settings, i, force=force) for i in ids]


def send_and_record(
    settings: Settings, sessions: sessionmaker[Session], sr_document_id: int
) -> str:
    """Deliver one SR to all its destinations now, whatever their backoff says (tests, and
    the old ``worker.send_report`` message): ``sent`` (all delivered), ``exists`` (all were
    delivered before), ``failed`` (one gave up), ``missing`` (no such SR, or no delivery).
    Raises :class:`SendError` when an attempt failed and will be retried."""
    with sessions() as session:
        outcomes = deliver_document(session, settings, sr_document_id, force=True)
        if not outcomes:
            return "missing"
        if "retry" in outcomes:
            doc = session.get(SRDocument, sr_document_id)
            raise SendError(doc.send_error if doc is not None and doc.send_error else "failed")
    if "gave up" in outcomes or "superseded" in outcomes:
        return "failed"
    if all(o == "exists" for o in outcomes):
        return "exists"
    return "sent"
