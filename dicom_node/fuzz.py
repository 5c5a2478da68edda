"""Fuzz the storage SCP: malformed objects and PDUs against the real node, on loopback.

Starts ``fracture-triage scp`` as a subprocess (SQLite in a temporary data dir, the broker
URL pointing at a closed port, so every stored object is left pending: the SCP answers
anyway), then runs ``--count`` cases, cycling through :data:`KINDS`. Run::

    python -m dicom_node.fuzz --count 1000 --seed 1

Data set cases mutate a real sample (``--samples``, the small stored-as-is radiographs),
each with a fresh SOP Instance UID, write the mutated Part 10 file and send its bytes as
they are (pynetdicom's chunked sending: nothing is decoded or re-encoded) over a fresh
association. PDU cases write to a raw socket, in a few background threads from another
loopback address (127.0.0.2) so the idle and truncated ones, which the SCP closes only at
its timeouts, overlap the other cases. ``pdu_abort_burst`` (in the foreground) opens 8
connections from each of two more addresses that the SCP aborts at once, then times a C-ECHO
from 127.0.0.1: refused is a lockout.

For every case: the outcome; whether the SCP process still runs (a crash restarts it); a
C-STORE unanswered within 35 s, or a raw connection the SCP neither answers nor closes in
its timeout plus 10 s, is a hang; a C-STORE whose association ends without a status is
unanswered. Each Success is checked: the file ``objects/<study>/<series>/<sop>.dcm`` holds
byte for byte the data set sent, and ``instances`` has the SOP Instance UID. Every 50 cases
a C-ECHO is timed and the SCP's VmRSS read. One JSON object is printed; the exit status is 0
only when crashes, hangs, unanswered, missing_or_different, echo failures and lockouts are
all 0.

Case ``i`` draws from ``random.Random(f"{seed}:{i}")``: a case is reproduced by its seed and
index alone (``--first i --count 1``); ``--verbose`` prints one line per case, ``--scp-log
FILE`` keeps the SCP's log. A Success for a SOP Instance UID stored before (a re-send) must
leave the first object in place (the node's default ``keep-first``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom._config
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset

from dicom_node.contexts import STORAGE_SOP_CLASSES

#: Data set mutations, then PDU-level cases; case ``i`` is of kind ``KINDS[i % len(KINDS)]``.
DATASET_KINDS = (
    "flip_header",
    "flip_pixels",
    "truncate",
    "absurd_attributes",
    "bad_uid",
    "bad_length",
    "deep_sequence",
    "bad_vr",
)
PDU_KINDS = ("pdu_random", "pdu_truncated_rq", "pdu_huge_length", "pdu_idle", "pdu_abort_burst")
KINDS = DATASET_KINDS + PDU_KINDS

#: A C-STORE not answered within this many seconds is a hang.
DIMSE_TIMEOUT_S = 35.0
#: The SCP's read and ACSE timeouts during a fuzz run (its defaults are 30 s).
SCP_TIMEOUT_S = 3.0
ECHO_EVERY = 50
#: Samples larger than this are left out (speed; the large ones add nothing to the parsing).
MAX_SAMPLE_BYTES = 1_200_000
PDU_SOURCE = "127.0.0.2"
#: ``pdu_abort_burst``: from each address, as many connections as the per-peer cap (8), each
#: a PDU header the SCP answers with A-ABORT and closes at once; then a C-ECHO from
#: 127.0.0.1 must get through (a refused one is a lockout).
BURST_SOURCES = ("127.0.0.3", "127.0.0.4")
BURST_PER_SOURCE = 8

SUCCESS = 0x0000
EXPLICIT_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF


# --- the node under test ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """``fracture-triage scp`` in a subprocess; restarted by :meth:`start` after a crash."""

    def __init__(self, data_dir: Path, scp_timeout: float) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.log_path = data_dir.parent / "scp.log"
        self.env = {
            **os.environ,
            "FRACTURE_TRIAGE_DATA_DIR": str(data_dir),
            "FRACTURE_TRIAGE_DICOM_PORT": str(self.port),
            # nothing listens there: stores stay pending, the SCP answers regardless
            "FRACTURE_TRIAGE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
            "FRACTURE_TRIAGE_DICOM_READ_TIMEOUT_SECONDS": str(scp_timeout),
            "FRACTURE_TRIAGE_DICOM_ACSE_TIMEOUT_SECONDS": str(scp_timeout),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        found = shutil.which("fracture-triage", path=str(Path(sys.executable).parent))
        if found:
            return [found]
        return [sys.executable, "-c", "import sys; from fracture_triage.cli import main; "
                "sys.exit(main())"]  # fmt: skip

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command(), "scp", "--log-level", "WARNING"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the SCP exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"the SCP does not listen after 90 s; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float:
        if self.proc is None:
            return 0.0
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


# --- encoded data sets -----------------------------------------------------------------------


@dataclass(frozen=True)
class Element:
    """One top-level element of an encoded data set: offsets into the file's bytes."""

    tag: int
    start: int  # the tag's first byte
    vr_at: int | None  # explicit VR only
    length_at: int
    length_size: int
    value_at: int
    length: int


