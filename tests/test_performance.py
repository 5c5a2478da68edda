"""The model's figures at the site: Wilson intervals, the threshold proposal, and the
performance endpoint, page and ``fracture-triage calibrate`` over verdicts given via the API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from db.performance import Case, confusion, propose_threshold, wilson
from tests.test_api_worklist import STUDY_A, STUDY_C, STUDY_D, STUDY_E, populate_worklist
from tests.test_cli_results import run_cli
from tests.webapp import WebApp, login, serve


def test_wilson_interval_matches_the_published_values() -> None:
    # Wilson (1927) for 1 of 2 and 0 of 10 (e.g. Newcombe 1998, Table I)
    assert wilson(1, 2) == {"value": 0.5, "low": 0.0945, "high": 0.9055}
    assert wilson(0, 10) == {"value": 0.0, "low": 0.0, "high": 0.2775}
    assert wilson(0, 0)["value"] is None


def _case(p: float, truth: bool) -> Case:
    return Case(1, p >= 0.5, p, truth, "HAND", datetime(2026, 1, 5, tzinfo=UTC))


def test_threshold_proposal_keeps_the_target_sensitivity() -> None:
    found = [_case(p, True) for p in (0.9, 0.6, 0.3, 0.2)] + [
        _case(p, False) for p in (0.1, 0.25, 0.4, 0.7)
    ]
    proposal = propose_threshold(found, 0.75)
    assert proposal is not None and proposal["threshold"] == 0.3
    assert (proposal["tp"], proposal["fn"], proposal["fp"], proposal["tn"]) == (3, 1, 2, 2)
    assert propose_threshold(found, 1.0)["threshold"] == 0.2  # type: ignore[index]
    as_configured = confusion(found)
    assert (as_configured["tp"], as_configured["fp"]) == (2, 1)
    assert propose_threshold([_case(0.1, False)], 0.9) is None


@pytest.fixture
def app(tmp_path: Path, dicom_samples: Path) -> Iterator[WebApp]:
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    populate_worklist(url, tmp_path / "objects", dicom_samples)
    with serve(url, tmp_path / "data") as served:
        yield served


def test_performance_from_verdicts(app: WebApp, tmp_path: Path) -> None:
    with app.api() as api:
        for study, fracture in ((STUDY_A, True), (STUDY_D, False), (STUDY_C, False)):
            api.post(f"/api/v1/studies/{study}/verdict", json={"fracture": True})
            # the newest fracture/no-fracture verdict counts; a "read" one does not
            api.post(f"/api/v1/studies/{study}/verdict", json={"fracture": fracture})
            api.post(f"/api/v1/studies/{study}/verdict", json={"read": True})
        api.post(f"/api/v1/studies/{STUDY_E}/verdict", json={"fracture": True})  # unclassified
        report = api.get("/api/v1/performance").json()
    overall = report["overall"]
    assert (overall["tp"], overall["fp"], overall["tn"], overall["fn"]) == (1, 1, 1, 0)
    assert overall["specificity"] == {"value": 0.5, "low": 0.0945, "high": 0.9055}
    assert set(report["by_body_part"]) == {"HAND", "WRIST"}
    assert report["by_body_part"]["WRIST"]["fp"] == 1
    assert sum(w["cases"] for w in report["by_week"].values()) == 3

    client, _ = login(app)
    with closing(client):
        page = client.get("/performance")
        assert page.status_code == 200 and "0.50 <small>(0.09–0.91)</small>" in page.text

    out = run_cli(
        "calibrate",
        "--target-sensitivity",
        "1",
        "--json",
        "--database-url",
        app.settings.resolved_database_url,
    )
    assert out.returncode == 0, out.stderr
    proposal = json.loads(out.stdout)["proposal"]
    assert proposal["threshold"] == 0.91 and proposal["sensitivity"]["value"] == 1.0
    text = run_cli("calibrate", "--database-url", app.settings.resolved_database_url).stdout
    assert "not applied" in text
