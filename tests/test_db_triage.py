"""The worklist summary (``study_triage``): kept current by the repository's writes, equal
to a recomputation from scratch, and filled by migration 0006 from what was stored before."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sqlalchemy import select

from db import repository as repo
from db import reviews, triage
from db.migrations import downgrade, upgrade
from db.models import Instance, StudyTriage
from db.session import make_engine, make_session_factory
from tests.test_api_worklist import STUDY_A, STUDY_D, STUDY_E, populate_worklist
from tests.test_cli_results import _rec


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
    downgrade(database_url, "0003")
    upgrade(database_url)
    assert snapshot(database_url) == before
