"""Patient data at rest (``fracture_triage.at_rest``): the real roles create nothing that
another local user can read, and tighten what an earlier version left open."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import require
from tests.servers import RedisServer, free_port, wait_for_port
from tests.test_cli_results import cli
from tests.test_scp import dcmtk

TINY_CR = "CR_cspine_MONO1_12b_16x16_tiny.dcm"


def open_to_others(root: Path) -> list[str]:
    """Every entry under ``root`` (itself included) that group or others may access."""
    found = []
    for folder, dirs, files in os.walk(root):
        for path in [Path(folder)] + [Path(folder, n) for n in dirs + files]:
            st = path.lstat()
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                found.append(f"{path.relative_to(root)} {stat.filemode(st.st_mode)}")
    return sorted(set(found))


@contextmanager
def scp_role(
    data_dir: Path, broker_url: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[int]:
    """``fracture-triage scp`` as its own process, started from a shell whose umask is 0o022
    (the usual default), with ``env`` added to its environment; yields the port it listens
    on (``FRACTURE_TRIAGE_TLS_PORT`` when ``env`` sets it and turns the plain port off)."""
    port = free_port()
    env = {
        **os.environ,
        "FRACTURE_TRIAGE_DATA_DIR": str(data_dir),
        "FRACTURE_TRIAGE_BROKER_URL": broker_url,
        "FRACTURE_TRIAGE_DICOM_PORT": str(port),
        **(env or {}),
    }
    if env["FRACTURE_TRIAGE_DICOM_PORT"] == "0":
        port = int(env["FRACTURE_TRIAGE_TLS_PORT"])
    old = os.umask(0o022)
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen([*cli(), "scp"], env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        os.umask(old)
    try:
        wait_for_port(port, timeout=60, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow  # runs the SCP role and dcmtk
def test_scp_role_keeps_everything_private_and_tightens_an_open_data_dir(
    tmp_path: Path, redis: RedisServer, dicom_samples: Path
) -> None:
    # What an earlier version left: a world-readable data directory, database and object.
    data_dir = tmp_path / "data"
    old_object = data_dir / "objects" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    old_object.parent.mkdir(parents=True)
    old_object.write_bytes(b"not really DICOM")
    for path in (data_dir, data_dir / "objects", old_object.parent.parent, old_object.parent):
        path.chmod(0o755)
    old_object.chmod(0o644)
    assert open_to_others(data_dir)

    log = tmp_path / "scp.log"
    with scp_role(data_dir, redis.url, log) as port:
        sent = subprocess.run(
            [
                dcmtk("storescu"),
                "-aec",
                "FXTRIAGE",
                "127.0.0.1",
                str(port),
                str(require(dicom_samples / TINY_CR)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        # While the role runs, SQLite's write-ahead log and shared memory file exist too.
        db = data_dir / "triage.db"
        deadline = time.monotonic() + 10
        journal = [db.with_name("triage.db-wal"), db.with_name("triage.db-shm")]
        while not all(p.exists() for p in journal):
            assert time.monotonic() < deadline, sorted(p.name for p in data_dir.iterdir())
            time.sleep(0.1)
        stored = [p for p in (data_dir / "objects").rglob("*.dcm") if p != old_object]
        assert len(stored) == 1
        assert open_to_others(data_dir) == []
        for path in (db, *journal, *stored):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(stored[0].parent.stat().st_mode) == 0o700
    text = log.read_text(errors="replace")
    assert "removed group/other access from 5 file(s) and folder(s)" in text


def test_db_upgrade_creates_a_private_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    old = os.umask(0o022)
    try:
        run = subprocess.run(
            [*cli(), "db", "upgrade", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.umask(old)
    assert run.returncode == 0, run.stderr
    assert (data_dir / "triage.db").is_file()
    assert open_to_others(data_dir) == []
    # Nothing was loose, so nothing was announced.
    assert "removed group/other access" not in run.stderr
