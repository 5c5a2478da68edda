"""When a delivery is tried again, and when it is given up: the one rule for every
destination (DICOM C-STORE and HL7 over MLLP alike).

The first retry comes :data:`FIRST_RETRY` after the first failed attempt, each later one
twice as long after the previous (30 s, 1 min, 2 min, ... 4 h 16 min would be next), capped
at :data:`MAX_DELAY` (4 h): a PACS or RIS down for a weekend is tried every 4 hours, one
down for a minute is tried again within a minute. A delivery is given up ("gave up") after
``max_attempts`` failed attempts (when set) or once it has been pending ``max_age`` (default
3 days, ``Settings.delivery_max_age_hours``), whichever comes first; ``fracture-triage
resend`` puts it back (its count and age then start again). Imports nothing of the project.
"""

from __future__ import annotations

from datetime import datetime, timedelta

FIRST_RETRY = timedelta(seconds=30)
MAX_DELAY = timedelta(hours=4)
DEFAULT_MAX_AGE = timedelta(days=3)


def retry_delay(failed_attempts: int) -> timedelta:
    """The wait after the ``failed_attempts``-th failed attempt (1: the first) before the next."""
    if failed_attempts < 1:
        raise ValueError(f"failed_attempts must be >= 1, got {failed_attempts}")
    # 2**n overflows nothing here: past 10 doublings the cap applies, so stop counting there.
    doublings = min(failed_attempts - 1, 20)
    delay: timedelta = FIRST_RETRY * (2**doublings)
    return min(delay, MAX_DELAY)


def next_attempt_at(
    failed_attempts: int,
    pending_since: datetime,
    now: datetime,
    *,
    max_attempts: int | None = None,
    max_age: timedelta = DEFAULT_MAX_AGE,
) -> datetime | None:
    """When to try again after the ``failed_attempts``-th failure at ``now``; ``None``: give up
    (``max_attempts`` failures reached, or pending for ``max_age`` since ``pending_since``).

    A retry that would fall after the age limit is moved to the limit itself, so the last
    attempt happens when the limit is reached rather than up to 4 h before it.
    """
    if max_attempts is not None and failed_attempts >= max_attempts:
        return None
    deadline = pending_since + max_age
    if now >= deadline:
        return None
    return min(now + retry_delay(failed_attempts), deadline)


__all__ = ["DEFAULT_MAX_AGE", "FIRST_RETRY", "MAX_DELAY", "next_attempt_at", "retry_delay"]
