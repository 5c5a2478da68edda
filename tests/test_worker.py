"""The classification worker with real parts: redis-server, a Celery worker subprocess, the
tiny real model, DICOM samples from ../shared, SQLite and PostgreSQL.

Fault tests (SIGKILL mid-task, Redis stopped during a burst) are in test_worker_faults.py;
the helpers here are shared with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.deliveries import create_deliveries
from db.models import Instance, InstanceStatus, Result, SRDocument, Study
from fracture_triage.messages import SCHEMA_VERSION, ClassifyInstance, ReportStudy
from fracture_triage.results import collect_results
from fracture_triage.settings import Settings
from tests.conftest import REPO, require
from tests.servers import RedisServer, free_port
from worker.queue import CeleryEnqueuer, EnqueueError, queue_instance
from worker.sweeper import Sweeper, run_sweeper
from worker.tasks import MAX_ATTEMPTS, RETRYABLE, WorkerState, classify, report

#: Radiographs that decode (small ones: the worker's speed is not under test here).
GOOD = (
    "CR_chest_MONO1_10b_440_EVRLE_gdcm.dcm",
    "DERIVED_CR_chest_MONO1_10b_440_DeflatedEVRLE.dcm",
    "DX_thorax_MONO1_8b_odd169x211_EVRLE.dcm",
    "SC_OT_MONO2_8b_Deflated_dclunie.dcm",
    "CR_extremity_RG3_MONO1_10b_J2K_lossy.dcm",
    "DERIVED_SC_modDX_chest_NIH_MONO2_8b_JPEGBaseline.dcm",
)
#: Files no decoder accepts: truncated pixel data, an almost empty dataset, a bad JPEG scan.
BAD = (
    "BAD_MR_truncated_pixeldata.dcm",
    "DERIVED_BAD_CR_extremity_RG3_truncated_at60000.dcm",
    "BAD_CR_extremity_RG3_JPEGExtended_SOS_Se0.dcm",
)
CR = "1.2.840.10008.5.1.4.1.1.1"


# --- helpers shared with test_worker_faults.py ------------------------------------------------


def make_sessions(url: str) -> sessionmaker[Session]:
    from db.migrations import upgrade
    from db.session import make_engine, make_session_factory

    upgrade(url)
    return make_session_factory(make_engine(url))


def record(
    sessions: sessionmaker[Session],
    sample: Path,
    study_uid: str,
    series_uid: str | None = None,
) -> Instance:
    """Record a sample as the SCP would after storing it (a fresh SOP Instance UID: several
    samples share one upstream)."""
    with sessions() as session:
        instance, new = repository.record_received(
            session,
            repository.ReceivedInstance(
                sop_instance_uid=generate_uid(),
                sop_class_uid=CR,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid or study_uid + ".1",
                storage_path=str(sample),
                calling_ae_title="TESTSCU",
                modality="CR",
            ),
        )
        session.commit()
        assert new
        return instance


def scp_store(
    sessions: sessionmaker[Session], enqueuer: CeleryEnqueuer, sample: Path, study_uid: str
) -> bool:
    """What the SCP does per C-STORE after writing the file: record, then queue (or leave
    pending when the broker is down). Returns whether it was queued."""
    instance = record(sessions, sample, study_uid)
    with sessions() as session:
        queued = queue_instance(session, enqueuer, instance)
        session.commit()
        return queued


def result_counts(sessions: sessionmaker[Session]) -> dict[int, int]:
    with sessions() as session:
        rows = session.execute(
            select(Result.instance_id, func.count(Result.id)).group_by(Result.instance_id)
        ).all()
    return {int(i): int(n) for i, n in rows}


def statuses(sessions: sessionmaker[Session]) -> dict[int, InstanceStatus]:
    with sessions() as session:
        return {i.id: i.status for i in session.scalars(select(Instance))}


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2
) -> float:
    """Poll ``condition``; return the seconds it took; fail the test after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FRACTURE_TRIAGE_DATA_DIR=str(settings.data_dir),
        FRACTURE_TRIAGE_DATABASE_URL=settings.resolved_database_url,
        FRACTURE_TRIAGE_BROKER_URL=settings.broker_url,
        FRACTURE_TRIAGE_MODEL_DIR=str(settings.model_dir),
        FRACTURE_TRIAGE_STUDY_STABLE_SECONDS=str(settings.study_stable_seconds),
        PYTHONPATH=str(REPO),
        # The machine is shared: one inference thread, no GPU probing, quiet TensorFlow.
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


