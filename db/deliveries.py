"""The record of each produced SR's delivery to each destination (``deliveries``).

A delivery is made for every configured destination when the SR is recorded
(:func:`create_deliveries`, in the report's transaction), tried at once, and after a failure
again when :mod:`fracture_triage.backoff` says (:func:`record_attempt`), until it is sent or
gives up. An attempt first claims its row (:func:`claim`) so that two messages naming it
(the sweeper's and the report task's) make one attempt. The SR's own ``send_status``,
``send_attempts``, ``send_error`` and ``sent_at`` (and its study's evidence captures') are the
summary of its deliveries (:func:`settle`): what retention, the worklist and the metrics read.

Like ``db.repository``, every function takes a ``Session`` and never commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.evidence import study_evidence
from db.models import Delivery, DeliveryState, SendStatus, SRDocument, Study
from db.repository import as_utc, utcnow
from fracture_triage import backoff
from fracture_triage.settings import Destination, Settings

#: How long a claimed attempt holds its delivery: longer than any send (association, DIMSE
#: and MLLP timeouts are 30 s each); a worker that dies mid-attempt frees it after this.
CLAIM_LEASE = timedelta(minutes=10)


def new_control_id() -> str:
    """An HL7 message control id (MSH-10, ST of at most 20 characters in v2.5.1): random,
    so that two nodes (or a restored database) never reuse one."""
    return uuid.uuid4().hex[:20]


def create_deliveries(
    session: Session, doc: SRDocument, destinations: Iterable[Destination]
) -> list[Delivery]:
    """One pending delivery of ``doc`` per destination, due now (no flush of its own)."""
    now = utcnow()
    rows = [
        Delivery(
            sr_document_id=doc.id,
            destination=d.name,
            kind=d.kind,
            state=DeliveryState.pending,
            attempts=0,
            created_at=now,
            pending_since=now,
            next_attempt_at=now,
            message_control_id=new_control_id() if d.kind == "hl7" else None,
        )
        for d in destinations
    ]
    session.add_all(rows)
    return rows


def due_deliveries(
    session: Session, names: Iterable[str], now: datetime | None = None, limit: int = 500
) -> Sequence[Delivery]:
    """Pending deliveries to configured destinations whose next attempt is due, oldest first."""
    wanted = list(names)
    if not wanted:
        return []
    return session.scalars(
        select(Delivery)
        .where(
            Delivery.state == DeliveryState.pending,
            Delivery.next_attempt_at <= (now or utcnow()),
            Delivery.destination.in_(wanted),
        )
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(limit)
    ).all()


def claim(session: Session, delivery_id: int, *, force: bool = False) -> Delivery | None:
    """Take the delivery for one attempt if it is pending and due (any time with ``force``):
    its ``next_attempt_at`` moves :data:`CLAIM_LEASE` ahead, so another message finds it not
    due. ``None``: not pending, not due, or claimed by another attempt. The caller commits
    before the attempt (the claim must be visible to the others)."""
    now = utcnow()
    query = update(Delivery).where(
        Delivery.id == delivery_id, Delivery.state == DeliveryState.pending
    )
    if not force:
        query = query.where(Delivery.next_attempt_at <= now)
    # Not evaluated against loaded objects (SQLite gives naive datetimes): the row is read
    # again below.
    done = session.execute(
        query.values(next_attempt_at=now + CLAIM_LEASE).execution_options(synchronize_session=False)
    )
    if getattr(done, "rowcount", 0) != 1:
        return None
    return session.get(Delivery, delivery_id, populate_existing=True)


def record_attempt(
    session: Session,
    delivery_id: int,
    error: str | None,
    settings: Settings,
    capture_errors: dict[int, str | None] | None = None,
) -> Delivery | None:
    """Record one attempt (sent when ``error`` is None; otherwise retried at the backoff's
    time, or given up) and settle the SR's summary (``capture_errors``: see :func:`settle`).
    Returns the row (None if gone)."""
    row = session.get(Delivery, delivery_id)
    if row is None:
        return None
    now = utcnow()
    row.attempts = (row.attempts or 0) + 1
    if error is None:
        row.state, row.last_error, row.sent_at, row.next_attempt_at = (
            DeliveryState.sent,
            None,
            now,
            None,
        )
    else:
        row.last_error = error[:2000]
        row.next_attempt_at = backoff.next_attempt_at(
            row.attempts,
            as_utc(row.pending_since),
            now,
            max_attempts=settings.max_delivery_attempts,
            max_age=timedelta(hours=settings.delivery_max_age_hours),
        )
        if row.next_attempt_at is None:
            row.state = DeliveryState.gave_up
    session.flush()
    settle(session, row.sr_document_id, capture_errors=capture_errors or {})
    return row


def settle(session: Session, sr_document_id: int, *, capture_errors: dict[int, str | None]) -> None:
    """Summarise the SR's deliveries on its row, and on its study's evidence captures:
    pending while any is pending; sent (at the last one's time) once all are; failed when
    none is pending and one gave up (its error, naming the destination, kept).
    ``capture_errors`` (evidence id: error or None) is what the last attempt said of each
    capture it carried, kept as that capture's ``send_error``."""
    doc = session.get(SRDocument, sr_document_id)
    if doc is None:
        return
    rows = list(session.scalars(select(Delivery).where(Delivery.sr_document_id == sr_document_id)))
    if not rows:
        return
    states = {r.state for r in rows}
    doc.send_attempts = sum(r.attempts or 0 for r in rows)
    if DeliveryState.pending in states:
        status = SendStatus.pending
        failing = [r for r in rows if r.last_error and r.state == DeliveryState.pending]
        doc.send_error = (
            None if not failing else f"{failing[0].destination}: {failing[0].last_error}"
        )
    elif states == {DeliveryState.sent}:
        status = SendStatus.sent
        doc.send_error = None
        doc.sent_at = max(as_utc(r.sent_at) for r in rows if r.sent_at is not None)
    else:
        status = SendStatus.failed
        gave_up = [r for r in rows if r.state == DeliveryState.gave_up]
        doc.send_error = f"{gave_up[0].destination}: {gave_up[0].last_error}"
    doc.send_status = status
    if not any(r.kind == "dicom" for r in rows):
        return
    for capture in study_evidence(session, doc.study_id):
        if capture.send_status == SendStatus.none:
            continue
        if capture.id in capture_errors:
            capture.send_attempts = (capture.send_attempts or 0) + 1
            error = capture_errors[capture.id]
            capture.send_error = None if error is None else error[:2000]
        if status == SendStatus.sent:
            capture.send_status, capture.send_error = SendStatus.sent, None
            capture.sent_at = doc.sent_at
        elif status == SendStatus.failed and capture.send_error:
            capture.send_status = SendStatus.failed
        elif status == SendStatus.failed:
            capture.send_status = SendStatus.sent
        else:
            capture.send_status = SendStatus.pending


def document_deliveries(session: Session, sr_document_id: int) -> Sequence[Delivery]:
    return session.scalars(
        select(Delivery).where(Delivery.sr_document_id == sr_document_id).order_by(Delivery.id)
    ).all()


@dataclass(frozen=True)
class Requeued:
    """One delivery put back to pending by :func:`resend`."""

    study_instance_uid: str
    sr_sop_instance_uid: str
    destination: str
    was: DeliveryState


def resend(
    session: Session, *, study_instance_uid: str | None = None, gave_up: bool = False
) -> list[Requeued] | None:
    """Put deliveries back to pending, due now, their count and age starting again: every
    delivery of the study's current SR (``study_instance_uid``: send it again, whatever its
    state) or every delivery that gave up (``gave_up``). ``None``: no such study."""
    query = (
        select(Delivery, SRDocument.sop_instance_uid, Study.study_instance_uid)
        .join(SRDocument, Delivery.sr_document_id == SRDocument.id)
        .join(Study, SRDocument.study_id == Study.id)
        .order_by(Delivery.id)
    )
    if study_instance_uid is not None:
        if (
            session.scalars(
                select(Study.id).where(Study.study_instance_uid == study_instance_uid)
            ).first()
            is None
        ):
            return None
        query = query.where(
            Study.study_instance_uid == study_instance_uid, SRDocument.superseded_by_id.is_(None)
        )
    if gave_up:
        query = query.where(Delivery.state == DeliveryState.gave_up)
    now = utcnow()
    out: list[Requeued] = []
    touched: set[int] = set()
    for delivery, sr_uid, study_uid in session.execute(query).tuples():
        out.append(Requeued(study_uid, sr_uid, delivery.destination, delivery.state))
        delivery.state = DeliveryState.pending
        delivery.attempts = 0
        delivery.pending_since = now
        delivery.next_attempt_at = now
        touched.add(delivery.sr_document_id)
    session.flush()
    for sr_id in touched:
        settle(session, sr_id, capture_errors={})
    return out


def delivery_dict(d: Delivery) -> dict[str, Any]:
    """One delivery as the results, the API and the admin page show it."""
    return {
        "destination": d.destination,
        "kind": d.kind,
        "state": d.state.value,
        "attempts": d.attempts,
        "last_error": d.last_error,
        "next_attempt_at": None
        if d.next_attempt_at is None or d.state != DeliveryState.pending
        else as_utc(d.next_attempt_at).isoformat(),
        "sent_at": None if d.sent_at is None else as_utc(d.sent_at).isoformat(),
        "message_control_id": d.message_control_id,
    }


def latest_deliveries(session: Session) -> dict[int, list[dict[str, Any]]]:
    """Study id -> the deliveries of its current (not superseded) SR, as dicts."""
    out: dict[int, list[dict[str, Any]]] = {}
    query = (
        select(SRDocument.study_id, Delivery)
        .join(Delivery, Delivery.sr_document_id == SRDocument.id)
        .where(SRDocument.superseded_by_id.is_(None))
        .order_by(Delivery.id)
    )
    for study_id, delivery in session.execute(query).tuples():
        out.setdefault(study_id, []).append(delivery_dict(delivery))
    return out


def delivery_counts(session: Session) -> dict[str, dict[str, int]]:
    """Destination -> state -> deliveries, for the admin page."""
    out: dict[str, dict[str, int]] = {}
    query = select(Delivery.destination, Delivery.state, func.count()).group_by(
        Delivery.destination, Delivery.state
    )
    for name, state, n in session.execute(query).tuples():
        out.setdefault(name, {s.value: 0 for s in DeliveryState})[DeliveryState(state).value] = n
    return out


def gave_up_deliveries(session: Session, limit: int = 100) -> list[dict[str, Any]]:
    """The newest deliveries that gave up, with their study and SR UIDs (no patient data)."""
    query = (
        select(Delivery, SRDocument.sop_instance_uid, Study.study_instance_uid)
        .join(SRDocument, Delivery.sr_document_id == SRDocument.id)
        .join(Study, SRDocument.study_id == Study.id)
        .where(Delivery.state == DeliveryState.gave_up)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    return [
        {**delivery_dict(d), "sr_sop_instance_uid": sr_uid, "study_instance_uid": study_uid}
        for d, sr_uid, study_uid in session.execute(query).tuples()
    ]