class Walker:
    """Top-level elements of an encoded Little Endian data set (sequences skipped whole)."""

    def __init__(self, data: bytes, offset: int, implicit: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.elements: list[Element] = []
        # a data set we cannot walk further: the elements found so far
        with contextlib.suppress(struct.error, IndexError, ValueError):
            self._walk(offset, len(data), top=True)

    def _header(self, pos: int) -> tuple[int, bytes | None, int, int, int]:
        """(tag, VR, length offset, length size, value offset) of the element at ``pos``."""
        group, elem = struct.unpack_from("<HH", self.data, pos)
        tag = group << 16 | elem
        if self.implicit or group == 0xFFFE:
            return tag, None, pos + 4, 4, pos + 8
        vr = self.data[pos + 4 : pos + 6]
        if vr in EXPLICIT_LONG_VRS:
            return tag, vr, pos + 8, 4, pos + 12
        return tag, vr, pos + 6, 2, pos + 8

    def _length(self, at: int, size: int) -> int:
        return int(struct.unpack_from("<L" if size == 4 else "<H", self.data, at)[0])

    def _walk(self, pos: int, end: int, top: bool) -> int:
        """Elements from ``pos`` to ``end`` or an item delimiter; the offset after them."""
        while pos + 8 <= end:
            tag, vr, length_at, size, value_at = self._header(pos)
            length = self._length(length_at, size)
            if tag == ITEM_END:
                return value_at
            if top:
                self.elements.append(
                    Element(tag, pos, pos + 4 if vr else None, length_at, size, value_at, length)
                )
            if length == UNDEFINED:
                pos = self._undefined(value_at, end, tag == PIXEL_DATA)
            else:
                pos = value_at + length
        return pos

    def _undefined(self, pos: int, end: int, fragments: bool) -> int:
        """Skip the items of an undefined-length sequence (or encapsulated pixel data)."""
        while pos + 8 <= end:
            tag, _vr, length_at, _size, value_at = self._header(pos)
            length = self._length(length_at, 4)
            if tag == SEQ_END:
                return value_at
            if tag != ITEM:
                raise ValueError("not an item")
            if length == UNDEFINED and not fragments:
                pos = self._walk(value_at, end, top=False)
            else:
                pos = value_at + length
        return pos

    def header_end(self) -> int:
        """Where the Pixel Data element starts (or the end of the data)."""
        for el in self.elements:
            if el.tag == PIXEL_DATA:
                return el.start
        return len(self.data)

    def pixel_value(self) -> int | None:
        for el in self.elements:
            if el.tag == PIXEL_DATA:
                return el.value_at
        return None


@dataclass
class Sample:
    name: str
    dataset: Dataset
    implicit: bool


def load_samples(folder: Path) -> list[Sample]:
    """The samples stored as they are: ours to mutate (small, Little Endian, not deflated)."""
    out = []
    for path in sorted(folder.glob("*.dcm")):
        if path.name.startswith(("BAD_", "DERIVED_BAD_")) or path.stat().st_size > MAX_SAMPLE_BYTES:
            continue
        try:
            meta, _offset = split_dataset(path)
            ts = UID(str(meta.TransferSyntaxUID))
            if str(meta.MediaStorageSOPClassUID) not in STORAGE_SOP_CLASSES:
                continue
        except (InvalidDicomError, AttributeError, KeyError, ValueError):
            continue
        if not ts.is_little_endian or ts.is_deflated:
            continue
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue
        out.append(Sample(path.name, ds, ts.is_implicit_VR))
    if not out:
        raise SystemExit(f"no usable samples in {folder}")
    return out


def encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def fresh(sample: Sample, uid: str) -> Dataset:
    ds = copy.deepcopy(sample.dataset)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    return ds


def dataset_offset(data: bytes) -> int:
    """Offset of the data set in a Part 10 file (after preamble and File Meta)."""
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


# --- data set mutations ----------------------------------------------------------------------

BAD_UIDS = (
    "../../etc",
    "1.2.3/4",
    "1." + "2" * 63,  # 65 characters
    "/etc/passwd",
    "..",
    "1..2",
    ".1.2",
    "1.2.",
    "01.2.3",
    "1.2.3 4",
    "1.2.3\\4",
    "a" * 64,
    "1.2.3\x00",  # "1.2.3" padded: valid, and the same UID each time (a re-send)
    "{uid}\x00",  # a fresh UID padded with NUL: valid
    "",
    "1.2.3\n4",
)


def mutate_flip(rng: random.Random, data: bytes, lo: int, hi: int) -> tuple[bytes, str]:
    out = bytearray(data)
    if hi <= lo:
        return data, "nothing to flip"
    positions = sorted(rng.randrange(lo, hi) for _ in range(rng.choice((1, 1, 2, 4, 16))))
    for p in positions:
        out[p] ^= rng.randrange(1, 256)
    return bytes(out), f"flipped {len(positions)} bytes at {positions[:4]}"


def mutate_dataset(rng: random.Random, kind: str, sample: Sample, uid: str) -> tuple[bytes, str]:
    ds = fresh(sample, uid)
    if kind == "absurd_attributes":
        choices: dict[str, list[object]] = {
            "Rows": [0, 1, 65535],
            "Columns": [0, 1, 65535],
            "BitsAllocated": [0, 1, 3, 7, 9, 64, 65535],
            "BitsStored": [0, 17, 65535],
            "HighBit": [0, 64, 65535],
            "SamplesPerPixel": [0, 2, 3, 4, 65535],
            "PixelRepresentation": [2, 65535],
            "PhotometricInterpretation": ["", "FOO", "RGB", "PALETTE COLOR", "YBR_FULL", "A" * 16],
            "NumberOfFrames": ["0", "-1", "999999999", "abc", "1.5", "2"],
            "PlanarConfiguration": [1, 2, 65535],
        }
        picked = rng.sample(sorted(choices), rng.choice((1, 1, 2, 3)))
        for name in picked:
            setattr(ds, name, rng.choice(choices[name]))
        return encode(ds), ", ".join(f"{n}={getattr(ds, n)!r}"[:40] for n in picked)
    if kind == "bad_uid":
        target = rng.choice(
            ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")
        )
        value = rng.choice(BAD_UIDS).replace("{uid}", uid)
        setattr(ds, target, value)
        if target == "SOPInstanceUID":  # the command's Affected SOP Instance UID too
            ds.file_meta.MediaStorageSOPInstanceUID = UID(value)
        return encode(ds), f"{target}={value!r}"
    if kind == "deep_sequence":
        depth = rng.choice((1, 10, 100, 500, 1000, 3000, 10000))
        if "ReferencedImageSequence" in ds:
            del ds.ReferencedImageSequence
        data = encode(ds)
        offset = dataset_offset(data)
        walker = Walker(data, offset, sample.implicit)
        at = next((e.start for e in walker.elements if e.tag > 0x00081140), len(data))
        tag = struct.pack("<HH", 0x0008, 0x1140)
        sq = tag + (b"" if sample.implicit else b"SQ\x00\x00") + b"\xff" * 4
        item = struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED)
        close = struct.pack("<HHLHHL", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0)
        nested = (sq + item) * depth + close * depth
        return data[:at] + nested + data[at:], f"depth {depth}"
    data = encode(ds)
    offset = dataset_offset(data)
    walker = Walker(data, offset, sample.implicit)
    header_end = walker.header_end()
    if kind == "flip_header":
        return mutate_flip(rng, data, offset, header_end)
    if kind == "flip_pixels":
        pixel = walker.pixel_value()
        return mutate_flip(rng, data, pixel if pixel is not None else header_end, len(data))
    if kind == "truncate":
        cut = rng.randrange(offset + 1, len(data))
        return data[:cut], f"cut at {cut} of {len(data)}"
    elements = [e for e in walker.elements if e.start < header_end] or walker.elements
    if kind == "bad_length":
        if rng.random() < 0.2:
            el = next((e for e in walker.elements if e.tag == PIXEL_DATA), elements[-1])
        else:
            el = rng.choice(elements)
        limit = 0xFFFF if el.length_size == 2 else 0xFFFFFFFF
        new = rng.choice(
            (el.length + 1, max(el.length - 1, 0), 0, limit, limit - 1, el.length + 1001)
        )
        new = min(new, limit)
        packed = struct.pack("<H" if el.length_size == 2 else "<L", new)
        out = data[: el.length_at] + packed + data[el.length_at + el.length_size :]
        return out, f"({el.tag >> 16:04X},{el.tag & 0xFFFF:04X}) length {el.length} -> {new}"
    if kind == "bad_vr":
        explicit = [e for e in elements if e.vr_at is not None]
        if not explicit:  # implicit VR: a VR where none belongs, in the tag's place
            el = rng.choice(elements)
            out = data[: el.start + 2] + b"PN" + data[el.start + 4 :]
            return out, f"({el.tag >> 16:04X},{el.tag & 0xFFFF:04X}) element number -> 'PN'"
        el = rng.choice(explicit)
        assert el.vr_at is not None
        vr = rng.choice((b"ZZ", b"\x00\x00", b"  ", b"SQ", b"OB", b"UN", b"xx", rng.randbytes(2)))
        out = data[: el.vr_at] + vr + data[el.vr_at + 2 :]
        return out, f"({el.tag >> 16:04X},{el.tag & 0xFFFF:04X}) VR -> {vr!r}"
    raise ValueError(kind)


