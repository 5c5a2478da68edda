"""``python -m dicom_node.fuzz``: run the cases against a fresh SCP, print the figures."""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import pynetdicom._config
from pydicom import config as pydicom_config

from dicom_node.fuzz import KINDS
from dicom_node.fuzz.checks import Report, probe, run_dataset_case
from dicom_node.fuzz.mutations import load_samples
from dicom_node.fuzz.node import Node
from dicom_node.fuzz.pdus import PDU_KINDS, run_abort_burst, run_pdu_case
from fracture_triage.settings import Settings

#: The SCP's read and ACSE timeouts during a fuzz run (its defaults are 30 s).
SCP_TIMEOUT_S = 3.0
ECHO_EVERY = 50
#: PDU cases run beside the data set cases, at most this many at a time. Most of them (an
#: idle peer, a truncated A-ASSOCIATE-RQ) hold their connection until the SCP's read deadline,
#: so they are bounded: submitted without bound they piled up faster than they finished and
#: a 10,000-case run spent over 15 minutes draining them after its last case. One below the
#: SCP's per-peer connection cap (the fuzzed node runs with the default; all PDU cases come
#: from PDU_SOURCE), so that the cap, which closes a connection at once, does not decide the
#: cases' outcome.
BACKGROUND_CASES: int = Settings.model_fields["max_associations_per_peer"].default - 1


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
        pending: set[Future[None]] = set()
        try:
            with ThreadPoolExecutor(max_workers=BACKGROUND_CASES) as background:
                probe(node, report)
                for index in range(first, first + count):
                    kind = KINDS[index % len(KINDS)]
                    rng = random.Random(f"{seed}:{index}")
                    report.cases += 1
                    report.kinds[kind] += 1
                    if kind == "pdu_abort_burst":
                        run_abort_burst(node, report, index, scp_timeout)
                    elif kind in PDU_KINDS:
                        if len(pending) >= BACKGROUND_CASES:  # wait for a free slot
                            done, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for future in done:
                                future.result()
                        pending.add(
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
                for future in pending:
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
    parser = argparse.ArgumentParser(
        prog="python -m dicom_node.fuzz", description=__doc__.splitlines()[0]
    )
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
