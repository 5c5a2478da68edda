"""The radiologists' worklist in SQL: one row per study, likely fractures first.

Filtering, ordering and paging run in the database (``GET /api/v1/worklist`` and the worklist
page both call :func:`worklist_page`) over the per-study summary ``study_triage`` that the
repository keeps current (``db.triage``); the order is ``db.triage.priority_order`` alone:
the study's decision (fracture, then doubt, then no fracture; ``verdict.study_decision``),
each by highest probability, unclassified studies after them and studies whose every image
is out of the model's scope last (newest received first within a tie).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    exists,
    func,
    select,
)
from sqlalchemy.orm import Session

from db.models import (
    Instance,
    InstanceStatus,
    RadiologistVerdict,
    Series,
    SRDocument,
    Study,
    StudyTriage,
)
from db.repository import as_utc
from db.triage import Priority, decision_of_priority, out_of_scope_counts, priority_order
from fracture_triage.attributes import PATIENT_IDENTIFIERS


@dataclass(frozen=True)
class WorklistFilter:
    """What the radiologist narrows the list to; ``None`` leaves a criterion out."""

    #: Studies with at least one instance in this state.
    status: InstanceStatus | None = None
    priority: Priority | None = None
    modality: str | None = None
    body_part: str | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None
    #: DICOM DA (YYYYMMDD) bounds, inclusive: string order is date order.
    study_date_from: str | None = None
    study_date_to: str | None = None
    #: True: studies with a radiologist's verdict; False: without one.
    reviewed: bool | None = None


def _conditions(criteria: WorklistFilter) -> tuple[list[ColumnElement[bool]], bool]:
    """The WHERE terms of ``criteria`` over ``study_triage``, and whether they need the
    ``studies`` row too (only the study date does: counting the rest joins nothing)."""
    study = StudyTriage.study_id
    terms: list[ColumnElement[bool]] = []
    if criteria.status is not None:
        terms.append(
            exists()
            .where(Series.study_id == study, Instance.series_id == Series.id)
            .where(Instance.status == criteria.status)
        )
    if criteria.priority is not None:
        terms.append(StudyTriage.priority == int(criteria.priority))
    if criteria.modality:
        terms.append(exists().where(Series.study_id == study, Series.modality == criteria.modality))
    if criteria.body_part:
        terms.append(
            exists().where(
                Series.study_id == study, Series.body_part_examined == criteria.body_part
            )
        )
    if criteria.received_from is not None:
        terms.append(StudyTriage.last_received_at >= criteria.received_from)
    if criteria.received_to is not None:
        terms.append(StudyTriage.last_received_at <= criteria.received_to)
    needs_study = bool(criteria.study_date_from or criteria.study_date_to)
    if criteria.study_date_from:
        terms.append(Study.study_date >= criteria.study_date_from)
    if criteria.study_date_to:
        terms.append(Study.study_date <= criteria.study_date_to)
    if criteria.reviewed is not None:
        has_verdict = exists().where(RadiologistVerdict.study_id == study)
        terms.append(has_verdict if criteria.reviewed else ~has_verdict)
    return terms, needs_study


def count_studies(session: Session, criteria: WorklistFilter) -> int:
    terms, needs_study = _conditions(criteria)
    query = select(func.count()).select_from(StudyTriage)
    if needs_study:
        query = query.join(Study, Study.id == StudyTriage.study_id)
    return int(session.scalar(query.where(*terms)) or 0)


#: What a worklist entry shows of the study and of its summary (their names do not clash).
_STUDY_COLUMNS = (
    Study.id,
    Study.study_instance_uid,
    Study.study_date,
    Study.study_description,
    Study.last_received_at,
    Study.report_failure,
    *(getattr(Study, name) for name in PATIENT_IDENTIFIERS),
)
_SUMMARY_COLUMNS = (
    StudyTriage.priority,
    StudyTriage.max_probability,
    StudyTriage.instances,
    StudyTriage.classified,
    StudyTriage.failed,
    StudyTriage.modality,
    StudyTriage.body_part_examined,
    StudyTriage.first_received_at,
    StudyTriage.last_result_at,
)


@dataclass(frozen=True)
class WorklistPage:
    entries: list[dict[str, Any]]
    total: int
    page: int
    page_size: int


def _iso(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat()


def worklist_page(
    session: Session,
    criteria: WorklistFilter,
    *,
    page: int = 1,
    page_size: int = 50,
    include_patient: bool = False,
) -> WorklistPage:
    """One page of the worklist (``page`` counts from 1) and the number of matching studies.

    One statement (a request's round trips were most of its time): the page of
    ``study_triage`` in the worklist order with each study's newest verdict id and newest
    current SR id (correlated, on the page's rows only), joined to those rows, and the count
    of matching studies as an uncorrelated subquery (computed once). Only a page past the end
    counts again on its own.
    """
    terms, needs_study = _conditions(criteria)
    newest_verdict = (
        select(func.max(RadiologistVerdict.id))
        .where(RadiologistVerdict.study_id == StudyTriage.study_id)
        .scalar_subquery()
    )
    newest_report = (
        select(func.max(SRDocument.id))
        .where(SRDocument.study_id == StudyTriage.study_id, SRDocument.superseded_by_id.is_(None))
        .scalar_subquery()
    )
    inner = select(
        StudyTriage.study_id.label("study_id"),
        newest_verdict.label("verdict_id"),
        newest_report.label("report_id"),
    )
    if needs_study:
        inner = inner.join(Study, Study.id == StudyTriage.study_id)
    keys = (
        inner.where(*terms)
        .order_by(*priority_order())
        .limit(page_size)
        .offset((page - 1) * page_size)
        .subquery("page")
    )
    total_query = select(func.count()).select_from(StudyTriage)
    if needs_study:
        total_query = total_query.join(Study, Study.id == StudyTriage.study_id)
    total_column = total_query.where(*terms).scalar_subquery().label("total")
    # Columns rather than Study and StudyTriage objects: building 100 ORM objects was a
    # tenth of a request's time (py-spy) and the page only reads them.
    rows = session.execute(
        select(*_STUDY_COLUMNS, *_SUMMARY_COLUMNS, RadiologistVerdict, SRDocument, total_column)
        .join(keys, keys.c.study_id == Study.id)
        .join(StudyTriage, StudyTriage.study_id == Study.id)
        .outerjoin(RadiologistVerdict, RadiologistVerdict.id == keys.c.verdict_id)
        .outerjoin(SRDocument, SRDocument.id == keys.c.report_id)
        .order_by(*priority_order())
    ).all()
    total = int(rows[0].total) if rows else count_studies(session, criteria)
    # one grouped query for the page's images left out of scope (fracture_triage.scope)
    left_out = out_of_scope_counts(session, [row.id for row in rows])
    entries = []
    for row in rows:
        study = summary = row  # the columns of both, by their names
        verdict: RadiologistVerdict | None = row.RadiologistVerdict
        report: SRDocument | None = row.SRDocument
        first, last_result = summary.first_received_at, summary.last_result_at
        decision = decision_of_priority(summary.priority)
        entry: dict[str, Any] = {
            "study_instance_uid": study.study_instance_uid,
            "priority": Priority(summary.priority).name,
            # The study decision; ``fracture`` is its flag at the lower threshold (fracture
            # or doubt: a radiologist must look), None while nothing is classified.
            "decision": None if decision is None else decision.value,
            "fracture": None if decision is None else summary.priority >= Priority.doubt,
            "max_probability": None
            if summary.max_probability is None
            else round(float(summary.max_probability), 6),
            "instances": summary.instances,
            "classified": summary.classified,
            "failed": summary.failed,
            # not assessed: body part outside the model's scope (``fracture_triage.scope``)
            "out_of_scope": left_out.get(study.id, 0),
            "waiting": summary.instances
            - summary.classified
            - summary.failed
            - left_out.get(study.id, 0),
            "modality": summary.modality,
            "body_part_examined": summary.body_part_examined,
            "study_date": study.study_date,
            "study_description": study.study_description,
            "first_received_at": _iso(first),
            "last_received_at": _iso(study.last_received_at),
            "seconds_to_result": None
            if last_result is None or first is None
            else round((as_utc(last_result) - as_utc(first)).total_seconds(), 3),
            "reported": report is not None,
            "sr_sop_instance_uid": None if report is None else report.sop_instance_uid,
            "sr_send_status": None if report is None else report.send_status.value,
            "report_failure": study.report_failure,
            "reviewed": verdict is not None,
            "verdict": None if verdict is None else verdict_dict(verdict),
        }
        if include_patient:
            for name in PATIENT_IDENTIFIERS:
                entry[name] = getattr(study, name)
        entries.append(entry)
    return WorklistPage(entries=entries, total=total, page=page, page_size=page_size)


def verdict_dict(verdict: RadiologistVerdict) -> dict[str, Any]:
    return {
        "fracture": verdict.fracture,
        "comment": verdict.comment,
        "read": verdict.read,
        "author": verdict.author,
        "author_kind": verdict.author_kind,
        "created_at": _iso(verdict.created_at),
    }
