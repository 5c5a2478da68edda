"""`fracture-triage results`, `--help` and the settings hand-over, via the console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from db import repository as repo
from db.models import SRDocument, Study
from db.session import make_engine, make_session_factory
from fracture_triage.settings import Settings
from fracture_triage.up import settings_environment
from tests.databases import migrated

STUDY_A = "1.2.826.0.1.3680043.8.498.100"
STUDY_B = "1.2.826.0.1.3680043.8.498.200"
CR = "1.2.840.10008.5.1.4.1.1.1"
PATIENT_NAME = "Testpatient^Wilhelmina"
PATIENT_ID = "PID-SECRET-4711"


def cli() -> list[str]:
    """The installed ``fracture-triage`` script (``pip install -e .`` puts it beside python)."""
    script = Path(sys.executable).with_name("fracture-triage")
    if script.is_file():
        return [str(script)]
    found = shutil.which("fracture-triage")
    if found is None:
        pytest.fail("the fracture-triage console script is not installed (pip install -e .)")
    return [found]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli(), *args], capture_output=True, text=True, timeout=timeout)


def _rec(study: str, n: int, failure: str | None = None) -> repo.ReceivedInstance:
    series = f"{study}.1"
    return repo.ReceivedInstance(
        sop_instance_uid=f"{series}.{n}",
        sop_class_uid=CR,
        study_instance_uid=study,
        series_instance_uid=series,
        storage_path=f"/objects/{series}.{n}.dcm",
        modality="CR",
        body_part_examined="HAND",
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        accession_number="ACC-99",
        failure_reason=failure,
    )


def populate(url: str) -> None:
    """Study A: two images classified, one failed, reported twice (the first SR superseded).
    Study B: one image still queued, no report."""
    migrated(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        a1, _ = repo.record_received(s, _rec(STUDY_A, 1))
        a2, _ = repo.record_received(s, _rec(STUDY_A, 2))
        repo.record_received(s, _rec(STUDY_A, 3, failure="Pixel Data shorter than declared"))
        b1, _ = repo.record_received(s, _rec(STUDY_B, 1))
        repo.mark_queued(s, b1.id)
        for inst, p in ((a1, 0.91), (a2, 0.12)):
            repo.save_result(
                s,
                inst.id,
                repo.Classification(
                    probability=p,
                    threshold=0.5,
                    fracture=p >= 0.5,
                    model_name="mnv2",
                    model_version="1.0",
                    model_uid="2.25.7",
                    preprocess_ms=3,
                    inference_ms=9,
                ),
            )
        study = s.scalars(select(Study).where(Study.study_instance_uid == STUDY_A)).one()
        docs = []
        for rev, path in ((1, "/sr/a-first.dcm"), (2, "/sr/a-second.dcm")):
            doc = SRDocument(
                study_id=study.id,
                study_revision=rev,
                sop_instance_uid=f"2.25.{rev}00",
                series_instance_uid="2.25.9",
                path=path,
                created_at=repo.utcnow(),
                fracture=True,
                probability=0.91,
                instance_count=3,
            )
            s.add(doc)
            s.flush()
            docs.append(doc)
        docs[0].superseded_by_id = docs[1].id
        s.commit()
    engine.dispose()


def _db_args(url: str, data_dir: Path) -> list[str]:
    if url.startswith("sqlite"):
        return ["--data-dir", str(data_dir)]
    return ["--database-url", url]


@pytest.mark.slow  # runs `fracture-triage results` four times
def test_results_json(database_url: str, tmp_path: Path) -> None:
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path / 'triage.db'}"
    populate(database_url)
    run = run_cli("results", "--json", *_db_args(database_url, tmp_path))
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    by_uid = {r["sop_instance_uid"]: r for r in rows}
    assert len(rows) == 4

    a1, a2, a3 = (by_uid[f"{STUDY_A}.1.{n}"] for n in (1, 2, 3))
    assert (a1["status"], a1["probability"], a1["fracture"]) == ("done", 0.91, True)
    assert (a2["status"], a2["probability"], a2["fracture"]) == ("done", 0.12, False)
    assert a3["status"] == "failed" and a3["probability"] is None
    assert a3["failure_reason"] == "Pixel Data shorter than declared"
    # Every image of study A points at the study's latest SR, not the superseded one.
    assert {r["sr_path"] for r in (a1, a2, a3)} == {"/sr/a-second.dcm"}
    assert all(r["study_instance_uid"] == STUDY_A for r in (a1, a2, a3))

    b1 = by_uid[f"{STUDY_B}.1.1"]
    assert (b1["status"], b1["probability"], b1["sr_path"]) == ("queued", None, None)
    for row in rows:
        assert {
            "sop_instance_uid",
            "study_instance_uid",
            "status",
            "probability",
            "fracture",
            "failure_reason",
            "sr_path",
        } <= row.keys()
    # Patient identifiers stay out unless asked for.
    for secret in (PATIENT_NAME, PATIENT_ID, "ACC-99"):
        assert secret not in run.stdout and secret not in run.stderr

    one = run_cli("results", "--json", "--study", STUDY_B, *_db_args(database_url, tmp_path))
    assert [json.loads(x)["sop_instance_uid"] for x in one.stdout.splitlines()] == [
        f"{STUDY_B}.1.1"
    ]
    with_patient = run_cli(
        "results", "--json", "--include-patient", *_db_args(database_url, tmp_path)
    )
    assert json.loads(with_patient.stdout.splitlines()[0])["patient_name"] == PATIENT_NAME


def test_results_table(tmp_path: Path) -> None:
    populate(f"sqlite:///{tmp_path / 'triage.db'}")
    run = run_cli("results", "--data-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["STATUS", "PROB", "DECISION"]
    assert any(line.startswith("done") and "0.910  fracture" in line for line in lines)
    assert any(line.startswith("done") and "0.120  no fracture" in line for line in lines)
    assert any(line.startswith("failed") and "Pixel Data shorter" in line for line in lines)
    assert (
        "4 instances in 2 studies: 2 classified (1 fracture, 0 doubt, 1 no fracture), 1 failed"
        in lines[-1]
    )
    assert PATIENT_NAME not in run.stdout


def test_results_without_a_database_fails_clearly(tmp_path: Path) -> None:
    run = run_cli("results", "--data-dir", str(tmp_path / "nowhere"))
    assert run.returncode == 1
    assert "no database" in run.stderr
    assert not (tmp_path / "nowhere").exists()  # a query creates nothing


def test_help_lists_every_command() -> None:
    run = run_cli("--help")
    assert run.returncode == 0, run.stderr
    for command in (
        "up",
        "scp",
        "worker",
        "sweeper",
        "results",
        "api",
        "echo",
        "db",
        "train",
        "evaluate",
        "classify",
    ):
        assert f"    {command}" in run.stdout


def test_settings_survive_the_hand_over_to_child_processes(tmp_path: Path) -> None:
    """``up`` passes its Settings to each role as FRACTURE_TRIAGE_* variables."""
    settings = Settings(
        data_dir=tmp_path,
        dicom_port=4242,
        allowed_calling_aets=["MOD1", "PACS"],
        study_stable_seconds=2.5,
        sr_destination_host="127.0.0.1",
        sr_destination_port=104,
        sr_destination_ae_title="ORTHANC",
        # Never None in `up` (it refuses to start without a model); an unset variable would
        # give the child the shipped model instead.
        model_dir=tmp_path / "model",
    )
    env = settings_environment(settings)
    code = (
        "import json; from fracture_triage.settings import Settings; "
        "print(Settings().model_dump_json())"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert Settings.model_validate_json(run.stdout) == settings
