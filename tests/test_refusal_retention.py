"""The records of refused C-STOREs (``store_refusals``) are pruned after
``FRACTURE_TRIAGE_REFUSAL_RETENTION_DAYS`` (``fracture_triage.retention.prune_refusals``) by
``fracture-triage purge`` and by the sweeper, on SQLite and PostgreSQL, while ``/metrics``'
``fracture_triage_instances_refused_total`` stays a counter: it never goes down."""

from __future__ import annotations

import os
import subprocess
import threading
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import node_state
from db.models import StoreRefusal
from db.repository import utcnow
from fracture_triage import retention
from fracture_triage.settings import Settings
from tests.servers import free_port
from tests.test_cli_results import cli
from tests.webapp import serve

UID = "1.2.826.0.1.3680043.8.498.77"


def refusals(sessions: sessionmaker[Session], *ages: tuple[int, float]) -> None:
    """One refusal per (status, age in days), as the SCP records it, then aged."""
    with sessions() as session:
        for status, days in ages:
            node_state.record_refusal(
                session, status, "why", sop_instance_uid=UID, calling_ae_title="CR1"
            )
            session.flush()
            newest = session.scalar(select(func.max(StoreRefusal.id)))
            session.execute(
                update(StoreRefusal)
                .where(StoreRefusal.id == newest)
                .values(at=utcnow() - timedelta(days=days))
            )
        session.commit()


def kept(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(StoreRefusal)) or 0)


