"""The server-rendered pages over real HTTP: login, worklist, study page, verdict form with
its CSRF token, admin page (SQLite; the browser test drives the same pages in Chromium)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.test_api_worklist import STUDY_A, STUDY_B, STUDY_C, STUDY_D, STUDY_E, populate_worklist
from tests.test_cli_results import PATIENT_NAME
from tests.webapp import ADMIN_PASSWORD, WebApp, login, serve


@pytest.fixture
def app(tmp_path: Path, dicom_samples: Path) -> Iterator[WebApp]:
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    populate_worklist(url, tmp_path / "objects", dicom_samples)
    with serve(url, tmp_path / "data") as served:
        yield served


def row_uids(html: str) -> list[str]:
    return re.findall(r'data-href="/studies/([0-9.]+)"', html)


def test_worklist_page_lists_studies_fracture_first_with_patient_data(app: WebApp) -> None:
    client, _ = login(app)
    with closing(client):
        page = client.get("/worklist")
        assert row_uids(page.text) == [STUDY_A, STUDY_D, STUDY_C, STUDY_E, STUDY_B]
        assert PATIENT_NAME in page.text and 'class="badge fracture"' in page.text
        assert "<script" not in page.text.split("</head>")[1]  # no inline script (CSP)
        flagged = client.get("/worklist", params={"flag": "fracture", "modality": "DX"})
        assert row_uids(flagged.text) == [STUDY_D]
        bad = client.get("/worklist", params={"study_date_from": "yesterday"})
        assert bad.status_code == 422 and "invalid request" in bad.text
        assert client.get("/").headers["location"] == "/worklist"


def test_study_page_and_verdict_form(app: WebApp) -> None:
    client, csrf_token = login(app)
    with closing(client):
        page = client.get(f"/studies/{STUDY_E}")
        assert page.status_code == 200 and PATIENT_NAME in page.text
        previews = re.findall(r'<img class="preview" src="([^"]+preview\.png)"', page.text)
        assert len(previews) == 2
        assert "evidence.png" not in page.text  # nothing classified: no evidence to show
        assert client.get(previews[0]).headers["content-type"] == "image/png"
        assert client.get("/studies/1.2.3.999").status_code == 404

        url = f"/studies/{STUDY_E}/verdict"
        forged = client.post(url, data={"fracture": "yes", "csrf_token": "forged"})
        assert forged.status_code == 403 and "invalid CSRF token" in forged.text
        missing = client.post(url, data={"fracture": "yes"})
        assert missing.status_code == 403
        r = client.post(
            url, data={"fracture": "yes", "comment": "distal radius", "csrf_token": csrf_token}
        )
        assert r.status_code == 303 and r.headers["location"] == f"/studies/{STUDY_E}#verdicts"
        history = client.get(f"/studies/{STUDY_E}").text.split('id="history"')[1]
        assert "distal radius" in history and "rad" in history and "fracture" in history
        bad = client.post(url, data={"fracture": "maybe", "csrf_token": csrf_token})
        assert bad.status_code == 422
        # Reviewed studies can be left out of the list.
        todo = client.get("/worklist", params={"reviewed": "false"})
        assert STUDY_E not in row_uids(todo.text)


def test_admin_page_shows_the_audit_trail_to_admins_only(app: WebApp) -> None:
    client, _ = login(app)
    with closing(client):
        client.get(f"/studies/{STUDY_A}")
        refused = client.get("/admin")
        assert refused.status_code == 403 and "admin role" in refused.text
    admin, _ = login(app, "boss", ADMIN_PASSWORD)
    with closing(admin):
        page = admin.get("/admin")
        assert page.status_code == 200
        trail = page.text.split('id="audit"')[1]
        assert "study_view" in trail and STUDY_A in trail and "login" in trail
        assert PATIENT_NAME not in trail
        assert "ris" in page.text and "radiologist" in page.text  # tokens and users listed
        assert "studies; instances:" in page.text
