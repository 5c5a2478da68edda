"""The sweeper: the database is the source of truth, the broker only a delivery mechanism.

Every ``settings.sweeper_interval_seconds`` it

1. queues ``pending`` instances (stored and acknowledged while the broker was down, or
   while it did not answer) received at least ``pending_after`` (5 s) ago, so as not to race
   the SCP's own publish, oldest first, and stops at the first refusal (the broker is still
   down); one whose message the broker holds after all (a publish that timed out
   while Redis was frozen reaches it when it thaws) is marked queued, not sent again;
2. sends again ``queued`` instances that have had no result for ``stale_after`` and whose
   message the broker no longer holds (``CeleryEnqueuer.held_instances``: lost with a
   broker killed or restarted without persistence), however long the queue is: once each,
   since the message sent is then held. It reads the broker's contents twice, so a message
   being delivered at that moment is not missed;
3. queues ``report_study`` for studies quiet for ``settings.study_stable_seconds`` whose
   current revision has no SR yet, at most once per (study, revision) every
   ``report_resend_after`` (a lost message is sent again, a slow one is not duplicated);
4. queues ``deliver`` for each SR delivery that is due (``db.deliveries.due_deliveries``:
   pending, its backoff time passed, to a destination still configured), at most once every
   ``report_resend_after`` per delivery (the task claims the row, so a duplicate is cheap);
5. every ``prune_every_s`` (an hour), and on its first sweep, deletes the records of refused
   C-STOREs past ``refusal_retention_days`` (``fracture_triage.retention.prune_refusals``),
   whether or not anyone runs ``fracture-triage purge``: the SCP appends one per refusal,
   and a peer that sends garbage in a loop must not fill the database. After the other
   steps, and even with the broker down: it needs only the database.

It writes no report state itself: the SR task records the SR (or why it cannot be built)
and the reported revision in one transaction, so a crash anywhere leaves the study
reportable, never reports one revision twice (the task checks the reported revision first)
and a report that cannot be built is not queued again for that revision.

The tasks are idempotent and claim their instance (``worker.claims``), so the rare message
sent twice (a race with a delivery, a publish that timed out yet arrived) costs a database
lookup, never a second classification.

Each step of a sweep is one unit of work, committed when it ends: what was handed to the
broker is marked even if a later step fails (the repository functions never commit).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.deliveries import due_deliveries
from fracture_triage.messages import Deliver, ReportStudy
from fracture_triage.retention import prune_refusals
from fracture_triage.settings import Settings
from worker.queue import CeleryEnqueuer, EnqueueError, classify_message, queue_instance

log = logging.getLogger(__name__)

STALE_AFTER = timedelta(minutes=2)
#: A pending instance younger than this may be the SCP's own publish in flight: left to it.
PENDING_AFTER = timedelta(seconds=5)
REPORT_RESEND_AFTER_S = 120.0
PENDING_BATCH = 500
#: Seconds between two prunes of the refusal records (their retention is in days).
PRUNE_EVERY_S = 3600.0


@dataclass
class SweepCounts:
    queued: int = 0
    requeued: int = 0
    #: pending instances whose message the broker held already (marked queued, not sent)
    adopted: int = 0
    reports: int = 0
    sends: int = 0
    #: refusal records deleted (past ``refusal_retention_days``)
    refusals_pruned: int = 0
    broker_down: bool = False


@dataclass
class Sweeper:
    """One sweeper's state: what it queued recently, to avoid resending too early."""

    settings: Settings
    sessions: sessionmaker[Session]
    enqueuer: CeleryEnqueuer
    stale_after: timedelta = STALE_AFTER
    pending_after: timedelta = PENDING_AFTER
    report_resend_after_s: float = REPORT_RESEND_AFTER_S
    prune_every_s: float = PRUNE_EVERY_S
    #: monotonic time of the last prune of the refusal records (None: not yet)
    _pruned_at: float | None = None
    #: study id -> (revision, monotonic time the report was queued)
    _reports: dict[int, tuple[int, float]] = field(default_factory=dict)
    #: delivery id -> monotonic time its attempt was queued
    _sends: dict[int, float] = field(default_factory=dict)

    def sweep_once(self) -> SweepCounts:
        counts = SweepCounts()
        with self.sessions() as session:
            for step in (
                self._queue_pending,
                self._requeue_stale,
                self._queue_reports,
                self._queue_sends,
            ):
                step(session, counts)
                session.commit()
                if counts.broker_down:
                    break
        now = time.monotonic()
        if self._pruned_at is None or now - self._pruned_at >= self.prune_every_s:
            counts.refusals_pruned = prune_refusals(self.sessions, self.settings)
            self._pruned_at = now
            if counts.refusals_pruned:
                log.info(
                    "pruned %d C-STORE refusal record(s) older than %g days",
                    counts.refusals_pruned,
                    self.settings.refusal_retention_days,
                )
        return counts

    def _queue_pending(self, session: Session, counts: SweepCounts) -> None:
        # One batch per sweep (a sweep every few seconds still queues hundreds per second).
        pending = repository.pending_instances(
            session, limit=PENDING_BATCH, received_before=self.pending_after
        )
        if not pending:
            return
        held = self.enqueuer.held_instances()  # None: unknown (down or frozen): send
        for instance in pending:
            if held is not None and instance.id in held:
                repository.mark_queued(session, instance.id)
                counts.adopted += 1
                continue
            if not queue_instance(session, self.enqueuer, instance):
                counts.broker_down = True
                return
            counts.queued += 1

    def _requeue_stale(self, session: Session, counts: SweepCounts) -> None:
        stale = repository.stale_queued_instances(session, self.stale_after, limit=200)
        if not stale:
            return
        # Read twice: a message a worker is taking at that moment (popped from the queue, not
        # yet in the unacked hash) shows in one of them. One finished meanwhile is re-sent,
        # and the duplicate finds its result.
        first = self.enqueuer.held_instances()
        second = self.enqueuer.held_instances()
        if first is None or second is None:
            return  # the broker cannot be read: neither can it be sent to
        held = first | second
        for instance in stale:
            if instance.id in held:
                continue  # waiting in a backlog or being classified: not lost
            try:
                self.enqueuer(classify_message(instance))
            except EnqueueError as exc:
                log.warning("stale instance %s not resent: %s", instance.sop_instance_uid, exc)
                counts.broker_down = True
                return
            repository.mark_requeued(session, instance.id)
            counts.requeued += 1
            log.info("resent instance %s: its message was lost", instance.sop_instance_uid)

    def _queue_reports(self, session: Session, counts: SweepCounts) -> None:
        now = time.monotonic()
        ready = repository.studies_ready_to_report(session, self.settings.study_stable_seconds)
        ready_ids = {study.id for study in ready}
        for study_id in list(self._reports):
            if study_id not in ready_ids:
                del self._reports[study_id]
        for study in ready:
            seen = self._reports.get(study.id)
            if seen and seen[0] == study.revision and now - seen[1] < self.report_resend_after_s:
                continue
            msg = ReportStudy(study_id=study.id, study_instance_uid=study.study_instance_uid)
            try:
                self.enqueuer.enqueue_report(msg)
            except EnqueueError as exc:
                log.warning("report of study %s not queued: %s", study.study_instance_uid, exc)
                counts.broker_down = True
                return
            self._reports[study.id] = (study.revision, now)
            counts.reports += 1
            log.info("queued report of study %s rev %d", study.study_instance_uid, study.revision)

    def _queue_sends(self, session: Session, counts: SweepCounts) -> None:
        names = [d.name for d in self.settings.all_destinations]
        if not names:
            return
        now = time.monotonic()
        due = due_deliveries(session, names)
        due_ids = {d.id for d in due}
        for delivery_id in list(self._sends):
            if delivery_id not in due_ids:
                del self._sends[delivery_id]
        for delivery in due:
            queued_at = self._sends.get(delivery.id)
            if queued_at is not None and now - queued_at < self.report_resend_after_s:
                continue
            try:
                self.enqueuer.enqueue_delivery(Deliver(delivery_id=delivery.id))
            except EnqueueError as exc:
                log.warning("delivery %d not queued: %s", delivery.id, exc)
                counts.broker_down = True
                return
            self._sends[delivery.id] = now
            counts.sends += 1


