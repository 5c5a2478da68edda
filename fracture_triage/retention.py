"""Retention: received radiographs are deleted some days after their result was delivered.

``Settings.retention_days`` (unset: kept for ever): a received object's file is deleted once
a Structured Report covering it (produced after the object was received) has been sent to
every destination that many days ago (``send_status`` sent: the summary of its
``deliveries``, the last one's time) -- or produced that many days ago when no destination
is configured. An SR still pending at one destination, or given up there, keeps its study's
objects until ``fracture-triage resend`` delivers it: the result has not arrived
everywhere, and a PACS administrator expects the node to keep what it could still resend.
Objects the node refused (``objects/rejected/``) are deleted that many days after they
arrived. ``Settings.sr_retention_days`` (unset: kept for ever) does the same for the node's
own SR files, counted from their sending (or production).

Database rows stay, with ``purged_at`` set, so results, worklists and audits keep the
history. ``fracture-triage purge [--dry-run]`` runs it; run it daily (cron, a systemd
timer, a compose job). Logs and output carry counts, sizes and UIDs, never patient data.

The one exception: the records of refused C-STOREs (``store_refusals``: a status, a UID,
an AE title, no patient data) are deleted ``Settings.refusal_retention_days`` (30) after
the refusal, always (a peer sending garbage in a loop must not fill the database), by
``purge`` and by the sweeper every hour (:func:`prune_refusals`). Each deleted row is
added to its status' total, so ``/metrics``' refusal counter never goes down.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import node_state
from db.models import Instance, InstanceStatus, SendStatus, Series, SRDocument
from db.repository import REFUSED_PREFIX, utcnow
from fracture_triage.settings import Settings

log = logging.getLogger(__name__)

#: Rows marked per transaction (short transactions; the SCP and worker keep writing).
BATCH = 500


@dataclass
class Purge:
    """What a purge removed (or, dry, would remove)."""

    dry_run: bool
    objects: int = 0
    srs: int = 0
    rejected_files: int = 0
    bytes: int = 0
    studies: set[int] = field(default_factory=set)
    #: records of refused C-STOREs (``store_refusals``) past ``refusal_retention_days``
    refusals: int = 0

    def summary(self) -> str:
        verb = "would purge" if self.dry_run else "purged"
        return (
            f"{verb} {self.objects} received object(s) of {len(self.studies)} study(ies), "
            f"{self.rejected_files} refused object file(s) and {self.srs} SR file(s): "
            f"{self.bytes / 1024**2:.1f} MiB; {self.refusals_summary()}"
        )

    def refusals_summary(self) -> str:
        verb = "would prune" if self.dry_run else "pruned"
        return f"{verb} {self.refusals} C-STORE refusal record(s)"


#: Refusal rows deleted per transaction (short ones: the SCP keeps appending).
REFUSAL_BATCH = 5000


def prune_refusals(
    sessions: sessionmaker[Session],
    settings: Settings,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> int:
    """Delete the refusal records older than ``settings.refusal_retention_days`` (with
    ``dry_run``, count them); how many."""
    before = (now or utcnow()) - timedelta(days=settings.refusal_retention_days)
    if dry_run:
        with sessions() as session:
            return node_state.refusals_before(session, before)
    total = 0
    while True:
        with sessions() as session:
            n = node_state.prune_refusals(session, before, REFUSAL_BATCH)
            session.commit()
        total += n
        if n == 0:
            return total


def _delivered(cutoff: datetime) -> object:
    """An SR sent before ``cutoff``, or produced before it where nothing is sent."""
    return or_(
        and_(SRDocument.send_status == SendStatus.sent, SRDocument.sent_at <= cutoff),
        and_(SRDocument.send_status == SendStatus.none, SRDocument.created_at <= cutoff),
    )


def due_objects(session: Session, cutoff: datetime) -> list[tuple[int, int, str]]:
    """(instance id, study id, path) of the received objects due for deletion."""
    covered = (
        select(SRDocument.study_id, func.max(SRDocument.created_at).label("until"))
        .where(_delivered(cutoff))  # type: ignore[arg-type]
        .group_by(SRDocument.study_id)
        .subquery()
    )
    reported = (
        select(Instance.id, Series.study_id, Instance.storage_path)
        .join(Series, Instance.series_id == Series.id)
        .join(covered, covered.c.study_id == Series.study_id)
        .where(
            Instance.purged_at.is_(None),
            Instance.received_at <= covered.c.until,
            Instance.status.in_(
                [InstanceStatus.done, InstanceStatus.failed, InstanceStatus.out_of_scope]
            ),
        )
    )
    refused = (
        select(Instance.id, Series.study_id, Instance.storage_path)
        .join(Series, Instance.series_id == Series.id)
        .where(
            Instance.purged_at.is_(None),
            Instance.failure_reason.startswith(REFUSED_PREFIX),
            Instance.received_at <= cutoff,
        )
    )
    rows = {r[0]: (r[0], r[1], r[2]) for r in session.execute(reported)}
    rows.update({r[0]: (r[0], r[1], r[2]) for r in session.execute(refused)})
    return sorted(rows.values())


def due_srs(session: Session, cutoff: datetime) -> list[tuple[int, str]]:
    """(SR document id, path) of the node's SR files due for deletion."""
    query = select(SRDocument.id, SRDocument.path).where(
        SRDocument.purged_at.is_(None),
        _delivered(cutoff),  # type: ignore[arg-type]
    )
    return [(r[0], r[1]) for r in session.execute(query)]


