"""The Alembic migrations build exactly the schema of ``db.models``, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from db.migrations import (
    current_revision,
    downgrade,
    head_revision,
    schema_differences,
    upgrade,
)
from db.models import Base
from db.session import make_engine

CLI = [sys.executable, "-m", "fracture_triage.cli"]


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_creates_the_models_schema(database_url: str) -> None:
    assert current_revision(database_url) is None
    upgrade(database_url)
    assert current_revision(database_url) == head_revision() is not None
    assert _tables(database_url) == set(Base.metadata.tables) | {"alembic_version"}
    # What `alembic check` compares: tables, columns, types, nullability, indexes, constraints.
    assert schema_differences(database_url) == []
    upgrade(database_url)  # a second run (every role runs it at start) changes nothing
    assert current_revision(database_url) == head_revision()


def test_downgrade_to_base_and_back(database_url: str) -> None:
    upgrade(database_url)
    downgrade(database_url, "base")
    assert _tables(database_url) <= {"alembic_version"}
    assert current_revision(database_url) is None
    upgrade(database_url)
    assert schema_differences(database_url) == []


def test_schema_differences_notices_a_missing_index(database_url: str) -> None:
    """The comparison the tests rely on can fail: drop an index and it is reported."""
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_instances_status"))
    engine.dispose()
    diffs = schema_differences(database_url)
    assert any("ix_instances_status" in repr(d) for d in diffs), diffs


def _upgrade_in_child(url: str) -> None:
    upgrade(url)


def test_concurrent_upgrades_are_serialised(database_url: str) -> None:
    """Several roles starting at once each migrate; all succeed and the schema is built once."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_upgrade_in_child, args=(database_url,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert current_revision(database_url) == head_revision()
    assert schema_differences(database_url) == []


@pytest.mark.slow  # runs `fracture-triage db` three times
def test_cli_db_upgrade_and_check(tmp_path: Path) -> None:
    data = tmp_path / "fresh"  # does not exist yet: `db upgrade` creates it
    run = subprocess.run(
        [*CLI, "db", "upgrade", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert f"is at revision {head_revision()}" in run.stdout
    assert (data / "triage.db").is_file()

    check = subprocess.run(
        [*CLI, "db", "check", "--data-dir", str(data)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr

    engine = make_engine(f"sqlite:///{data / 'triage.db'}")
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_results_instance_id"))
    engine.dispose()
    check = subprocess.run(
        [*CLI, "db", "check", "--data-dir", str(data)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 1
    assert "ix_results_instance_id" in check.stdout


@pytest.mark.parametrize("journal", ["wal"])
def test_sqlite_database_is_in_wal_mode(tmp_path: Path, journal: str) -> None:
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == journal
    engine.dispose()


def test_a_current_database_is_recognised_without_alembic(database_url: str) -> None:
    """Roles start against a migrated database without importing Alembic (memory and
    start-up time of every worker process); the recorded head is Alembic's own."""
    from db.migrations import HEAD_REVISION, is_current

    assert head_revision() == HEAD_REVISION
    assert not is_current(database_url)
    upgrade(database_url)
    assert is_current(database_url)
    code = (
        "import sys; from db.migrations import upgrade; "
        f"upgrade({database_url!r}); print('alembic' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
