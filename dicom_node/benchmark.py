"""C-STORE throughput of the storage SCP at two maximum PDU sizes, over TCP and over TLS.

Starts the real SCP (SQLite, a real redis-server as broker) on loopback, sends the same
radiographs with pynetdicom at each PDU size, and prints MB/s. Run::

    python -m dicom_node.benchmark --samples ../shared/dicom-samples --repeat 10
    python -m dicom_node.benchmark --repeat 10 --pdu 131072 --tls   # plain and TLS, side by side

With ``--tls`` each size is measured on the plain port and on the TLS port (a throw-away
certificate made with ``openssl``, TLS as negotiated by Python's ssl and the node's
profile, :mod:`dicom_node.tls`).

Both ends use the PDU size under test (the SCP's ``max_pdu`` setting and the SCU's), so the
figure shows what a modality sees against a node configured with 16 KiB (pynetdicom's
default) or 128 KiB (this project's default).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
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


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (``openssl``): (certificate, key)."""
    cert, key = folder / "node.crt", folder / "node.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=fracture-triage benchmark", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


def _send(
    port: int,
    datasets: list[pydicom.Dataset],
    max_pdu: int,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> float:
    """Send every dataset over one association; return the seconds taken."""
    ae = AE(ae_title="BENCH")
    ae.maximum_pdu_size = max_pdu
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FXTRIAGE", max_pdu=max_pdu, tls_args=tls_args)
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


def run(samples: Path, repeat: int, pdu_sizes: list[int], tls: bool = False) -> None:
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
            for over_tls in (False, True) if tls else (False,):
                seconds, count = _round(originals, repeat, pdu, redis_port, over_tls)
                print(
                    f"max PDU {pdu // 1024:>4} KiB {'TLS' if over_tls else 'TCP'}: {count} "
                    f"objects, {size_mb:.0f} MB in {seconds:.2f} s = {size_mb / seconds:.0f} "
                    f"MB/s, {count / seconds:.1f} objects/s"
                )
    finally:
        redis.terminate()
        redis.wait(timeout=10)


def _round(
    originals: Sequence[pydicom.Dataset], repeat: int, pdu: int, redis_port: int, over_tls: bool
) -> tuple[float, int]:
    """One measurement against a fresh SCP: (seconds, objects sent)."""
    with tempfile.TemporaryDirectory() as tmp:
        cert = key = None
        if over_tls:
            cert, key = _certificate(Path(tmp))
        settings = Settings(
            data_dir=Path(tmp) / "data",
            dicom_port=0 if over_tls else _free_port(),
            tls_port=_free_port(),
            tls_cert=cert,
            tls_key=key,
            max_pdu=pdu,
            broker_url=f"redis://127.0.0.1:{redis_port}/0",
            model_dir=None,
        )
        settings.data_dir.mkdir()
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
            if over_tls:
                context = ssl.create_default_context(cafile=str(cert))
                seconds = _send(scp.tls_port, datasets, pdu, (context, "127.0.0.1"))
            else:
                seconds = _send(scp.port, datasets, pdu)
        enqueue.close()
    return seconds, len(datasets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=Path("../shared/dicom-samples"))
    parser.add_argument("--repeat", type=int, default=10, help="times each file is sent")
    parser.add_argument("--pdu", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--tls", action="store_true", help="each size over TCP and over TLS")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    run(args.samples, args.repeat, args.pdu, args.tls)


if __name__ == "__main__":
    main()
