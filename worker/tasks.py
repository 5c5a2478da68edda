"""Celery tasks: classify one instance, report one study, send one SR.

Tasks are registered on an app by :func:`register_tasks` (called by ``make_celery``), so
importing this module builds nothing. Each task body is a plain function taking a
:class:`WorkerState`, testable without a broker.

Idempotency: one result per (instance, model version). A redelivered or duplicated message
finds the result and stops; two concurrent runs both reach ``save_result``, which keeps one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from celery import Celery, Task
from pydantic import BaseModel, ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import Instance, InstanceStatus, Study
from fracture_triage.messages import ClassifyInstance, ReportStudy, SendReport
from fracture_triage.settings import Settings

if TYPE_CHECKING:
    from model.artifact import ModelCard
    from model.inference import Classifier
    from worker.queue import CeleryEnqueuer

M = TypeVar("M", bound=BaseModel)
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
        if self.settings.model_dir is None:
            raise RuntimeError(
                "no model configured (settings.model_dir / FRACTURE_TRIAGE_MODEL_DIR)"
            )
        return Path(self.settings.model_dir)

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
                self._classifier = Classifier.load(self.model_dir())
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


def _parse(message_type: type[M], payload: Any, kind: str) -> M | None:
    """The queue message as ``message_type``, or ``None`` (logged) when it does not fit:
    a wrong schema version or shape comes from a newer/older producer, and retrying cannot
    help."""
    try:
        return message_type.model_validate(payload)
    except ValidationError as exc:
        log.error("refused %s message: %s", kind, exc.errors(include_input=False))
        return None


def classify(state: WorkerState, payload: Any) -> str:
    """Classify one instance; return what happened (for logs and tests).

    Outcomes: ``invalid`` (message refused), ``missing`` (no such instance), ``failed``
    (already failed, or the file cannot be decoded/preprocessed: recorded, not retried),
    ``exists`` (a result for this model version exists), ``done`` (result stored).
    Transient database errors propagate (the task retries them).
    """
    msg = _parse(ClassifyInstance, payload, "classify")
    if msg is None:
        return "invalid"

    card = state.card()
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
        if repository.find_result(session, instance.id, card.version) is not None:
            if instance.status != InstanceStatus.done:
                # A result stored by a run that died before marking the instance (or a
                # status reset): settle the instance, keep the single result.
                instance.status = InstanceStatus.done
                session.commit()
            return "exists"
        attempts = repository.start_attempt(session, instance.id)
        if attempts > MAX_ATTEMPTS:
            reason = (
                f"gave up after {attempts - 1} attempts that did not finish "
                "(the worker died or the task kept failing; see the worker log)"
            )
            repository.mark_failed(session, instance.id, reason)
            log.error("instance %s failed: %s", msg.sop_instance_uid, reason)
            return "failed"
        path = Path(instance.storage_path)

    # The model is loaded here, lazily, once per process; a model that cannot be loaded is
    # not the instance's fault: the error propagates and the instance stays queued.
    classifier = state.classifier()

    from model.preprocess import load_network_input

    t0 = time.perf_counter()
    try:
        image = load_network_input(
            path, classifier.input_size, max_pixels=state.settings.max_pixels
        )
    except Exception as exc:  # noqa: BLE001 - decoders raise anything: ValueError, KeyError ...
        reason = f"cannot decode or preprocess: {_reason(exc)}"
        with sessions() as session:
            repository.mark_failed(session, msg.instance_id, reason)
        log.warning("instance %s failed: %s", msg.sop_instance_uid, reason)
        return "failed"
    t1 = time.perf_counter()
    probability = float(classifier.predict_batch(image[np.newaxis])[0])
    t2 = time.perf_counter()

    c = repository.Classification(
        probability=probability,
        threshold=classifier.threshold,
        fracture=probability >= classifier.threshold,
        model_name=classifier.card.name,
        model_version=classifier.card.version,
        model_uid=classifier.card.uid,
        preprocess_ms=(t1 - t0) * 1000,
        inference_ms=(t2 - t1) * 1000,
    )
    with sessions() as session:
        repository.save_result(session, msg.instance_id, c)
    log.info(
        "instance %s classified: p=%.3f fracture=%s (%.0f ms + %.0f ms)",
        msg.sop_instance_uid,
        c.probability,
        c.fracture,
        c.preprocess_ms,
        c.inference_ms,
    )
    return "done"


def report(state: WorkerState, payload: Any) -> str:
    """Build, store and record the SR of one study revision; queue its sending.

    The SR module (``worker.sr``) records the document and the reported revision in one
    transaction, so a crash before that leaves the study unreported (the sweeper queues it
    again) and a duplicate message finds the revision reported and stops.
    """
    msg = _parse(ReportStudy, payload, "report")
    if msg is None:
        return "invalid"
    sessions = state.sessions()
    with sessions() as session:
        study = session.get(Study, msg.study_id)
        if study is None or study.study_instance_uid != msg.study_instance_uid:
            log.error("report: no study %d with UID %s", msg.study_id, msg.study_instance_uid)
            return "missing"
        if study.reported_revision is not None and study.reported_revision >= study.revision:
            return "exists"

    from worker.sr import ReportError, build_study_report

    try:
        sr_doc = build_study_report(sessions, state.settings, msg.study_id, state.card())
    except ReportError as exc:
        log.error("report of study %s refused: %s", msg.study_instance_uid, exc)
        return "error"
    if sr_doc.send_status == "pending" and state.settings.sr_destination is not None:
        send_msg = SendReport(sr_document_id=sr_doc.id, path=sr_doc.path)
        from worker.queue import EnqueueError

        try:
            state.enqueuer().enqueue_send(send_msg)
        except EnqueueError as exc:
            # The SR is recorded as pending: the sweeper queues the send later.
            log.warning("SR %s recorded, send not queued yet: %s", sr_doc.sop_instance_uid, exc)
    return "done"


def send(state: WorkerState, payload: Any) -> str:
    """Send one recorded SR to the configured destination (C-STORE, with retries)."""
    msg = _parse(SendReport, payload, "send")
    if msg is None:
        return "invalid"
    from worker.sr_send import SendError, send_sr_document

    try:
        with state.sessions()() as session:
            return str(send_sr_document(session, state.settings, msg.sr_document_id))
    except SendError as exc:
        # The attempt is recorded; the destination may come back: retry with backoff (the
        # sweeper also resends SRs left pending).
        raise TransientError(str(exc)) from exc


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

    @app.task(name="worker.classify_instance", bind=True, acks_late=True, ignore_result=True)
    def classify_instance(self: Task, payload: dict[str, Any]) -> str:
        try:
            return classify(state, payload)
        except RETRYABLE as exc:
            _retry(self, exc)
            raise  # unreachable: retry raises

    @app.task(name="worker.report_study", bind=True, acks_late=True, ignore_result=True)
    def report_study(self: Task, payload: dict[str, Any]) -> str:
        try:
            return report(state, payload)
        except RETRYABLE as exc:
            _retry(self, exc)
            raise

    @app.task(name="worker.send_report", bind=True, acks_late=True, ignore_result=True)
    def send_report(self: Task, payload: dict[str, Any]) -> str:
        try:
            return send(state, payload)
        except RETRYABLE as exc:
            _retry(self, exc)
            raise

    return state
