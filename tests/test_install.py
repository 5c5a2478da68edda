"""A plain, non-editable install is a complete node without TensorFlow.

Builds the project as a wheel, installs it with its dependencies into a new virtual
environment (no extras, no system site-packages), then, from outside the source tree:
TensorFlow, Keras, scikit-learn and matplotlib are absent; the shipped model is found as
package data and classifies a real radiograph; ``train`` exits 2 naming the extra; and
``fracture-triage up`` receives a study from dcmtk's ``dcmsend``, classifies it and writes its
Structured Report.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED, require
from tests.servers import free_port, wait_for_port

STUDY = [
    "CR_chest_MONO1_10b_440_EVRLE_gdcm.dcm",
    "DERIVED_CR_chest_MONO1_10b_440_VOILUTSequence.dcm",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plain-install")
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (wheel,) = wheels.glob("fracture_triage-*.whl")
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    return venv


def _run(venv: Path, *args: str, cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRACTURE_TRIAGE_")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


@pytest.mark.timeout(600)
def test_plain_install_has_no_training_stack_and_classifies(
    plain_venv: Path, tmp_path: Path
) -> None:
    for module in ("tensorflow", "keras", "sklearn", "matplotlib", "imagehash"):
        probe = _run(plain_venv, "python", "-c", f"import {module}", cwd=tmp_path)
        assert probe.returncode != 0, f"{module} is importable in a plain install"
    image = sorted(require(SHARED / "datasets/fracatlas-train/images").glob("*.jpg"))[0]
    out = _run(plain_venv, "fracture-triage", "classify", "--json", str(image), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert 0.0 <= row["probability"] <= 1.0 and isinstance(row["fracture"], bool)
    train = _run(plain_venv, "fracture-triage", "train", "--out", "run", cwd=tmp_path)
    assert train.returncode == 2
    assert "pip install 'fracture-triage[train]'" in train.stderr


@pytest.mark.timeout(600)
def test_plain_install_up_receives_classifies_and_reports(
    plain_venv: Path, tmp_path: Path, dicom_samples: Path
) -> None:
    dcmsend = shutil.which("dcmsend")
    assert dcmsend, "dcmtk's dcmsend is needed (apt install dcmtk)"
    data = tmp_path / "data"
    port, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRACTURE_TRIAGE_")}
    env["FRACTURE_TRIAGE_BODY_PARTS"] = "*"  # the study is a chest film: outside the default
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 - closed below
    up = subprocess.Popen(
        [str(plain_venv / "bin" / "fracture-triage"), "up", "--data-dir", str(data)]
        + ["--dicom-port", str(port), "--http-port", str(http), "--study-stable-seconds", "2"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        wait_for_port(port, 120)
        files = [str(require(dicom_samples / name)) for name in STUDY]
        sent = subprocess.run(
            [dcmsend, "-aec", "FXTRIAGE", "127.0.0.1", str(port), *files],
            capture_output=True,
            text=True,
            env={**env, "TCP_NODELAY": "1"},
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        deadline = time.monotonic() + 180
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            res = _run(
                plain_venv,
                "fracture-triage",
                "results",
                "--json",
                "--data-dir",
                str(data),
                cwd=tmp_path,
            )
            rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
            if len(rows) == len(STUDY) and all(
                r["status"] == "done" and r["sr_path"] for r in rows
            ):
                break
            time.sleep(1)
        assert len(rows) == len(STUDY), (tmp_path / "up.log").read_text()[-3000:]
        assert all(r["status"] == "done" for r in rows)
        sr = Path(str(rows[0]["sr_path"]))
        assert sr.is_file() and sr.stat().st_size > 0
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()
