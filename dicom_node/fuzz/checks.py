"""What each case is checked for: the outcomes tallied (:class:`Report`), a Success stored
byte-exact and recorded, C-STOREs of mutated files, C-ECHO latency and the SCP's memory."""

from __future__ import annotations

import hashlib
import random
import sqlite3
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset

from dicom_node.fuzz.mutations import Sample, dataset_offset, mutate_dataset
from dicom_node.fuzz.node import Node

#: A C-STORE not answered within this many seconds is a hang.
DIMSE_TIMEOUT_S = 35.0
SUCCESS = 0x0000


@dataclass
class Report:
    cases: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    crashes: int = 0
    hangs: int = 0
    unanswered: int = 0
    success_answers: int = 0
    stored_byte_exact: int = 0
    missing_or_different: int = 0
    max_rss_mb: float = 0.0
    max_echo_s: float = 0.0
    #: Successes for a SOP Instance UID stored before: the first object must stay (keep-first)
    duplicate_successes: int = 0
    #: the sha256 of the data set of each SOP Instance UID's first Success
    first_stored: dict[str, str] = field(default_factory=dict)
    #: the longest a raw connection of each PDU kind stayed open
    pdu_max_open_s: dict[str, float] = field(default_factory=dict)
    echo_failures: int = 0
    #: C-ECHOs from 127.0.0.1 refused right after an abort burst from other addresses
    lockouts: int = 0
    #: tracebacks in the SCP's log (pynetdicom logs some for PDUs it cannot decode)
    scp_log_tracebacks: int = 0
    #: connections the SCP closed unanswered under its per-address cap (from its log)
    refused_by_peer_cap: int = 0
    defects: list[dict[str, object]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: called with one line per case (``--verbose``)
    trace: Callable[[str], None] | None = None

    def record(self, index: int, kind: str, outcome: str, detail: str, problem: str = "") -> None:
        with self.lock:
            if self.trace:
                self.trace(f"{index} {kind} {outcome} {detail!r} {problem}".rstrip())
            self.outcomes[kind][outcome] += 1
            if problem and len(self.defects) < 50:
                self.defects.append(
                    {
                        "case": index,
                        "kind": kind,
                        "problem": problem,
                        "outcome": outcome,
                        "mutation": detail,
                    }
                )

    def as_json(self, seed: int, wall_s: float) -> dict[str, object]:
        return {
            "seed": seed,
            "cases": self.cases,
            "kinds": dict(sorted(self.kinds.items())),
            "crashes": self.crashes,
            "hangs": self.hangs,
            "unanswered": self.unanswered,
            "success_answers": self.success_answers,
            "stored_byte_exact": self.stored_byte_exact,
            "missing_or_different": self.missing_or_different,
            "max_rss_mb": round(self.max_rss_mb, 1),
            "max_echo_s": round(self.max_echo_s, 3),
            "duplicate_successes": self.duplicate_successes,
            "pdu_max_open_s": {k: round(v, 1) for k, v in sorted(self.pdu_max_open_s.items())},
            "echo_failures": self.echo_failures,
            "lockouts": self.lockouts,
            "scp_log_tracebacks": self.scp_log_tracebacks,
            "refused_by_peer_cap": self.refused_by_peer_cap,
            "outcomes": {k: dict(sorted(v.items())) for k, v in sorted(self.outcomes.items())},
            "defects": self.defects,
            "wall_s": round(wall_s, 1),
        }

    def ok(self) -> bool:
        return (
            self.crashes == self.hangs == self.unanswered == self.missing_or_different == 0
            and self.echo_failures == self.lockouts == 0
        )


def stored_check(data_dir: Path, sop: str, expected_sha256: str) -> str:
    """'' when the object is recorded and stored with data set ``expected``, else what is
    wrong (``expected_sha256``: of the data set's bytes)."""
    con = sqlite3.connect(f"file:{data_dir / 'triage.db'}?mode=ro", uri=True, timeout=30)
    try:
        row = con.execute(
            "SELECT st.study_instance_uid, se.series_instance_uid, i.storage_path "
            "FROM instances i JOIN series se ON i.series_id = se.id "
            "JOIN studies st ON se.study_id = st.id WHERE i.sop_instance_uid = ?",
            (sop,),
        ).fetchone()
    finally:
        con.close()
    if row is None:
        return "Success but no row in instances"
    path = data_dir / "objects" / row[0] / row[1] / f"{sop}.dcm"
    if not path.is_file():
        return f"Success but no file {path.relative_to(data_dir)}"
    stored = path.read_bytes()
    if hashlib.sha256(stored[dataset_offset(stored) :]).hexdigest() != expected_sha256:
        return "Success but the stored data set differs from the one sent"
    return ""


def c_store(node: Node, path: Path, sop_class: str, ts: str) -> tuple[str, float]:
    """(outcome, seconds) of one C-STORE of the file's bytes over a fresh association."""
    ae = AE(ae_title="FUZZ")
    ae.acse_timeout = 10
    ae.dimse_timeout = DIMSE_TIMEOUT_S
    ae.network_timeout = DIMSE_TIMEOUT_S + 5
    ae.add_requested_context(sop_class, ts)
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", node.port, ae_title="FXTRIAGE")
    if assoc.is_rejected:
        return "association rejected", time.monotonic() - started
    if not assoc.is_established:
        return "association aborted", time.monotonic() - started
    try:
        try:
            status = assoc.send_c_store(path)
        except (ValueError, TypeError, AttributeError, InvalidDicomError, OSError) as exc:
            return f"not sent: {type(exc).__name__}", time.monotonic() - started
        seconds = time.monotonic() - started
        if "Status" in status:
            return f"0x{int(status.Status):04X}", seconds
        if seconds >= DIMSE_TIMEOUT_S - 1:
            return "no answer (timeout)", seconds
        return "no answer (association ended)", seconds
    finally:
        if assoc.is_established:
            assoc.release()


def run_dataset_case(
    node: Node, work: Path, report: Report, index: int, kind: str, rng: random.Random,
    samples: list[Sample], seed: int,
) -> None:  # fmt: skip
    pool = samples
    if kind == "bad_vr":  # explicit VR samples where there are some
        pool = [s for s in samples if not s.implicit] or samples
    sample = rng.choice(pool)
    uid = generate_uid(entropy_srcs=[str(seed), str(index)])
    try:
        data, detail = mutate_dataset(rng, kind, sample, uid)
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        report.record(index, kind, f"not built: {type(exc).__name__}", sample.name)
        return
    detail = f"{sample.name}: {detail}"
    path = work / "case.dcm"
    path.write_bytes(data)
    meta = sample.dataset.file_meta
    outcome, seconds = c_store(
        node, path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    )
    problem = ""
    if outcome == "no answer (timeout)":
        report.hangs += 1
        problem = f"hang: no C-STORE answer in {seconds:.0f} s"
    elif outcome == "no answer (association ended)":
        report.unanswered += 1
        problem = "the association ended without a C-STORE answer"
    elif outcome == "0x0000":
        report.success_answers += 1
        # the Affected SOP Instance UID pynetdicom sent: the File Meta's
        sent_sop = str(split_dataset(path)[0].MediaStorageSOPInstanceUID)
        sent = hashlib.sha256(data[dataset_offset(data) :]).hexdigest()
        if sent_sop in report.first_stored:  # keep-first: the object stored first stays
            report.duplicate_successes += 1
        expected = report.first_stored.setdefault(sent_sop, sent)
        wrong = stored_check(node.data_dir, sent_sop, expected)
        if wrong:
            report.missing_or_different += 1
            problem = wrong
        else:
            report.stored_byte_exact += 1
    if not node.alive():
        report.crashes += 1
        problem = f"the SCP died (exit {node.proc.returncode if node.proc else '?'})"
        node.stop()
        node.start()
    report.record(index, kind, outcome, detail, problem)


def echo(node: Node) -> float | None:
    ae = AE(ae_title="FUZZ")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = 10
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", node.port, ae_title="FXTRIAGE")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    seconds = time.monotonic() - started
    assoc.release()
    return seconds if status.get("Status") == SUCCESS else None


def probe(node: Node, report: Report) -> None:
    seconds = echo(node)
    if seconds is None:
        report.echo_failures += 1
        report.record(-1, "echo", "failed", "", "C-ECHO not answered with Success")
    else:
        report.max_echo_s = max(report.max_echo_s, seconds)
    report.max_rss_mb = max(report.max_rss_mb, node.rss_mb())