@dataclass
class WorkerProcess:
    """A real Celery worker (``python -m worker``) in its own process group."""

    proc: subprocess.Popen[bytes]
    log: Path

    def ready(self) -> bool:
        return " ready." in self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(lambda: self.ready() or self.proc.poll() is not None, timeout, "worker ready")
        assert self.proc.poll() is None, f"worker exited:\n{self.log.read_text()[-3000:]}"

    def sigkill(self) -> None:
        """Kill the main process and its pool children at once, like a machine crash."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown: the task in hand finishes
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Pool children left behind (none expected).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@contextmanager
def celery_worker(settings: Settings, log: Path, concurrency: int = 1) -> Iterator[WorkerProcess]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", f"--concurrency={concurrency}", "--loglevel=INFO"],
            cwd=REPO,
            env=worker_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = WorkerProcess(proc, log)
    try:
        yield worker
    finally:
        worker.stop()


@contextmanager
def sweeper_thread(
    settings: Settings, stale_after: timedelta = timedelta(minutes=2)
) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(
        target=run_sweeper, args=(settings, stop), kwargs={"stale_after": stale_after}, daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=20)
        assert not thread.is_alive(), "sweeper did not stop"


def node_settings(
    tmp_path: Path, database_url: str, broker_url: str, model_dir: Path, **kw: object
) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url=broker_url,
        model_dir=model_dir,
        sweeper_interval_seconds=0.5,
        **kw,  # type: ignore[arg-type]
    )


@contextmanager
def redis_node(
    tmp_path: Path, database_url: str, model_dir: Path, **kw: object
) -> Iterator[tuple[Settings, sessionmaker[Session], CeleryEnqueuer]]:
    """A real Redis, the node's settings for it, a migrated database and an enqueuer."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    settings = node_settings(tmp_path, database_url, redis.url, model_dir, **kw)
    enqueuer = CeleryEnqueuer(settings)
    try:
        yield settings, make_sessions(database_url), enqueuer
    finally:
        enqueuer.close()
        redis.stop()


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.slow  # needs redis-server installed (for its port)
def test_enqueue_fails_fast_when_broker_is_down(tmp_path: Path) -> None:
    """The SCP must answer a C-STORE even with Redis down: a send fails within seconds."""
    server = RedisServer(tmp_path / "redis")  # port chosen, server not started
    enqueuer = CeleryEnqueuer(Settings(broker_url=server.url, data_dir=tmp_path))
    msg = ClassifyInstance(instance_id=1, sop_instance_uid="1.2.3")
    try:
        t0 = time.monotonic()
        with pytest.raises(EnqueueError):
            enqueuer(msg)
        assert time.monotonic() - t0 < 3
        server.start()
        enqueuer(msg)
        assert enqueuer.queue_length() == 1
        server.stop()
        with pytest.raises(EnqueueError):
            enqueuer(msg)
        # Back on the same port (empty: no persistence): the stale connection is replaced.
        server.start()
        enqueuer(msg)
        assert enqueuer.queue_length() == 1
    finally:
        enqueuer.close()
        server.stop()


