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

``--ingest`` measures instead the whole node against dcmtk's own receiver, as a PACS team
would compare them::

    python -m dicom_node.benchmark --ingest --files 48 --rounds 3

It builds ``--files`` large uncompressed radiographs from the samples (the uncompressed CR
and DX of at least a megapixel, and the compressed ones pydicom decodes, decompressed to
Explicit VR Little Endian; each copy with new Study, Series and SOP Instance UIDs), then for
each round starts ``fracture-triage up`` (embedded Redis, SCP, worker with the shipped
model, sweeper, web application: the whole node, every image in scope so the worker
classifies all of them while they arrive) and, separately, ``storescp --fork`` (one process
per association, writing the files without fsync; the node fsyncs each object and records
it in the database before it answers Success), both with a 128 KiB maximum PDU, and sends
the same files over 4 parallel associations: with ``dcmsend`` over TCP, and over TLS with
``storescu +tla`` (dcmsend has no TLS) to ``storescp +tls`` and to the node's TLS port. It
prints MB/s (file bytes / seconds from the first association to the last one released,
median of the rounds) side by side, their ratio and the goal (0.75).

Beside them it measures pynetdicom's own receiver answering Success without decoding,
writing or recording anything (the ceiling of any node built on pynetdicom's network layer),
in one process and in two processes sharing the port (what a node with one SCP process per
core could reach at best), how busy the machine's cores were, and how many cores the node's
SCP and worker used while the files arrived: where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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


# --------------------------------------------------------------------------- --ingest

#: The goal of issue 13: the node ingests at least this fraction of storescp's MB/s.
INGEST_GOAL = 0.75
#: Parallel associations, as a modality fleet or a PACS forwarding to the node opens them.
ASSOCIATIONS = 4
#: Both receivers advertise dcmtk's largest maximum PDU (the node's default is the same).
INGEST_PDU = 131072


def _dcmtk(name: str) -> str:
    """dcmtk's program ``name``: a real executable (pynetdicom installs a Python
    ``storescu`` that may come first on PATH), apt's first."""
    for path in [Path("/usr/bin") / name] + [
        Path(d) / name for d in os.environ.get("PATH", "").split(os.pathsep) if d
    ]:
        if path.is_file() and os.access(path, os.X_OK):
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    return str(path)
    raise SystemExit(f"dcmtk's {name} is needed (apt-get install dcmtk)")


def _radiograph_sources(samples: Path) -> list[pydicom.Dataset]:
    """The large radiographs among the samples, uncompressed: CR and DX of at least one
    megapixel whose pixel data pydicom can read (compressed ones decompressed)."""
    found: list[pydicom.Dataset] = []
    for path in sorted(samples.glob("*.dcm")):
        if "BAD_" in path.name:  # refused or truncated on purpose
            continue
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True)
            if head.get("Modality") not in ("CR", "DX"):
                continue
            if int(head.get("Rows", 0)) * int(head.get("Columns", 0)) < 1_000_000:
                continue
            ds = pydicom.dcmread(path)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()  # to Explicit VR Little Endian
            elif ds.file_meta.TransferSyntaxUID != pydicom.uid.ExplicitVRLittleEndian:
                continue  # big endian, deflated: not what a modality sends in bulk
        except Exception:  # noqa: BLE001 - a sample this machine cannot decode is left out
            continue
        found.append(ds)
    if not found:
        raise SystemExit(f"no large decodable CR/DX radiograph in {samples}")
    return found


