"""The record of each result's evidence Secondary Capture: produced (its file and UIDs) or
not produced (why), and its sending with the study's SR.

Like ``db.repository``, every function takes a ``Session`` and never commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Evidence, EvidenceState, Instance, Result, SendStatus, Series
from db.repository import utcnow


@dataclass(frozen=True)
class EvidenceRecord:
    """What the classify task made of one result's evidence."""

    state: EvidenceState
    reason: str | None = None
    path: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    send_status: SendStatus = SendStatus.none


def evidence_of_result(session: Session, result_id: int) -> Evidence | None:
    return session.scalars(select(Evidence).where(Evidence.result_id == result_id)).first()


def produced_evidence_of_instance(session: Session, instance_id: int) -> Evidence | None:
    """The produced evidence capture of the instance's latest result (the one the study page
    shows, ``db.triage.latest_results``); None when that result has none or there is no
    result."""
    latest = select(func.max(Result.id)).where(Result.instance_id == instance_id).scalar_subquery()
    return session.scalars(
        select(Evidence).where(
            Evidence.result_id == latest, Evidence.state == EvidenceState.produced
        )
    ).first()


def record_evidence(session: Session, result_id: int, record: EvidenceRecord) -> Evidence:
    """Record the evidence of one result, once: an existing row (a redelivered task) is
    returned unchanged (the caller then removes its own file)."""
    existing = evidence_of_result(session, result_id)
    if existing is not None:
        return existing
    row = Evidence(
        result_id=result_id,
        state=record.state,
        reason=None if record.reason is None else record.reason[:2000],
        path=record.path,
        sop_instance_uid=record.sop_instance_uid,
        series_instance_uid=record.series_instance_uid,
        created_at=utcnow(),
        send_status=record.send_status
        if record.state == EvidenceState.produced
        else SendStatus.none,
        send_attempts=0,
    )
    session.add(row)
    session.flush()
    return row


def study_evidence(session: Session, study_id: int) -> Sequence[Evidence]:
    """Every produced evidence capture of the study's instances, oldest first."""
    return session.scalars(
        select(Evidence)
        .join(Result, Evidence.result_id == Result.id)
        .join(Instance, Result.instance_id == Instance.id)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study_id, Evidence.state == EvidenceState.produced)
        .order_by(Evidence.id)
    ).all()


def evidence_to_send(session: Session, study_id: int) -> Sequence[Evidence]:
    """The study's produced captures still to send (pending: never sent, or to retry)."""
    return [e for e in study_evidence(session, study_id) if e.send_status == SendStatus.pending]


def record_evidence_send(
    session: Session, evidence_id: int, error: str | None, *, final: bool = False
) -> None:
    """Record one send attempt of a capture (success when ``error`` is None); a failed one
    stays pending unless ``final``. Does not commit."""
    row = session.get(Evidence, evidence_id)
    if row is None:
        return
    row.send_attempts = (row.send_attempts or 0) + 1
    if error is None:
        row.send_status, row.send_error, row.sent_at = SendStatus.sent, None, utcnow()
    else:
        row.send_status = SendStatus.failed if final else SendStatus.pending
        row.send_error = error[:2000]
