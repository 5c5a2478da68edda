"""Alembic environment: runs the migrations against the database named by the settings.

The URL comes, in this order, from the caller (``db.migrations.upgrade`` puts it in
``config.attributes["url"]``), from ``sqlalchemy.url`` in the Alembic configuration, or from
``Settings()`` (``FRACTURE_TRIAGE_DATABASE_URL`` / ``FRACTURE_TRIAGE_DATA_DIR``) when Alembic's
own command line is used. Nothing here runs at import of the ``db`` package.
"""

from __future__ import annotations

from pathlib import Path

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import make_url

from db.models import Base
from db.session import make_engine

#: Key of the PostgreSQL advisory lock that serialises concurrent upgrades (several roles
#: starting at once each run ``db upgrade``). Any constant works; this one spells "fxtr".
_PG_LOCK_KEY = 0x66787472

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return str(url)
    from fracture_triage.settings import Settings

    return Settings().resolved_database_url


def _configure(**kwargs: object) -> None:
    url = _url()
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the DDL instead of running it."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        # A fresh data directory: SQLite creates the file, not the folder.
        Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Batch mode rebuilds a table (copy, drop, rename); with foreign keys enforced
                # dropping a table other tables reference fails. The pragma is a no-op inside
                # a transaction, so it is set before Alembic begins one (Alembic's batch docs).
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            _configure(connection=connection)
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Released at commit; a second upgrader waits, then finds nothing to do.
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY}
                    )
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