# --- outcomes --------------------------------------------------------------------------------


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


# --- cases -----------------------------------------------------------------------------------


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


def associate_rq(called: bytes = b"FXTRIAGE", calling: bytes = b"FUZZ") -> bytes:
    """A well-formed A-ASSOCIATE-RQ for Verification (PS3.8 9.3.2)."""

    def item(kind: int, data: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(data)) + data

    context = item(
        0x20,
        bytes((1, 0, 0, 0)) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"),
    )
    user = item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9"))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)
        + calling.ljust(16)
        + b"\0" * 32
        + item(0x10, b"1.2.840.10008.3.1.1.1")
        + context
        + user
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def pdu_payload(rng: random.Random, kind: str) -> tuple[bytes, bool, str]:
    """(bytes to send, whether to half-close afterwards, description)."""
    if kind == "pdu_random":
        body = rng.randbytes(rng.randint(1, 4096))
        if rng.random() < 0.5 and len(body) > 6:  # a plausible header, junk behind it
            body = struct.pack(">BBL", rng.randint(1, 7), 0, len(body) - 6) + body[6:]
        return body, rng.random() < 0.5, f"{len(body)} random bytes, type 0x{body[0]:02X}"
    if kind == "pdu_truncated_rq":
        rq = associate_rq()
        cut = rng.randrange(1, len(rq))
        half_close = rng.random() < 0.5
        return rq[:cut], half_close, f"A-ASSOCIATE-RQ cut at {cut} of {len(rq)}"
    if kind == "pdu_huge_length":
        pdu_type = rng.choice((0x01, 0x02, 0x04, 0x05, 0x07))
        junk = b"\0" * rng.choice((0, 1024, 1024 * 1024))
        return (
            struct.pack(">BBL", pdu_type, 0, 0xFFFFFFFF) + junk,
            False,
            (f"type 0x{pdu_type:02X} declaring 4 GiB, {len(junk)} bytes after"),
        )
    return b"", False, "connect, send nothing"


