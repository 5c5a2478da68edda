"""The study verdict: one rule for the SR, the results and the worklist.

A study is flagged as fracture when any of its classified images is; its probability is the
highest image probability. Images without a result (failed, waiting) do not count either way.
Imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    fracture: bool
    #: None when no image of the study has a result.
    probability: float | None

    @property
    def assessed(self) -> bool:
        return self.probability is not None


def study_verdict(images: Iterable[tuple[float | None, bool | None]]) -> Verdict:
    """The verdict from ``(probability, fracture)`` per image; ``None`` means no result."""
    scored = [(float(p), bool(f)) for p, f in images if p is not None]
    return Verdict(
        fracture=any(f for _, f in scored),
        probability=max((p for p, _ in scored), default=None),
    )
