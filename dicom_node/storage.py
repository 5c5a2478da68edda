"""Where and how received objects are written: durable before anything is acknowledged.

Layout under ``Settings.storage_dir``::

    <Study Instance UID>/<Series Instance UID>/<SOP Instance UID>.dcm   accepted objects
    rejected/<sha256 of the content>.dcm                                refused objects

Accepted paths are built from UIDs checked by :func:`dicom_node.validate.is_valid_uid`
(digits and dots only), so a peer cannot steer a path. Refused objects are kept for the
administrator under a content hash: a peer retrying the same bad object writes one file.
Objects are written through hidden temporary files (``.incoming-*.tmp``) in the same folder;
those a crash leaves behind are removed when the node starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from pathlib import Path

from dicom_node.validate import Uids, is_valid_uid

REJECTED_DIR = "rejected"

#: Name of the temporary file :func:`write_atomic` writes before renaming it.
TEMP_PREFIX, TEMP_SUFFIX = ".incoming-", ".tmp"
#: A temporary file left untouched this long is a crash's leftover, not a write in progress.
STALE_TEMPORARY_S = 60.0


def instance_path(storage_dir: Path, uids: Uids) -> Path:
    """The file of an accepted instance; refuses any UID that is not digits and dots."""
    parts = (uids.study_instance_uid, uids.series_instance_uid, uids.sop_instance_uid)
    for part in parts:
        if not is_valid_uid(part):  # defence in depth: the handler validated them already
            raise ValueError("refusing to build a storage path from an invalid UID")
    return storage_dir / parts[0] / parts[1] / f"{parts[2]}.dcm"


def rejected_path(storage_dir: Path, content: bytes) -> Path:
    return storage_dir / REJECTED_DIR / f"{hashlib.sha256(content).hexdigest()[:40]}.dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, chunks: list[bytes]) -> None:
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
    _fsync_dir(path.parent)
    # Each new folder's entry lives in its parent: fsync those too, innermost first.
    for folder in created:
        _fsync_dir(folder.parent)


def remove_stale_temporaries(storage_dir: Path, older_than_s: float = STALE_TEMPORARY_S) -> int:
    """Delete the temporary files of writes a crash cut short; return how many.

    An object is acknowledged only after its temporary file was complete, fsynced and renamed
    onto its final name, so a temporary file still there was never acknowledged: the peer
    got no Success and sends the object again. Files modified in the last ``older_than_s``
    seconds are kept, in case another node process sharing the folder is writing them.
    """
    cutoff = time.time() - older_than_s
    removed = 0
    for folder, _dirs, names in os.walk(storage_dir):
        for name in names:
            if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
                continue
            path = Path(folder, name)
            try:
                if path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # renamed or removed meanwhile
                continue
    return removed
