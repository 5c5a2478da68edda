"""Who may associate (``dicom_node.peers``): the called AE title and (calling AE title,
address) pairs, refused with the A-ASSOCIATE-RJ reason that names it (PS3.8 9.3.4)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.peers import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    parse_peer,
    policy,
)
from fracture_triage.cli import main
from fracture_triage.settings import Settings
from tests.test_scp import DCMTK_ENV, dcmtk
from tests.test_scp_hostile import running_scp

PEERS = ["CR1@127.0.0.1", "WS@127.0.0.0/29", "PACS@10.0.0.0/8"]


def test_peer_entries_parse_and_bad_ones_are_named() -> None:
    assert str(parse_peer("CR1@10.1.2.3")) == "CR1@10.1.2.3/32"
    assert str(parse_peer(" PACS @ 10.20.0.0/16 ")) == "PACS@10.20.0.0/16"
    assert str(parse_peer("MOD@2001:db8::/32")) == "MOD@2001:db8::/32"
    assert parse_peer("ANYWHERE").network is None
    for bad in ("CR1@10.1.2.300", "@10.0.0.1", "A_TITLE_LONGER_THAN_16@10.0.0.1", "X@net/99"):
        with pytest.raises(ValueError, match="peer"):
            parse_peer(bad)


def test_policy_names_the_reason() -> None:
    rules = policy(Settings(allowed_peers=PEERS, allowed_calling_aets=["ANYHOST"]))
    assert rules.refusal("CR1", "FXTRIAGE", "127.0.0.1") is None
    assert rules.refusal("WS", "FXTRIAGE", "127.0.0.5") is None
    assert rules.refusal("ANYHOST", "FXTRIAGE", "192.168.9.9") is None
    refused = rules.refusal("CR1", "FXTRIAGE", "127.0.0.2")
    assert refused is not None and refused[0] == CALLING_AE_NOT_RECOGNIZED
    assert "not allowed from this address" in refused[1]
    refused = rules.refusal("STRANGER", "FXTRIAGE", "127.0.0.1")
    assert refused is not None and refused[0] == CALLING_AE_NOT_RECOGNIZED
    refused = rules.refusal("CR1", "OTHER", "127.0.0.1")
    assert refused is not None and refused[0] == CALLED_AE_NOT_RECOGNIZED
    anyone = policy(Settings(accept_any_called_aet=True))
    assert anyone.refusal("WHOEVER", "OTHER", "203.0.113.1") is None


def test_a_malformed_peer_setting_stops_the_scp_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("FRACTURE_TRIAGE_ALLOWED_PEERS", "CR1@10.0.0.300")
    monkeypatch.setenv("FRACTURE_TRIAGE_DATA_DIR", str(tmp_path))
    assert main(["scp"]) == 2
    assert "CR1@10.0.0.300" in capsys.readouterr().err


def echoscu(port: int, calling: str, called: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def pynetdicom_echo(port: int, calling: str, source: str) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="FXTRIAGE", bind_address=(source, 0))
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0x0000
    assoc.release()
    return ok


@pytest.mark.slow  # dcmtk's echoscu
def test_peers_and_called_ae_title_with_echoscu(
    tmp_path: Path, sqlite_db: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    with running_scp(tmp_path, sqlite_db, allowed_peers=PEERS) as scp:
        allowed = echoscu(scp.port, "CR1", "FXTRIAGE")
        stranger = echoscu(scp.port, "STRANGER", "FXTRIAGE")
        elsewhere = echoscu(scp.port, "PACS", "FXTRIAGE")  # allowed from 10/8 only
        wrong_called = echoscu(scp.port, "CR1", "ANY-SCP")
        assert pynetdicom_echo(scp.port, "WS", "127.0.0.5")
        assert not pynetdicom_echo(scp.port, "CR1", "127.0.0.2")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    for refused in (stranger, elsewhere):
        text = refused.stdout + refused.stderr
        assert refused.returncode != 0
        # PS3.8 9.3.4: rejected-permanent, source service-user, reason 3.
        assert "Rejected Permanent" in text and "Calling AE Title Not Recognized" in text, text
    text = wrong_called.stdout + wrong_called.stderr
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in text, text  # reason 7
    assert "refused association from PACS@127.0.0.1: calling AE title 'PACS' is not allowed" in (
        caplog.text
    )


@pytest.mark.slow  # dcmtk's echoscu
def test_any_called_ae_title_when_configured(
    tmp_path: Path, sqlite_db: sessionmaker[Session]
) -> None:
    with running_scp(tmp_path, sqlite_db, accept_any_called_aet=True) as scp:
        run = echoscu(scp.port, "MODALITY", "WHATEVER")
    assert run.returncode == 0, run.stdout + run.stderr
