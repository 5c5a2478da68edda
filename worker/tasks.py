"""Celery tasks: classify one instance, report one study, deliver one SR to one destination.

Tasks are registered on an app by :func:`register_tasks` (called by ``make_celery``), so
importing this module builds nothing. Each task body is a plain function taking a
:class:`WorkerState`, testable without a broker.

Idempotency: one result per (instance, model version). A redelivered or duplicated message
finds the result and stops; one arriving while another delivery of the same instance is
being classified finds its claim (``worker.claims``) and stops too, so an instance is
classified once however many messages name it (``save_result`` still keeps one result if
two runs ever reach it).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Celery, Task
from celery.worker.request import Request
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from db import reports, repository
from db.evidence import record_evidence
from db.models import Instance, InstanceStatus, SendStatus, Study
from db.session import in_transaction
from fracture_triage.messages import (
    SCHEMA_VERSION,
    ClassifyInstance,
    Deliver,
    QueueMessage,
    ReportStudy,
    SendReport,
)
from fracture_triage.scope import in_scope, out_of_scope_reason
from fracture_triage.settings import Settings
from worker import claims

if TYPE_CHECKING:
    from model.artifact import ModelCard
    from model.inference import Classifier, Explained
    from worker.evidence import MadeEvidence
    from worker.queue import CeleryEnqueuer

M = TypeVar("M", bound=QueueMessage)
log = logging.getLogger(__name__)

#: Attempts (deliveries that started work) before an instance is given up as failed. Only a
#: worker dying mid-task (or a task outliving the visibility timeout, delivered again while
#: it runs) makes another attempt: ordinary failures are recorded at once. A file that kills
#: its worker every time is failed after this many crashes instead of looping for ever.
MAX_ATTEMPTS = 5
#: Retries of a transient failure (database or broker unavailable), with exponential backoff
#: capped below the broker's visibility timeout (a message waiting for its retry is held
#: unacknowledged by the worker). After that the instance stays ``queued`` and the sweeper
#: sends it again later.
MAX_RETRIES = 6
RETRY_BACKOFF_MAX_S = 10

#: Exceptions that say "try again later", not "this file is bad".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
)


class TransientError(RuntimeError):
    """A failure worth retrying (the broker refused a follow-up message, ...)."""


RETRYABLE: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, TransientError)


def release_freed_memory() -> None:
    """Return the heap freed after a classification to the operating system.

    Decoding and rendering a full-size radiograph allocates a few large arrays; glibc keeps
    freed blocks of that size in the process (its mmap threshold grows after each free), so
    a worker's resident memory ratchets up to its largest image and stays there (measured:
    the pool child grew from ~170 to ~240 MB over eight DICOM samples). ``malloc_trim(0)``
    hands them back; elsewhere than glibc it is absent and this does nothing.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - an AttributeError here means: not glibc
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


def retry_countdown(retries: int) -> float:
    """Exponential backoff: 1, 2, 4, 8, 10, 10 ... seconds."""
    return float(min(2**retries, RETRY_BACKOFF_MAX_S))


