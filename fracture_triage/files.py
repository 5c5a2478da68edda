"""The one atomic, durable file write: complete and on disk, or absent.

Used for received objects (``dicom_node.storage``) and produced SRs (``worker.sr``) alike, so
both survive a crash or a power cut the same way. Imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

#: Name of the temporary file :func:`write_atomic` writes before renaming it.
TEMP_PREFIX, TEMP_SUFFIX = ".incoming-", ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` so that it is complete and durable, or absent.

    A temporary file in the same folder is written and fsynced, renamed over ``path``
    (atomic on POSIX within one file system), and the folder is fsynced so the rename
    itself survives a power cut. Newly created parent folders are fsynced too.
    """
    created: list[Path] = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)
    # Each new folder's entry lives in its parent: fsync those too, innermost first.
    for folder in created:
        fsync_dir(folder.parent)
