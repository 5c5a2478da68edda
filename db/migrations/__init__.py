"""Alembic migrations for the schema in ``db.models``, run programmatically.

``fracture-triage db upgrade`` calls :func:`upgrade`; every role calls it at start too, so a
fresh data directory or database works. The Alembic configuration ships inside this package
(``alembic.ini``) so that an installed copy finds its migrations.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from alembic.config import Config

HERE = Path(__file__).resolve().parent
INI = HERE / "alembic.ini"
#: The newest migration in ``versions/`` (a test holds it equal to Alembic's own head). A
#: role starting against a database already at this revision never imports Alembic, which
#: costs every process ~35 MB and ~0.4 s (the worker's pool children inherit both).
HEAD_REVISION = "0011"


def alembic_config(url: str) -> Config:
    """An Alembic ``Config`` for this package's migrations and the database at ``url``."""
    from alembic.config import Config

    cfg = Config(str(INI))
    cfg.set_main_option("script_location", str(HERE))
    # Passed as an attribute, not an ini option: ini interpolation would mangle '%' in passwords.
    cfg.attributes["url"] = url
    return cfg


@contextmanager
def _sqlite_file_lock(url: str) -> Iterator[None]:
    """Serialise upgrades of one SQLite file across processes (PostgreSQL uses an advisory
    lock in ``env.py``)."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        yield
        return
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".migrate-lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_current(url: str) -> bool:
    """Whether the database at ``url`` is at :data:`HEAD_REVISION`, read with SQLAlchemy
    alone; any failure (no such file, no ``alembic_version`` table yet) is a ``False``."""
    from db.session import make_engine

    try:
        engine = make_engine(url)
    except sa_exc.SQLAlchemyError:
        return False
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    except sa_exc.SQLAlchemyError:
        return False
    finally:
        engine.dispose()
    return [r[0] for r in rows] == [HEAD_REVISION]


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (creating it from nothing if needed)."""
    if revision == "head" and is_current(url):
        return
    from alembic import command

    with _sqlite_file_lock(url):
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    with _sqlite_file_lock(url):
        command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The revision the database is at, or ``None`` for an empty database."""
    from alembic.runtime.migration import MigrationContext

    from db.session import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def schema_differences(url: str) -> list[Any]:
    """What ``alembic check`` would complain about: differences between the models and the
    database at ``url`` (empty when the migrations produce exactly ``db.models``)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.models import Base
    from db.session import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()