class WorkerState:
    """Per-process resources, created on first use in the process that uses them.

    Celery's prefork pool forks children from the worker's main process; database engines
    and TensorFlow must not cross a fork, so everything here is (re)built lazily when the
    process id changes. The model is loaded once per process, on the first classification.
    """

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self._app = app
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._card: ModelCard | None = None
        self._classifier: Classifier | None = None
        self._enqueuer: CeleryEnqueuer | None = None

    def _check_pid(self) -> None:
        pid = os.getpid()
        if self._pid != pid:
            self._pid = pid
            self._sessions = None
            self._card = None
            self._classifier = None
            self._enqueuer = None

    def sessions(self) -> sessionmaker[Session]:
        with self._lock:
            self._check_pid()
            if self._sessions is None:
                from db.session import make_engine, make_session_factory

                engine = make_engine(self.settings.resolved_database_url)
                self._sessions = make_session_factory(engine)
            return self._sessions

    def model_dir(self) -> Path:
        from model.artifact import resolve_model_dir

        return resolve_model_dir(self.settings.model_dir)

    def card(self) -> ModelCard:
        """The model card (name, version, UID): cheap, read without loading TensorFlow."""
        with self._lock:
            self._check_pid()
            if self._card is None:
                from model.artifact import read_card

                self._card = read_card(self.model_dir())
            return self._card

    def classifier(self) -> Classifier:
        with self._lock:
            self._check_pid()
            if self._classifier is None:
                from model.inference import Classifier

                log.info("loading model from %s (pid %d)", self.model_dir(), os.getpid())
                self._classifier = Classifier.load(
                    self.model_dir(), num_threads=self.settings.inference_threads
                )
                if not self._classifier.has_map:
                    log.warning(
                        "the export in %s returns no class activation map: evidence captures "
                        "will be recorded as not produced; export it again",
                        self.model_dir(),
                    )
                self._card = self._classifier.card
            return self._classifier

    def enqueuer(self) -> CeleryEnqueuer:
        with self._lock:
            self._check_pid()
            if self._enqueuer is None:
                from worker.queue import CeleryEnqueuer

                self._enqueuer = CeleryEnqueuer(self.settings, app=self._app)
            return self._enqueuer


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:2000] if text else type(exc).__name__


