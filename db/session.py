"""Engine and session factory, built from settings at the entry point (never at import)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL mode and a busy timeout so several roles can share it."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged object must keep its row across a power loss.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def in_transaction(
    sessions: sessionmaker[Session], work: Callable[[Session], T], *, attempts: int = 3
) -> T:
    """Run ``work`` as one unit of work and commit it once; return what it returned.

    Repository functions never commit; this is where a request or a task does. An
    ``IntegrityError`` means another writer inserted the same unique row (a study, a series,
    an instance, a result) first: the transaction is rolled back and ``work`` runs again,
    now finding that row. Rows returned stay readable (``expire_on_commit=False``).
    """
    for attempt in range(1, attempts + 1):
        with sessions() as session:
            try:
                result = work(session)
                session.commit()
                return result
            except IntegrityError:
                session.rollback()
                if attempt == attempts:
                    raise
    raise AssertionError("unreachable")  # the loop returns or raises
