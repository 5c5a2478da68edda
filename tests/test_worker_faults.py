"""Faults with real parts: a Celery worker killed with SIGKILL in the middle of a task, and
redis-server stopped during a burst of stores. Every acknowledged instance still ends with
exactly one result."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, InstanceStatus
from tests.conftest import require
from tests.servers import RedisServer
from tests.test_worker import (
    BAD,
    GOOD,
    celery_worker,
    make_sessions,
    node_settings,
    record,
    result_counts,
    scp_store,
    statuses,
    sweeper_thread,
    wait_until,
)
from worker.celery_app import UNACKED_RESTORE_INTERVAL_S, VISIBILITY_TIMEOUT_S
from worker.queue import CeleryEnqueuer, queue_instance

#: Every test here starts redis-server and Celery worker processes.
pytestmark = pytest.mark.slow

#: The largest sample (4 MB JPEG 2000, 2128 x 2000): the task stays busy long enough to kill.
BIG = "DX_chest_MONO1_12b_J2K_lossless_Canon.dcm"
#: Stores per phase of the burst (broker up, down, up again).
PER_PHASE = 5


def _attempts(sessions: sessionmaker[Session], instance_id: int) -> int:
    with sessions() as session:
        instance = session.get(Instance, instance_id)
        assert instance is not None
        return instance.attempts


def _pool_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_sigkill_mid_task_reruns_the_task_once(
    tmp_path: Path, tiny_model_dir: Path, dicom_samples: Path
) -> None:
    """Kill the pool child mid-task (the worker requeues at once), then kill the whole worker
    mid-task (the broker restores the message after its visibility timeout, to a new
    worker): the task re-runs each time and the instance ends with one result."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    settings = node_settings(tmp_path, url, redis.url, tiny_model_dir)
    sessions = make_sessions(url)
    enqueuer = CeleryEnqueuer(settings)
    instance = record(sessions, require(dicom_samples / BIG), "1.2.826.0.1.4")
    try:
        with celery_worker(settings, tmp_path / "worker1.log") as worker:
            worker.wait_ready()
            with sessions() as session:
                assert queue_instance(session, enqueuer, instance)
                session.commit()
            # attempts is committed when the task starts, before the model loads (~10 s).
            # Polled often and killed before anything else is checked: the re-run in a new
            # child (the tiny model loads at once) can end within a second.
            wait_until(lambda: _attempts(sessions, instance.id) >= 1, 60, "task start", 0.02)
            children = _pool_children(worker.proc.pid)
            assert len(children) == 1
            subprocess.run(["kill", "-KILL", str(children[0])], check=True)
            t_child = time.monotonic()
            assert result_counts(sessions) == {}, "the task finished before the child's kill"
            # task_reject_on_worker_lost: the main process requeues, a new child runs it.
            wait_until(
                lambda: _attempts(sessions, instance.id) >= 2, 60, "re-run in new child", 0.02
            )
            worker.sigkill()
            t_kill = time.monotonic()
            child_rerun = t_kill - t_child
        assert result_counts(sessions) == {}, "the task finished before the kill"
        assert _attempts(sessions, instance.id) == 2

        with celery_worker(settings, tmp_path / "worker2.log") as worker:
            worker.wait_ready()
            wait_until(lambda: _attempts(sessions, instance.id) >= 3, 60, "re-run after crash")
            rerun = time.monotonic() - t_kill
            wait_until(lambda: bool(result_counts(sessions)), 60, "result")
            done = time.monotonic() - t_kill
            time.sleep(1)  # nothing else arrives
        print(
            f"\nre-run after SIGKILL of the pool child: {child_rerun:.1f} s; after SIGKILL of "
            f"the whole worker: {rerun:.1f} s (visibility timeout {VISIBILITY_TIMEOUT_S} s, "
            f"restore every {UNACKED_RESTORE_INTERVAL_S} s), result {done:.1f} s after the kill"
        )
        assert rerun < 30
        assert result_counts(sessions) == {instance.id: 1}
        assert statuses(sessions) == {instance.id: InstanceStatus.done}
        assert _attempts(sessions, instance.id) == 3
    finally:
        enqueuer.close()
        redis.stop()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_redis_stopped_during_a_burst_loses_nothing(
    tmp_path: Path, database_url: str, tiny_model_dir: Path, dicom_samples: Path
) -> None:
    """Stores keep being acknowledged while Redis is down (instances left pending); queued
    messages that Redis lost when it stopped are resent; the worker reconnects. Every
    instance ends with exactly one result (or a recorded failure for the bad file)."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    settings = node_settings(tmp_path, database_url, redis.url, tiny_model_dir)
    sessions = make_sessions(database_url)
    enqueuer = CeleryEnqueuer(settings)
    files = [require(dicom_samples / name) for name in (*GOOD, BAD[0])]
    queued: list[bool] = []
    try:
        with celery_worker(settings, tmp_path / "worker.log") as worker:
            worker.wait_ready()
            with sweeper_thread(settings, stale_after=timedelta(seconds=3)):
                for phase in ("up", "down", "up again"):
                    if phase == "down":
                        redis.stop()
                    elif phase == "up again":
                        redis.start()
                        t_back = time.monotonic()
                    for _ in range(PER_PHASE):
                        queued.append(
                            scp_store(
                                sessions, enqueuer, files[len(queued) % len(files)], "1.2.826.0.1.5"
                            )
                        )
                        time.sleep(0.05)
                wait_until(
                    lambda: (
                        not {InstanceStatus.pending, InstanceStatus.queued}
                        & set(statuses(sessions).values())
                    ),
                    120,
                    "every instance settled",
                )
                settled = time.monotonic() - t_back
            assert worker.proc.poll() is None, "the worker did not survive the outage"
        print(f"\nall {3 * PER_PHASE} instances settled {settled:.1f} s after Redis came back")
        n = PER_PHASE
        assert queued[:n] == [True] * n
        assert queued[n : 2 * n] == [False] * n  # acknowledged anyway: pending in the database
        counts = result_counts(sessions)
        with sessions() as session:
            instances = session.scalars(select(Instance)).all()
        assert len(instances) == 3 * PER_PHASE
        for inst in instances:
            if Path(inst.storage_path).name in BAD:
                assert inst.status == InstanceStatus.failed and inst.failure_reason
                assert inst.id not in counts
            else:
                assert inst.status == InstanceStatus.done
                assert counts[inst.id] == 1
    finally:
        enqueuer.close()
        redis.stop()


@pytest.mark.timeout(300)
def test_a_frozen_redis_does_not_stall_stores_or_the_worker(
    tmp_path: Path, tiny_model_dir: Path, dicom_samples: Path
) -> None:
    """Redis frozen (SIGSTOP: TCP stays open, nothing answers) for 30 s, as a stalled host
    looks: every store during the stall is acknowledged within the enqueue's short timeout
    (left pending for the sweeper), and once Redis answers again the same worker and sweeper
    settle every instance within seconds: one result each, none left queued."""
    import os
    import signal

    database_url = f"sqlite:///{tmp_path / 'triage.db'}"
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    assert redis.proc is not None
    settings = node_settings(tmp_path, database_url, redis.url, tiny_model_dir)
    sessions = make_sessions(database_url)
    enqueuer = CeleryEnqueuer(settings)
    files = [require(dicom_samples / name) for name in GOOD]
    store_seconds: list[float] = []
    try:
        with celery_worker(settings, tmp_path / "worker.log") as worker:
            worker.wait_ready()
            with sweeper_thread(settings, stale_after=timedelta(seconds=5)):
                for i in range(PER_PHASE):
                    scp_store(sessions, enqueuer, files[i % len(files)], "1.2.826.0.1.6")
                os.kill(redis.proc.pid, signal.SIGSTOP)
                try:
                    t_stop = time.monotonic()
                    while time.monotonic() - t_stop < 30:
                        t0 = time.monotonic()
                        scp_store(sessions, enqueuer, files[0], "1.2.826.0.1.6")
                        store_seconds.append(time.monotonic() - t0)
                        time.sleep(1)
                finally:
                    os.kill(redis.proc.pid, signal.SIGCONT)
                t_back = time.monotonic()
                for i in range(PER_PHASE):
                    scp_store(sessions, enqueuer, files[i % len(files)], "1.2.826.0.1.6")
                wait_until(
                    lambda: (
                        not {InstanceStatus.pending, InstanceStatus.queued}
                        & set(statuses(sessions).values())
                    ),
                    120,
                    "every instance settled after the stall",
                )
                settled = time.monotonic() - t_back
            assert worker.proc.poll() is None, "the worker did not survive the stall"
        print(
            f"\nstores during the stall: longest {max(store_seconds):.1f} s; all settled "
            f"{settled:.1f} s after Redis answered again"
        )
        # a sender must get its answer well within its own DIMSE timeout (dcmtk: 30 s)
        assert max(store_seconds) < 5
        counts = result_counts(sessions)
        assert set(counts.values()) == {1}
        assert len(counts) == len(statuses(sessions))
    finally:
        enqueuer.close()
        redis.stop()


def _classified_lines(log: Path) -> Counter[str]:
    """SOP Instance UID -> how many times the worker log says it classified it."""
    found = re.findall(r"instance (\S+) classified: p=", log.read_text(errors="replace"))
    return Counter(found)


@pytest.mark.timeout(300)
def test_work_stranded_by_a_redis_kill_and_stall_is_requeued_once_and_classified_once(
    tmp_path: Path, tiny_model_dir: Path, dicom_samples: Path
) -> None:
    """Redis SIGKILLed and restarted empty (the queued instances' messages are lost), then
    more stores (the queue is never empty again before the worker starts), then Redis frozen
    (SIGSTOP) for 8 s while stores go on (their publishes time out, yet reach Redis when it
    thaws, some twice). The sweeper re-sends every lost message although the queue is not
    empty, and adopts the pending instances whose message arrived after all; then a real
    Celery worker with two pool children classifies every acknowledged instance exactly once
    (one attempt, one result, one "classified" line each)."""
    import os
    import signal

    database_url = f"sqlite:///{tmp_path / 'triage.db'}"
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    settings = node_settings(tmp_path, database_url, redis.url, tiny_model_dir)
    sessions = make_sessions(database_url)
    enqueuer = CeleryEnqueuer(settings)
    files = [require(dicom_samples / name) for name in GOOD]
    study = "1.2.826.0.1.7"
    log = tmp_path / "worker.log"
    try:
        with sweeper_thread(settings, stale_after=timedelta(seconds=3)):
            for i in range(6):
                assert scp_store(sessions, enqueuer, files[i % len(files)], study)
            redis.proc.kill()  # type: ignore[union-attr]
            redis.proc.wait(10)  # type: ignore[union-attr]
            redis.start()  # same port, empty: the 6 messages are gone
            for i in range(4):
                assert scp_store(sessions, enqueuer, files[i % len(files)], study)
            assert redis.proc is not None
            os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                for i in range(4):
                    assert not scp_store(sessions, enqueuer, files[i % len(files)], study)
                    time.sleep(1)
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
            every = set(statuses(sessions))
            assert len(every) == 14
            # No worker yet: the queue holds the 4 stored after the restart all along.
            wait_until(
                lambda: (
                    every <= (enqueuer.held_instances() or set())
                    and set(statuses(sessions).values()) == {InstanceStatus.queued}
                ),
                60,
                "every acknowledged instance queued and held by the broker",
            )
            with celery_worker(settings, log, concurrency=2) as worker:
                worker.wait_ready()
                wait_until(
                    lambda: set(statuses(sessions).values()) == {InstanceStatus.done},
                    120,
                    "every instance classified",
                )
                time.sleep(3)  # duplicate messages still queued run now: they must do nothing
        assert result_counts(sessions) == dict.fromkeys(every, 1)
        assert {_attempts(sessions, i) for i in every} == {1}
        lines = _classified_lines(log)
        assert len(lines) == 14 and set(lines.values()) == {1}, lines
    finally:
        enqueuer.close()
        redis.stop()