def run_pdu_case(
    node: Node, report: Report, index: int, kind: str, rng: random.Random, scp_timeout: float
) -> None:
    payload, half_close, detail = pdu_payload(rng, kind)
    limit = scp_timeout + 10
    outcome = ""
    try:
        sock = socket.create_connection(
            ("127.0.0.1", node.port), timeout=5, source_address=(PDU_SOURCE, 0)
        )
    except OSError as exc:
        report.record(index, kind, f"connect failed: {type(exc).__name__}", detail)
        return
    answered = b""
    started = time.monotonic()
    with sock:
        try:
            if payload:
                sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the SCP closed the connection before all of it was sent
            outcome = "closed while sending"
        sock.settimeout(1.0)
        while not outcome:
            if time.monotonic() - started > limit:
                outcome = "open (hang)"
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                outcome = "reset"
                break
            if not chunk:
                outcome = "closed"
                break
            answered += chunk
    if answered:
        names = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x07: "A-ABORT"}
        outcome += f" after {names.get(answered[0], f'PDU 0x{answered[0]:02X}')}"
    problem = ""
    with report.lock:
        longest = report.pdu_max_open_s.get(kind, 0.0)
        report.pdu_max_open_s[kind] = max(longest, time.monotonic() - started)
    if outcome.startswith("open"):
        with report.lock:
            report.hangs += 1
        problem = f"the SCP neither answered nor closed in {limit:.0f} s"
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


