"""Patient data at rest: readable by the node's user only.

The data directory holds received radiographs, produced SRs and (by default) the SQLite
database with patient names, ids and accession numbers. Every role calls :func:`protect`
first: it sets the process umask to 0o077, so whatever the role and its children create
afterwards (folders 0700; the database, its ``-wal`` and ``-shm``, which SQLite creates
with the database file's mode, 0600; the embedded Redis' files) is private to the user,
and it tightens what an earlier version or another tool left readable to others, saying so
in the log. Objects and SRs are written through ``tempfile.mkstemp`` (0600 whatever the
umask) and renamed, so they keep that mode.

The whole tree is walked only when the data directory itself was found open to others (a
data directory made before this module, or by hand); otherwise only the data directory's
own entries are checked, so a start does not read millions of folder entries.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: Permission bits removed from every file the node creates: group and others get nothing.
UMASK = 0o077
#: Modes of what the node keeps: folders and files only its user can reach.
DIR_MODE = 0o700
FILE_MODE = 0o600


def set_umask() -> int:
    """Set the process umask to :data:`UMASK` (children inherit it); return the previous."""
    return os.umask(UMASK)


def _tighten(path: Path, st: os.stat_result) -> bool:
    """Remove group and other permissions from ``path``; whether anything changed."""
    if not st.st_mode & 0o077:
        return False
    keep = stat.S_IMODE(st.st_mode) & 0o700
    os.chmod(path, keep | (0o700 if stat.S_ISDIR(st.st_mode) else 0))
    return True


def tighten_tree(data_dir: Path) -> int:
    """Make ``data_dir`` 0700 and what it holds private to this user; return how many
    entries were changed (symbolic links are neither followed nor changed)."""
    if not data_dir.is_dir():
        return 0
    top = data_dir.stat()
    changed = int(_tighten(data_dir, top))
    # A data directory found closed was kept so by this module: its entries were made
    # under the umask, only its own entries (the database, the top folders) are checked.
    deep = bool(top.st_mode & 0o077)
    walk: Iterator[tuple[Path, list[str]]]
    if deep:
        walk = ((Path(folder), dirs + files) for folder, dirs, files in os.walk(data_dir))
    else:
        walk = iter([(data_dir, os.listdir(data_dir))])
    for folder, names in walk:
        for name in names:
            path = folder / name
            try:
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    continue
                changed += _tighten(path, st)
            except FileNotFoundError:  # removed meanwhile (a temporary renamed, say)
                continue
    return changed


def protect(data_dir: Path, *, create: bool = True) -> None:
    """What every role does first: the umask, then the data directory (created 0700 when
    ``create``) and what is in it made private; tightening is logged."""
    set_umask()
    if create:
        data_dir.mkdir(parents=True, exist_ok=True)
    try:
        changed = tighten_tree(data_dir)
    except PermissionError as exc:  # e.g. files of another user on a shared volume
        log.warning("could not restrict the permissions under %s: %s", data_dir, exc)
        return
    if changed:
        log.warning(
            "data directory %s: removed group/other access from %d file(s) and folder(s) "
            "(patient data is kept private to the node's user: folders 0700, files 0600)",
            data_dir.resolve(),
            changed,
        )