def counters(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as session:
        return node_state.refusals_by_status(session)


def test_pruning_deletes_old_records_and_the_counts_stay(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "REFUSAL_BATCH", 2)  # several batches, one per transaction
    refusals(sessions, (0xA900, 40), (0xA900, 31), (0xA700, 45), (0xA700, 29), (0xC000, 90))
    refusals(sessions, (0xA900, 0.01), (0xA700, 35))
    before = counters(sessions)
    assert before == {"0xA700": 3, "0xA900": 3, "0xC000": 1}
    settings = Settings(data_dir=tmp_path)  # the default: 30 days
    assert retention.prune_refusals(sessions, settings, dry_run=True) == 5
    assert kept(sessions) == 7  # a dry run only counts
    assert retention.prune_refusals(sessions, settings) == 5
    assert kept(sessions) == 2  # 29 days and today: kept
    assert counters(sessions) == before  # the counter does not go down
    assert retention.prune_refusals(sessions, settings) == 0
    # New refusals after a prune count on from the pruned totals.
    refusals(sessions, (0xA700, 0), (0xC000, 0))
    assert counters(sessions) == {"0xA700": 4, "0xA900": 3, "0xC000": 2}
    shorter = Settings(data_dir=tmp_path, refusal_retention_days=0.001)  # 86 s
    assert retention.prune_refusals(sessions, shorter) == 2  # the 29-day and 15-min ones
    assert kept(sessions) == 2 and counters(sessions) == {"0xA700": 4, "0xA900": 3, "0xC000": 2}


def test_simultaneous_prunes_count_each_record_once(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper and a ``purge`` prune at the same moment: every deleted row is added to
    its total by the one transaction that deleted it."""
    monkeypatch.setattr(retention, "REFUSAL_BATCH", 7)
    refusals(sessions, *[(0xA900 if i % 3 else 0xA700, 40 + i) for i in range(60)])
    before = counters(sessions)
    settings = Settings(data_dir=tmp_path)
    start = threading.Barrier(4)
    pruned: list[int] = []

    def prune() -> None:
        start.wait(timeout=30)
        pruned.append(retention.prune_refusals(sessions, settings))

    threads = [threading.Thread(target=prune) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(pruned) == 60 and kept(sessions) == 0
    assert counters(sessions) == before == {"0xA700": 20, "0xA900": 40}


def purge(
    database_url: str, data_dir: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if "RETENTION" not in k}
    environment |= {"FRACTURE_TRIAGE_DATABASE_URL": database_url, **env}
    return subprocess.run(
        [*cli(), "purge", "--data-dir", str(data_dir), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # runs `fracture-triage purge` three times
def test_purge_prunes_refusal_records_even_with_file_retention_off(
    sessions: sessionmaker[Session], database_url: str, tmp_path: Path
) -> None:
    refusals(sessions, (0xA900, 40), (0xA700, 12), (0xA700, 1))
    dry = purge(database_url, tmp_path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "file retention is off" in dry.stdout and "no file is deleted" in dry.stdout
    assert "would prune 1 C-STORE refusal record(s)" in dry.stdout
    assert kept(sessions) == 3
    done = purge(database_url, tmp_path)
    assert done.returncode == 0 and "pruned 1 C-STORE refusal record(s)" in done.stdout
    assert kept(sessions) == 2
    # With file retention on, the refusals are one more line of the same summary.
    ten = purge(
        database_url,
        tmp_path,
        FRACTURE_TRIAGE_RETENTION_DAYS="30",
        FRACTURE_TRIAGE_REFUSAL_RETENTION_DAYS="10",
    )
    assert ten.returncode == 0, ten.stderr
    assert "purged 0 received object(s)" in ten.stdout
    assert "pruned 1 C-STORE refusal record(s)" in ten.stdout
    assert kept(sessions) == 1
    assert counters(sessions) == {"0xA700": 2, "0xA900": 1}


@pytest.mark.parametrize("days", ["0", "-3", "a month"])
def test_a_bad_refusal_retention_is_a_usage_error(tmp_path: Path, days: str) -> None:
    run = purge(
        f"sqlite:///{tmp_path / 'triage.db'}",
        tmp_path,
        FRACTURE_TRIAGE_REFUSAL_RETENTION_DAYS=days,
    )
    assert run.returncode == 2
    assert "invalid settings" in run.stderr and "refusal_retention_days" in run.stderr


def test_the_sweeper_prunes_hourly_without_a_broker(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Nobody runs ``purge`` (file retention off, no cron): the sweeper prunes on its first
    sweep and then once an hour, with the broker down (pruning needs only the database)."""
    from worker.queue import CeleryEnqueuer
    from worker.sweeper import Sweeper

    refusals(sessions, (0xA900, 40), (0xA900, 50), (0xA700, 2))
    settings = Settings(data_dir=tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    enqueuer = CeleryEnqueuer(settings)  # nothing to queue: it is never asked to send
    try:
        sweeper = Sweeper(settings, sessions, enqueuer)
        assert sweeper.sweep_once().refusals_pruned == 2
        assert kept(sessions) == 1
        refusals(sessions, (0xA700, 31))
        assert sweeper.sweep_once().refusals_pruned == 0  # within the hour: not again
        assert kept(sessions) == 2
        sweeper.prune_every_s = 0.0  # an hour later
        assert sweeper.sweep_once().refusals_pruned == 1
    finally:
        enqueuer.close()
    assert counters(sessions) == {"0xA700": 2, "0xA900": 2}


def scrape_refused(url: str) -> dict[str, float]:
    """``fracture_triage_instances_refused_total`` by status, parsed as Prometheus does."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = httpx.get(f"{url}/metrics", timeout=30)  # a loopback client needs no token
    assert answer.status_code == 200, answer.text
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    family = families["fracture_triage_instances_refused"]
    assert family.type == "counter"
    return {
        s.labels["status"]: s.value
        for s in family.samples
        if s.name == "fracture_triage_instances_refused_total"
    }


def test_metrics_counter_does_not_go_down_when_records_are_pruned(
    sessions: sessionmaker[Session], database_url: str, tmp_path: Path
) -> None:
    refusals(sessions, (0xA900, 40), (0xA900, 1), (0xA700, 60))
    with serve(database_url, tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0") as app:
        assert scrape_refused(app.url) == {"0xA700": 1.0, "0xA900": 2.0}
        assert retention.prune_refusals(sessions, app.settings) == 2
        assert scrape_refused(app.url) == {"0xA700": 1.0, "0xA900": 2.0}
        refusals(sessions, (0xA700, 0))
        assert scrape_refused(app.url) == {"0xA700": 2.0, "0xA900": 2.0}
        assert "stay counted" in httpx.get(f"{app.url}/metrics", timeout=30).text  # HELP
