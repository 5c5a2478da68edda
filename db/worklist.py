"""The worklist order, as one SQL query: the only place studies are ranked.

A study's level is the highest decision among the latest results of its classified images
(fracture > doubt > no fracture, :func:`fracture_triage.verdict.study_decision` in SQL) and
its probability the highest of those results. The worklist lists fracture studies first,
then doubt, then no fracture, each by probability descending; studies with no classified
image come last; ties keep arrival order. ``fracture-triage results`` takes each study's
decision from the same subquery, so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, Subquery, case, func, select
from sqlalchemy.orm import Session

from db.models import Instance, InstanceStatus, Result, Series, Study
from fracture_triage.verdict import DECISION_ORDER, Decision


def latest_results() -> Subquery:
    """``(instance_id, result_id)``: the newest result of each instance, whatever the model
    version (a result of another model is still the instance's result)."""
    return (
        select(Result.instance_id, func.max(Result.id).label("result_id"))
        .group_by(Result.instance_id)
        .subquery("latest_result")
    )


def _rank() -> ColumnElement[int]:
    """A result's rank: 0 for fracture, 1 for doubt, 2 for no fracture (``DECISION_ORDER``)."""
    return case({d: i for i, d in enumerate(DECISION_ORDER)}, value=Result.decision)


def study_levels() -> Subquery:
    """``(study_id, rank, probability)`` of every study with a classified image: ``rank``
    indexes :data:`~fracture_triage.verdict.DECISION_ORDER` (the study's decision)."""
    latest = latest_results()
    return (
        select(
            Series.study_id.label("study_id"),
            func.min(_rank()).label("rank"),
            func.max(Result.probability).label("probability"),
        )
        .select_from(Instance)
        .join(Series, Instance.series_id == Series.id)
        .join(latest, latest.c.instance_id == Instance.id)
        .join(Result, Result.id == latest.c.result_id)
        .where(Instance.status == InstanceStatus.done)
        .group_by(Series.study_id)
        .subquery("study_level")
    )


def decision_of_rank(rank: int | None) -> Decision | None:
    """The decision a :func:`study_levels` rank stands for (None: nothing classified)."""
    return None if rank is None else DECISION_ORDER[int(rank)]


def ordered_studies(levels: Subquery) -> Select[Study, int | None, float | None]:
    """Every study with its rank and probability, in worklist order (``levels`` from
    :func:`study_levels`, outer-joined: unclassified studies have ``None`` for both)."""
    return (
        select(Study, levels.c.rank, levels.c.probability)
        .outerjoin(levels, levels.c.study_id == Study.id)
        # "IS NULL" first: unclassified last on SQLite and PostgreSQL alike (their NULL
        # ordering differs).
        .order_by(
            levels.c.rank.is_(None),
            levels.c.rank,
            levels.c.probability.desc(),
            Study.id,
        )
    )


@dataclass(frozen=True)
class WorklistEntry:
    study_id: int
    study_instance_uid: str
    #: None when no image of the study is classified.
    decision: Decision | None
    probability: float | None


def worklist(session: Session) -> Sequence[WorklistEntry]:
    """Every study, in worklist order, with its decision and highest probability."""
    return [
        WorklistEntry(
            study_id=study.id,
            study_instance_uid=study.study_instance_uid,
            decision=decision_of_rank(rank),
            probability=None if probability is None else float(probability),
        )
        for study, rank, probability in session.execute(ordered_studies(study_levels())).tuples()
    ]
