"""The fault-and-load run: C-STOREs over several associations while roles are killed and frozen.

``python -m worker.faultload [--count 1000] [--associations 4]`` starts, on loopback and in a
temporary data directory, a real redis-server (no persistence) and the roles as the CLI runs
them (``fracture-triage scp``, ``worker``, ``sweeper``; SQLite), then sends ``--count``
C-STOREs of small real radiographs, each with a fresh SOP Instance UID, over
``--associations`` concurrent pynetdicom associations. A sender behaves as a modality does:
a store with no answer (its association died) is sent again on a new association, a
0xA700 (out of resources) is sent again after a pause, any other status is final.

While the stores go on, after these shares of the count have been acknowledged:

- 15 %: the worker (main process and pool child) is SIGKILLed, with a task in hand (once it
  has stored a first result), and started again 1 s later;
- 30 %: redis-server is frozen (SIGSTOP) for ``--stall`` seconds (30), then SIGKILLed and
  started again empty on its port (every queued message is lost);
- 70 %: the SCP is SIGKILLed and started again 0.5 s later.

Then it waits (``--timeout``) until every acknowledged instance is settled and prints one
JSON object: stores acknowledged, re-sent and refused; the faults and when they came; the
longest C-STORE (and the longest during the Redis stall); for the acknowledged instances,
how many have exactly one result, failed, are still waiting (stuck) or are not in the
database at all (unaccounted); duplicates (an instance with more than one result, or
classified more than once by the worker's log); instances that took more than one attempt
(re-run after the worker kill); seconds from the first store to the last result, and from
the last fault to it. Exit status 0 only when every one of the ``--count`` stores was
acknowledged and classified once, with 0 duplicates, 0 stuck and 0 unaccounted.

Nothing is asserted here beyond that exit status: it prints figures (the test suite's
``tests/test_worker_faults.py`` has the small versions). Reports are not built
(``FRACTURE_TRIAGE_STUDY_STABLE_SECONDS`` = 3600): classification is what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE

from worker.benchmark import _free_port, _wait_port

#: Small, uncompressed samples every stage accepts (the load is the point, not decoding).
SAMPLES = ("DX_thorax_MONO1_8b_odd169x211_EVRLE.dcm", "CR_cspine_MONO1_12b_16x16_tiny.dcm")
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700
#: (share of --count acknowledged, fault)
SCHEDULE = ((0.15, "worker"), (0.30, "redis"), (0.70, "scp"))


@dataclass
class Tally:
    """What the senders saw (shared between their threads)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acknowledged: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)
    resent_no_answer: int = 0
    resent_out_of_resources: int = 0
    longest_store_s: float = 0.0
    longest_in_stall_s: float = 0.0
    stalled: bool = False
    first_store: float = 0.0