def _remove(path: Path, stop_at: Path | None, dry_run: bool) -> int:
    """Delete ``path`` (and folders left empty up to ``stop_at``); the bytes it held."""
    try:
        size = path.stat().st_size
    except OSError:
        return 0  # gone already (deleted by hand, or an earlier run that stopped half-way)
    if dry_run:
        return size
    path.unlink(missing_ok=True)
    folder = path.parent
    while stop_at is not None and folder != stop_at and stop_at in folder.parents:
        with contextlib.suppress(OSError):  # not empty: stop
            folder.rmdir()
            folder = folder.parent
            continue
        break
    return size


def _rejected_files(rejected_dir: Path, cutoff_s: float) -> list[Path]:
    if not rejected_dir.is_dir():
        return []
    return [p for p in rejected_dir.iterdir() if p.is_file() and p.stat().st_mtime <= cutoff_s]


def purge(
    sessions: sessionmaker[Session],
    settings: Settings,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> Purge:
    """Delete what retention makes due (see module doc); with ``dry_run`` only count it."""
    now = now or utcnow()
    result = Purge(dry_run=dry_run)
    storage = settings.storage_dir.resolve()
    if settings.retention_days is not None:
        cutoff = now - timedelta(days=settings.retention_days)
        with sessions() as session:
            objects = due_objects(session, cutoff)
        seen: set[Path] = set()
        for start in range(0, len(objects), BATCH):
            batch = objects[start : start + BATCH]
            for _id, study_id, path in batch:
                seen.add(Path(path).resolve())
                result.bytes += _remove(Path(path), storage, dry_run)
                result.studies.add(study_id)
            if not dry_run:
                ids = [row[0] for row in batch]
                with sessions() as session:
                    session.execute(
                        update(Instance).where(Instance.id.in_(ids)).values(purged_at=now)
                    )
                    session.commit()
            result.objects += len(batch)
        # Refused objects nobody recorded (no usable UIDs): by the file's age.
        cutoff_s = time.time() - settings.retention_days * 86400
        for leftover in _rejected_files(settings.storage_dir / "rejected", cutoff_s):
            if leftover.resolve() in seen:
                continue
            result.bytes += _remove(leftover, None, dry_run)
            result.rejected_files += 1
    if settings.sr_retention_days is not None:
        cutoff = now - timedelta(days=settings.sr_retention_days)
        with sessions() as session:
            srs = due_srs(session, cutoff)
        sr_dir = settings.sr_dir.resolve()
        for start in range(0, len(srs), BATCH):
            batch_srs = srs[start : start + BATCH]
            for _id, path in batch_srs:
                result.bytes += _remove(Path(path), sr_dir, dry_run)
            if not dry_run:
                ids = [row[0] for row in batch_srs]
                with sessions() as session:
                    session.execute(
                        update(SRDocument).where(SRDocument.id.in_(ids)).values(purged_at=now)
                    )
                    session.commit()
            result.srs += len(batch_srs)
    result.refusals = prune_refusals(sessions, settings, dry_run=dry_run, now=now)
    if not dry_run and (result.objects or result.srs or result.rejected_files or result.refusals):
        log.info("retention: %s", result.summary())
    return result


def retention_configured(settings: Settings) -> bool:
    """Whether files are deleted (refusal records always are, see the module doc)."""
    return settings.retention_days is not None or settings.sr_retention_days is not None


__all__ = ["Purge", "due_objects", "due_srs", "prune_refusals", "purge", "retention_configured"]
