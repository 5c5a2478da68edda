"""The worklist summary (``study_triage``): kept current by the repository's writes, equal
to a recomputation from scratch, filled by migration 0007 from what was stored before, and
ranked by the study decision (fracture, doubt, no fracture, unclassified)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sqlalchemy import select

from db import repository as repo
from db import reviews, triage
from db.evidence import EvidenceRecord, record_evidence
from db.migrations import downgrade, upgrade
from db.models import EvidenceState, Instance, Result, StudyTriage
from db.session import make_engine, make_session_factory
from db.worklist import WorklistFilter, worklist_page
from fracture_triage.results import collect_results
from fracture_triage.verdict import DECISION_ORDER
from tests.test_api_worklist import STUDY_A, STUDY_D, STUDY_E, populate_worklist
from tests.test_cli_results import _rec
from tests.test_decision import _classify as classify_two_thresholds

BASE = "1.2.826.0.1.3680043.8.498."


def snapshot(url: str) -> dict[int, tuple[Any, ...]]:
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        rows = {
            t.study_id: (
                t.priority,
                None if t.max_probability is None else round(t.max_probability, 9),
                t.instances,
                t.classified,
                t.failed,
                t.modality,
                t.body_part_examined,
                repo.as_utc(t.last_received_at),
                None if t.first_received_at is None else repo.as_utc(t.first_received_at),
                None if t.last_result_at is None else repo.as_utc(t.last_result_at),
            )
            for t in s.scalars(select(StudyTriage))
        }
    engine.dispose()
    return rows


def test_summary_follows_writes_and_equals_a_rebuild(
    database_url: str, tmp_path: Path, dicom_samples: Path
) -> None:
    populate_worklist(database_url, tmp_path / "objects", dicom_samples)
    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:
        # E's first image fails; D gets a second, higher-scored image; A a re-send that
        # lands in study D (the instance moves, both summaries change).
        e1 = s.scalars(select(Instance).where(Instance.sop_instance_uid == f"{STUDY_E}.1.1")).one()
        repo.mark_failed(s, e1.id, "cannot decode")
        d2, _ = repo.record_received(s, _rec(STUDY_D, 2))
        repo.save_result(
            s,
            d2.id,
            repo.Classification(0.97, 0.5, True, "mnv2", "1.0", "2.25.7", 1, 1),
        )
        moved = s.scalars(
            select(Instance).where(Instance.sop_instance_uid == f"{STUDY_A}.1.2")
        ).one()
        rec = dataclasses.replace(_rec(STUDY_D, 9), sop_instance_uid=moved.sop_instance_uid)
        repo.replace_conflicting(s, moved, rec)
        s.commit()
        ids = {uid: reviews.find_study(s, uid).id for uid in (STUDY_A, STUDY_D, STUDY_E)}  # type: ignore[union-attr]
    engine.dispose()
    incremental = snapshot(database_url)
    assert len(incremental) == 5
    # (priority, max probability, instances, classified, failed) as a reader would count
    assert incremental[ids[STUDY_D]][:5] == (3, 0.97, 3, 2, 0)
    assert incremental[ids[STUDY_A]][:5] == (3, 0.91, 2, 1, 1)
    assert incremental[ids[STUDY_E]][:5] == (0, None, 2, 0, 1)

    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:
        assert triage.rebuild_all(s) == 5
        s.commit()
    engine.dispose()
    assert snapshot(database_url) == incremental


def test_migration_fills_the_summary_from_stored_studies(
    database_url: str, tmp_path: Path, dicom_samples: Path
) -> None:
    populate_worklist(database_url, tmp_path / "objects", dicom_samples)
    before = snapshot(database_url)
    priorities = sorted(v[0] for v in before.values())
    assert priorities == [0, 0, 1, 3, 3]
    downgrade(database_url, "0006")  # before the web application
    upgrade(database_url)
    assert snapshot(database_url) == before


def test_priorities_are_the_decision_levels_in_their_order() -> None:
    """The worklist's levels are ``verdict.DECISION_ORDER``'s, most urgent highest, so the
    highest image priority is the study decision."""
    ranked = sorted(triage.DECISION_PRIORITY, key=triage.DECISION_PRIORITY.__getitem__)
    assert tuple(reversed(ranked)) == DECISION_ORDER
    assert max(triage.DECISION_PRIORITY.values()) == triage.Priority.fracture
    for decision in DECISION_ORDER:
        assert triage.decision_of_priority(triage.DECISION_PRIORITY[decision]) == decision
    assert triage.decision_of_priority(triage.Priority.unclassified) is None


def test_doubt_studies_rank_between_fracture_and_no_fracture(database_url: str) -> None:
    """Thresholds 0.3 / 0.7: the worklist, its doubt filter, the study page and the
    migration's backfill all give a study its decision; ``results`` agrees."""
    images = {"501": [0.5], "502": [0.8], "503": [0.1], "504": [0.65, 0.2]}
    upgrade(database_url)
    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:
        for study, probabilities in images.items():
            for n, p in enumerate(probabilities):
                inst, _ = repo.record_received(s, _rec(BASE + study, n))
                classify_two_thresholds(s, inst.id, p)
        s.commit()
        page = worklist_page(s, WorklistFilter())
        got = [
            (e["study_instance_uid"][len(BASE) :], e["priority"], e["decision"], e["fracture"])
            for e in page.entries
        ]
        doubt = worklist_page(s, WorklistFilter(priority=triage.Priority.doubt)).entries
        # The evidence of 504's first image was not produced: the study page says why.
        first = s.scalars(select(Instance).where(Instance.sop_instance_uid == f"{BASE}504.1.0"))
        result_id = s.scalars(select(Result.id).where(Result.instance_id == first.one().id))
        record_evidence(
            s, result_id.one(), EvidenceRecord(state=EvidenceState.not_produced, reason="tiny")
        )
        s.commit()
        doubt_study = reviews.find_study(s, BASE + "504")
        assert doubt_study is not None
        detail = reviews.study_detail(s, doubt_study, include_patient=False)
        study_decisions = {r["study_instance_uid"]: r["study_decision"] for r in collect_results(s)}
    engine.dispose()
    assert got == [
        ("502", "fracture", "fracture", True),
        ("504", "doubt", "doubt", True),
        ("501", "doubt", "doubt", True),
        ("503", "no_fracture", "no fracture", False),
    ]
    assert [e["study_instance_uid"] for e in doubt] == [BASE + "504", BASE + "501"]
    assert study_decisions == {BASE + uid: d for uid, _, d, _ in got}
    assert detail["decision"] == "doubt"
    assert [(i["decision"], i["evidence"]) for i in detail["images"]] == [
        (
            "doubt",
            {
                "state": "not produced",
                "path": None,
                "reason": "tiny",
                "sop_instance_uid": None,
                "send_status": "none",
            },
        ),
        ("no fracture", None),
    ]

    before = snapshot(database_url)
    assert sorted(v[0] for v in before.values()) == [1, 2, 2, 3]
    downgrade(database_url, "0006")  # the decisions of 0004 stay: the backfill reads them
    upgrade(database_url)
    assert snapshot(database_url) == before
