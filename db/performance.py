"""How the model does at this site: its study flags against the radiologists' verdicts.

Each study with a radiologist's verdict that says fracture or no fracture (the newest such
verdict counts) and a model decision (at least one classified image) is one case: the model's
flag (``study_triage.priority`` fracture or doubt: flagged at the lower threshold) against
the verdict. Sensitivity, specificity and PPV come
with 95 % Wilson score intervals (Wilson 1927; exact enough for the small counts of a site),
overall, by ISO week of the verdict and by body part. :func:`propose_threshold` suggests the
highest study-probability threshold that keeps a target sensitivity on these cases; it is
only shown, never applied.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import RadiologistVerdict, StudyTriage
from db.repository import as_utc
from db.triage import Priority

Z95 = 1.959964


@dataclass(frozen=True)
class Case:
    study_id: int
    model_flag: bool
    probability: float
    truth: bool
    body_part: str | None
    verdict_at: datetime


def cases(session: Session) -> list[Case]:
    """One case per study with a fracture/no-fracture verdict and a model decision."""
    newest = (
        select(func.max(RadiologistVerdict.id))
        .where(RadiologistVerdict.fracture.is_not(None))
        .group_by(RadiologistVerdict.study_id)
    )
    rows = session.execute(
        select(RadiologistVerdict, StudyTriage)
        .join(StudyTriage, StudyTriage.study_id == RadiologistVerdict.study_id)
        .where(RadiologistVerdict.id.in_(newest))
        # a model decision: neither unclassified nor out of scope (no probability at all)
        .where(StudyTriage.priority > int(Priority.unclassified))
    ).tuples()
    return [
        Case(
            study_id=v.study_id,
            model_flag=t.priority >= int(Priority.doubt),
            probability=float(t.max_probability or 0.0),
            truth=bool(v.fracture),
            body_part=t.body_part_examined,
            verdict_at=as_utc(v.created_at),
        )
        for v, t in rows
    ]


def wilson(successes: int, n: int) -> dict[str, float | None]:
    """Proportion with its 95 % Wilson score interval (None when n is 0)."""
    if n == 0:
        return {"value": None, "low": None, "high": None}
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return {"value": round(p, 4), "low": round(centre - half, 4), "high": round(centre + half, 4)}


def confusion(found: Iterable[Case], flag_at: float | None = None) -> dict[str, Any]:
    """Counts and rates; ``flag_at`` re-decides each case at that probability threshold."""
    tp = fp = tn = fn = 0
    for c in found:
        flag = c.model_flag if flag_at is None else c.probability >= flag_at
        if flag and c.truth:
            tp += 1
        elif flag:
            fp += 1
        elif c.truth:
            fn += 1
        else:
            tn += 1
    return {
        "cases": tp + fp + tn + fn,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": wilson(tp, tp + fn),
        "specificity": wilson(tn, tn + fp),
        "ppv": wilson(tp, tp + fp),
    }


def report(session: Session) -> dict[str, Any]:
    found = cases(session)
    by_week: dict[str, list[Case]] = defaultdict(list)
    by_part: dict[str, list[Case]] = defaultdict(list)
    for c in found:
        year, week, _ = c.verdict_at.isocalendar()
        by_week[f"{year}-W{week:02d}"].append(c)
        by_part[c.body_part or "(none)"].append(c)
    return {
        "overall": confusion(found),
        "by_week": {k: confusion(v) for k, v in sorted(by_week.items())},
        "by_body_part": {k: confusion(v) for k, v in sorted(by_part.items())},
    }


def propose_threshold(found: list[Case], target_sensitivity: float) -> dict[str, Any] | None:
    """The highest threshold on the study probability whose sensitivity on ``found`` is at
    least the target, with its figures; None without any verdict of fracture."""
    positives = sorted((c.probability for c in found if c.truth), reverse=True)
    if not positives:
        return None
    # Flagging every study at or above the k-th highest positive probability catches k of
    # them: the smallest k reaching the target gives the highest threshold that does.
    needed = max(1, math.ceil(target_sensitivity * len(positives) - 1e-9))
    threshold = positives[needed - 1]
    return {"threshold": round(threshold, 6), **confusion(found, flag_at=threshold)}
