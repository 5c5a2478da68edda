"""The counters and histograms ``/metrics`` reads (``db.node_state``), computed in SQL, on
SQLite and PostgreSQL: totals, refusals by status, C-STORE time and time to result."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from db import node_state
from db import repository as repo
from db.models import Result
from db.session import make_engine, make_session_factory
from tests.databases import migrated
from tests.test_api_worklist import _classify
from tests.test_cli_results import _rec

STUDY = "1.2.826.0.1.3680043.8.498.900"


def test_totals_refusals_and_histograms(database_url: str) -> None:
    migrated(database_url)
    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:
        fast, _ = repo.record_received(s, _rec(STUDY, 1))
        slow, _ = repo.record_received(s, _rec(STUDY, 2))
        repo.record_received(s, _rec(STUDY, 3, failure="Pixel Data shorter than declared"))
        refused = f"{repo.REFUSED_PREFIX} (0xA900): no pixels"
        repo.record_received(s, _rec(STUDY, 4, failure=refused))
        fast.store_ms, slow.store_ms = 20.0, 700.0
        for instance in (fast, slow):
            _classify(s, instance.id, 0.7)
        s.flush()
        # Results 3 s and 45 s after their instances were received
        for instance, seconds in ((fast, 3), (slow, 45)):
            s.execute(
                update(Result)
                .where(Result.instance_id == instance.id)
                .values(created_at=instance.received_at + timedelta(seconds=seconds))
            )
        for status in (0xA900, 0xA700, 0xA700):
            node_state.record_refusal(s, status, "why", sop_instance_uid=None)
        s.commit()

        totals = node_state.totals(s)
        assert (totals.received, totals.classified, totals.failed) == (3, 2, 1)
        assert node_state.refusals_by_status(s) == {"0xA700": 2, "0xA900": 1}

        store = node_state.store_seconds(s)
        assert store.count == 2 and abs(store.total - 0.72) < 1e-6
        le = dict(store.buckets)
        assert (le[0.01], le[0.025], le[0.5], le[1.0], le[float("inf")]) == (0, 1, 1, 2, 2)

        to_result = node_state.result_seconds(s)
        assert to_result.count == 2 and abs(to_result.total - 48.0) < 0.01
        le = dict(to_result.buckets)
        assert (le[2.0], le[5.0], le[30.0], le[60.0]) == (0, 1, 1, 2)
    engine.dispose()
