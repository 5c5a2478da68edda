"""The decision and the study verdict: one rule for the worker, the SR, the results and the
worklist.

An image is decided in one of three levels, as radiologists' tools report them, from its
probability and the model card's two operating thresholds (both chosen on validation: the
lower one for sensitivity, the upper one for a high positive predictive value):

- *fracture*: probability >= upper threshold;
- *doubt*: lower threshold <= probability < upper threshold (a human must look);
- *no fracture*: probability < lower threshold.

A card with one threshold has upper == lower: there is no doubt level, every image is
*fracture* or *no fracture*. The boolean ``fracture`` flag kept beside the decision stays
"probability >= lower threshold" (flagged for a radiologist: *fracture* or *doubt*).

A study's decision is the highest level among its classified images (fracture > doubt >
no fracture) and its probability the highest image probability. Images without a result
(failed, waiting) do not count either way. Imports nothing of the project.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass


class Decision(enum.StrEnum):
    """The three levels of an image's or a study's result; values are what the results,
    ``classify --json`` and the database carry."""

    fracture = "fracture"
    doubt = "doubt"
    no_fracture = "no fracture"


#: The levels from the most to the least urgent: the study decision is the first of these
#: that any of its images has, and the worklist lists studies in this order.
DECISION_ORDER: tuple[Decision, ...] = (Decision.fracture, Decision.doubt, Decision.no_fracture)


def check_thresholds(lower: float, upper: float | None = None) -> float:
    """The upper threshold to use (``lower`` when ``upper`` is None) after checking both:
    each a number within [0, 1], ``upper >= lower``. Raises ``ValueError`` saying which."""
    for name, value in (("threshold", lower), ("upper_threshold", upper)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    if upper is None:
        return float(lower)
    if upper < lower:
        raise ValueError(
            f"upper_threshold ({upper}) must be >= threshold ({lower}): the upper threshold "
            "starts the fracture level, the lower one the doubt level"
        )
    return float(upper)


def decide(probability: float, lower: float, upper: float | None = None) -> Decision:
    """The decision for one image: fracture when ``probability >= upper``, doubt when
    ``lower <= probability < upper``, else no fracture. ``upper`` None means ``lower`` (a
    card with one threshold: no doubt level). Raises ``ValueError`` on invalid thresholds."""
    top = check_thresholds(lower, upper)
    if probability >= top:
        return Decision.fracture
    if probability >= lower:
        return Decision.doubt
    return Decision.no_fracture


def study_decision(decisions: Iterable[Decision | str | None]) -> Decision | None:
    """The highest level among a study's image decisions (fracture > doubt > no fracture);
    ``None`` entries (images without a result) are ignored; ``None`` when nothing is left."""
    levels = {Decision(d) for d in decisions if d is not None}
    return next((d for d in DECISION_ORDER if d in levels), None)


@dataclass(frozen=True)
class Verdict:
    fracture: bool
    #: None when no image of the study has a result.
    probability: float | None
    #: The highest image decision (None when no image has a result).
    decision: Decision | None = None

    @property
    def assessed(self) -> bool:
        return self.probability is not None


def study_verdict(images: Iterable[tuple[float | None, bool | None, str | None]]) -> Verdict:
    """The verdict from ``(probability, fracture, decision)`` per image; a ``None``
    probability means no result. A result without a decision (None) counts as fracture or
    no fracture by its flag, as a card with one threshold decides."""
    scored: list[tuple[float, bool, Decision]] = []
    for probability, flag, given in images:
        if probability is None:
            continue
        decision = (
            Decision(given) if given else (Decision.fracture if flag else Decision.no_fracture)
        )
        scored.append((float(probability), bool(flag), decision))
    return Verdict(
        fracture=any(f for _, f, _ in scored),
        probability=max((p for p, _, _ in scored), default=None),
        decision=study_decision(d for _, _, d in scored),
    )
