"""The triage summary of each study (``study_triage``) and THE worklist order.

:func:`refresh_study` recomputes one study's row from its instances and their latest results;
the repository calls it in every write that changes them (an instance recorded or replaced,
a result saved, a failure recorded), inside the writer's transaction, after locking the row
so two writers of one study cannot leave a stale summary. :func:`priority_order` is the one
place the triage order is written: highest :class:`Priority` first, then the highest
probability, then the newest study.

The study flag is the rule of ``fracture_triage.verdict.study_verdict`` as SQL aggregates: a
study is flagged when any classified image is, its probability is the highest image
probability, and images without a result count neither way. Imports only ``db.models``.
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, delete, func, insert, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import UnaryExpression

from db.models import Instance, InstanceStatus, Result, Series, Study, StudyTriage


class Priority(enum.IntEnum):
    """The worklist's levels; higher is read first. (Room is left at 2 for a "doubt" level
    between the two once the model reports three.)"""

    unclassified = 0
    no_fracture = 1
    fracture = 3


def _aggregate() -> Select[*tuple[Any, ...]]:
    """Per study: counts by state, highest probability, flag, times, modality, body part."""
    latest = (
        select(Result.instance_id, func.max(Result.id).label("result_id"))
        .group_by(Result.instance_id)
        .subquery("latest_result")
    )
    done = Instance.status == InstanceStatus.done
    counted_flag = case((and_(done, Result.id.is_not(None)), case((Result.fracture, 1), else_=0)))
    max_probability = func.max(case((done, Result.probability)))
    return (
        select(
            Series.study_id.label("study_id"),
            priority_rank(max_probability, func.max(counted_flag)).label("priority"),
            max_probability.label("max_probability"),
            func.count(Instance.id).label("instances"),
            func.sum(case((done, 1), else_=0)).label("classified"),
            func.sum(case((Instance.status == InstanceStatus.failed, 1), else_=0)).label("failed"),
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
    )


def priority_rank(
    max_probability: ColumnElement[Any], flagged: ColumnElement[Any]
) -> ColumnElement[int]:
    """:class:`Priority` of a study from its aggregates (highest probability, any image
    flagged). The three-level model decision plugs in here."""
    return case(
        (max_probability.is_(None), int(Priority.unclassified)),
        (flagged == 1, int(Priority.fracture)),
        else_=int(Priority.no_fracture),
    )


def priority_order() -> list[UnaryExpression[Any]]:
    """THE worklist order: priority, then probability, highest first, then the newest study
    (the id makes pages stable). All descending, so ``ix_study_triage_order`` serves it."""
    return [
        StudyTriage.priority.desc(),
        StudyTriage.max_probability.desc(),
        StudyTriage.last_received_at.desc(),
        StudyTriage.study_id.desc(),
    ]


_COLUMNS = (
    "priority",
    "max_probability",
    "instances",
    "classified",
    "failed",
    "first_received_at",
    "last_result_at",
    "modality",
    "body_part_examined",
)


def refresh_study(session: Session, study_id: int) -> None:
    """Recompute the summary of one study (in the caller's transaction, never committing)."""
    # Lock first, read after: a concurrent writer of this study commits before our
    # aggregate's snapshot is taken (READ COMMITTED), so the last summary written is whole.
    row = session.get(StudyTriage, study_id, with_for_update=True)
    study = session.get(Study, study_id)
    if study is None:
        return
    found = session.execute(_aggregate().where(Series.study_id == study_id)).one_or_none()
    if found is None:  # no instance left (all moved to another study by re-sends)
        if row is not None:
            session.delete(row)
        return
    if row is None:
        row = StudyTriage(study_id=study_id)
        session.add(row)
    for name in _COLUMNS:
        setattr(row, name, getattr(found, name))
    row.classified = int(found.classified or 0)
    row.failed = int(found.failed or 0)
    row.last_received_at = study.last_received_at


def rebuild_all(session: Session) -> int:
    """Recompute every study's summary in one statement (migration, repairs, benchmarks);
    returns the number of studies summarised."""
    session.execute(delete(StudyTriage))
    summary = _aggregate().subquery("summary")
    source = select(
        summary.c.study_id,
        *(summary.c[name] for name in _COLUMNS),
        Study.last_received_at,
    ).join(Study, Study.id == summary.c.study_id)
    session.execute(
        insert(StudyTriage).from_select(["study_id", *_COLUMNS, "last_received_at"], source)
    )
    return int(session.scalar(select(func.count()).select_from(StudyTriage)) or 0)