def run_abort_burst(node: Node, report: Report, index: int, scp_timeout: float) -> None:
    """Connections the SCP aborts and closes within milliseconds must not keep other peers
    out: a C-ECHO from 127.0.0.1 right after them is answered."""
    answers: Counter[str] = Counter()
    for source in BURST_SOURCES:
        for _ in range(BURST_PER_SOURCE):
            try:
                with socket.create_connection(
                    ("127.0.0.1", node.port), timeout=5, source_address=(source, 0)
                ) as sock:
                    sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
                    first = sock.recv(1)
                    answers["A-ABORT" if first == b"\x07" else "closed"] += 1
            except OSError:
                answers["reset"] += 1
    detail = ", ".join(f"{n} {k}" for k, n in sorted(answers.items()))
    seconds = echo(node)
    if seconds is not None:
        report.record(index, "pdu_abort_burst", "echo answered", detail)
        return
    report.lockouts += 1
    # how long other peers stay locked out (then the next cases run against a free node)
    started = time.monotonic()
    while echo(node) is None and time.monotonic() - started < scp_timeout + 10:
        time.sleep(0.1)
    problem = (
        f"C-ECHO from 127.0.0.1 refused after {sum(answers.values())} connections the SCP had "
        f"closed already; refused for {time.monotonic() - started:.1f} s"
    )
    report.record(index, "pdu_abort_burst", "echo refused (lockout)", detail, problem)


def probe(node: Node, report: Report) -> None:
    seconds = echo(node)
    if seconds is None:
        report.echo_failures += 1
        report.record(-1, "echo", "failed", "", "C-ECHO not answered with Success")
    else:
        report.max_echo_s = max(report.max_echo_s, seconds)
    report.max_rss_mb = max(report.max_rss_mb, node.rss_mb())


def run(
    samples_dir: Path, count: int, seed: int, first: int = 0, scp_timeout: float = SCP_TIMEOUT_S,
    progress: Callable[[str], None] | None = None, trace: Callable[[str], None] | None = None,
    scp_log: Path | None = None,
) -> Report:  # fmt: skip
    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    # this side writes and reads invalid values on purpose
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    samples = load_samples(samples_dir)
    report = Report(trace=trace)
    with tempfile.TemporaryDirectory(prefix="fracture-triage-fuzz-") as tmp:
        node = Node(Path(tmp) / "data", scp_timeout)
        node.start()
        futures: list[Future[None]] = []
        try:
            with ThreadPoolExecutor(max_workers=4) as background:
                probe(node, report)
                for index in range(first, first + count):
                    kind = KINDS[index % len(KINDS)]
                    rng = random.Random(f"{seed}:{index}")
                    report.cases += 1
                    report.kinds[kind] += 1
                    if kind == "pdu_abort_burst":
                        run_abort_burst(node, report, index, scp_timeout)
                    elif kind in PDU_KINDS:
                        futures.append(
                            background.submit(
                                run_pdu_case, node, report, index, kind, rng, scp_timeout
                            )
                        )
                    else:
                        run_dataset_case(node, Path(tmp), report, index, kind, rng, samples, seed)
                    if (index - first + 1) % ECHO_EVERY == 0:
                        probe(node, report)
                        if progress:
                            progress(f"{index - first + 1} cases")
                for future in futures:
                    future.result()
            probe(node, report)
            if not node.alive():
                report.crashes += 1
                report.record(-1, "end", "dead", "", "the SCP died during the PDU cases")
        finally:
            node.stop()
            log = node.log_path.read_text(errors="replace") if node.log_path.exists() else ""
            report.scp_log_tracebacks = log.count("Traceback")
            report.refused_by_peer_cap = log.count("refused a connection from")
            if scp_log is not None:
                scp_log.write_text(log)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True, help="cases to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="index of the first case")
    parser.add_argument("--samples", type=Path, default=Path("../shared/dicom-samples"))
    parser.add_argument(
        "--scp-timeout",
        type=float,
        default=SCP_TIMEOUT_S,
        help=f"the SCP's read and ACSE timeouts, seconds ({SCP_TIMEOUT_S:g})",
    )
    parser.add_argument("--verbose", action="store_true", help="one line per case on stderr")
    parser.add_argument("--scp-log", type=Path, default=None, help="keep the SCP's log here")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    started = time.monotonic()

    def err(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = run(
        args.samples,
        args.count,
        args.seed,
        args.first,
        args.scp_timeout,
        progress=err,
        trace=err if args.verbose else None,
        scp_log=args.scp_log,
    )
    print(json.dumps(report.as_json(args.seed, time.monotonic() - started), indent=2))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
