"""The JSON API on SQLite and PostgreSQL, through uvicorn on loopback: worklist order,
filters and pages, a study, its previews, verdicts and their audit rows, results."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from db import repository as repo
from db.models import Result
from db.session import make_engine, make_session_factory
from tests.conftest import require
from tests.test_cli_results import PATIENT_ID, PATIENT_NAME, STUDY_A, STUDY_B, _rec, populate
from tests.webapp import WebApp, login, serve

STUDY_C = "1.2.826.0.1.3680043.8.498.300"
STUDY_D = "1.2.826.0.1.3680043.8.498.400"
STUDY_E = "1.2.826.0.1.3680043.8.498.500"
GOOD_SAMPLE = "CR_extremity_RG3_MONO1_10b_EVRLE.dcm"
BAD_SAMPLE = "BAD_MR_truncated_pixeldata.dcm"


def _classify(s: object, instance_id: int, p: float) -> Result:
    return repo.save_result(
        s,  # type: ignore[arg-type]
        instance_id,
        repo.Classification(
            probability=p,
            threshold=0.5,
            fracture=p >= 0.5,
            model_name="mnv2",
            model_version="1.0",
            model_uid="2.25.7",
            preprocess_ms=1,
            inference_ms=1,
        ),
    )


def populate_worklist(url: str, objects: Path, samples: Path) -> None:
    """A: flagged 0.91 (CR HAND, one failed image); B: queued only; C: 0.2, no fracture;
    D: flagged 0.6 (DX WRIST, 2024-01-05); E: unclassified, real stored objects (one that
    renders, one with truncated pixel data)."""
    populate(url)
    objects.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        c, _ = repo.record_received(s, _rec(STUDY_C, 1))
        _classify(s, c.id, 0.2)
        d_rec = dataclasses.replace(
            _rec(STUDY_D, 1), modality="DX", body_part_examined="WRIST", study_date="20240105"
        )
        d, _ = repo.record_received(s, d_rec)
        _classify(s, d.id, 0.6)
        for n, sample in ((1, GOOD_SAMPLE), (2, BAD_SAMPLE)):
            target = objects / sample
            shutil.copyfile(require(samples / sample), target)
            repo.record_received(s, dataclasses.replace(_rec(STUDY_E, n), storage_path=str(target)))
        s.commit()
    engine.dispose()


STUDY_F = "1.2.826.0.1.3680043.8.498.700"


def add_study_with_evidence(app: WebApp, samples: Path) -> tuple[str, str]:
    """Study F: the renderable radiograph classified 0.8 with an evidence capture made by the
    worker's own ``make_evidence`` (a class activation map bright in one corner). Returns the
    study's and the image's UIDs."""
    from db.evidence import record_evidence
    from model.artifact import read_card, resolve_model_dir
    from model.imaging import dicom_to_uint8
    from worker.evidence import make_evidence

    target = app.settings.data_dir / "objects-f" / GOOD_SAMPLE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(require(samples / GOOD_SAMPLE), target)
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[:3, :3] = 4.0
    engine = make_engine(app.settings.resolved_database_url)
    with make_session_factory(engine)() as s:
        instance, _ = repo.record_received(
            s, dataclasses.replace(_rec(STUDY_F, 1), storage_path=str(target))
        )
        result = _classify(s, instance.id, 0.8)
        made = make_evidence(
            app.settings,
            instance,
            instance.series.study,
            read_card(resolve_model_dir(None)),
            dicom_to_uint8(target),
            cam,
            0.8,
            0.5,
        )
        assert made.path is not None, made.record.reason
        record_evidence(s, result.id, made.record)
        sop = instance.sop_instance_uid
        s.commit()
    engine.dispose()
    return STUDY_F, sop


@pytest.fixture
def app(database_url: str, tmp_path: Path, dicom_samples: Path) -> Iterator[WebApp]:
    populate_worklist(database_url, tmp_path / "objects", dicom_samples)
    with serve(database_url, tmp_path / "data") as served:
        yield served


def uids(answer: dict[str, object]) -> list[str]:
    studies = answer["studies"]
    assert isinstance(studies, list)
    return [s["study_instance_uid"] for s in studies]


def test_worklist_order_entries_and_pages(app: WebApp) -> None:
    with app.api() as api:
        r = api.get("/api/v1/worklist")
        assert r.status_code == 200
        body = r.json()
        # Flagged by probability, then the rest by probability, unclassified last (newest
        # received first: E after B).
        assert uids(body) == [STUDY_A, STUDY_D, STUDY_C, STUDY_E, STUDY_B]
        assert body["total"] == 5
        a = body["studies"][0]
        assert (a["priority"], a["fracture"], a["max_probability"]) == ("fracture", True, 0.91)
        assert (a["instances"], a["classified"], a["failed"], a["waiting"]) == (3, 2, 1, 0)
        assert a["reported"] is True and a["reviewed"] is False
        assert a["seconds_to_result"] is not None and a["seconds_to_result"] >= 0
        assert body["studies"][-1]["priority"] == "unclassified"
        assert PATIENT_NAME not in r.text and PATIENT_ID not in r.text

        first = api.get("/api/v1/worklist", params={"page_size": 2}).json()
        second = api.get("/api/v1/worklist", params={"page_size": 2, "page": 2}).json()
        third = api.get("/api/v1/worklist", params={"page_size": 2, "page": 3}).json()
        assert uids(first) + uids(second) + uids(third) == uids(body)
        assert first["total"] == 5
        assert api.get("/api/v1/worklist", params={"page": 9}).json()["studies"] == []


#: Filters and the studies each leaves, in worklist order.
FILTERS: list[tuple[dict[str, str], list[str]]] = [
    ({"flag": "fracture"}, [STUDY_A, STUDY_D]),
    ({"flag": "no_fracture"}, [STUDY_C]),
    ({"flag": "unclassified"}, [STUDY_E, STUDY_B]),
    ({"modality": "DX"}, [STUDY_D]),
    ({"body_part": "WRIST"}, [STUDY_D]),
    ({"status": "failed"}, [STUDY_A]),
    ({"status": "queued"}, [STUDY_B]),
    ({"study_date_from": "20240101", "study_date_to": "20240131"}, [STUDY_D]),
    ({"received_from": "2999-01-01T00:00:00Z"}, []),
    ({"received_to": "2999-01-01T00:00:00+01:00", "flag": "no_fracture"}, [STUDY_C]),
    ({"reviewed": "true"}, []),
]

#: Filters the API refuses.
BAD_FILTERS: list[dict[str, str]] = [
    {"flag": "maybe"},
    {"study_date_from": "2024-01-01"},
    {"page": "0"},
    {"page_size": "1000"},
    {"received_from": "yesterday"},
    {"status": "lost"},
]


# The filter cases only read: one served application answers them all (a server per case
# would cost the fast tier ~0.5 s each), and each failure names its case.
def test_worklist_filters(app: WebApp) -> None:
    with app.api() as api:
        for params, expected in FILTERS:
            r = api.get("/api/v1/worklist", params=params)
            assert r.status_code == 200, (params, r.text)
            found = (uids(r.json()), r.json()["total"])
            assert found == (expected, len(expected)), params


def test_bad_filters_are_422_with_a_message(app: WebApp) -> None:
    with app.api() as api:
        for params in BAD_FILTERS:
            r = api.get("/api/v1/worklist", params=params)
            assert r.status_code == 422, (params, r.text)
            assert r.json()["error"].startswith("invalid request: query."), params


def test_study_detail_patient_data_and_audit(app: WebApp) -> None:
    with app.api() as api, app.api("ops") as ops:
        r = api.get(f"/api/v1/studies/{STUDY_A}")
        assert r.status_code == 200
        study = r.json()
        assert study["fracture"] is True and study["max_probability"] == 0.91
        assert [i["status"] for i in study["images"]] == ["done", "done", "failed"]
        assert study["images"][2]["failure_reason"] == "Pixel Data shorter than declared"
        assert study["reports"][0]["superseded"] is False and study["reports"][1]["superseded"]
        assert PATIENT_NAME not in r.text
        assert ops.get("/api/v1/audit", params={"action": "study_view"}).json()["events"] == []

        with_patient = api.get(f"/api/v1/studies/{STUDY_A}", params={"include_patient": "true"})
        assert with_patient.json()["patient_name"] == PATIENT_NAME
        events = ops.get("/api/v1/audit", params={"action": "study_view"}).json()["events"]
        assert [(e["actor"], e["study_instance_uid"]) for e in events] == [("token:ris", STUDY_A)]
        assert events[0]["client_address"] == "127.0.0.1"
        assert PATIENT_NAME not in json.dumps(events)

        api.get("/api/v1/worklist", params={"include_patient": "true", "page_size": 2})
        (listed,) = ops.get("/api/v1/audit", params={"action": "worklist_view"}).json()["events"]
        assert f"2 studies {STUDY_A} {STUDY_D}" in listed["detail"]

        assert api.get("/api/v1/studies/1.2.3.999").status_code == 404
        assert api.get("/api/v1/studies/1.2.3.999").json() == {"error": "no study 1.2.3.999"}
        assert api.get("/api/v1/studies/not-a-uid").status_code == 422


def test_preview_is_rendered_once_cached_privately_and_sized(app: WebApp) -> None:
    study = STUDY_E
    with app.api() as api:
        detail = api.get(f"/api/v1/studies/{study}").json()
        good, bad = (i["sop_instance_uid"] for i in detail["images"])
        url = f"/api/v1/studies/{study}/images/{good}/preview.png"
        r = api.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        cached = list(app.settings.preview_dir.glob(f"{good}-*.png"))
        assert len(cached) == 1
        assert stat.S_IMODE(os.stat(cached[0]).st_mode) & 0o077 == 0
        assert stat.S_IMODE(os.stat(app.settings.preview_dir).st_mode) == 0o700
        picture = Image.open(cached[0])
        assert max(picture.size) == app.settings.preview_size and picture.mode == "L"
        assert len(set(picture.getdata())) > 50  # an image, not a blank
        before = cached[0].stat().st_mtime_ns
        assert api.get(url).content == r.content
        assert cached[0].stat().st_mtime_ns == before  # served from the cache

        broken = api.get(f"/api/v1/studies/{study}/images/{bad}/preview.png")
        assert broken.status_code == 422 and "cannot be rendered" in broken.json()["error"]
        other = api.get(f"/api/v1/studies/{STUDY_A}/images/{good}/preview.png")
        assert other.status_code == 404  # an image of another study is not this study's
    with app.client() as anonymous:
        assert anonymous.get(url).status_code == 401


def test_evidence_is_the_capture_in_colour_cached_and_sized(
    app: WebApp, dicom_samples: Path
) -> None:
    study, sop = add_study_with_evidence(app, dicom_samples)
    url = f"/api/v1/studies/{study}/images/{sop}/evidence.png"
    with app.api() as api:
        detail = api.get(f"/api/v1/studies/{study}").json()
        assert detail["images"][0]["evidence"]["state"] == "produced"
        r = api.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["cache-control"] == "private, max-age=3600"
        (cached,) = app.settings.preview_dir.glob("evidence-*.png")
        assert stat.S_IMODE(os.stat(cached).st_mode) & 0o077 == 0
        picture = Image.open(cached)
        assert max(picture.size) == app.settings.preview_size and picture.mode == "RGB"
        # The map is coloured (red over the bright corner); the radiograph elsewhere is gray.
        pixels = np.asarray(picture, dtype=np.int16)
        colour = np.abs(pixels[..., 0] - pixels[..., 2])
        assert (colour > 60).mean() > 0.02
        assert api.get(url).content == r.content  # from the cache

        # No evidence: an image without a result, an image of another study, unknown UIDs
        e_good = api.get(f"/api/v1/studies/{STUDY_E}").json()["images"][0]["sop_instance_uid"]
        none = api.get(f"/api/v1/studies/{STUDY_E}/images/{e_good}/evidence.png")
        assert none.status_code == 404 and none.json() == {
            "error": f"no evidence for image {e_good}"
        }
        a = api.get(f"/api/v1/studies/{STUDY_A}").json()["images"][0]["sop_instance_uid"]
        assert api.get(f"/api/v1/studies/{STUDY_A}/images/{a}/evidence.png").status_code == 404
        assert api.get(f"/api/v1/studies/{STUDY_E}/images/{sop}/evidence.png").status_code == 404
        unknown = api.get(f"/api/v1/studies/1.2.3.999/images/{sop}/evidence.png")
        assert unknown.status_code == 404 and "error" in unknown.json()
    with app.client() as anonymous:
        assert anonymous.get(url).status_code == 401


def test_verdicts_history_reviewed_filter_and_csrf(app: WebApp) -> None:
    with app.api() as api, app.api("ops") as ops:
        r = api.post(
            f"/api/v1/studies/{STUDY_D}/verdict", json={"fracture": False, "comment": "old"}
        )
        assert r.status_code == 201, r.text
        assert r.json()["verdict"]["fracture"] is False
        r = api.post(f"/api/v1/studies/{STUDY_D}/verdict", json={"fracture": True})
        history = r.json()["history"]
        assert [v["fracture"] for v in history] == [True, False]  # newest first
        assert history[0]["author"] == "ris" and history[0]["author_kind"] == "token"
        reviewed = api.get("/api/v1/worklist", params={"reviewed": "true"}).json()
        assert uids(reviewed) == [STUDY_D] and reviewed["studies"][0]["verdict"]["fracture"]
        not_reviewed = api.get("/api/v1/worklist", params={"reviewed": "false"}).json()
        assert STUDY_D not in uids(not_reviewed) and len(uids(not_reviewed)) == 4

        assert (
            api.post(f"/api/v1/studies/{STUDY_D}/verdict", json={"fracture": "perhaps"}).status_code
            == 422
        )
        assert (
            api.post(f"/api/v1/studies/{STUDY_D}/verdict", content=b"{not json").status_code == 422
        )
        too_long = api.post(f"/api/v1/studies/{STUDY_D}/verdict", json={"comment": "x" * 2001})
        assert too_long.status_code == 422
        assert api.post("/api/v1/studies/1.2.3.999/verdict", json={}).status_code == 404
        events = ops.get("/api/v1/audit", params={"action": "verdict"}).json()["events"]
        assert [e["detail"] for e in events] == [
            "fracture; read=yes",
            "no fracture; read=yes; with comment",
        ]

    # A browser session must send its CSRF token with a JSON post too.
    client, csrf_token = login(app)
    with closing(client):
        url = f"/api/v1/studies/{STUDY_C}/verdict"
        assert client.post(url, json={"fracture": False}).status_code == 403
        forged = client.post(url, json={"fracture": False}, headers={"X-CSRF-Token": "x"})
        assert forged.status_code == 403
        ok = client.post(url, json={"fracture": False}, headers={"X-CSRF-Token": csrf_token})
        assert ok.status_code == 201 and ok.json()["verdict"]["author_kind"] == "user"


def test_results_are_paged(app: WebApp) -> None:
    with app.api() as api:
        everything = api.get("/api/v1/results", params={"page_size": 1000}).json()["results"]
        assert len(everything) == 8
        paged = [
            r
            for page in (1, 2, 3)
            for r in api.get("/api/v1/results", params={"page_size": 3, "page": page}).json()[
                "results"
            ]
        ]
        assert paged == everything
        only_b = api.get("/api/v1/results", params={"study": STUDY_B}).json()["results"]
        assert [r["study_instance_uid"] for r in only_b] == [STUDY_B]
        assert PATIENT_NAME not in json.dumps(everything)
