"""Who runs a classification attempt, and whether that attempt can still be running.

An instance's attempt is claimed in the database (``db.repository.claim_attempt``) by its
owner, ``<host>.<space>.<pid>`` with the host and process-space digests temporary files
carry (``fracture_triage.files.writer_keys``). A second delivery of the same instance (a
message the sweeper sent again, a publish that timed out but reached Redis after all)
finds the claim and does nothing while its owner may be running; it takes the instance
over only when that attempt is certainly over:

- its owner ran on this host in another boot or PID namespace, or its pid no longer runs
  (a pool child killed mid-task: its own message comes back at once, and claims);
- it is this very process (one task at a time per pool child: that attempt ended without
  recording anything);
- it started more than :data:`ATTEMPT_LEASE` ago (another host's worker, whose processes
  cannot be seen from here: no task outlives the hard time limit).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from fracture_triage.files import writer_keys
from worker.celery_app import TASK_TIME_LIMIT_S

#: An attempt older than this is over whoever runs it: the hard task time limit, plus margin.
ATTEMPT_LEASE = timedelta(seconds=TASK_TIME_LIMIT_S + 30)


def owner() -> str:
    """This process as a claim's owner (at most 64 characters)."""
    host, space = writer_keys()
    return f"{host}.{space}.{os.getpid()}"


def attempt_over(claimed_by: str, started_at: datetime | None) -> bool:
    """Whether the attempt ``claimed_by`` started at ``started_at`` is certainly over."""
    if started_at is None:
        return True
    if started_at.tzinfo is None:  # SQLite returns naive UTC datetimes
        started_at = started_at.replace(tzinfo=UTC)
    if datetime.now(UTC) - started_at > ATTEMPT_LEASE:
        return True
    try:
        host, space, pid_text = claimed_by.split(".")
        pid = int(pid_text)
    except ValueError:
        return True  # not a claim this code wrote
    my_host, my_space = writer_keys()
    if host != my_host:
        return False  # another host: only the lease tells
    if space != my_space or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False