def test_classify_in_process_is_idempotent_and_records_decode_failures(
    tmp_path: Path, database_url: str, tiny_model_dir: Path, dicom_samples: Path
) -> None:
    """The task body without a broker: one result whatever the redeliveries; a file that
    cannot be decoded is failed with a reason and not attempted again; bad messages are
    refused."""
    settings = node_settings(tmp_path, database_url, "redis://127.0.0.1:1/0", tiny_model_dir)
    sessions = make_sessions(database_url)
    state = WorkerState(settings)
    good = record(sessions, require(dicom_samples / GOOD[0]), "1.2.826.0.1.1")
    bad = record(sessions, require(dicom_samples / BAD[0]), "1.2.826.0.1.1")
    good_msg = ClassifyInstance(
        instance_id=good.id, sop_instance_uid=good.sop_instance_uid
    ).model_dump()
    bad_msg = ClassifyInstance(
        instance_id=bad.id, sop_instance_uid=bad.sop_instance_uid
    ).model_dump()

    assert classify(state, good_msg) == "done"
    assert classify(state, good_msg) == "exists"  # redelivered message
    assert classify(state, bad_msg) == "failed"
    assert classify(state, bad_msg) == "failed"  # redelivered: not attempted again
    assert classify(state, {**good_msg, "schema_version": 1}) == "invalid"  # done: untouched
    assert classify(state, {**good_msg, "sop_instance_uid": "1.2.3.4"}) == "missing"

    # A file that killed its worker MAX_ATTEMPTS times is failed, not delivered for ever.
    crashing = record(sessions, require(dicom_samples / GOOD[1]), "1.2.826.0.1.1")
    with sessions() as session:
        row = session.get(Instance, crashing.id)
        assert row is not None
        row.attempts = MAX_ATTEMPTS
        session.commit()
    crash_msg = ClassifyInstance(
        instance_id=crashing.id,
        sop_instance_uid=crashing.sop_instance_uid,
    ).model_dump()
    assert classify(state, crash_msg) == "failed"

    assert result_counts(sessions) == {good.id: 1}
    with sessions() as session:
        c = session.get(Instance, crashing.id)
        assert c is not None and c.status == InstanceStatus.failed
        assert c.failure_reason and c.failure_reason.startswith("gave up after")
        g = session.get(Instance, good.id)
        b = session.get(Instance, bad.id)
        assert g is not None and b is not None
        assert g.status == InstanceStatus.done and g.attempts == 1
        assert b.status == InstanceStatus.failed and b.attempts == 1
        assert b.failure_reason and "decode" in b.failure_reason
        result = session.scalars(select(Result)).one()
        assert 0.0 <= result.probability <= 1.0
        assert result.model_version == "test-0" and result.model_uid == "2.25.1234567890"