class RefusedMessageError(ValueError):
    """A queue message this worker cannot read: it comes from a newer or older producer (or
    is malformed), and retrying cannot help. ``reason`` names no value from the message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _parse(message_type: type[M], payload: Any) -> M:
    """The queue message as ``message_type``; raise :class:`RefusedMessageError` (logged, naming
    the task) when it is of another schema version or does not fit the schema."""
    version = payload.get("schema_version") if isinstance(payload, dict) else None
    if version != SCHEMA_VERSION:
        reason = (
            f"{message_type.task} message of schema version {version!r} refused: "
            f"this worker reads version {SCHEMA_VERSION}"
        )
        log.error("%s", reason)
        raise RefusedMessageError(reason)
    try:
        return message_type.model_validate(payload)
    except ValidationError as exc:
        # Field names and error kinds only: the input may carry anything.
        fields = sorted({".".join(map(str, e["loc"])) + f" ({e['type']})" for e in exc.errors()})
        reason = f"malformed {message_type.task} message: {', '.join(fields)}"
        log.error("%s", reason)
        raise RefusedMessageError(reason) from exc


def _fail_refused_instance(state: WorkerState, payload: Any, reason: str) -> None:
    """Record on the instance a classify message names why it will not be classified, so the
    refusal shows in the results instead of the instance waiting for ever. Only an instance
    still waiting for classification, whose id and SOP Instance UID the message names."""
    if not isinstance(payload, dict):
        return
    instance_id, uid = payload.get("instance_id"), payload.get("sop_instance_uid")
    if not isinstance(instance_id, int) or not isinstance(uid, str):
        return
    with state.sessions()() as session:
        instance = session.get(Instance, instance_id)
        if instance is None or instance.sop_instance_uid != uid:
            return
        if instance.status in (InstanceStatus.pending, InstanceStatus.queued):
            repository.mark_failed(session, instance_id, reason)
            session.commit()


def classify(state: WorkerState, payload: Any) -> str:
    """Classify one instance; return what happened (for logs and tests).

    Outcomes: ``invalid`` (message refused; a waiting instance it names is failed with the
    reason), ``no-model`` (the model cannot be loaded: the instance stays queued, no attempt
    counted, and the sweeper sends it again), ``missing`` (no such instance), ``failed``
    (already failed, or the file cannot be decoded/preprocessed: recorded, not retried),
    ``out-of-scope`` (its Body Part Examined is not in ``Settings.body_parts``: recorded as
    not assessed, never classified; checked before the model is even loaded),
    ``exists`` (a result for this model version exists), ``busy`` (another delivery of it is
    being classified: see ``worker.claims``), ``done`` (result stored).
    Transient database errors propagate (the task retries them).
    """
    try:
        msg = _parse(ClassifyInstance, payload)
    except RefusedMessageError as exc:
        _fail_refused_instance(state, payload, exc.reason)
        return "invalid"
    if _leave_out_of_scope(state, msg):
        return "out-of-scope"

    from model.inference import ExportError

    try:
        # Loaded once per process, on the first message, before an attempt is counted: a
        # model that cannot be loaded is not the instance's fault.
        classifier = state.classifier()
    except (ExportError, OSError, ValueError) as exc:
        log.error(
            "instance %s stays queued: the model cannot be loaded: %s", msg.sop_instance_uid, exc
        )
        return "no-model"
    card = classifier.card
    sessions = state.sessions()
    with sessions() as session:
        instance = session.get(Instance, msg.instance_id)
        if instance is None or instance.sop_instance_uid != msg.sop_instance_uid:
            log.error(
                "classify: no instance %d with SOP Instance UID %s",
                msg.instance_id,
                msg.sop_instance_uid,
            )
            return "missing"
        if instance.status == InstanceStatus.failed:
            return "failed"
        if instance.status == InstanceStatus.out_of_scope:
            return "out-of-scope"
        if repository.find_result(session, instance.id, card.version) is not None:
            if instance.status != InstanceStatus.done:
                # A result stored by a run that died before marking the instance (or a
                # status reset): settle the instance, keep the single result.
                instance.status = InstanceStatus.done
                repository.refresh_triage(session, instance.series.study_id)
                session.commit()
            return "exists"
        attempts = repository.claim_attempt(
            session, instance.id, claims.owner(), claims.attempt_over
        )
        # Committed before the work starts: a worker killed while classifying leaves it.
        session.commit()
        if attempts is None:
            # Another delivery of this instance is being classified right now (a message sent
            # again, or one whose publish timed out but reached the broker): it records the
            # result; a second classification would only cost CPU.
            log.info("instance %s: already being classified, not again", msg.sop_instance_uid)
            return "busy"
        if attempts > MAX_ATTEMPTS:
            reason = (
                f"gave up after {attempts - 1} attempts that did not finish "
                "(the worker died or the task kept failing; see the worker log)"
            )
            repository.mark_failed(session, instance.id, reason)
            session.commit()
            log.error("instance %s failed: %s", msg.sop_instance_uid, reason)
            return "failed"
        path = Path(instance.storage_path)

    try:
        return _classify_claimed(state, classifier, msg, path)
    except BaseException:
        # The attempt ends without a record (a transient error retried, a soft time limit):
        # its claim must not make the retry, in another pool child maybe, look like a
        # duplicate. If the database is down too, the lease or the sweeper ends the claim.
        with contextlib.suppress(Exception):
            owner = claims.owner()
            in_transaction(
                sessions, lambda s: repository.release_attempt(s, msg.instance_id, owner)
            )
        raise


def _leave_out_of_scope(state: WorkerState, msg: ClassifyInstance) -> bool:
    """Whether the instance is outside the model's scope (``fracture_triage.scope``): then
    it is recorded so (``out_of_scope``, with the reason naming its body part) and not
    classified. The body part is the one recorded for its series by the SCP (General Series
    module, PS3.3 C.7.3.1). An instance already classified or failed keeps its record."""
    with state.sessions()() as session:
        instance = session.get(Instance, msg.instance_id)
        if instance is None or instance.sop_instance_uid != msg.sop_instance_uid:
            return False  # the caller reports it missing
        if instance.status not in (InstanceStatus.pending, InstanceStatus.queued):
            return instance.status == InstanceStatus.out_of_scope
        body_part = instance.series.body_part_examined
        if in_scope(body_part, state.settings.body_parts):
            return False
        reason = out_of_scope_reason(body_part)
        repository.mark_out_of_scope(session, instance.id, reason)
        session.commit()
    log.info("instance %s %s", msg.sop_instance_uid, reason)
    return True


def _classify_claimed(
    state: WorkerState, classifier: Classifier, msg: ClassifyInstance, path: Path
) -> str:
    """Classify a claimed instance and record the result or the failure (ends the claim)."""
    from model.inference import ImageError

    sessions = state.sessions()
    try:
        # the one classification path, shared with `classify` and model.benchmark, with the
        # class activation map and the rendered image for the evidence capture
        explained = classifier.explain_file(path, max_pixels=state.settings.max_pixels)
    except ImageError as exc:
        release_freed_memory()
        reason = f"cannot decode or preprocess: {exc}"
        with sessions() as session:
            repository.mark_failed(session, msg.instance_id, reason)
            session.commit()
        log.warning("instance %s failed: %s", msg.sop_instance_uid, reason)
        return "failed"

    prediction = explained.prediction
    made = _evidence(state, msg.instance_id, classifier, explained)
    del explained
    release_freed_memory()
    c = repository.Classification(
        probability=prediction.probability,
        threshold=classifier.card.threshold,
        upper_threshold=classifier.card.upper_threshold,
        fracture=prediction.fracture,
        model_name=classifier.card.name,
        model_version=classifier.card.version,
        model_uid=classifier.card.uid,
        preprocess_ms=prediction.preprocess_ms,
        inference_ms=prediction.inference_ms,
    )

    def store(session: Session) -> str | None:
        # the result and its evidence in one transaction: both or neither
        result = repository.save_result(session, msg.instance_id, c)
        return record_evidence(session, result.id, made.record).sop_instance_uid

    try:
        recorded_uid = in_transaction(sessions, store)
    except BaseException:
        if made.path is not None:
            made.path.unlink(missing_ok=True)
        raise
    if made.path is not None and recorded_uid != made.record.sop_instance_uid:
        made.path.unlink(missing_ok=True)  # a concurrent run recorded its own capture first
    log.info(
        "instance %s classified: p=%.3f decision=%s (%.0f ms + %.0f ms); evidence %s (%.0f ms)%s",
        msg.sop_instance_uid,
        c.probability,
        c.decision.value,
        c.preprocess_ms,
        c.inference_ms,
        made.record.state.value,
        made.ms,
        f": {made.record.reason}" if made.record.reason else "",
    )
    return "done"


def _evidence(
    state: WorkerState, instance_id: int, classifier: Classifier, explained: Explained
) -> MadeEvidence:
    """The evidence capture of one classified instance (written, not yet recorded)."""
    from worker.evidence import make_evidence

    with state.sessions()() as session:
        instance = session.get(Instance, instance_id)
        assert instance is not None  # checked by the caller, never deleted
        probability = explained.prediction.probability
        return make_evidence(
            state.settings,
            instance,
            instance.series.study,
            classifier.card,
            explained.gray,
            explained.map,
            probability,
            classifier.threshold,
        )


def report(state: WorkerState, payload: Any) -> str:
    """Build, store and record the SR of one study revision; queue its sending.

    One transaction records the document and the reported revision, so a crash before that
    leaves the study unreported (the sweeper queues it again) and a duplicate message finds
    the revision reported and stops. A report that cannot be built (:class:`ReportError`)
    is recorded as the study's ``report_failure`` for that revision (``failed``): the
    sweeper does not queue it again until a new image makes a new revision.
    """
    try:
        msg = _parse(ReportStudy, payload)
    except RefusedMessageError:
        return "invalid"  # the sweeper queues the report again, in its own schema version
    from worker.sr import ReportError, build_study_report

    with state.sessions()() as session:
        study = session.get(Study, msg.study_id)
        if study is None or study.study_instance_uid != msg.study_instance_uid:
            log.error("report: no study %d with UID %s", msg.study_id, msg.study_instance_uid)
            return "missing"
        if study.reported_revision is not None and study.reported_revision >= study.revision:
            return "exists"
        revision = study.revision
        try:
            sr_doc = build_study_report(session, state.settings, msg.study_id, state.card())
            session.commit()
        except ReportError as exc:
            session.rollback()
            reports.mark_report_failed(session, msg.study_id, revision, str(exc))
            session.commit()
            log.error("report of study %d revision %d failed: %s", msg.study_id, revision, exc)
            return "failed"
    if sr_doc.send_status == SendStatus.pending:
        from db.deliveries import document_deliveries
        from worker.queue import EnqueueError

        with state.sessions()() as session:
            pending = [d.id for d in document_deliveries(session, sr_doc.id)]
        try:
            for delivery_id in pending:
                state.enqueuer().enqueue_delivery(Deliver(delivery_id=delivery_id))
        except EnqueueError as exc:
            # The deliveries are recorded as pending and due: the sweeper queues them later.
            log.warning("SR %s recorded, delivery not queued yet: %s", sr_doc.sop_instance_uid, exc)
    return "done"


def deliver(state: WorkerState, payload: Any) -> str:
    """Make one attempt of one delivery (``worker.delivery.deliver``). A failure is recorded
    with its next attempt's time, not retried here: the sweeper queues what is due."""
    try:
        msg = _parse(Deliver, payload)
    except RefusedMessageError:
        return "invalid"  # the sweeper queues due deliveries again
    from worker.delivery import deliver as deliver_one

    with state.sessions()() as session:
        return deliver_one(session, state.settings, msg.delivery_id)


