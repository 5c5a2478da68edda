"""The node's roles as separate processes: start-up to first classification and memory.

``python -m worker.benchmark [--dicom-dir DIR] [-n N]`` starts, on loopback and in a
temporary data directory, a real redis-server and the roles as the CLI runs them
(``fracture-triage scp``, ``sweeper``, ``api``), sends N DICOM files with dcmtk's
``dcmsend`` (stored and queued, nothing classifies them yet), then starts
``fracture-triage worker`` and prints:

- seconds from the worker's start to its first recorded classification (the first file's
  result row in the database) and to the last one;
- each role's resident memory (VmRSS of every process of the role: the Celery worker's main
  process and its pool child, which holds the model, are listed apart).

Before the roles, in this process (``--evidence-only``: that alone; ``--no-evidence``: not
at all, the start-up and memory figures alone, ~10 s), the evidence figures on
every decodable DICOM sample, side by side (:func:`evidence_figures`): images per second of
the classification alone (``Classifier.classify_file``) and of the worker's path with the
evidence (``Classifier.explain_file`` + ``worker.evidence.make_evidence``: map, overlay,
Secondary Capture built and written), and the capture's added milliseconds per image
(mean, median, 90th percentile, max; the first capture of a process apart: highdicom reads
its copy of the standard once).

The figures print side by side as one JSON object; nothing is asserted.

``--memory-stages`` prints instead where a worker's memory goes, in this (fresh) process:
VmRSS at start, after importing what the worker's pool child imports, after loading the
export (LiteRT's XNNPACK delegate: packed weights and the working set of the 8-view batch),
after the first image classified (the first inference; the decoders' libraries), after its
evidence capture, and after N images (with ``malloc_trim`` after each, as the worker does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from db.models import Study
    from fracture_triage.settings import Settings
    from model.inference import Classifier, Explained
    from worker.evidence import MadeEvidence


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def rss_mb(pid: int) -> float:
    """Resident set size of one process (``/proc/PID/status`` VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Celery's prefork pool children of the worker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _counts(db: Path) -> dict[str, int]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute("SELECT status, count(*) FROM instances GROUP BY status")
            return {str(s): int(n) for s, n in rows}
    except sqlite3.Error:
        return {}


def _wait_for(db: Path, done: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = _counts(db)
        if counts.get("done", 0) + counts.get("failed", 0) >= done:
            return counts
        time.sleep(0.02)
    raise SystemExit(f"only {_counts(db)} after {timeout:.0f} s")


def _samples(dicom_dir: Path) -> list[Path]:
    """The DICOM samples, without those broken on purpose (``BAD_*``)."""
    return sorted(f for f in dicom_dir.glob("*.dcm") if not f.name.startswith("BAD_"))


def capture(
    clf: Classifier, settings: Settings, study: Study, explained: Explained, f: Path, i: int
) -> MadeEvidence:
    """The worker's evidence Secondary Capture of ``explained`` (image ``f``, instance id
    ``i`` of ``study``), as :func:`worker.evidence.make_evidence` makes it."""
    from db.models import Instance
    from worker.evidence import make_evidence

    instance = Instance(
        id=i,
        sop_instance_uid=f"{study.study_instance_uid}.{i}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        storage_path=str(f),
    )
    p = explained.prediction.probability
    return make_evidence(
        settings, instance, study, clf.card, explained.gray, explained.map, p, clf.threshold
    )


def evidence_figures(dicom_dir: Path, repeat: int = 2) -> dict[str, object]:
    """Classification alone against classification with the evidence capture, in-process,
    on the decodable DICOM samples (each ``repeat`` times), with the shipped model."""
    import numpy as np

    from db.models import Study
    from fracture_triage.settings import Settings
    from model.artifact import resolve_model_dir
    from model.inference import Classifier, ImageError

    clf = Classifier.load(resolve_model_dir(None))
    files = []
    for f in _samples(dicom_dir):
        try:
            clf.prepare(f)
        except ImageError:
            continue
        files.append(f)
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-evidence-"))
    settings = Settings(data_dir=tmp)
    study = Study(study_instance_uid="1.2.826.0.1.3680043.10.1.99")

    writes: list[float] = []

    def with_evidence(f: Path, i: int) -> float:
        explained = clf.explain_file(f)
        t = time.perf_counter()
        made = capture(clf, settings, study, explained, f, i)
        if made.path is None:
            return float("nan")
        writes.append(made.write_ms)
        return (time.perf_counter() - t) * 1000

    try:
        t = time.perf_counter()
        first_ms = with_evidence(files[-1], 10_000)  # cold: highdicom loads the standard once
        first_total = (time.perf_counter() - t) * 1000
        clf.classify_file(files[0])
        n = len(files) * repeat
        t = time.perf_counter()
        for k in range(n):
            clf.classify_file(files[k % len(files)])
        alone = n / (time.perf_counter() - t)
        added: list[float] = []
        writes.clear()
        t = time.perf_counter()
        for k in range(n):
            added.append(with_evidence(files[k % len(files)], k + 1))
        evidence = n / (time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ms = np.array([a for a in added if a == a])
    row: dict[str, object] = {
        "dicom_files": len(files),
        "images": n,
        "classify_only_img_per_s": round(alone, 2),
        "classify_with_evidence_img_per_s": round(evidence, 2),
        "evidence_added_ms_mean": round(float(ms.mean()), 1),
        "evidence_added_ms_median": round(float(np.median(ms)), 1),
        "evidence_added_ms_p90": round(float(np.percentile(ms, 90)), 1),
        "evidence_added_ms_max": round(float(ms.max()), 1),
        "evidence_added_ms_median_without_durable_write": round(
            float(np.median(ms - np.array(writes))), 1
        ),
        "evidence_durable_write_ms_median": round(float(np.median(writes)), 1),
        "evidence_not_produced": int(len(added) - len(ms)),
        "first_capture_of_process_ms": round(first_ms, 1),
        "first_image_of_process_total_ms": round(first_total, 1),
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(f"evidence, worker path: {json.dumps(row)}", flush=True)
    return row


def memory_stages(dicom_dir: Path, n: int) -> dict[str, float]:
    """VmRSS (MB) of this process at each stage of a worker's life (module doc)."""
    stages = {"start": rss_mb(os.getpid())}
    import worker.evidence
    import worker.sr  # for its memory only: the worker's child builds the reports too
    import worker.tasks
    from model.artifact import resolve_model_dir
    from model.inference import Classifier, ImageError

    stages["imports"] = rss_mb(os.getpid())
    clf = Classifier.load(resolve_model_dir(None))
    stages["model_loaded"] = rss_mb(os.getpid())
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-memory-"))
    try:
        from db.models import Study
        from fracture_triage.settings import Settings

        settings = Settings(data_dir=tmp)
        study = Study(study_instance_uid="1.2.826.0.1.3680043.10.1.98")
        done = 0
        for f in _samples(dicom_dir):
            if done == n:
                break
            try:
                explained = clf.explain_file(f)
            except ImageError:
                continue
            if done == 0:
                stages["first_image_classified"] = rss_mb(os.getpid())
            capture(clf, settings, study, explained, f, done + 1)
            worker.tasks.release_freed_memory()
            done += 1
            if done == 1:
                stages["first_capture_made"] = rss_mb(os.getpid())
        stages[f"after_{done}_images"] = rss_mb(os.getpid())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: round(v, 1) for k, v in stages.items()}


def main(argv: Sequence[str] | None = None) -> int:
    repo = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dicom-dir", type=Path, default=repo.parent / "shared" / "dicom-samples")
    p.add_argument("-n", type=int, default=8, help="DICOM files to send (valid ones first)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--evidence-only", action="store_true", help="the evidence figures alone")
    mode.add_argument("--no-evidence", action="store_true", help="the roles' figures alone")
    mode.add_argument("--memory-stages", action="store_true", help="where a worker's memory goes")
    args = p.parse_args(argv)
    if args.memory_stages:
        print(json.dumps(memory_stages(args.dicom_dir, args.n), indent=1))
        return 0
    evidence = None if args.no_evidence else evidence_figures(args.dicom_dir)
    if args.evidence_only:
        if args.out:
            args.out.write_text(json.dumps({"evidence": evidence}, indent=2) + "\n")
        return 0
    dcmsend = shutil.which("dcmsend")
    redis_server = shutil.which("redis-server")
    if dcmsend is None or redis_server is None:
        print("error: needs dcmtk's dcmsend and redis-server on PATH", file=sys.stderr)
        return 2
    files = sorted(f for f in args.dicom_dir.rglob("*.dcm") if not f.name.startswith("BAD_"))
    files = files[: args.n]
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    redis_port, dicom_port, http_port = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "FRACTURE_TRIAGE_DATA_DIR": str(tmp / "data"),
        "FRACTURE_TRIAGE_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "FRACTURE_TRIAGE_DICOM_PORT": str(dicom_port),
        "FRACTURE_TRIAGE_HTTP_PORT": str(http_port),
        "FRACTURE_TRIAGE_STUDY_STABLE_SECONDS": "3600",  # classification only, no reports
        # every sample classified: most are chest films, outside the default scope
        "FRACTURE_TRIAGE_BODY_PARTS": "*",
    }
    cli = [sys.executable, "-m", "fracture_triage.cli"]

    def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["redis"] = spawn(
            [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
        )
        _wait_port(redis_port, 20)
        subprocess.run([*cli, "db", "upgrade"], check=True, capture_output=True, env=env)
        for role in ("scp", "sweeper", "api"):
            procs[role] = spawn([*cli, role])
        _wait_port(dicom_port, 60)
        _wait_port(http_port, 60)
        sent = subprocess.run(
            [
                dcmsend,
                "-nh",
                "+f",
                "-nuc",
                "-aec",
                "FXTRIAGE",
                "127.0.0.1",
                str(dicom_port),
                *map(str, files),
            ],
            check=False,
            capture_output=True,
            env={**env, "TCP_NODELAY": "1"},
        )
        db = tmp / "data" / "triage.db"
        stored = sum(_counts(db).values())
        if not stored:
            print(sent.stdout.decode(errors="replace")[-2000:], file=sys.stderr)
            raise SystemExit("the SCP stored nothing")
        t0 = time.monotonic()
        worker_log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - closed with the process
        procs["worker"] = subprocess.Popen(
            [*cli, "worker", "--concurrency", "1"], stdout=worker_log, stderr=worker_log, env=env
        )
        _wait_for(db, 1, 120)
        first = time.monotonic() - t0
        counts = _wait_for(db, stored, 600)
        last = time.monotonic() - t0
        worker_pid = procs["worker"].pid
        rss = {role: rss_mb(proc.pid) for role, proc in procs.items() if role != "worker"}
        rss["worker_main"] = rss_mb(worker_pid)
        for i, child in enumerate(children(worker_pid)):
            rss[f"worker_pool_child_{i}"] = rss_mb(child)
        result = {
            "files_sent": len(files),
            "stored": stored,
            "statuses": counts,
            "worker_start_to_first_classification_s": round(first, 2),
            "worker_start_to_last_classification_s": round(last, 2),
            "rss_mb": rss,
            "cpu_cores": os.cpu_count(),
            "evidence": evidence,
        }
        print(json.dumps(result, indent=1))
        if os.environ.get("BENCH_SHOW_LOG"):
            print((tmp / "worker.log").read_text()[-3000:])
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