def run_sweeper(
    settings: Settings,
    stop_event: threading.Event,
    *,
    sessions: sessionmaker[Session] | None = None,
    enqueuer: CeleryEnqueuer | None = None,
    stale_after: timedelta = STALE_AFTER,
) -> None:
    """Sweep every ``settings.sweeper_interval_seconds`` until ``stop_event`` is set.

    Errors (database or broker down) are logged and the loop goes on: the sweeper is what
    recovers from them.
    """
    own_engine = None
    if sessions is None:
        from db.session import make_engine, make_session_factory

        own_engine = make_engine(settings.resolved_database_url)
        sessions = make_session_factory(own_engine)
    own_enqueuer = enqueuer is None
    if enqueuer is None:
        enqueuer = CeleryEnqueuer(settings)
    sweeper = Sweeper(settings, sessions, enqueuer, stale_after=stale_after)
    log.info("sweeper running every %.1f s", settings.sweeper_interval_seconds)
    was_down = False
    try:
        while not stop_event.is_set():
            try:
                counts = sweeper.sweep_once()
            except Exception:
                log.exception("sweep failed; trying again")
            else:
                if counts.broker_down != was_down:
                    log.warning("broker %s", "unreachable" if counts.broker_down else "back")
                    was_down = counts.broker_down
                if counts.queued or counts.requeued or counts.adopted:
                    log.info(
                        "queued %d pending (%d more already on the broker), resent %d lost",
                        counts.queued,
                        counts.adopted,
                        counts.requeued,
                    )
            stop_event.wait(settings.sweeper_interval_seconds)
    finally:
        if own_enqueuer:
            enqueuer.close()
        if own_engine is not None:
            own_engine.dispose()
