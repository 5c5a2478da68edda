"""Migrated databases for the tests, made quickly.

Running the migrations takes 0.1-0.2 s per database; the web and command-line tests make one
per test. A new SQLite database is instead a copy of one migrated once per test process (the
same file ``upgrade`` would produce); any other URL, or a file that exists, is upgraded."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url

from db.migrations import upgrade

_template: Path | None = None


def _migrated_template() -> Path:
    global _template
    if _template is None:
        folder = Path(tempfile.mkdtemp(prefix="ft-template-"))
        path = folder / "template.db"
        upgrade(f"sqlite:///{path}")
        _template = path
    return _template


def migrated(url: str) -> None:
    """Bring the database at ``url`` to the migrations' head, as :func:`db.migrations.upgrade`
    does."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and database and not Path(database).exists():
        target = Path(database)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_template(), target)
        target.chmod(0o600)  # as the node creates it (patient data at rest)
        return
    upgrade(url)