def test_a_decoder_panic_fails_the_instance_at_once_with_its_reason(
    tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    """Corrupt RLE offsets make pylibjpeg-rle's Rust decoder panic (a BaseException that
    ``except Exception`` misses): the one classification path turns it into an ImageError,
    and the task body fails the instance on its first attempt with that reason, instead of
    the panic escaping the task and the instance being retried until "gave up after 5
    attempts ... the worker died"."""
    from model.inference import Classifier, ImageError
    from tests.test_preprocess_samples import write_corrupt_rle

    corrupt = write_corrupt_rle(tmp_path / "corrupt_rle.dcm")
    classifier = Classifier.load(tiny_model_dir)
    with pytest.raises(ImageError, match="decoder crashed on corrupt data"):
        classifier.classify_file(corrupt)

    row = _classify_one_file(tmp_path, database_url, tiny_model_dir, corrupt)
    assert row.status == InstanceStatus.failed and row.attempts == 1
    assert row.failure_reason is not None
    assert "cannot decode or preprocess" in row.failure_reason
    assert "decoder crashed on corrupt data" in row.failure_reason


def _classify_one_file(tmp_path: Path, database_url: str, model_dir: Path, path: Path) -> Instance:
    """Record ``path`` as the SCP would, run the classify task body on it once (it must end
    ``failed``), check no result was stored, and return the instance row."""
    settings = node_settings(tmp_path, database_url, "redis://127.0.0.1:1/0", model_dir)
    sessions = make_sessions(database_url)
    instance = record(sessions, path, "1.2.826.0.1.2")
    msg = ClassifyInstance(instance_id=instance.id, sop_instance_uid=instance.sop_instance_uid)
    assert classify(WorkerState(settings), msg.model_dump()) == "failed"
    assert result_counts(sessions) == {}
    with sessions() as session:
        row = session.get(Instance, instance.id)
        assert row is not None
        return row


def test_a_window_width_of_zero_is_failed_with_its_reason_not_classified(
    tmp_path: Path, database_url: str, tiny_model_dir: Path, dicom_samples: Path
) -> None:
    """A real radiograph with Window Width 0 (PS3.3 C.11.2.1.2 requires >= 1) used to be
    rendered without its window and classified "done"; now the one classification path
    refuses it naming the attribute, and the worker records that reason."""
    import pydicom

    from model.inference import Classifier, ImageError

    ds = pydicom.dcmread(require(dicom_samples / GOOD[0]))
    ds.WindowWidth = 0
    path = tmp_path / "window_width_0.dcm"
    ds.save_as(path)
    with pytest.raises(ImageError, match=r"invalid Window Width \(0028,1051\): 0.0"):
        Classifier.load(tiny_model_dir).classify_file(path)

    row = _classify_one_file(tmp_path, database_url, tiny_model_dir, path)
    assert row.status == InstanceStatus.failed
    assert row.failure_reason and "Window Width (0028,1051)" in row.failure_reason


def test_an_unusable_model_export_leaves_the_instance_queued_and_the_worker_serving(
    tmp_path: Path,
    database_url: str,
    tiny_model_dir: Path,
    dicom_samples: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A corrupt export is the model's fault, not the image's: the instance stays queued
    with no attempt spent, the log names the file, and once the export is repaired the same
    worker state classifies it."""
    import shutil

    from model.artifact import EXPORT_FILE

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    export_file = model_dir / EXPORT_FILE
    good_bytes = export_file.read_bytes()
    export_file.write_bytes(good_bytes[: len(good_bytes) // 2])
    settings = node_settings(tmp_path, database_url, "redis://127.0.0.1:1/0", model_dir)
    sessions = make_sessions(database_url)
    state = WorkerState(settings)
    inst = record(sessions, require(dicom_samples / GOOD[0]), "1.2.826.0.1.1")
    msg = ClassifyInstance(instance_id=inst.id, sop_instance_uid=inst.sop_instance_uid)

    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        assert classify(state, msg.model_dump()) == "no-model"
        assert classify(state, msg.model_dump()) == "no-model"  # redelivered: same answer
    assert str(export_file) in caplog.text and "sha256" in caplog.text
    with sessions() as session:
        row = session.get(Instance, inst.id)
        # still waiting (as recorded), no attempt spent, no result, no failure reason
        assert row is not None and row.status == inst.status and row.attempts == 0
        assert row.failure_reason is None

    export_file.write_bytes(good_bytes)  # the administrator puts the right file back
    assert classify(state, msg.model_dump()) == "done"
    assert result_counts(sessions) == {inst.id: 1}


def test_database_outage_is_transient_not_a_failure(tmp_path: Path, tiny_model_dir: Path) -> None:
    """With the database unreachable the task body raises a retryable error (the Celery task
    retries it with backoff) instead of recording anything about the instance."""
    url = f"postgresql+psycopg://triage@127.0.0.1:{free_port()}/triage?connect_timeout=2"
    state = WorkerState(node_settings(tmp_path, url, "redis://127.0.0.1:1/0", tiny_model_dir))
    msg = ClassifyInstance(instance_id=1, sop_instance_uid="1.2.3")
    with pytest.raises(RETRYABLE):
        classify(state, msg.model_dump())


@pytest.mark.slow  # starts redis-server
def test_sweeper_queues_pending_when_the_broker_comes_back(
    tmp_path: Path, dicom_samples: Path
) -> None:
    """Instances stored while Redis was down stay pending; the sweeper queues them once it is
    back, and resends queued ones whose message was lost (queue empty, no result)."""
    server = RedisServer(tmp_path / "redis")
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    settings = node_settings(tmp_path, url, server.url, tmp_path / "no-model-needed")
    sessions = make_sessions(url)
    enqueuer = CeleryEnqueuer(settings)
    try:
        sweeper = Sweeper(
            settings, sessions, enqueuer, stale_after=timedelta(0), pending_after=timedelta(0)
        )
        ids = [
            record(sessions, require(dicom_samples / name), "1.2.826.0.1.2").id for name in GOOD[:3]
        ]
        counts = sweeper.sweep_once()
        assert counts.broker_down and counts.queued == 0
        assert set(statuses(sessions).values()) == {InstanceStatus.pending}

        server.start()
        counts = sweeper.sweep_once()
        assert not counts.broker_down and counts.queued == 3
        assert set(statuses(sessions).values()) == {InstanceStatus.queued}
        assert enqueuer.queue_length() == 3
        # Messages still waiting: nothing is resent however old they are.
        assert sweeper.sweep_once().requeued == 0

        # Redis restarted without persistence: the three messages are gone.
        server.stop()
        server.start()
        assert enqueuer.queue_length() == 0
        counts = sweeper.sweep_once()
        assert counts.requeued == 3 and enqueuer.queue_length() == 3
        assert set(statuses(sessions)) == set(ids)
    finally:
        enqueuer.close()
        server.stop()


def _classified(sessions: sessionmaker[Session], instance_id: int) -> None:
    with sessions() as session:
        repository.save_result(
            session,
            instance_id,
            repository.Classification(
                probability=0.9,
                threshold=0.5,
                fracture=True,
                model_name="m",
                model_version="1",
                model_uid="2.25.1",
                preprocess_ms=1.0,
                inference_ms=1.0,
            ),
        )
        session.commit()


@pytest.mark.slow  # starts redis-server
def test_sweeper_queues_one_report_per_study_revision_and_pending_sends(
    tmp_path: Path, database_url: str, dicom_samples: Path
) -> None:
    """Reports are queued for quiet, settled studies once per revision (a slow report is not
    queued again); a later image makes a new revision, queued again; SRs waiting to be sent
    are queued when a destination is configured."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    settings = node_settings(
        tmp_path,
        database_url,
        redis.url,
        tmp_path / "no-model-needed",
        study_stable_seconds=0.0,
        sr_destination_host="127.0.0.1",
        sr_destination_port=104,
        sr_destination_ae_title="PACS",
    )
    sessions = make_sessions(database_url)
    enqueuer = CeleryEnqueuer(settings)
    try:
        sweeper = Sweeper(
            settings,
            sessions,
            enqueuer,
            pending_after=timedelta(0),
        )
        first = record(sessions, require(dicom_samples / GOOD[0]), "1.2.826.0.1.6")
        counts = sweeper.sweep_once()
        assert counts.queued == 1 and counts.reports == 0  # an image not classified yet
        _classified(sessions, first.id)
        counts = sweeper.sweep_once()
        assert counts.queued == 0 and counts.reports == 1
        assert sweeper.sweep_once().reports == 0  # same revision, report still on its way
        second = record(sessions, require(dicom_samples / GOOD[1]), "1.2.826.0.1.6")
        _classified(sessions, second.id)
        assert sweeper.sweep_once().reports == 1  # a new revision
        assert enqueuer.queue_length() == 3  # classify, report, report

        with sessions() as session:
            study = session.scalars(select(Study)).one()
            study.reported_revision = study.revision  # what the SR task records
            doc = SRDocument(
                study_id=study.id,
                study_revision=study.revision,
                sop_instance_uid="2.25.9",
                series_instance_uid="2.25.8",
                path=str(tmp_path / "sr.dcm"),
                created_at=repository.utcnow(),
                fracture=True,
                probability=0.9,
                instance_count=2,
                send_status="pending",
                send_attempts=0,
            )
            session.add(doc)
            session.flush()
            create_deliveries(session, doc, settings.all_destinations)
            session.commit()
        counts = sweeper.sweep_once()
        assert counts.reports == 0 and counts.sends == 1
        assert sweeper.sweep_once().sends == 0  # queued recently: not duplicated
        assert enqueuer.queue_length() == 4
    finally:
        enqueuer.close()
        redis.stop()


def test_a_message_of_another_schema_version_is_refused_and_recorded(
    tmp_path: Path, database_url: str, tiny_model_dir: Path, dicom_samples: Path, caplog: Any
) -> None:
    """A classify message from an older producer (schema version 1) is refused with a log
    line naming the task; the instance it names is failed with that reason (visible in the
    results) instead of waiting for ever; a redelivery changes nothing and raises nothing."""
    settings = node_settings(tmp_path, database_url, "redis://127.0.0.1:1/0", tiny_model_dir)
    sessions = make_sessions(database_url)
    state = WorkerState(settings)
    waiting = record(sessions, require(dicom_samples / GOOD[0]), "1.2.826.0.1.9")
    old = {"schema_version": 1, "instance_id": waiting.id, "path": waiting.storage_path}
    old["sop_instance_uid"] = waiting.sop_instance_uid

    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        assert classify(state, old) == "invalid"
        assert classify(state, old) == "invalid"  # redelivered: refused again, no crash
    assert "worker.classify_instance message of schema version 1 refused" in caplog.text
    with sessions() as session:
        rows = collect_results(session)
    assert [(r["status"], r["probability"]) for r in rows] == [("failed", None)]
    assert f"reads version {SCHEMA_VERSION}" in (rows[0]["failure_reason"] or "")
    assert result_counts(sessions) == {}
    # A current message for it is not classified either: the instance is settled as failed.
    current = ClassifyInstance(instance_id=waiting.id, sop_instance_uid=waiting.sop_instance_uid)
    assert classify(state, current.model_dump()) == "failed"


def test_a_study_report_that_cannot_be_built_is_failed_once_not_requeued(
    tmp_path: Path, database_url: str, tiny_model_dir: Path, dicom_samples: Path
) -> None:
    """A study whose Study Instance UID is not a UID by PS3.5 9.1 (recorded before the SCP
    refused such objects): the report task records the failure and its reason on the study
    (shown by the results), and the sweeper does not queue its report again."""
    with redis_node(tmp_path, database_url, tiny_model_dir, study_stable_seconds=0.0) as node:
        settings, sessions, enqueuer = node
        state = WorkerState(settings)
        sweeper = Sweeper(settings, sessions, enqueuer, report_resend_after_s=0.0)
        instance = record(sessions, require(dicom_samples / GOOD[0]), "1.2.826.0.01.7")
        _classified(sessions, instance.id)
        assert sweeper.sweep_once().reports == 1
        with sessions() as session:
            study = session.scalars(select(Study)).one()
        msg = ReportStudy(study_id=study.id, study_instance_uid=study.study_instance_uid)
        assert report(state, msg.model_dump()) == "failed"
        assert report(state, msg.model_dump()) == "exists"  # redelivered: settled

        with sessions() as session:
            rows = collect_results(session)
            assert session.scalars(select(SRDocument)).all() == []
        assert "not a valid UID (PS3.5 9.1)" in (rows[0]["report_failure"] or "")
        assert rows[0]["sr_path"] is None
        # Sweeps go on (and would resend a lost report at once): this one is not queued again.
        assert [sweeper.sweep_once().reports for _ in range(3)] == [0, 0, 0]
        assert enqueuer.queue_length() == 1  # the one report message, nothing more


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.slow  # redis-server and a Celery worker process
def test_worker_classifies_each_instance_once_and_reports_each_study_revision_once(
    tmp_path: Path, database_url: str, tiny_model_dir: Path, dicom_samples: Path
) -> None:
    """A real Celery worker and the sweeper: every queued instance gets exactly one result
    (a duplicated message included), every undecodable one is failed with a reason after one
    attempt, and each study gets one SR per revision, a new one when an image arrives later."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    settings = node_settings(
        tmp_path, database_url, redis.url, tiny_model_dir, study_stable_seconds=1.0
    )
    sessions = make_sessions(database_url)
    enqueuer = CeleryEnqueuer(settings)
    studies = ["1.2.826.0.1.3.1", "1.2.826.0.1.3.2"]
    try:
        with celery_worker(settings, tmp_path / "worker.log") as worker:
            for i, name in enumerate(GOOD + BAD):
                assert scp_store(sessions, enqueuer, require(dicom_samples / name), studies[i % 2])
            # The same message twice (a retried C-STORE answered late, a resend...).
            with sessions() as session:
                first = session.scalars(select(Instance).order_by(Instance.id)).first()
                assert first is not None
                queue_instance(session, enqueuer, first)
                session.commit()
            worker.wait_ready()
            with sweeper_thread(settings):
                took = wait_until(
                    lambda: _all_reported(sessions, 2), 120, "results and one SR per study"
                )
                print(
                    f"\n{len(GOOD + BAD)} instances classified and 2 studies reported "
                    f"{took:.1f} s after the worker was ready"
                )
                # A late image: the study gets a second SR (new revision), the other study none.
                late = record(sessions, require(dicom_samples / GOOD[0]), studies[0])
                with sessions() as session:
                    queue_instance(session, enqueuer, late)
                    session.commit()
                wait_until(lambda: _all_reported(sessions, 3), 60, "the late image's SR")
                time.sleep(2)  # a few more sweeps: nothing is reported twice

        counts = result_counts(sessions)
        with sessions() as session:
            instances = session.scalars(select(Instance)).all()
            good = [i for i in instances if Path(i.storage_path).name in GOOD]
            bad = [i for i in instances if Path(i.storage_path).name in BAD]
            assert len(good) == len(GOOD) + 1 and len(bad) == len(BAD)
            for inst in good:
                assert inst.status == InstanceStatus.done
                assert counts.get(inst.id) == 1, inst.storage_path
            for inst in bad:
                assert inst.status == InstanceStatus.failed, inst.storage_path
                assert inst.failure_reason, inst.storage_path
                assert inst.attempts == 1 and inst.id not in counts
            docs = session.scalars(select(SRDocument).order_by(SRDocument.id)).all()
            by_study: dict[int, list[SRDocument]] = {}
            for doc in docs:
                by_study.setdefault(doc.study_id, []).append(doc)
            revisions = [(d.study_id, d.study_revision) for d in docs]
            assert len(revisions) == len(set(revisions)) == 3
            for study in session.scalars(select(Study)):
                assert study.reported_revision == study.revision
            late_study = session.scalars(
                select(Study).where(Study.study_instance_uid == studies[0])
            ).one()
            old, new = by_study[late_study.id]
            assert old.superseded_by_id == new.id and new.superseded_by_id is None
            assert new.instance_count == old.instance_count + 1
    finally:
        enqueuer.close()
        redis.stop()


def _all_reported(sessions: sessionmaker[Session], sr_count: int) -> bool:
    with sessions() as session:
        unsettled = session.scalar(
            select(func.count(Instance.id)).where(
                Instance.status.in_([InstanceStatus.pending, InstanceStatus.queued])
            )
        )
        docs = session.scalar(select(func.count(SRDocument.id)))
    return unsettled == 0 and docs == sr_count
