"""Scope by Body Part Examined: a chest film is stored, never classified, recorded "not
assessed: out of scope (CHEST)", shown so in the results, the worklist and the SR; a study's
decision ignores such images. End to end with dcmtk's storescu into ``fracture-triage up``."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from db import repository as repo
from db.models import Instance, InstanceStatus
from db.triage import Priority
from db.worklist import WorklistFilter, worklist_page
from fracture_triage.results import collect_results, write_table
from fracture_triage.scope import DEFAULT_BODY_PARTS, in_scope, out_of_scope_reason
from fracture_triage.settings import Settings
from tests.conftest import require
from tests.test_cli_results import cli
from tests.test_cli_up import _wait_for_banner, dcmtk, running_node
from tests.test_sr import CARD, assert_valid_sr, texts_of
from worker import tasks
from worker.sr import build_study_report

#: A small uncompressed DX the tests relabel (Body Part Examined, UIDs) into their images.
DX = "DX_thorax_MONO1_8b_odd169x211_EVRLE.dcm"
COMMENT = "121106"  # DCM "Comment": TID 1501's TEXT item


def test_default_scope_is_limbs_joints_pelvis_and_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRACTURE_TRIAGE_BODY_PARTS")
    allowed = Settings().body_parts
    assert allowed == list(DEFAULT_BODY_PARTS)
    for part in ("HAND", "wrist", " KNEE ", "Hip", "PELVIS", "EXTREMITY", "", None, "FOOT "):
        assert in_scope(part, allowed), part
    for part in ("CHEST", "THORAX", "SKULL", "CSPINE", "ABDOMEN", "HEAD", "BREAST"):
        assert not in_scope(part, allowed), part


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("HAND,WRIST", ["HAND", "WRIST"]),
        (" hand , CHEST ", ["hand", "CHEST"]),
        ("HAND,", ["HAND", ""]),  # a trailing empty entry admits an empty body part
        ('["HAND", ""]', ["HAND", ""]),
        ("*", ["*"]),
    ],
)
def test_body_parts_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("FRACTURE_TRIAGE_BODY_PARTS", value)
    assert Settings().body_parts == expected


def test_a_configured_list_replaces_the_default_and_star_admits_all() -> None:
    assert in_scope("chest", ["CHEST"]) and not in_scope("HAND", ["CHEST"])
    assert not in_scope("", ["HAND"])  # empty admitted only when listed
    assert in_scope("ANYTHING", ["*"]) and in_scope(None, ["*"])


def test_reason_names_the_body_part_in_plain_text() -> None:
    assert out_of_scope_reason(" chest ") == "not assessed: out of scope (CHEST)"
    assert out_of_scope_reason(None) == "not assessed: out of scope (empty)"
    assert out_of_scope_reason("A\nB\x1b[31m") == "not assessed: out of scope (A?B??31M)"


def _record(
    sessions: sessionmaker[Session], study: str, series: str, body_part: str | None
) -> tuple[int, str]:
    sop = generate_uid()
    rec = repo.ReceivedInstance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid=study,
        series_instance_uid=series,
        storage_path="/nonexistent.dcm",
        modality="DX",
        body_part_examined=body_part,
    )
    with sessions() as session:
        instance, _ = repo.record_received(session, rec)
        session.commit()
        return instance.id, sop


def _classify_message(instance_id: int, sop: str) -> dict[str, object]:
    from fracture_triage.messages import ClassifyInstance

    return ClassifyInstance(instance_id=instance_id, sop_instance_uid=sop).model_dump(mode="json")


def test_out_of_scope_is_recorded_ranked_last_reported_and_ignored_by_the_verdict(
    sqlite_db: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The classify task records a chest film as out of scope before loading any model (the
    model folder does not exist here); a mixed study's decision is its hand's; a chest-only
    study is listed last, as out of scope, and its SR says not assessed."""
    monkeypatch.delenv("FRACTURE_TRIAGE_BODY_PARTS")
    url = str(sqlite_db.kw["bind"].url)
    settings = Settings(data_dir=tmp_path, database_url=url, model_dir=tmp_path / "no-model")
    state = tasks.WorkerState(settings)
    mixed, chest_only = generate_uid(), generate_uid()
    hand_id, hand_sop = _record(sqlite_db, mixed, generate_uid(), "HAND")
    chest_id, chest_sop = _record(sqlite_db, mixed, generate_uid(), "CHEST")
    lone_id, lone_sop = _record(sqlite_db, chest_only, generate_uid(), "chest ")

    assert tasks.classify(state, _classify_message(chest_id, chest_sop)) == "out-of-scope"
    assert tasks.classify(state, _classify_message(lone_id, lone_sop)) == "out-of-scope"
    # again (a redelivered message): still nothing classified
    assert tasks.classify(state, _classify_message(lone_id, lone_sop)) == "out-of-scope"
    # the hand is in scope: it goes on to the model, which cannot be loaded here
    assert tasks.classify(state, _classify_message(hand_id, hand_sop)) == "no-model"
    with sqlite_db() as session:
        repo.save_result(
            session,
            hand_id,
            repo.Classification(
                probability=0.2,
                threshold=CARD.threshold,
                fracture=False,
                model_name=CARD.name,
                model_version=CARD.version,
                model_uid=CARD.uid,
                preprocess_ms=1.0,
                inference_ms=1.0,
            ),
        )
        session.commit()
        for instance_id in (chest_id, lone_id):
            instance = session.get(Instance, instance_id)
            assert instance is not None
            assert instance.status == InstanceStatus.out_of_scope
            assert instance.results == []  # no probability recorded
        assert [s.id for s in repo.studies_ready_to_report(session, 0)] != []  # settled

        rows = {r["sop_instance_uid"]: r for r in collect_results(session)}
        assert rows[chest_sop]["status"] == "out_of_scope"
        assert rows[chest_sop]["probability"] is None and rows[chest_sop]["decision"] is None
        assert rows[chest_sop]["failure_reason"] == "not assessed: out of scope (CHEST)"
        # the study's decision is the hand's alone
        assert rows[chest_sop]["study_decision"] == "no fracture"
        assert rows[lone_sop]["study_decision"] is None

        page = worklist_page(session, WorklistFilter())
        order = [(e["study_instance_uid"], e["priority"]) for e in page.entries]
        assert order == [(mixed, "no_fracture"), (chest_only, "out_of_scope")]
        first = page.entries[0]
        assert (first["classified"], first["out_of_scope"], first["waiting"]) == (1, 1, 0)
        only = worklist_page(session, WorklistFilter(priority=Priority.out_of_scope))
        assert [e["study_instance_uid"] for e in only.entries] == [chest_only]

        study_ids = {}
        for instance_id in (hand_id, lone_id):
            instance = session.get(Instance, instance_id)
            assert instance is not None
            study_ids[instance_id] = instance.series.study_id
        mixed_sr = build_study_report(session, settings, study_ids[hand_id], CARD)
        lone_sr = build_study_report(session, settings, study_ids[lone_id], CARD)
        session.commit()
    assert (mixed_sr.fracture, mixed_sr.probability) == (False, 0.2)
    assert (lone_sr.fracture, lone_sr.probability) == (False, None)
    groups = sr_groups(Path(mixed_sr.path))
    assert texts_of(groups[chest_sop], COMMENT) == ["Not assessed: out of scope (CHEST)"]
    assert groups[chest_sop].get_measurements() == []  # type: ignore[attr-defined]
    assert texts_of(groups[hand_sop], COMMENT) == []
    (lone_group,) = sr_groups(Path(lone_sr.path)).values()
    assert texts_of(lone_group, COMMENT) == ["Not assessed: out of scope (CHEST)"]
    (evaluation,) = lone_group.get_qualitative_evaluations()  # type: ignore[attr-defined]
    assert evaluation.value == codes.SCT.Undetermined

    import io

    out = io.StringIO()
    with sqlite_db() as session:
        write_table(collect_results(session), out)
    text = out.getvalue()
    assert any(
        ln.startswith("out_of_scope") and "not assessed: out of scope (CHEST)" in ln
        for ln in text.splitlines()
    )
    assert "2 not assessed (out of scope), 0 waiting" in text


