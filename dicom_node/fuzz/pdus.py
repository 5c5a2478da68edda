"""PDU-level cases on raw sockets (PS3.8 9.3): random bytes, truncated and huge
A-ASSOCIATE-RQs, idle peers, and bursts of connections the SCP aborts."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections import Counter

from dicom_node.fuzz.checks import Report, echo
from dicom_node.fuzz.node import Node

PDU_KINDS = ("pdu_random", "pdu_truncated_rq", "pdu_huge_length", "pdu_idle", "pdu_abort_burst")
PDU_SOURCE = "127.0.0.2"
#: ``pdu_abort_burst``: from each address, as many connections as the per-peer cap (8), each
#: a PDU header the SCP answers with A-ABORT and closes at once; then a C-ECHO from
#: 127.0.0.1 must get through (a refused one is a lockout).
BURST_SOURCES = ("127.0.0.3", "127.0.0.4")
BURST_PER_SOURCE = 8


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