def _write_ingest_files(sources: Sequence[pydicom.Dataset], folder: Path, count: int) -> int:
    """``count`` files in ``folder``, cycling through ``sources``, each with new UIDs (one
    study each, as received from a modality); returns the total file bytes."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    total = 0
    for i in range(count):
        ds = sources[i % len(sources)]
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = folder / f"{i:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        total += target.stat().st_size
    return total


def _send_parallel(files: Sequence[Path], port: int, tls_ca: Path | None) -> float:
    """Send ``files`` over :data:`ASSOCIATIONS` parallel associations (one dcmtk client per
    share, each one association); return the seconds until the last one ended. Raises
    SystemExit when a client fails (a refused object would make the figure meaningless)."""
    shares = [list(files[i::ASSOCIATIONS]) for i in range(ASSOCIATIONS)]
    env = {**os.environ, "TCP_NODELAY": "1"}  # Debian's dcmtk: no 40 ms stall per object
    commands = []
    for share in shares:
        if tls_ca is None:
            cmd = [_dcmtk("dcmsend"), "-aec", "FXTRIAGE", "127.0.0.1", str(port)]
        else:
            cmd = [_dcmtk("storescu"), "+tla", "+cf", str(tls_ca), "-aec", "FXTRIAGE"]
            cmd += ["127.0.0.1", str(port)]
        commands.append(cmd + [str(f) for f in share])
    started = time.perf_counter()
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for c in commands
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    seconds = time.perf_counter() - started
    for command, proc, out in zip(commands, procs, outputs, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"{Path(command[0]).name} failed:\n{out.decode()[-2000:]}")
    return seconds


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not listen on {port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def _storescp(folder: Path, tls: tuple[Path, Path] | None) -> Iterator[int]:
    """dcmtk's ``storescp --fork`` writing into ``folder``; yields its port."""
    port = _free_port()
    out = folder / "received"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [_dcmtk("storescp"), "--fork", "-pdu", str(INGEST_PDU), "-od", str(out)]
    if tls is not None:
        cmd += ["+tls", str(tls[1]), str(tls[0]), "-ic"]  # key, certificate; no client cert
    proc = subprocess.Popen([*cmd, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, "storescp", 30)
        yield port
    finally:
        _stop(proc, 10)
        # --fork children end with their association; the parent's SIGINT ends the rest
        shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def _bare_pynetdicom(tls: tuple[Path, Path] | None, processes: int = 1) -> Iterator[int]:
    """pynetdicom's own receiver answering Success to every C-STORE without decoding,
    writing or recording anything: the ceiling of any node built on pynetdicom's network
    layer (the node's guard, checks, fsyncs and database come on top), in ``processes``
    processes that share one port (``SO_REUSEPORT``: the kernel spreads the associations
    over them, each process with its own GIL). Yields the port."""
    port = _free_port()
    cmd = [sys.executable, "-m", "dicom_node.benchmark", "--noop-receiver", str(port)]
    if tls is not None:
        cmd += ["--noop-tls", str(tls[0]), str(tls[1])]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    try:
        for proc in procs:  # each says so once its socket is bound and listening
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"listening":
                raise SystemExit(f"the no-op receiver did not start (exit {proc.wait()})")
        yield port
    finally:
        for proc in procs:
            _stop(proc, 10)


def _noop_receiver(port: int, tls: tuple[Path, Path] | None) -> None:
    """The no-op receiver of :func:`_bare_pynetdicom`, in this process until SIGINT."""
    from pynetdicom import AllStoragePresentationContexts, evt
    from pynetdicom.transport import ThreadedAssociationServer

    class SharedPortServer(ThreadedAssociationServer):
        def server_bind(self) -> None:
            assert self.socket is not None  # made by socketserver before it binds
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            super().server_bind()

    ae = AE(ae_title="FXTRIAGE")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_pdu_size = INGEST_PDU
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
    server = ae.make_server(
        ("127.0.0.1", port),
        evt_handlers=[(evt.EVT_C_STORE, lambda _event: 0x0000)],  # 0x0000 Success, unseen
        server_class=SharedPortServer,
        ssl_context=context,
    )
    print("listening", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()


def _fracture_triage() -> list[str]:
    """The ``fracture-triage`` console script beside this interpreter."""
    script = Path(sys.executable).with_name("fracture-triage")
    found = str(script) if script.is_file() else shutil.which("fracture-triage")
    if found is None:
        raise SystemExit("the fracture-triage command is not installed (pip install .)")
    return [found]


def _machine_cpu() -> tuple[int, int]:
    """(all, idle) clock ticks of every core since boot (``/proc/stat``)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]  # idle + iowait


def _busy_since(before: tuple[int, int]) -> float:
    """The fraction of the machine's cores busy since ``before`` (:func:`_machine_cpu`)."""
    total, idle = _machine_cpu()
    return 1 - (idle - before[1]) / max(1, total - before[0])


#: The roles of ``fracture-triage up``, as the last word of their command lines.
_ROLES = ("scp", "worker", "sweeper", "api")


def _role_cpu(root: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role among ``root``'s descendants
    (a Celery pool child counts as ``worker``; the embedded Redis as ``redis``)."""
    from worker.benchmark import children

    descendants, todo = [], [root]
    while todo:
        found = children(todo.pop())
        descendants += found
        todo += found
    tick = os.sysconf("SC_CLK_TCK")
    cpu: dict[str, float] = {}
    for pid in descendants:
        with contextlib.suppress(OSError, IndexError, ValueError):
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            args = [w.decode(errors="replace") for w in words if w]
            role = next((r for r in _ROLES if r in args), "redis" if "redis" in args[0] else "")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if role:
                cpu[role] = cpu.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return cpu


@contextlib.contextmanager
def _node(folder: Path, tls: tuple[Path, Path] | None) -> Iterator[tuple[int, int]]:
    """``fracture-triage up`` in ``folder`` (every image in scope); yields the DICOM port the
    clients use (the plain one, or the TLS port when ``tls`` is given) and its pid."""
    dicom_port, tls_port, http_port = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRACTURE_TRIAGE_")}
    env["FRACTURE_TRIAGE_BODY_PARTS"] = "*"  # the worker classifies every image received
    if tls is not None:
        env |= {
            "FRACTURE_TRIAGE_TLS_CERT": str(tls[0]),
            "FRACTURE_TRIAGE_TLS_KEY": str(tls[1]),
            "FRACTURE_TRIAGE_TLS_PORT": str(tls_port),
        }
    log = open(folder / "up.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*_fracture_triage(), "up", "--data-dir", str(folder / "data")]
        + ["--dicom-port", str(dicom_port), "--http-port", str(http_port)],
        env=env,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    try:
        port = tls_port if tls is not None else dicom_port
        _wait_port(port, proc, "fracture-triage up", 180)
        deadline = time.monotonic() + 120
        while b"Press Ctrl-C" not in (folder / "up.log").read_bytes():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"up did not start: see {folder / 'up.log'}")
            time.sleep(0.2)
        yield port, proc.pid
    finally:
        _stop(proc, 90)
        log.close()


def run_ingest(samples: Path, count: int, rounds: int) -> dict[str, dict[str, float]]:
    """The ingest figures: per transport (TCP, TLS), the median MB/s of the node and of
    storescp over ``rounds``; printed as a table, returned for callers."""
    sources = _radiograph_sources(samples)
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fxt-ingest-") as tmp:
        root = Path(tmp)
        tls_pair = _certificate(root)
        mb = _write_ingest_files(sources, root / "files", count) / 1e6
        print(
            f"{count} files, {mb:.0f} MB (from {len(sources)} radiographs of "
            f"{samples}), {ASSOCIATIONS} associations, {rounds} round(s)",
            flush=True,
        )
        for transport in ("TCP", "TLS"):
            tls = tls_pair if transport == "TLS" else None
            runs: dict[str, list[float]] = {
                "node": [],
                "storescp": [],
                "pynetdicom": [],
                "pynetdicom x2": [],
                "scp_cores": [],
                "worker_cores": [],
            }
            for r in range(rounds):
                for target in ("storescp", "pynetdicom", "pynetdicom x2", "node"):
                    work = root / f"{target.replace(' ', '')}-{transport}-{r}"
                    work.mkdir()
                    # fresh UIDs every time: a re-sent object would not be stored again
                    _write_ingest_files(sources, root / "files", count)
                    files = sorted((root / "files").glob("*.dcm"))
                    with contextlib.ExitStack() as stack:
                        pid = None
                        if target == "node":
                            port, pid = stack.enter_context(_node(work, tls))
                        elif target == "storescp":
                            port = stack.enter_context(_storescp(work, tls))
                        else:
                            processes = 2 if target.endswith("x2") else 1
                            port = stack.enter_context(_bare_pynetdicom(tls, processes))
                        before, cpu_before = _machine_cpu(), _role_cpu(pid) if pid else {}
                        seconds = _send_parallel(files, port, tls[0] if tls else None)
                        busy = _busy_since(before)
                        cpu = {  # cores each role kept busy while the files arrived
                            k: (v - cpu_before.get(k, 0.0)) / seconds
                            for k, v in (_role_cpu(pid) if pid else {}).items()
                        }
                    runs[target].append(mb / seconds)
                    line = f"  {transport} {target:10} round {r + 1}: {mb / seconds:6.0f} MB/s, "
                    line += f"{os.cpu_count()} cores {busy:4.0%} busy"
                    if cpu:
                        runs["scp_cores"].append(cpu.get("scp", 0.0))
                        runs["worker_cores"].append(cpu.get("worker", 0.0))
                        line += ", cores used: " + ", ".join(
                            f"{role} {cores:.2f}" for role, cores in sorted(cpu.items())
                        )
                    print(line, flush=True)
                    shutil.rmtree(work, ignore_errors=True)
            figures[transport] = {k: statistics.median(v) for k, v in runs.items()}
    clients = {"TCP": "dcmsend", "TLS": "storescu +tla"}
    print(
        f"\n{'transport':10} {'client':14} {'node MB/s':>10} {'storescp MB/s':>14} "
        f"{'ratio':>6} {'goal':>5}  {'pynetdicom no-op MB/s':>21} {'its ratio':>9}"
        f"  {'no-op, 2 processes':>18} {'its ratio':>9}"
    )
    for transport, f in figures.items():
        ratio = f["node"] / f["storescp"]
        print(
            f"{transport:10} {clients[transport]:14} {f['node']:10.0f} {f['storescp']:14.0f} "
            f"{ratio:6.2f} {INGEST_GOAL:5.2f}  {f['pynetdicom']:21.0f} "
            f"{f['pynetdicom'] / f['storescp']:9.2f}  {f['pynetdicom x2']:18.0f} "
            f"{f['pynetdicom x2'] / f['storescp']:9.2f}"
            f"{'' if ratio >= INGEST_GOAL else '  below goal'}"
        )
    print(
        "\ncores used by the node while receiving (median): "
        + "; ".join(
            f"{t} SCP {f['scp_cores']:.2f}, worker {f['worker_cores']:.2f}"
            for t, f in figures.items()
        )
    )
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=Path("../shared/dicom-samples"))
    parser.add_argument("--repeat", type=int, default=10, help="times each file is sent")
    parser.add_argument("--pdu", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--tls", action="store_true", help="each size over TCP and over TLS")
    parser.add_argument(
        "--ingest",
        action="store_true",
        help="the whole node (fracture-triage up) against storescp --fork, 4 associations",
    )
    parser.add_argument("--files", type=int, default=48, help="--ingest: files per round")
    parser.add_argument("--rounds", type=int, default=3, help="--ingest: rounds (median)")
    # --ingest runs its no-op receivers as child processes of this module:
    parser.add_argument("--noop-receiver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--noop-tls", type=Path, nargs=2, metavar="PEM", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.noop_receiver:
        _noop_receiver(args.noop_receiver, tuple(args.noop_tls) if args.noop_tls else None)
        return
    if args.repeat < 1 or args.files < ASSOCIATIONS or args.rounds < 1:
        parser.error(f"--repeat and --rounds must be at least 1, --files {ASSOCIATIONS}")
    if args.ingest:
        run_ingest(args.samples, args.files, args.rounds)
        return
    run(args.samples, args.repeat, args.pdu, args.tls)


if __name__ == "__main__":
    main()