def send(state: WorkerState, payload: Any) -> str:
    """A ``worker.send_report`` message queued before revision 0009: the due deliveries of
    that SR are attempted (as ``worker.deliver`` would)."""
    try:
        msg = _parse(SendReport, payload)
    except RefusedMessageError:
        return "invalid"
    from worker.delivery import deliver_document

    with state.sessions()() as session:
        return ",".join(deliver_document(session, state.settings, msg.sr_document_id)) or "missing"


class AckOrForgetRequest(Request):  # type: ignore[misc]
    """A task request whose acknowledgement cannot wedge the worker.

    kombu's Redis transport removes a delivered message from the channel's prefetch window
    only after the acknowledgement reached Redis (``kombu.transport.redis.QoS.ack``). When
    Redis stalls, that write times out, Celery logs "Couldn't ack" and the message stays in
    the window for ever: with prefetch 1 the worker never fetches again, long after Redis is
    back (measured: nothing consumed for 7+ minutes; compare celery/celery#8030). Here an
    acknowledgement that fails on a connection error is dropped from the local window only;
    Redis still holds the message as unacknowledged and redelivers it after the visibility
    timeout, and the task, idempotent, finds its result and stops.
    """

    def acknowledge(self) -> None:
        if self.acknowledged:  # type: ignore[has-type]
            return
        try:
            self.message.ack()
        except self._connection_errors as exc:
            from kombu.transport.virtual.base import QoS

            log.warning(
                "task %s: acknowledgement failed (%s: %s); left to the broker to redeliver",
                self.id,
                type(exc).__name__,
                exc,
            )
            channel = self.message.channel
            if isinstance(getattr(channel, "qos", None), QoS):
                QoS.ack(channel.qos, self.message.delivery_tag)  # type: ignore[no-untyped-call]  # local window only
        self.acknowledged = True


def register_tasks(app: Celery, settings: Settings) -> WorkerState:
    """Register the node's tasks on ``app``; return the state they share in each process."""
    state = WorkerState(settings, app)

    def _retry(task: Task, exc: BaseException) -> None:
        retries = task.request.retries
        log.warning(
            "%s: transient failure (%s), retry %d/%d",
            task.name,
            _reason(exc),
            retries + 1,
            MAX_RETRIES,
        )
        raise task.retry(exc=exc, countdown=retry_countdown(retries), max_retries=MAX_RETRIES)

    def register(name: str, body: Callable[[WorkerState, Any], str]) -> None:
        # Every task: acknowledged late (a task whose worker died is redelivered), its
        # acknowledgement unable to wedge the worker, transient failures retried with backoff.
        @app.task(
            name=name, bind=True, acks_late=True, ignore_result=True, Request=AckOrForgetRequest
        )
        def task(self: Task, payload: dict[str, Any]) -> str:
            try:
                return body(state, payload)
            except RETRYABLE as exc:
                _retry(self, exc)
                raise  # unreachable: retry raises

    register(ClassifyInstance.task, classify)
    register(ReportStudy.task, report)
    register(SendReport.task, send)
    register(Deliver.task, deliver)
    return state
