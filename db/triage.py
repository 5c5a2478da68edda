"""The triage summary of each study (``study_triage``) and THE worklist order.

:func:`refresh_study` recomputes one study's row from its instances and their latest results;
the repository calls it in every write that changes them (an instance recorded or replaced,
a result saved, a failure recorded), inside the writer's transaction, after locking the row
so two writers of one study cannot leave a stale summary. :func:`priority_order` is the one
place the triage order is written: highest :class:`Priority` first, then the highest
probability, then the newest study.

A study's priority is its decision, ``fracture_triage.verdict.study_decision`` as an SQL
aggregate: the highest level among the latest results of its classified images (fracture >
doubt > no fracture), unclassified when none is classified; its probability is the highest
image probability. Images without a result (failed, waiting, out of scope) count neither
way; a study whose every image is out of scope (``fracture_triage.scope``) is
:attr:`Priority.out_of_scope`, after the unclassified ones.
``fracture-triage results`` takes each study's decision from :func:`study_priorities`, the
same expression computed now, so the worklist and the results never disagree.
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import ColumnElement, Select, Subquery, and_, case, delete, func, insert, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import UnaryExpression

from db.models import Instance, InstanceStatus, Result, Series, Study, StudyTriage
from fracture_triage.verdict import Decision


class Priority(enum.IntEnum):
    """The worklist's levels; higher is read first: a study's decision, or unclassified
    (something still waiting or failed), or out of scope (every image not assessed, its
    body part outside the model's scope: nothing for the model to rank, listed last)."""

    out_of_scope = -1
    unclassified = 0
    no_fracture = 1
    doubt = 2
    fracture = 3


#: The priority of each decision level: their order is ``verdict.DECISION_ORDER``'s (a test
#: holds the two equal), so the highest priority of a study's images is its study decision.
DECISION_PRIORITY: dict[Decision, Priority] = {
    Decision.fracture: Priority.fracture,
    Decision.doubt: Priority.doubt,
    Decision.no_fracture: Priority.no_fracture,
}


def decision_of_priority(priority: int | None) -> Decision | None:
    """The study decision a :class:`Priority` stands for (None: nothing classified)."""
    found = [d for d, p in DECISION_PRIORITY.items() if p == priority]
    return found[0] if found else None


def latest_results() -> Subquery:
    """``(instance_id, result_id)``: the newest result of each instance, whatever the model
    version (a result of another model is still the instance's result)."""
    return (
        select(Result.instance_id, func.max(Result.id).label("result_id"))
        .group_by(Result.instance_id)
        .subquery("latest_result")
    )


def _image_priority() -> ColumnElement[Any]:
    """Per joined row: the :class:`Priority` of a classified image's latest decision, NULL
    for an image without one (failed, waiting)."""
    done = and_(Instance.status == InstanceStatus.done, Result.id.is_not(None))
    by_decision = case({d: int(p) for d, p in DECISION_PRIORITY.items()}, value=Result.decision)
    return case((done, by_decision))


def _from_images(*columns: ColumnElement[Any]) -> Select[*tuple[Any, ...]]:
    """``columns`` per study, over its instances joined to their latest results."""
    latest = latest_results()
    return (
        select(Series.study_id.label("study_id"), *columns)
        .select_from(Instance)
        .join(Series, Instance.series_id == Series.id)
        .outerjoin(latest, latest.c.instance_id == Instance.id)
        .outerjoin(Result, Result.id == latest.c.result_id)
        .group_by(Series.study_id)
    )


def _out_of_scope_count() -> ColumnElement[Any]:
    return func.sum(case((Instance.status == InstanceStatus.out_of_scope, 1), else_=0))


def _study_priority() -> ColumnElement[int]:
    """Per study (aggregate): :func:`priority_rank` of its images, or
    :attr:`Priority.out_of_scope` when every image is out of scope."""
    every_out = _out_of_scope_count() == func.count(Instance.id)
    return case(
        (every_out, int(Priority.out_of_scope)),
        else_=priority_rank(func.max(_image_priority())),
    )


def study_priorities() -> Subquery:
    """``(study_id, priority)`` of every study with an instance, computed now from its
    results (what :func:`refresh_study` stores): ``fracture-triage results`` reads its
    ``study_decision`` here."""
    return _from_images(_study_priority().label("priority")).subquery("study_priority")


def out_of_scope_counts(session: Session, study_ids: list[int]) -> dict[int, int]:
    """Per study of ``study_ids``: how many of its images are out of scope (the worklist
    shows them apart from those still waiting; one grouped query per page)."""
    if not study_ids:
        return {}
    rows = session.execute(
        select(Series.study_id, func.count(Instance.id))
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id.in_(study_ids), Instance.status == InstanceStatus.out_of_scope)
        .group_by(Series.study_id)
    ).all()
    return {int(study_id): int(count) for study_id, count in rows}


def _aggregate() -> Select[*tuple[Any, ...]]:
    """Per study: priority, counts by state, highest probability, times, modality, body
    part."""
    done = Instance.status == InstanceStatus.done
    max_probability = func.max(case((done, Result.probability)))
    return _from_images(
        _study_priority().label("priority"),
        max_probability.label("max_probability"),
        func.count(Instance.id).label("instances"),
        func.sum(case((done, 1), else_=0)).label("classified"),
        func.sum(case((Instance.status == InstanceStatus.failed, 1), else_=0)).label("failed"),
        func.min(Instance.received_at).label("first_received_at"),
        func.max(case((done, Result.created_at))).label("last_result_at"),
        func.max(Series.modality).label("modality"),
        func.max(Series.body_part_examined).label("body_part_examined"),
    )


def priority_rank(highest_image_priority: ColumnElement[Any]) -> ColumnElement[int]:
    """:class:`Priority` of a study from the highest :class:`Priority` of its classified
    images' decisions (``verdict.study_decision``): unclassified when it has none."""
    return func.coalesce(highest_image_priority, int(Priority.unclassified))


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
