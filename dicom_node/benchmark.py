"""C-STORE throughput of the storage SCP at two maximum PDU sizes.

Starts the real SCP (SQLite, a real redis-server as broker) on loopback, sends the same
radiographs with pynetdicom at each PDU size, and prints MB/s. Run::

    python -m dicom_node.benchmark --samples ../shared/dicom-samples --repeat 10

Both ends use the PDU size under test (the SCP's ``max_pdu`` setting and the SCU's), so the
figure shows what a modality sees against a node configured with 16 KiB (pynetdicom's
default) or 128 KiB (this project's default).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
from pynetdicom import AE

from db.migrations import upgrade
from db.session import make_engine, make_session_factory
from dicom_node.scp import StorageSCP
from fracture_triage.settings import Settings
from worker.queue import CeleryEnqueuer

#: Large uncompressed radiographs: the case where PDU size matters.
DEFAULT_FILES = ("CR_hip_RG2_MONO2_10b_EVRLE.dcm", "CR_extremity_RG3_MONO1_10b_EVRLE.dcm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _send(port: int, datasets: list[pydicom.Dataset], max_pdu: int) -> float:
    """Send every dataset over one association; return the seconds taken."""
    ae = AE(ae_title="BENCH")
    ae.maximum_pdu_size = max_pdu
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FXTRIAGE", max_pdu=max_pdu)
    if not assoc.is_established:
        raise SystemExit("association refused by the SCP")
    started = time.perf_counter()
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0x0000:
                raise SystemExit(f"C-STORE failed: {status}")
    finally:
        assoc.release()
    return time.perf_counter() - started


def run(samples: Path, repeat: int, pdu_sizes: list[int]) -> None:
    files = [samples / name for name in DEFAULT_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"sample files missing: {', '.join(missing)}")
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is needed (apt-get install redis-server)")
    originals = [pydicom.dcmread(f) for f in files]
    size_mb = sum(f.stat().st_size for f in files) * repeat / 1e6
    redis_port = _free_port()
    redis = subprocess.Popen(
        [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        for pdu in pdu_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                settings = Settings(
                    data_dir=Path(tmp),
                    dicom_port=_free_port(),
                    max_pdu=pdu,
                    broker_url=f"redis://127.0.0.1:{redis_port}/0",
                    model_dir=None,
                )
                upgrade(settings.resolved_database_url)
                sessions = make_session_factory(make_engine(settings.resolved_database_url))
                enqueue = CeleryEnqueuer(settings)
                with StorageSCP(settings, sessions, enqueue) as scp:
                    # New SOP Instance UIDs per round: a duplicate would not be stored again.
                    datasets = []
                    for _ in range(repeat):
                        for ds in originals:
                            copy = pydicom.Dataset(ds)
                            copy.file_meta = ds.file_meta
                            copy.SOPInstanceUID = pydicom.uid.generate_uid()
                            datasets.append(copy)
                    seconds = _send(scp.port, datasets, pdu)
                enqueue.close()
                print(
                    f"max PDU {pdu // 1024:>4} KiB: {len(datasets)} objects, {size_mb:.0f} MB "
                    f"in {seconds:.2f} s = {size_mb / seconds:.0f} MB/s, "
                    f"{len(datasets) / seconds:.1f} objects/s"
                )
    finally:
        redis.terminate()
        redis.wait(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=Path("../shared/dicom-samples"))
    parser.add_argument("--repeat", type=int, default=10, help="times each file is sent")
    parser.add_argument("--pdu", type=int, nargs="+", default=[16384, 131072])
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    run(args.samples, args.repeat, args.pdu)


if __name__ == "__main__":
    main()
