"""Where and how received objects are written: durable before anything is acknowledged.

Layout under ``Settings.storage_dir``::

    <Study Instance UID>/<Series Instance UID>/<SOP Instance UID>.dcm   accepted objects
    rejected/<sha256 of the content>.dcm                                refused objects

Accepted paths are built from UIDs checked by :func:`fracture_triage.uids.is_valid_uid`
(digits and dots only), so a peer cannot steer a path. Refused objects are kept for the
administrator under a content hash: a peer retrying the same bad object writes one file.
Objects are written with :func:`fracture_triage.files.write_atomic` (the writer the SRs use
too), through hidden temporary files (``.incoming-*.tmp``) in the same folder, named after
their writer (host, boot and PID namespace, pid); those a crash leaves behind are removed
when the node starts (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from dicom_node.validate import Uids
from fracture_triage.files import is_temporary, temporary_writer_gone, write_atomic
from fracture_triage.uids import is_valid_uid

__all__ = [
    "dataset_sha256",
    "instance_path",
    "rejected_path",
    "remove_stale_temporaries",
    "stored_dataset_sha256",
    "write_atomic",
]

REJECTED_DIR = "rejected"
#: A temporary file left untouched this long is a crash's leftover, not a write in progress.
STALE_TEMPORARY_S = 60.0


def instance_path(storage_dir: Path, uids: Uids) -> Path:
    """The file of an accepted instance; refuses any UID that is not digits and dots."""
    parts = (uids.study_instance_uid, uids.series_instance_uid, uids.sop_instance_uid)
    for part in parts:
        if not is_valid_uid(part):  # defence in depth: the handler validated them already
            raise ValueError("refusing to build a storage path from an invalid UID")
    return storage_dir / parts[0] / parts[1] / f"{parts[2]}.dcm"


def dataset_sha256(dataset_bytes: bytes) -> str:
    """The digest recorded for a stored object: its data set as received, without the File
    Meta Information (which names the sender's AE title, so the same object re-sent from
    another peer would otherwise differ)."""
    return hashlib.sha256(dataset_bytes).hexdigest()


def stored_dataset_sha256(path: Path) -> str | None:
    """:func:`dataset_sha256` of a stored Part 10 file (for instances recorded before the
    digest was), or ``None`` when it cannot be read.

    The data set starts after the 128-byte preamble, ``DICM`` and the File Meta Information,
    whose length is in its first element, File Meta Information Group Length (0002,0000):
    12 bytes in Explicit VR Little Endian (PS3.10 7.1).
    """
    try:
        content = path.read_bytes()
    except OSError:
        return None
    if len(content) < 144 or content[128:136] != b"DICM\x02\x00\x00\x00":
        return None
    group_length = int.from_bytes(content[140:144], "little")
    return dataset_sha256(content[144 + group_length :])


def rejected_path(storage_dir: Path, content: bytes) -> Path:
    return storage_dir / REJECTED_DIR / f"{hashlib.sha256(content).hexdigest()[:40]}.dcm"


def remove_stale_temporaries(storage_dir: Path, older_than_s: float = STALE_TEMPORARY_S) -> int:
    """Delete the temporary files of writes a crash cut short; return how many.

    An object is acknowledged only after its temporary file was complete, fsynced and renamed
    onto its final name, so a temporary file still there was never acknowledged: the peer
    got no Success and sends the object again. Deleting it loses nothing.

    At start-up every temporary the node's own previous run left is such a leftover, however
    recent (a restart within seconds of a crash is the usual case): a file is removed when
    its name shows its writer has stopped (:func:`fracture_triage.files.temporary_writer_gone`:
    another boot or PID namespace of this host, or a pid that no longer runs). Only a writer
    that may still run -- another node process on this host sharing the folder, or one on
    another host (a shared volume) -- keeps its file, unless it was not modified for
    ``older_than_s`` seconds: no write takes that long (the object is in memory before its
    file is written), so such a file is a leftover too, e.g. of a temporary named before
    writers were named, or of a pid reused since.
    """
    cutoff = time.time() - older_than_s
    removed = 0
    for folder, _dirs, names in os.walk(storage_dir):
        for name in names:
            if not is_temporary(name):
                continue
            path = Path(folder, name)
            try:
                if temporary_writer_gone(path) or path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # renamed or removed meanwhile
                continue
    return removed
