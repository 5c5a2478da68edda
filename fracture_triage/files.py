"""The one atomic, durable file write: complete and on disk, or absent.

Used for received objects (``dicom_node.storage``) and produced SRs (``worker.sr``) alike, so
both survive a crash or a power cut the same way. Imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

#: Name of the temporary file :func:`write_atomic` writes before renaming it.
TEMP_PREFIX, TEMP_SUFFIX = ".incoming-", ".tmp"

# A temporary file names its writer: ``.incoming-<host>.<space>.<pid>.<random>.tmp``, where
# <host> is a digest of the host name and <space> one of the host name, the kernel's boot id
# and the writer's PID namespace (the set of processes its pid is a number in). So whoever
# finds the file later can tell whether its writer can still be running (see
# :func:`temporary_writer_gone`) instead of guessing from its age.
_TEMP_NAME = re.compile(
    re.escape(TEMP_PREFIX)
    + r"([0-9a-f]{8})\.([0-9a-f]{8})\.([0-9]+)\.[A-Za-z0-9_]+"
    + re.escape(TEMP_SUFFIX)
)

# The temporaries this process is writing now (a start-up sweep in the same process, e.g.
# a second SCP in one test process, must not take them for a dead writer's).
_in_flight: set[str] = set()
_in_flight_lock = threading.Lock()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@functools.cache
def writer_keys() -> tuple[str, str]:
    """(host, process space) digests of this process, as its temporary files carry them.

    Neither changes during a process's life (a fork keeps both; the pid, which does change,
    is read at each write). Without /proc (not Linux) the space key is the host's alone, and
    a previous boot's files then look like this one's: their pids are checked, and the
    age rule of the sweep covers the rest.
    """
    host = socket.gethostname()
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return _digest(host), _digest(host, boot, pid_ns)


def temporary_prefix(pid: int | None = None) -> str:
    """The start of the names of the temporary files process ``pid`` (default: this one)
    writes on this host."""
    host, space = writer_keys()
    return f"{TEMP_PREFIX}{host}.{space}.{os.getpid() if pid is None else pid}."


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`write_atomic`'s temporaries (any format)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def temporary_writer_gone(path: Path) -> bool | None:
    """Whether the process that wrote temporary ``path`` has certainly stopped.

    ``True``: written on this host in another boot or PID namespace (a restarted machine or
    container: every process of that space is gone), or by a pid that no longer runs, or by
    this very process but not being written now. ``False``: its writer runs. ``None``:
    cannot tell (another host sharing the folder, or a name without a writer, as written
    before writers were named); the caller falls back on the file's age.

    A pid reused since by an unrelated process reads as running: the file stays until a
    later sweep finds it old. Host names are taken to tell nodes apart: two containers that
    share a folder need distinct host names (Docker gives each its own).
    """
    match = _TEMP_NAME.fullmatch(path.name)
    if match is None:
        return None
    host, space = writer_keys()
    if match.group(1) != host:
        return None
    if match.group(2) != space:
        return True
    pid = int(match.group(3))
    if pid == os.getpid():
        with _in_flight_lock:
            return os.path.abspath(path) not in _in_flight
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


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
    # Created and registered under the lock, so a sweep in this process that sees the file
    # also sees it registered.
    with _in_flight_lock:
        fd, tmp_name = tempfile.mkstemp(
            prefix=temporary_prefix(), suffix=TEMP_SUFFIX, dir=path.parent
        )
        tmp_name = os.path.abspath(tmp_name)
        _in_flight.add(tmp_name)
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
    finally:
        with _in_flight_lock:
            _in_flight.discard(tmp_name)
    fsync_dir(path.parent)
    # Each new folder's entry lives in its parent: fsync those too, innermost first.
    for folder in created:
        fsync_dir(folder.parent)