def sr_groups(path: Path) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The SR's TID 1501 groups by the SOP Instance UID of their source image."""
    sr = hd.sr.srread(path)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    out: dict[str, hd.sr.MeasurementsAndQualitativeEvaluations] = {}
    for group in report.get_image_measurement_groups():
        (source,) = group.source_images
        out[source.referenced_sop_instance_uid] = group
    return out


def _relabelled(source: Path, target: Path, body_part: str, study: str) -> str:
    """A copy of ``source`` with this Body Part Examined, in ``study``, with new series and
    SOP Instance UIDs; returns the SOP Instance UID."""
    ds = pydicom.dcmread(source)
    ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target)
    return str(ds.SOPInstanceUID)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_up_stores_a_chest_film_and_reports_it_not_assessed(
    tmp_path: Path,
    tiny_model_dir: Path,
    dicom_samples: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default scope, end to end: storescu sends a chest DX and a hand DX of one study
    and a chest-only study; both chests are answered Success and stored, neither gets a
    probability, the hand does; the SRs say the chests were not assessed (dsrdump), and
    ``results`` prints them so."""
    monkeypatch.delenv("FRACTURE_TRIAGE_BODY_PARTS")
    source = require(dicom_samples / DX)
    mixed, lone = generate_uid(), generate_uid()
    files = tmp_path / "send"
    files.mkdir()
    chest = _relabelled(source, files / "chest.dcm", "CHEST", mixed)
    hand = _relabelled(source, files / "hand.dcm", "HAND", mixed)
    lone_chest = _relabelled(source, files / "lone.dcm", "CHEST", lone)
    with running_node(tmp_path, tiny_model_dir) as node:
        _wait_for_banner(node)
        data_dir = Path(str(node["data_dir"]))
        sent = subprocess.run(
            [dcmtk("storescu"), "-aec", "FXTRIAGE", "127.0.0.1", str(node["port"])]
            + [str(files / n) for n in ("chest.dcm", "hand.dcm", "lone.dcm")],
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        deadline = time.monotonic() + 240
        rows: dict[str, dict[str, object]] = {}
        while time.monotonic() < deadline:
            run = subprocess.run(
                [*cli(), "results", "--json", "--data-dir", str(data_dir)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            rows = {r["sop_instance_uid"]: r for r in map(json.loads, run.stdout.splitlines()) if r}
            if len(rows) == 3 and all(r["sr_path"] for r in rows.values()):
                srs = {str(rows[s]["sr_path"]) for s in (hand, lone_chest)}
                if all(
                    set(sr_groups(Path(p))) >= ({chest, hand} if mixed in p else {lone_chest})
                    for p in srs
                ):
                    break
            time.sleep(1.0)
        else:
            pytest.fail(f"no complete results: {rows}\n{Path(str(node['err'])).read_text()}")
        table = subprocess.run(
            [*cli(), "results", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout

    for sop in (chest, lone_chest):
        assert rows[sop]["status"] == "out_of_scope"
        assert rows[sop]["probability"] is None and rows[sop]["fracture"] is None
        assert rows[sop]["failure_reason"] == "not assessed: out of scope (CHEST)"
        assert rows[sop]["evidence_path"] is None  # no heat map either
    assert rows[hand]["status"] == "done" and isinstance(rows[hand]["probability"], float)
    assert rows[chest]["study_decision"] == rows[hand]["decision"]
    assert rows[lone_chest]["study_decision"] is None
    # stored as received, though never classified
    stored = list((data_dir / "objects").rglob(f"{chest}.dcm"))
    assert len(stored) == 1 and pydicom.dcmread(stored[0]).BodyPartExamined == "CHEST"

    for sop in (hand, lone_chest):
        sr_path = str(rows[sop]["sr_path"])
        dump = subprocess.run(
            [dcmtk("dsrdump"), "+Pl", sr_path], capture_output=True, text=True, timeout=60
        )
        assert dump.returncode == 0, dump.stderr
        assert dump.stdout.count('"Not assessed: out of scope (CHEST)"') == 1
        assert_valid_sr(Path(sr_path))  # dciodvfy finds no error
        groups = sr_groups(Path(sr_path))
        if sop == hand:
            assert texts_of(groups[hand], COMMENT) == []
            assert len(groups[hand].get_measurements()) == 1  # type: ignore[attr-defined]
    assert any(
        ln.startswith("out_of_scope") and "not assessed: out of scope (CHEST)" in ln
        for ln in table.splitlines()
    )
    assert "1 classified" in table and "2 not assessed (out of scope)" in table


def test_default_terms_are_ps3_16_annex_l_body_part_examined_terms() -> None:
    # highdicom ships PS3.16 Annex L's Body Part Examined -> SNOMED CT table: every default
    # but PS3.3's older ARM and LEG and the empty value is one of its terms, so a typo
    # (a term no modality sends) cannot hide in the default.
    from importlib import resources

    from fracture_triage.settings import LEGACY_BODY_PARTS

    annex_l = json.loads(
        (resources.files("highdicom") / "_standard/anatomic_regions.json").read_bytes()
    )
    assert set(DEFAULT_BODY_PARTS) - LEGACY_BODY_PARTS <= set(annex_l)
    assert {"CHEST", "SKULL", "ABDOMEN"}.isdisjoint(DEFAULT_BODY_PARTS)
