"""The record of a study's Structured Reports: one SR per study revision, superseded by the
next, or the reason the revision's report could not be built.

Like ``db.repository``, every function takes a ``Session`` and never commits: the report task
is the unit of work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.deliveries import create_deliveries
from db.models import SendStatus, SRDocument, Study
from db.repository import utcnow
from fracture_triage.settings import Destination


def study_reports(session: Session, study_id: int) -> Sequence[SRDocument]:
    """Every SR recorded for the study, oldest first."""
    return session.scalars(
        select(SRDocument).where(SRDocument.study_id == study_id).order_by(SRDocument.id)
    ).all()


def report_of_revision(session: Session, study_id: int, revision: int) -> SRDocument | None:
    """The SR recorded for this revision of the study whose file is still there, if any."""
    doc = session.scalars(
        select(SRDocument).where(
            SRDocument.study_id == study_id, SRDocument.study_revision == revision
        )
    ).first()
    return doc if doc is not None and Path(doc.path).is_file() else None


def lock_study(session: Session, study_id: int) -> Study | None:
    """Take the study's write lock for the rest of the transaction; return the fresh row.

    A (no-op) UPDATE of the study row locks the row on PostgreSQL and, on SQLite, opens the
    write transaction (pysqlite issues BEGIN only before a write; the SELECTs before it see
    no snapshot, and SELECT ... FOR UPDATE is ignored there). Two report tasks of one
    revision so cannot both find no SR and record two.
    """
    session.execute(update(Study).where(Study.id == study_id).values(revision=Study.revision))
    study = session.get(Study, study_id, populate_existing=True)
    return study


@dataclass(frozen=True)
class ProducedReport:
    """An SR file just written for one revision of a study."""

    study_id: int
    study_revision: int
    sop_instance_uid: str
    series_instance_uid: str
    path: str
    fracture: bool
    probability: float | None
    instance_count: int
    send_status: SendStatus
    #: The study's decision (``fracture_triage.verdict.Decision`` value; None: not assessed).
    decision: str | None = None


def record_report(
    session: Session, report: ProducedReport, destinations: Iterable[Destination] = ()
) -> SRDocument:
    """Record the SR of one study revision, once, with a pending delivery to each of
    ``destinations`` (``db.deliveries``); mark the study's earlier SRs superseded.

    Returns the SR recorded for that revision by another task meanwhile when there is one
    (the caller then removes its own file), else the new row. Sets ``reported_revision``
    and clears a report failure of the study.
    """
    study = lock_study(session, report.study_id)
    if study is None:
        raise LookupError(f"no study with id {report.study_id}")
    existing = report_of_revision(session, report.study_id, report.study_revision)
    if existing is not None:
        return existing
    doc = SRDocument(
        study_id=report.study_id,
        study_revision=report.study_revision,
        sop_instance_uid=report.sop_instance_uid,
        series_instance_uid=report.series_instance_uid,
        path=report.path,
        created_at=utcnow(),
        fracture=report.fracture,
        probability=report.probability,
        instance_count=report.instance_count,
        send_status=report.send_status,
        send_attempts=0,
        decision=report.decision,
    )
    session.add(doc)
    session.flush()
    create_deliveries(session, doc, destinations)
    for old in session.scalars(
        select(SRDocument).where(
            SRDocument.study_id == report.study_id,
            SRDocument.superseded_by_id.is_(None),
            SRDocument.id != doc.id,
        )
    ):
        old.superseded_by_id = doc.id
    if study.reported_revision is None or study.reported_revision < report.study_revision:
        study.reported_revision = report.study_revision
        study.report_failure = None
    return doc


def mark_report_failed(session: Session, study_id: int, revision: int, reason: str) -> None:
    """Record that the report of this revision cannot be built: settled, not queued again.

    A new image makes a new revision, which is reported (or fails) afresh.
    """
    study = lock_study(session, study_id)
    if study is None or (study.reported_revision or 0) > revision:
        return
    study.reported_revision = revision
    study.report_failure = reason[:2000]
