"""The node under test: ``fracture-triage scp`` in a subprocess (see :mod:`dicom_node.fuzz`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


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
