"""Real servers for the tests, started on loopback on free ports and stopped afterwards."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; the usual default)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port nothing is bound to, for a server a test starts next.

    Chosen below the kernel's ephemeral range on purpose: a port from ``bind(0)`` comes from
    that range, the one every outgoing connection's local port comes from too, so any
    connection opened between the choice and the server's bind (a worker's Redis client, a
    database pool) could take it, and the server would exit with "address already in use"
    (CI saw storescp do that once). Ports under the range are never handed out that way.
    """
    low, high = _ephemeral_range()
    lowest, highest = (10000, low - 1) if low > 11000 else (high + 1, 65535)
    for _ in range(200):
        port = random.randint(lowest, highest)
        with socket.socket() as s:
            try:
                # Every address: a server bound to 0.0.0.0 conflicts with any of them.
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {lowest} and {highest} after 200 tries")


class ServerExitedError(RuntimeError):
    """A server process ended before it listened."""


def wait_for_port(
    port: int,
    timeout: float = 20.0,
    host: str = "127.0.0.1",
    proc: subprocess.Popen[Any] | None = None,
) -> None:
    """Wait until something accepts connections on ``host:port``; with ``proc``, fail at once
    (ServerExitedError) if that process ends first, instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerExitedError(
                f"{proc.args!r} exited with {proc.returncode} before listening on {host}:{port}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@contextmanager
def listening(
    argv: Callable[[int], list[str]],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
    attempts: int = 3,
) -> Iterator[int]:
    """Run the server ``argv(port)`` on a free port until the block ends; yields the port.

    Its output goes to ``workdir/server.log``, quoted in the error when it does not come up.
    If it exits before listening (its port was taken after all), it is started again on
    another port, ``attempts`` times in all.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    for attempt in range(1, attempts + 1):
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv(port), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_for_port(port, timeout, proc=proc)
            except ServerExitedError as exc:
                if attempt == attempts:
                    raise ServerExitedError(f"{exc}; its output:\n{log_path.read_text()}") from None
                continue
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}; its output:\n{log_path.read_text()}") from None
            yield port
            return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
    raise AssertionError("unreachable")


class RedisServer:
    """A real redis-server on 127.0.0.1; can be stopped and started again on the same port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _pg_bin(name: str) -> str:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: apt-get install postgresql")
    return found


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; yields a SQLAlchemy URL (psycopg 3)."""
    # Its own folder directly under /tmp: pytest's temporary folders are private to root,
    # and the server runs as the postgres user.
    workdir = Path(tempfile.mkdtemp(prefix="fracture-triage-pg-"))
    data = workdir / "pgdata"
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        pw = pwd.getpwnam("postgres")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *as_user,
            _pg_bin("initdb"),
            "-D",
            str(data),
            "-U",
            "triage",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            *as_user,
            _pg_bin("pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(workdir / "pg.log"),
            "-o",
            f"-p {port} -h 127.0.0.1 -k {workdir} -c fsync=off",
            "start",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        subprocess.run(
            [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "triage", "triage"],
            check=True,
        )
        yield f"postgresql+psycopg://triage@127.0.0.1:{port}/triage"
    finally:
        subprocess.run(
            [*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(workdir, ignore_errors=True)


class OrthancServer:
    """A real Orthanc PACS (apt package ``orthanc``) on loopback, storing into ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(binary).exists():
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        self.binary = binary
        self.workdir = workdir
        self.ae_title = "ORTHANCTEST"
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        import json

        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "fracture-triage-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            # No system plugins: the test wants plain storage and the REST API only.
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            # HTTP only from localhost, and without credentials there.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            # Refuse associations addressed to another AE title, as a real PACS would.
            "DicomCheckCalledAet": True,
            # Any calling AE may echo and store (the node's AE is not registered).
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "ConcurrentJobs": 1,
            "StorageCompression": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [self.binary, str(path)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.proc.returncode}; see {self.workdir}/orthanc.log"
                )
            try:
                with urllib.request.urlopen(f"{self.http_url}/system", timeout=1) as resp:
                    if resp.status == 200:
                        left = max(1.0, deadline - time.monotonic())
                        wait_for_port(self.dicom_port, timeout=left)
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"Orthanc not ready after {timeout}s; see {self.workdir}/orthanc.log")

    def get_json(self, path: str, data: bytes | None = None) -> object:
        """GET (or POST ``data`` to) the REST API and decode the JSON answer."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.http_url}{path}", data=data, timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
            self.log.close()


@contextmanager
def orthanc_server(workdir: Path) -> Iterator[OrthancServer]:
    """Orthanc on free ports; yields it (``ae_title``, ``dicom_port``, ``http_url``)."""
    server = OrthancServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
