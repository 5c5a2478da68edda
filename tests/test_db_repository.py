"""The repository operations on a migrated SQLite and PostgreSQL database.

Each test builds the schema with the Alembic migrations (not ``create_all``), so these also
show that the migrated schema is the one the code needs.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import identity, reports
from db import repository as repo
from db.models import Instance, InstanceStatus, Result, Series, SRDocument, Study
from db.session import in_transaction

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"


def received(n: int, study: str = STUDY, series: str = SERIES, **kw: str) -> repo.ReceivedInstance:
    return repo.ReceivedInstance(
        sop_instance_uid=f"{series}.{n}",
        sop_class_uid=CR,
        study_instance_uid=study,
        series_instance_uid=series,
        storage_path=f"/data/objects/{study}/{series}/{n}.dcm",
        calling_ae_title="MODALITY",
        modality="CR",
        patient_id="PID-7",
        patient_name="Doe^Jane",
        **kw,
    )


def classification(p: float, version: str = "v1") -> repo.Classification:
    return repo.Classification(
        probability=p,
        threshold=0.5,
        fracture=p >= 0.5,
        model_name="m",
        model_version=version,
        model_uid="2.25.1",
        preprocess_ms=1.0,
        inference_ms=2.0,
    )


def test_record_received_stores_once(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        first, new = repo.record_received(s, received(1))
        assert new and first.status == InstanceStatus.pending
        s.commit()
    with sessions() as s:
        again, new = repo.record_received(s, received(1))
        assert not new and again.id == first.id
        assert s.scalar(select(func.count(Instance.id))) == 1
        study = s.scalars(select(Study)).one()
        # Only a new instance changes the study.
        assert study.revision == 1
        assert study.patient_name == "Doe^Jane"
    with sessions() as s:
        second, new = repo.record_received(s, received(2))
        s.commit()
        assert new and second.id != first.id
        assert s.scalar(select(func.count(Study.id))) == 1
        assert s.scalar(select(func.count(Series.id))) == 1
        assert s.scalars(select(Study)).one().revision == 2


def test_record_received_with_a_failure_reason_is_failed(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        inst, _ = repo.record_received(s, replace(received(1), failure_reason="no Pixel Data"))
        assert inst.status == InstanceStatus.failed
        assert inst.failure_reason == "no Pixel Data"
        assert repo.pending_instances(s) == []


def test_concurrent_duplicates_are_recorded_once(sessions: sessionmaker[Session]) -> None:
    """Four associations deliver the same new instance at the same moment."""
    barrier = threading.Barrier(4)
    outcomes: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            barrier.wait(timeout=10)
            # The SCP's unit of work: a lost insert race is rolled back and run again.
            inst, new = in_transaction(sessions, lambda s: repo.record_received(s, received(1)))
            outcomes.append((inst.id, new))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len({i for i, _ in outcomes}) == 1
    assert sum(new for _, new in outcomes) == 1
    with sessions() as s:
        assert s.scalar(select(func.count(Instance.id))) == 1


def test_save_result_is_idempotent(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        inst, _ = repo.record_received(s, received(1))
        s.commit()
    with sessions() as s:
        first = repo.save_result(s, inst.id, classification(0.8))
        s.commit()
    with sessions() as s:
        # A redelivered task computes again (maybe a slightly different number): one row stays.
        again = repo.save_result(s, inst.id, classification(0.3))
        assert again.id == first.id and again.probability == pytest.approx(0.8)
        assert s.scalar(select(func.count(Result.id))) == 1
        assert s.get(Instance, inst.id).status == InstanceStatus.done  # type: ignore[union-attr]
    with sessions() as s:
        # A new model version is a new result.
        repo.save_result(s, inst.id, classification(0.1, version="v2"))
        assert s.scalar(select(func.count(Result.id))) == 2


def test_repository_functions_leave_the_commit_to_the_caller(
    sessions: sessionmaker[Session],
) -> None:
    """A unit of work that is not committed leaves nothing behind; one commit keeps it all."""
    with sessions() as s:
        inst, _ = repo.record_received(s, received(1))
        repo.mark_queued(s, inst.id)
        repo.save_result(s, inst.id, classification(0.7))
        s.rollback()
    with sessions() as s:
        assert s.scalar(select(func.count(Instance.id))) == 0
        assert s.scalar(select(func.count(Study.id))) == 0
    with sessions() as s:
        inst, _ = repo.record_received(s, received(1))
        repo.save_result(s, inst.id, classification(0.7))
        s.commit()
    with sessions() as s:
        row = s.get(Instance, inst.id)
        assert row is not None and row.status == InstanceStatus.done
        assert s.scalar(select(func.count(Result.id))) == 1


def test_queue_bookkeeping(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        a, _ = repo.record_received(s, received(1))
        b, _ = repo.record_received(s, received(2))
        assert [i.id for i in repo.pending_instances(s)] == [a.id, b.id]
        repo.mark_queued(s, a.id)
        assert [i.id for i in repo.pending_instances(s)] == [b.id]
        assert repo.stale_queued_instances(s, timedelta(hours=1)) == []
        assert [i.id for i in repo.stale_queued_instances(s, timedelta(0))] == [a.id]
        repo.mark_failed(s, b.id, "cannot decode")
        failed = s.get(Instance, b.id)
        assert failed is not None and failed.status == InstanceStatus.failed
        assert failed.failure_reason == "cannot decode"


def _ready(sessions: sessionmaker[Session], stable: float) -> list[str]:
    with sessions() as s:
        return [st.study_instance_uid for st in repo.studies_ready_to_report(s, stable)]


def test_studies_ready_to_report(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        a, _ = repo.record_received(s, received(1))
        b, _ = repo.record_received(s, received(2))
        s.commit()
    # Unsettled (pending, then queued) instances hold the report back.
    assert _ready(sessions, 0) == []
    with sessions() as s:
        repo.mark_queued(s, a.id)
        repo.save_result(s, b.id, classification(0.9))
        s.commit()
    assert _ready(sessions, 0) == []
    with sessions() as s:
        repo.mark_failed(s, a.id, "cannot decode")  # failed counts as settled
        s.commit()
    assert _ready(sessions, 0) == [STUDY]
    # Not yet stable: the newest image arrived less than an hour ago.
    assert _ready(sessions, 3600) == []

    with sessions() as s:
        study = s.scalars(select(Study)).one()
        study.reported_revision = study.revision
        s.commit()
    assert _ready(sessions, 0) == []

    # Another image later: the study is reported again once it is settled.
    with sessions() as s:
        c, _ = repo.record_received(s, received(3))
        s.commit()
    assert _ready(sessions, 0) == []
    with sessions() as s:
        repo.save_result(s, c.id, classification(0.2))
        s.commit()
    assert _ready(sessions, 0) == [STUDY]

    # A report that cannot be built settles the revision: not ready again until a new image.
    with sessions() as s:
        study = s.scalars(select(Study)).one()
        reports.mark_report_failed(s, study.id, study.revision, "no way to build it")
        s.commit()
    assert _ready(sessions, 0) == []
    with sessions() as s:
        assert s.scalars(select(Study)).one().report_failure == "no way to build it"
        d, _ = repo.record_received(s, received(4))
        repo.mark_failed(s, d.id, "cannot decode")
        s.commit()
    assert _ready(sessions, 0) == [STUDY]


def test_latest_report_skips_superseded(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        inst, _ = repo.record_received(s, received(1))
        study = s.scalars(select(Study)).one()
        old = SRDocument(
            study_id=study.id,
            study_revision=1,
            sop_instance_uid="2.25.10",
            series_instance_uid="2.25.11",
            path="/sr/old.dcm",
            created_at=repo.utcnow(),
            fracture=False,
            probability=0.1,
            instance_count=1,
        )
        s.add(old)
        s.commit()
        assert repo.latest_report(s, study.id) is old
        new = SRDocument(
            study_id=study.id,
            study_revision=2,
            sop_instance_uid="2.25.12",
            series_instance_uid="2.25.13",
            path="/sr/new.dcm",
            created_at=repo.utcnow(),
            fracture=True,
            probability=0.9,
            instance_count=2,
        )
        s.add(new)
        s.flush()
        old.superseded_by_id = new.id
        s.commit()
        latest = repo.latest_report(s, study.id)
        assert latest is not None and latest.path == "/sr/new.dcm"
        assert [i.id for i in repo.study_instances(s, study.id)] == [inst.id]


# --- identity: a series belongs to one study, a study to one patient (db.identity) -----------

OTHER_STUDY = "1.2.826.0.1.3680043.8.498.2"
SERIES_2 = "1.2.826.0.1.3680043.8.498.1.2"
SERIES_3 = "1.2.826.0.1.3680043.8.498.1.3"


def of_patient(
    n: int, patient_id: str | None, study: str = STUDY, series: str = SERIES
) -> repo.ReceivedInstance:
    return replace(received(n, study=study, series=series), patient_id=patient_id)


def _record(sessions: sessionmaker[Session], rec: repo.ReceivedInstance) -> Instance:
    return in_transaction(sessions, lambda s: repo.record_received(s, rec))[0]


def _stored(sessions: sessionmaker[Session]) -> dict[str, tuple[str, str | None, list[str]]]:
    """Study UID -> (series UIDs joined, Patient ID, SOP Instance UIDs of its instances)."""
    out = {}
    with sessions() as s:
        for study in s.scalars(select(Study)).all():
            series = ",".join(sorted(x.series_instance_uid for x in study.series))
            sops = [i.sop_instance_uid for i in repo.study_instances(s, study.id)]
            out[study.study_instance_uid] = (series, study.patient_id, sops)
    return out


def test_series_of_another_study_is_refused_not_merged(sessions: sessionmaker[Session]) -> None:
    """Patient B's image (its own study) reusing the Series Instance UID of patient A's study is
    refused: A's study keeps exactly its own instances, B's study is not created."""
    a = _record(sessions, received(1))
    b = of_patient(2, "PID-9", study=OTHER_STUDY, series=SERIES)
    with pytest.raises(identity.SeriesInAnotherStudy) as refused:
        _record(sessions, b)
    assert _stored(sessions) == {STUDY: (SERIES, "PID-7", [a.sop_instance_uid])}
    # UIDs only: the log line and the Error Comment name no patient.
    assert SERIES in refused.value.detail and OTHER_STUDY in refused.value.detail
    assert "PID" not in refused.value.detail + refused.value.comment
    assert len(refused.value.comment) <= 64
    with sessions() as s:  # the read-only check the SCP makes before writing agrees
        with pytest.raises(identity.SeriesInAnotherStudy):
            identity.check_stored(
                s, study_uid=OTHER_STUDY, series_uid=SERIES, patient_id=b.patient_id
            )
        assert repo.find_instance(s, b.sop_instance_uid) is None


def test_study_of_another_patient_is_refused(sessions: sessionmaker[Session]) -> None:
    a = _record(sessions, received(1))
    with pytest.raises(identity.StudyOfAnotherPatient) as refused:
        _record(sessions, of_patient(2, "PID-9", series=SERIES_2))
    assert "PID" not in refused.value.detail + refused.value.comment
    assert _stored(sessions) == {STUDY: (SERIES, "PID-7", [a.sop_instance_uid])}
    with sessions() as s, pytest.raises(identity.StudyOfAnotherPatient):
        identity.check_stored(s, study_uid=STUDY, series_uid=SERIES_2, patient_id="PID-9")


def test_an_absent_or_empty_patient_id_contradicts_nothing(
    sessions: sessionmaker[Session],
) -> None:
    """Unknown (absent or empty) on either side agrees; the first known Patient ID is kept and
    compared from then on, without surrounding spaces and case-sensitively."""
    _record(sessions, of_patient(1, None))
    _record(sessions, of_patient(2, ""))
    assert _stored(sessions)[STUDY][1] is None
    _record(sessions, of_patient(3, " PID-7 "))  # sets it
    _record(sessions, of_patient(4, None))
    _record(sessions, of_patient(5, "PID-7", series=SERIES_2))
    assert _stored(sessions)[STUDY][1] == "PID-7"
    for n, other in ((6, "PID-9"), (7, "pid-7")):
        with pytest.raises(identity.StudyOfAnotherPatient):
            _record(sessions, of_patient(n, other))
    assert len(_stored(sessions)[STUDY][2]) == 5


def _race(
    sessions: sessionmaker[Session], first: repo.ReceivedInstance, second: repo.ReceivedInstance
) -> BaseException | None:
    """Record ``first`` and hold its transaction open while another thread records ``second``;
    commit ``first`` and return what the second unit of work raised."""
    raised: list[BaseException] = []

    def other() -> None:
        try:
            _record(sessions, second)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    with sessions() as s:
        repo.record_received(s, first)  # flushed: rows written (and locked), not committed
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(1.0)  # the other writer waits for this transaction (row/unique/db lock)
        s.commit()
    thread.join(30)
    assert not thread.is_alive()
    return raised[0] if raised else None


def test_concurrent_patient_ids_for_a_study_without_one_only_one_passes(
    sessions: sessionmaker[Session],
) -> None:
    """A study stored without Patient ID, two associations bring different ones at once: the
    conditional update lets exactly one through (a read-then-write check would let both)."""
    _record(sessions, of_patient(1, None))
    exc = _race(
        sessions, of_patient(2, "PID-7", series=SERIES_2), of_patient(3, "PID-9", series=SERIES_3)
    )
    assert isinstance(exc, identity.StudyOfAnotherPatient)
    stored = _stored(sessions)[STUDY]
    assert stored[:2] == (f"{SERIES},{SERIES_2}", "PID-7")


def test_concurrent_new_series_in_two_studies_only_one_passes(
    sessions: sessionmaker[Session],
) -> None:
    exc = _race(sessions, received(1), of_patient(2, "PID-9", study=OTHER_STUDY))
    assert isinstance(exc, identity.SeriesInAnotherStudy)
    assert list(_stored(sessions)) == [STUDY]


def test_one_of_four_concurrent_deliveries_claims_the_attempt(
    sessions: sessionmaker[Session],
) -> None:
    """Four deliveries of one instance claim its attempt at the same moment (SQLite and
    PostgreSQL): exactly one wins; a later one takes over only when the attempt is over, and
    a recorded result ends the claim."""
    with sessions() as s:
        inst, _ = repo.record_received(s, received(1))
        s.commit()
        instance_id = inst.id
    barrier = threading.Barrier(4)
    won: list[int | None] = []

    def claim(owner: str) -> None:
        barrier.wait(timeout=10)

        def attempt(s: Session) -> int | None:
            return repo.claim_attempt(s, instance_id, owner, lambda _o, _t: False)

        try:
            won.append(in_transaction(sessions, attempt))
        except Exception:  # noqa: BLE001 - SQLite refuses a write from a stale snapshot
            won.append(None)

    threads = [threading.Thread(target=claim, args=(f"a.b.{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(won, key=lambda w: w or 0) == [None, None, None, 1]
    with sessions() as s:
        assert repo.claim_attempt(s, instance_id, "x.y.1", lambda _o, _t: False) is None
        assert repo.claim_attempt(s, instance_id, "x.y.1", lambda _o, _t: True) == 2
        repo.save_result(s, instance_id, classification(0.9))
        s.commit()
        found = s.get(Instance, instance_id)
        assert found is not None and found.attempt_owner is None and found.attempts == 2


def test_an_attempt_is_over_when_its_owner_no_longer_runs() -> None:
    """``worker.claims``: a live pool child's claim holds, a dead one's does not, an old one
    does not (another host's worker cannot be seen)."""
    import subprocess
    from datetime import UTC, datetime

    from worker import claims

    now = datetime.now(UTC)
    mine = claims.owner()
    host, space, _pid = mine.split(".")
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not claims.attempt_over(f"{host}.{space}.{child.pid}", now)
        assert claims.attempt_over(mine, now)  # this process: its earlier attempt ended
        assert not claims.attempt_over(f"ffffffff.{space}.1", now)  # another host
        old = now - claims.ATTEMPT_LEASE - timedelta(seconds=1)
        assert claims.attempt_over(f"ffffffff.{space}.1", old)
    finally:
        child.kill()
        child.wait()
    assert claims.attempt_over(f"{host}.{space}.{child.pid}", now)
