"""Group commit (db.group_commit) on a real SQLite file: several threads' units of work share
one transaction, each caller returns only once its work is committed, and one unit's
failure neither loses nor fails the others."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.group_commit import GroupCommit
from db.session import make_engine, make_session_factory

metadata = MetaData()
rows = Table(
    "rows", metadata, Column("id", Integer, primary_key=True), Column("name", String, unique=True)
)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'group.db'}")
    metadata.create_all(engine)
    yield make_session_factory(engine)
    engine.dispose()


def names(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(rows.c.name)))


def insert(name: str, before: Callable[[], None] = lambda: None) -> Callable[[Session], int]:
    def work(session: Session) -> int:
        before()
        inserted = session.execute(rows.insert().values(name=name).returning(rows.c.id))
        return int(inserted.scalar_one())

    return work


def run_all(
    writes: GroupCommit, works: dict[str, Callable[[Session], int]]
) -> tuple[list[threading.Thread], dict[str, object]]:
    """Each work on its own thread; what each caller got back (a result or an exception)."""
    outcome: dict[str, object] = {}

    def call(key: str, work: Callable[[Session], int]) -> None:
        try:
            outcome[key] = writes.run(work)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcome[key] = exc

    threads = [threading.Thread(target=call, args=item) for item in works.items()]
    for thread in threads:
        thread.start()
    return threads, outcome


def test_waiting_units_share_one_transaction_and_return_after_it(
    sessions: sessionmaker[Session],
) -> None:
    writes = GroupCommit(sessions)
    first_running, release = threading.Event(), threading.Event()

    def hold() -> None:  # keeps the first transaction open while the others arrive
        first_running.set()
        assert release.wait(10)

    first_thread, first = run_all(writes, {"first": insert("first", hold)})
    assert first_running.wait(10)
    threads, outcome = run_all(writes, {f"n{i}": insert(f"n{i}") for i in range(7)})
    while writes._queue.qsize() < 7:  # all seven handed over behind the open transaction
        threading.Event().wait(0.01)
    release.set()
    for thread in [*first_thread, *threads]:
        thread.join(10)
    outcome |= first
    assert all(isinstance(v, int) for v in outcome.values()), outcome
    assert len(set(outcome.values())) == 8  # eight rows, eight ids
    assert names(sessions) == {"first", *(f"n{i}" for i in range(7))}
    assert (writes.units, writes.batches) == (8, 2)  # the seven in one transaction
    writes.close()


def test_a_failing_unit_fails_alone(sessions: sessionmaker[Session]) -> None:
    writes = GroupCommit(sessions)
    assert writes.run(insert("taken")) > 0
    release = threading.Event()
    held, _ = run_all(writes, {"hold": insert("hold", lambda: None if release.wait(10) else None)})
    works: dict[str, Callable[[Session], int]] = {f"ok{i}": insert(f"ok{i}") for i in range(3)}
    works["duplicate"] = insert("taken")  # the unique name: IntegrityError

    def refuse() -> None:
        raise ValueError("refused by the unit itself")

    works["refused"] = insert("refused", refuse)
    threads, outcome = run_all(writes, works)
    while writes._queue.qsize() < len(works):
        threading.Event().wait(0.01)
    release.set()
    for thread in [*held, *threads]:
        thread.join(10)
    assert isinstance(outcome["refused"], ValueError)
    assert "UNIQUE" in str(outcome["duplicate"])
    assert all(isinstance(outcome[f"ok{i}"], int) for i in range(3))
    assert names(sessions) == {"taken", "hold", "ok0", "ok1", "ok2"}
    writes.close()


def test_a_failing_database_fails_every_caller_at_once(sessions: sessionmaker[Session]) -> None:
    writes = GroupCommit(sessions)

    def broken(session: Session) -> int:
        session.execute(text("INSERT INTO no_such_table VALUES (1)"))
        return 0

    with pytest.raises(OperationalError):
        writes.run(broken)
    assert writes.run(insert("after")) > 0  # the thread carries on
    writes.close()
    assert writes.run(insert("closed")) > 0  # after close: on the caller's thread
    assert names(sessions) == {"after", "closed"}


def test_submitted_work_is_committed_by_close(sessions: sessionmaker[Session]) -> None:
    writes = GroupCommit(sessions)

    def add(name: str) -> Callable[[Session], None]:
        def work(session: Session) -> None:
            insert(name)(session)

        return work

    futures = [writes.submit(add(f"s{i}")) for i in range(5)]
    writes.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert names(sessions) == {f"s{i}" for i in range(5)}