class Node:
    """redis-server and the roles, each restartable; logs in ``work``."""

    def __init__(self, work: Path, redis_server: str) -> None:
        self.work = work
        self.redis_server = redis_server
        self.redis_port, self.dicom_port = _free_port(), _free_port()
        self.env = {
            **os.environ,
            "FRACTURE_TRIAGE_DATA_DIR": str(work / "data"),
            "FRACTURE_TRIAGE_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "FRACTURE_TRIAGE_DICOM_PORT": str(self.dicom_port),
            "FRACTURE_TRIAGE_STUDY_STABLE_SECONDS": "3600",
            # every sample classified: most are chest films, outside the default scope
            "FRACTURE_TRIAGE_BODY_PARTS": "*",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str) -> None:
        if role == "redis":
            argv = [self.redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1"]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(self.work)]
        else:
            argv = [sys.executable, "-m", "fracture_triage.cli", role, "--log-level", "INFO"]
        with open(self.work / f"{role}.log", "ab") as log:
            # own process group: a SIGKILL of the role takes its children (the worker's pool)
            self.procs[role] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        if role == "redis":
            _wait_port(self.redis_port, 20)
        elif role == "scp":
            _wait_port(self.dicom_port, 60)

    def signal(self, role: str, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[role].pid, signum)

    def kill(self, role: str) -> None:
        self.signal(role, signal.SIGKILL)
        self.procs[role].wait(10)

    def stop_all(self) -> None:
        for role in ("scp", "sweeper", "worker", "redis"):
            proc = self.procs.get(role)
            if proc is None or proc.poll() is not None:
                continue
            self.signal(role, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill(role)


def _dataset(template: Dataset, study: str, series: str, sop: str) -> Dataset:
    """``template`` as a new instance of ``series`` in ``study`` (built per store: the
    samples are copied whole, pixel data included)."""
    ds = copy.deepcopy(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    return ds


def _send(node: Node, templates: list[Dataset], n: int, index: int, tally: Tally) -> None:
    """One sender: ``n`` stores, studies of its own, re-sending what got no answer."""
    ae = AE(ae_title=f"LOAD{index}")
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 40, 60
    for ds in templates:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    # one study per sample (each sample is another patient: one study holds one, db.identity)
    studies = [generate_uid() for _ in templates]
    series = [generate_uid() for _ in templates]
    todo = [generate_uid() for _ in range(n)]
    i, code = 0, SUCCESS
    while i < len(todo):
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="FXTRIAGE")
        if not assoc.is_established:
            time.sleep(0.3)  # the SCP is down (killed, restarting)
            continue
        while assoc.is_established and i < len(todo):
            k = i % len(templates)
            ds = _dataset(templates[k], studies[k], series[k], todo[i])
            started = time.monotonic()
            status = assoc.send_c_store(ds)
            seconds = time.monotonic() - started
            with tally.lock:
                tally.longest_store_s = max(tally.longest_store_s, seconds)
                if tally.stalled:
                    tally.longest_in_stall_s = max(tally.longest_in_stall_s, seconds)
                if "Status" not in status:
                    tally.resent_no_answer += 1  # no answer: sent again, new association
                    break
                code = int(status.Status)
                if code == OUT_OF_RESOURCES:
                    tally.resent_out_of_resources += 1
                elif code == SUCCESS:
                    tally.acknowledged.add(todo[i])
                    i += 1
                else:
                    tally.refused[f"0x{code:04X}"] += 1
                    i += 1
            if code == OUT_OF_RESOURCES:
                time.sleep(0.5)
        if assoc.is_established:
            assoc.release()


def _faults(node: Node, tally: Tally, count: int, stall_s: float, log: list[dict[str, object]],
            done: threading.Event) -> None:  # fmt: skip
    """Inject :data:`SCHEDULE`'s faults as the acknowledgements pass each share."""
    db = node.work / "data" / "triage.db"
    for share, role in SCHEDULE:
        # The worker is killed with a task in hand: once it has classified something.
        while len(tally.acknowledged) < share * count or (role == "worker" and not _results(db)):
            if done.wait(0.05):
                return
        at = round(time.monotonic() - tally.first_store, 1)
        entry: dict[str, object] = {"at_s": at, "acknowledged_before": len(tally.acknowledged)}
        if role == "worker":
            node.kill("worker")
            time.sleep(1)
            node.start("worker")
            entry["fault"] = "worker SIGKILLed (main and pool), restarted after 1 s"
        elif role == "redis":
            node.signal("redis", signal.SIGSTOP)
            tally.stalled = True
            time.sleep(stall_s)
            node.signal("redis", signal.SIGCONT)
            tally.stalled = False
            node.kill("redis")
            node.start("redis")
            entry["fault"] = f"redis SIGSTOPped {stall_s:.0f} s, then SIGKILLed and restarted empty"
        else:
            node.kill("scp")
            time.sleep(0.5)
            node.start("scp")
            entry["fault"] = "SCP SIGKILLed, restarted after 0.5 s"
        entry["ended_s"] = round(time.monotonic() - tally.first_store, 1)
        log.append(entry)


def _results(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])
    except sqlite3.Error:
        return 0


def _settled(db: Path, uids: set[str]) -> dict[str, tuple[str, int, int]]:
    """SOP Instance UID -> (status, results, attempts) for the acknowledged instances."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute(
            "SELECT i.sop_instance_uid, i.status, count(r.id), i.attempts FROM instances i "
            "LEFT JOIN results r ON r.instance_id = i.id GROUP BY i.id"
        ).fetchall()
    return {str(u): (str(s), int(n), int(a or 0)) for u, s, n, a in rows if u in uids}


def main(argv: Sequence[str] | None = None) -> int:
    repo = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=1000, help="C-STOREs to acknowledge (1000)")
    p.add_argument("--associations", type=int, default=4, help="concurrent associations (4)")
    p.add_argument("--stall", type=float, default=30.0, help="seconds Redis is frozen (30)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for results")
    p.add_argument("--dicom-dir", type=Path, default=repo.parent / "shared" / "dicom-samples")
    p.add_argument("--keep", action="store_true", help="keep the data directory and role logs")
    args = p.parse_args(argv)
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("error: needs redis-server on PATH", file=sys.stderr)
        return 2
    templates = [pydicom.dcmread(args.dicom_dir / name) for name in SAMPLES]
    work = Path(tempfile.mkdtemp(prefix="ft-faultload-"))
    node = Node(work, redis_server)
    tally = Tally()
    faults: list[dict[str, object]] = []
    done = threading.Event()
    try:
        node.start("redis")
        subprocess.run(
            [sys.executable, "-m", "fracture_triage.cli", "db", "upgrade"],
            check=True,
            capture_output=True,
            env=node.env,
        )
        for role in ("scp", "sweeper", "worker"):
            node.start(role)
        tally.first_store = time.monotonic()
        share, rest = divmod(args.count, args.associations)
        senders = [
            threading.Thread(
                target=_send, args=(node, templates, share + (k < rest), k, tally), daemon=True
            )
            for k in range(args.associations)
        ]
        injector = threading.Thread(
            target=_faults, args=(node, tally, args.count, args.stall, faults, done), daemon=True
        )
        injector.start()
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        stored_s = time.monotonic() - tally.first_store
        done.set()
        injector.join()
        db = work / "data" / "triage.db"
        deadline = time.monotonic() + args.timeout
        last_result = time.monotonic()
        seen = 0
        while True:
            state = _settled(db, tally.acknowledged)
            settled = sum(s in ("done", "failed") for s, _n, _a in state.values())
            if settled > seen:
                seen, last_result = settled, time.monotonic()
            if settled == len(tally.acknowledged) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        log = (work / "worker.log").read_text(errors="replace")
        classified = Counter(re.findall(r"instance (\S+) classified: p=", log))
        results = sum(1 for s, n, _a in state.values() if s == "done" and n == 1)
        figures = {
            "stores": args.count,
            "associations": args.associations,
            "acknowledged": len(tally.acknowledged),
            "refused": dict(tally.refused),
            "resent_after_no_answer": tally.resent_no_answer,
            "resent_after_0xA700": tally.resent_out_of_resources,
            "faults": faults,
            "longest_c_store_s": round(tally.longest_store_s, 2),
            "longest_c_store_during_redis_stall_s": round(tally.longest_in_stall_s, 2),
            "stores_took_s": round(stored_s, 1),
            "results": results,
            "failed": sum(1 for s, _n, _a in state.values() if s == "failed"),
            "duplicates": sum(1 for _s, n, _a in state.values() if n > 1)
            + sum(1 for uid, n in classified.items() if n > 1 and uid in tally.acknowledged),
            "stuck": sum(1 for s, _n, _a in state.values() if s not in ("done", "failed")),
            "unaccounted": len(tally.acknowledged - set(state)),
            "more_than_one_attempt": sum(1 for _s, _n, a in state.values() if a > 1),
            "time_to_last_result_s": round(last_result - tally.first_store, 1),
            "last_result_after_last_fault_s": round(
                last_result - tally.first_store - float(str(faults[-1]["ended_s"])), 1
            )
            if faults
            else None,
        }
        print(json.dumps(figures, indent=2))
        ok = (
            figures["acknowledged"] == figures["results"] == args.count
            and figures["duplicates"] == figures["stuck"] == figures["unaccounted"] == 0
        )
        return 0 if ok else 1
    finally:
        done.set()
        node.stop_all()
        if args.keep:
            print(f"data and logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
