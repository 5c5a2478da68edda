"""Log lines a peer cannot forge (``fracture_triage.logsafe``): unit checks, then the SCP role
run as the CLI runs it, fed control characters by real associations."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pynetdicom._config
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from fracture_triage.logsafe import EscapeControlCharacters, escape_controls, install
from tests.servers import free_port, wait_for_port

EVIL_AE = "EV\nFORGED\x00\x1b[2J"  # 16 characters
EVIL_UID = "1.2.3\r\nFORGED LINE\x00\x1b[31m"  # UI is ASCII


def test_escape_controls() -> None:
    assert escape_controls("a\nb\rc\td\x00e\x1bf\x7fg\x85h\u2028i") == (
        "a\\nb\\rc\\td\\x00e\\x1bf\\x7fg\\x85h\\u2028i"
    )
    assert escape_controls("1.2.840.10008 é MODALITY") == "1.2.840.10008 é MODALITY"


def test_filter_escapes_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tests.logsafe")
    logger.propagate = False
    logger.addHandler(handler)
    install(logger)
    install(logger)  # once only
    assert sum(isinstance(f, EscapeControlCharacters) for f in handler.filters) == 1
    try:
        logger.warning("value %r and %s\u2028", "x\ny", EVIL_AE)
        try:
            try:
                raise KeyError(EVIL_UID)
            except KeyError as exc:
                raise ValueError(f"bad {EVIL_UID}") from exc
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "\x00" not in text and "\x1b" not in text and "\r" not in text
    assert "\u2028" not in text
    assert not [line for line in text.splitlines() if line.startswith("FORGED")]
    assert "value 'x\\ny' and EV\\nFORGED\\x00\\x1b[2J" in text
    assert "ValueError: bad 1.2.3\\r\\nFORGED LINE\\x00\\x1b[31m" in text
    assert "The above exception was the direct cause of the following exception:" in text
    assert text.count("Traceback (most recent call last):") == 2


@pytest.mark.slow  # the SCP role in a subprocess
def test_scp_log_escapes_peer_supplied_text(
    tmp_path: Path, dicom_samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fracture-triage scp`` with its own logging: a calling AE title and an Affected SOP
    Instance UID full of control characters, which pynetdicom quotes in its log messages and
    tracebacks, come out escaped: no forged line, no NUL, no ANSI escape."""
    port = free_port()
    env = {
        **os.environ,
        "FRACTURE_TRIAGE_DATA_DIR": str(tmp_path / "data"),
        "FRACTURE_TRIAGE_DICOM_PORT": str(port),
        "FRACTURE_TRIAGE_BROKER_URL": "redis://127.0.0.1:1/0",  # never reached here
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "fracture_triage.cli", "scp"], env=env, stderr=subprocess.PIPE
    )
    try:
        wait_for_port(port, timeout=60, proc=proc)
        # The peer side skips pynetdicom's own validation to send what a hostile peer sends.
        monkeypatch.setitem(pynetdicom._config.VALIDATORS, "AE", lambda v: (True, ""))
        monkeypatch.setitem(pynetdicom._config.VALIDATORS, "UI", lambda v: (True, ""))
        evil = AE(ae_title=EVIL_AE)
        evil.add_requested_context(ComputedRadiographyImageStorage)
        assert not evil.associate("127.0.0.1", port, ae_title="FXTRIAGE").is_established

        ds = pydicom.dcmread(dicom_samples / "CR_cspine_MONO1_12b_16x16_tiny.dcm")
        ds.SOPInstanceUID = EVIL_UID
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="FXTRIAGE")
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0117  # Invalid SOP Instance
        assoc.release()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    for control in (b"\x00", b"\x1b", b"\r", "\u2028".encode()):
        assert control not in err
    record = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} scp\[\d+\] [A-Z]+ ")
    traceback_line = re.compile(rb"^(Traceback |  |\w+(\.\w+)*(Error|Exception): |$)")
    lines = err.split(b"\n")
    assert [ln for ln in lines if not record.match(ln) and not traceback_line.match(ln)] == []
    # The calling AE title is no AE value (PS3.5 6.2): the node's guard refuses the request
    # before pynetdicom sees it, and names no part of it.
    assert b"sent an undecodable A-ASSOCIATE-RQ (ValueError)" in err
    assert b"EV\\nFORGED" not in err
    assert b"1.2.3\\r\\nFORGED LINE\\x00\\x1b[31m" in err  # and the SOP Instance UID
