"""The radiologists' worklist in SQL: one row per study, likely fractures first.

Filtering, ordering and paging run in the database (``GET /api/v1/worklist`` and the worklist
page both call :func:`worklist_page`); no request loads every result into Python. The order
is :func:`priority_order` alone, the one place the triage order is written: flagged studies
by their highest probability, then the others by highest probability, unclassified studies
last (newest received first within a tie). The study flag is the rule of
``fracture_triage.verdict.study_verdict`` written as SQL aggregates: a study is flagged when
any classified image is, its probability is the highest image probability, and images
without a result count neither way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Subquery,
    and_,
    case,
    exists,
    func,
    select,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import UnaryExpression

from db.models import (
    Instance,
    InstanceStatus,
    RadiologistVerdict,
    Result,
    Series,
    SRDocument,
    Study,
)
from db.repository import as_utc
from fracture_triage.attributes import PATIENT_IDENTIFIERS


class Priority(enum.IntEnum):
    """The worklist's levels, in the order they are read."""

    fracture = 0
    no_fracture = 1
    unclassified = 2


def study_summary() -> Subquery:
    """Per study: instance counts by state, the highest probability and the flag, from the
    latest result of each classified instance."""
    latest = (
        select(Result.instance_id, func.max(Result.id).label("result_id"))
        .group_by(Result.instance_id)
        .subquery("latest_result")
    )
    done = Instance.status == InstanceStatus.done
    counted_probability = case((done, Result.probability))
    counted_flag = case((and_(done, Result.id.is_not(None)), case((Result.fracture, 1), else_=0)))
    return (
        select(
            Series.study_id.label("study_id"),
            func.count(Instance.id).label("instances"),
            func.sum(case((done, 1), else_=0)).label("classified"),
            func.sum(case((Instance.status == InstanceStatus.failed, 1), else_=0)).label("failed"),
            func.max(counted_probability).label("max_probability"),
            func.max(counted_flag).label("flagged"),
            func.min(Instance.received_at).label("first_received_at"),
            func.max(case((done, Result.created_at))).label("last_result_at"),
            func.max(Series.modality).label("modality"),
            func.max(Series.body_part_examined).label("body_part_examined"),
        )
        .select_from(Instance)
        .join(Series, Instance.series_id == Series.id)
        .outerjoin(latest, latest.c.instance_id == Instance.id)
        .outerjoin(Result, Result.id == latest.c.result_id)
        .group_by(Series.study_id)
        .subquery("study_summary")
    )


def priority_rank(summary: Subquery) -> ColumnElement[int]:
    """:class:`Priority` of a study, from its summary row."""
    return case(
        (summary.c.max_probability.is_(None), int(Priority.unclassified)),
        (summary.c.flagged == 1, int(Priority.fracture)),
        else_=int(Priority.no_fracture),
    )


def priority_order(summary: Subquery) -> list[UnaryExpression[Any]]:
    """THE worklist order (the one place it is written): level, then probability, highest
    first, then the newest study; the id makes pages stable."""
    return [
        priority_rank(summary).asc(),
        summary.c.max_probability.desc(),
        Study.last_received_at.desc(),
        Study.id.desc(),
    ]


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


def _filtered(criteria: WorklistFilter, summary: Subquery) -> Select[Any]:
    query: Select[Any] = select(Study, summary).join(summary, summary.c.study_id == Study.id)
    if criteria.status is not None:
        query = query.where(
            exists()
            .where(Series.study_id == Study.id, Instance.series_id == Series.id)
            .where(Instance.status == criteria.status)
        )
    if criteria.priority is not None:
        query = query.where(priority_rank(summary) == int(criteria.priority))
    if criteria.modality:
        query = query.where(
            exists().where(Series.study_id == Study.id, Series.modality == criteria.modality)
        )
    if criteria.body_part:
        query = query.where(
            exists().where(
                Series.study_id == Study.id, Series.body_part_examined == criteria.body_part
            )
        )
    if criteria.received_from is not None:
        query = query.where(Study.last_received_at >= criteria.received_from)
    if criteria.received_to is not None:
        query = query.where(Study.last_received_at <= criteria.received_to)
    if criteria.study_date_from:
        query = query.where(Study.study_date >= criteria.study_date_from)
    if criteria.study_date_to:
        query = query.where(Study.study_date <= criteria.study_date_to)
    if criteria.reviewed is not None:
        has_verdict = exists().where(RadiologistVerdict.study_id == Study.id)
        query = query.where(has_verdict if criteria.reviewed else ~has_verdict)
    return query


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
    """One page of the worklist (``page`` counts from 1) and the number of matching studies."""
    summary = study_summary()
    query = _filtered(criteria, summary)
    total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    rows = session.execute(
        query.add_columns(priority_rank(summary).label("priority"))
        .order_by(*priority_order(summary))
        .limit(page_size)
        .offset((page - 1) * page_size)
    ).all()
    study_ids = [row.Study.id for row in rows]
    latest_verdicts = _latest_verdicts(session, study_ids)
    latest_reports = _latest_reports(session, study_ids)
    entries = []
    for row in rows:
        study: Study = row.Study
        verdict = latest_verdicts.get(study.id)
        report = latest_reports.get(study.id)
        first, last_result = row.first_received_at, row.last_result_at
        entry: dict[str, Any] = {
            "study_instance_uid": study.study_instance_uid,
            "priority": Priority(row.priority).name,
            "fracture": None if row.max_probability is None else bool(row.flagged),
            "max_probability": None
            if row.max_probability is None
            else round(float(row.max_probability), 6),
            "instances": int(row.instances),
            "classified": int(row.classified or 0),
            "failed": int(row.failed or 0),
            "waiting": int(row.instances) - int(row.classified or 0) - int(row.failed or 0),
            "modality": row.modality,
            "body_part_examined": row.body_part_examined,
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


def _latest_verdicts(session: Session, study_ids: list[int]) -> dict[int, RadiologistVerdict]:
    if not study_ids:
        return {}
    newest = (
        select(func.max(RadiologistVerdict.id))
        .where(RadiologistVerdict.study_id.in_(study_ids))
        .group_by(RadiologistVerdict.study_id)
    )
    found = session.scalars(select(RadiologistVerdict).where(RadiologistVerdict.id.in_(newest)))
    return {v.study_id: v for v in found}


def _latest_reports(session: Session, study_ids: list[int]) -> dict[int, SRDocument]:
    if not study_ids:
        return {}
    newest = (
        select(func.max(SRDocument.id))
        .where(SRDocument.study_id.in_(study_ids), SRDocument.superseded_by_id.is_(None))
        .group_by(SRDocument.study_id)
    )
    found = session.scalars(select(SRDocument).where(SRDocument.id.in_(newest)))
    return {d.study_id: d for d in found}
