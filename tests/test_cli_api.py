"""``fracture-triage api``: the read-only HTTP query API over a populated database."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from db import repository as repo
from db.session import make_engine, make_session_factory
from tests.servers import free_port, wait_for_port
from tests.test_cli_results import PATIENT_NAME, STUDY_A, STUDY_B, _rec, cli, populate

STUDY_C = "1.2.826.0.1.3680043.8.498.300"


def get(port: int, path: str, method: str = "GET") -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_results_worklist_and_health(database_url: str, tmp_path: Path) -> None:
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path / 'triage.db'}"
    populate(database_url)
    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:  # a third study: classified, no fracture
        inst, _ = repo.record_received(s, _rec(STUDY_C, 1))
        repo.save_result(
            s,
            inst.id,
            repo.Classification(
                probability=0.2,
                threshold=0.5,
                fracture=False,
                model_name="mnv2",
                model_version="1.0",
                model_uid="2.25.7",
                preprocess_ms=1,
                inference_ms=1,
            ),
        )
        s.commit()
    engine.dispose()

    port = free_port()
    db_args = (
        ["--data-dir", str(tmp_path)]
        if database_url.startswith("sqlite")
        else ["--database-url", database_url]
    )
    proc = subprocess.Popen(
        [*cli(), "api", "--http-port", str(port), *db_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, timeout=60)
        status, health = get(port, "/health")
        assert (status, health["status"], health["storage"]["status"]) == (200, "ok", "ok")

        status, rows = get(port, "/results")
        assert status == 200 and len(rows) == 5
        assert {r["status"] for r in rows} == {"done", "failed", "queued"}
        assert PATIENT_NAME not in json.dumps(rows)

        status, rows = get(port, f"/results?study={STUDY_B}")
        assert [r["study_instance_uid"] for r in rows] == [STUDY_B]

        status, studies = get(port, "/worklist")
        assert status == 200
        # Flagged first, then by probability, unclassified last.
        assert [s["study_instance_uid"] for s in studies] == [STUDY_A, STUDY_C, STUDY_B]
        a = studies[0]
        assert (a["instances"], a["classified"], a["failed"], a["fracture"]) == (3, 2, 1, True)
        assert a["max_probability"] == 0.91 and a["reported"] is True
        assert studies[2]["waiting"] == 1 and studies[2]["fracture"] is None
        assert PATIENT_NAME not in json.dumps(studies)
        _, with_patient = get(port, "/worklist?include_patient=1")
        assert with_patient[0]["patient_name"] == PATIENT_NAME

        assert get(port, "/nothing")[0] == 404
        assert get(port, "/results", method="POST")[0] == 405
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        proc.stderr.close()
    assert PATIENT_NAME not in log
