"""DICOM over TLS (``dicom_node.tls``, PS3.15 Annex B) with dcmtk's own TLS clients.

Certificates come from ``tests.certs`` (a CA, a server and a client certificate, and a
client certificate of a CA the node does not trust). The SCP runs in this process on real
loopback ports; dcmtk's ``echoscu +tls``, ``storescu +tls`` and ``storescp +tls`` (Debian's
dcmtk is built with OpenSSL) are the peers.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    Verification,
)
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.scp import StorageSCP
from fracture_triage.settings import Destination, Settings
from tests.certs import Pki, make_pki
from tests.conftest import require
from tests.servers import RedisServer, free_port, listening
from tests.test_at_rest import scp_role
from tests.test_cli_results import cli
from tests.test_destinations import _delivery, _reported_study
from tests.test_scp import DCMTK_ENV, TINY_CR, dcmtk, instances
from tests.test_scp_hostile import closed_by_peer, no_broker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def tls_scp(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    pki: Pki,
    *,
    mutual: bool = True,
    plain: bool = False,
    **overrides: Any,
) -> Iterator[StorageSCP]:
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=free_port() if plain else 0,
        tls_port=free_port(),
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_ca=pki.ca if mutual else None,
        **overrides,
    )
    with StorageSCP(settings, sessions, no_broker) as scp:
        yield scp


def tls_options(pki: Pki, client: str | None) -> list[str]:
    """dcmtk's TLS options: the client's key and certificate (or anonymous TLS without
    one), the node's CA trusted."""
    if client is None:
        return ["+tla", "+cf", str(pki.ca)]
    pair = pki.client if client == "trusted" else pki.rogue_client
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(pki.ca)]


def echoscu(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-to", "10", "-ta", "10", *options, "-aec", "FXTRIAGE"]
        + ["127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_echo_and_store_with_a_trusted_client_certificate(
    tmp_path: Path,
    sqlite_db: sessionmaker[Session],
    pki: Pki,
    dicom_samples: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    sample = require(dicom_samples / TINY_CR)
    with tls_scp(tmp_path, sqlite_db, pki) as scp:
        with pytest.raises(RuntimeError):
            scp.port  # noqa: B018 - FRACTURE_TRIAGE_DICOM_PORT=0: no plain port
        echo = echoscu(scp.tls_port, *tls_options(pki, "trusted"))
        assert echo.returncode == 0, echo.stdout + echo.stderr
        store = subprocess.run(
            [dcmtk("storescu"), *tls_options(pki, "trusted"), "-aec", "FXTRIAGE"]
            + ["127.0.0.1", str(scp.tls_port), str(sample)],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert store.returncode == 0, store.stdout + store.stderr
        uid = str(pydicom.dcmread(sample, stop_before_pixels=True).SOPInstanceUID)
        stored = instances(sqlite_db)
        assert uid in stored
        assert Path(stored[uid].storage_path).read_bytes()[128:132] == b"DICM"
    assert "client certificate CN=modality-1" in caplog.text
    assert "TLSv1.3" in caplog.text or "TLSv1.2" in caplog.text


def test_untrusted_or_missing_client_certificate_is_refused(
    tmp_path: Path, sqlite_db: sessionmaker[Session], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with tls_scp(tmp_path, sqlite_db, pki) as scp:
        rogue = echoscu(scp.tls_port, *tls_options(pki, "rogue"))
        anonymous = echoscu(scp.tls_port, *tls_options(pki, None))
        # Still serving the trusted client after the refusals.
        trusted = echoscu(scp.tls_port, *tls_options(pki, "trusted"))
    assert rogue.returncode != 0 and anonymous.returncode != 0
    assert "Association Request Failed" in rogue.stdout + rogue.stderr
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    failures = [r.getMessage() for r in caplog.records if "TLS handshake with" in r.getMessage()]
    assert len(failures) == 2, failures
    assert any("CERTIFICATE" in f.upper() for f in failures), failures


def test_without_a_client_ca_any_tls_client_is_served(
    tmp_path: Path, sqlite_db: sessionmaker[Session], pki: Pki
) -> None:
    with tls_scp(tmp_path, sqlite_db, pki, mutual=False) as scp:
        anonymous = echoscu(scp.tls_port, *tls_options(pki, None))
        rogue = echoscu(scp.tls_port, *tls_options(pki, "rogue"))
    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
    assert rogue.returncode == 0, rogue.stdout + rogue.stderr


def test_plain_tcp_on_the_tls_port_is_refused_and_both_ports_serve(
    tmp_path: Path, sqlite_db: sessionmaker[Session], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with tls_scp(tmp_path, sqlite_db, pki, plain=True) as scp:
        over_plain = echoscu(scp.tls_port)
        plain_port = echoscu(scp.port)
        tls_port = echoscu(scp.tls_port, *tls_options(pki, "trusted"))
    assert over_plain.returncode != 0
    assert plain_port.returncode == 0, plain_port.stdout + plain_port.stderr
    assert tls_port.returncode == 0, tls_port.stdout + tls_port.stderr
    assert "TLS handshake with 127.0.0.1" in caplog.text


def test_the_server_offers_tls_1_2_or_later_only(
    tmp_path: Path, sqlite_db: sessionmaker[Session], pki: Pki
) -> None:
    with tls_scp(tmp_path, sqlite_db, pki, mutual=False) as scp:
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with (
            socket.create_connection(("127.0.0.1", scp.tls_port), timeout=10) as raw,
            pytest.raises(ssl.SSLError),
        ):
            old.wrap_socket(raw)


def test_scp_role_serves_tls_only_and_echo_checks_it(
    tmp_path: Path, pki: Pki, redis: RedisServer
) -> None:
    """``fracture-triage scp`` with the TLS settings and FRACTURE_TRIAGE_DICOM_PORT=0: dcmtk
    is served over TLS; ``fracture-triage echo`` (the container health check) goes over TLS."""
    tls_port = free_port()
    env = {
        "FRACTURE_TRIAGE_DICOM_PORT": "0",
        "FRACTURE_TRIAGE_TLS_PORT": str(tls_port),
        "FRACTURE_TRIAGE_TLS_CERT": str(pki.server.cert),
        "FRACTURE_TRIAGE_TLS_KEY": str(pki.server.key),
        "FRACTURE_TRIAGE_TLS_CA": str(pki.ca),
    }
    log = tmp_path / "scp.log"
    with scp_role(tmp_path / "data", redis.url, log, env) as port:
        assert port == tls_port
        echo = echoscu(port, *tls_options(pki, "trusted"))
        assert echo.returncode == 0, echo.stdout + echo.stderr
        # The health check offers the node's own certificate, which this CA signed too.
        ours = subprocess.run(
            [*cli(), "echo"],
            env={**os.environ, **env, "FRACTURE_TRIAGE_TLS_CERT": str(pki.client.cert)}
            | {"FRACTURE_TRIAGE_TLS_KEY": str(pki.client.key)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ours.returncode == 0 and "Success" in ours.stdout, ours.stdout + ours.stderr
    text = log.read_text(errors="replace")
    assert f"port {tls_port} (TLS, client certificates required)" in text


# --- hostile peers on the TLS port -----------------------------------------------------------


def tls_client(pki: Pki, port: int, source: str = "127.0.0.1") -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_silent_connections_time_out_in_handshake_without_blocking_others(
    tmp_path: Path, sqlite_db: sessionmaker[Session], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Peers that connect and never say hello: a trusted client is served meanwhile, and
    each silent connection is closed once the handshake deadline passes."""
    with tls_scp(tmp_path, sqlite_db, pki, dicom_acse_timeout_seconds=2.0) as scp:
        silent = [socket.create_connection(("127.0.0.1", scp.tls_port)) for _ in range(4)]
        try:
            started = time.monotonic()
            echo = echoscu(scp.tls_port, *tls_options(pki, "trusted"))
            assert echo.returncode == 0, echo.stdout + echo.stderr
            assert time.monotonic() - started < 2
            assert all(closed_by_peer(sock, 5) for sock in silent)
        finally:
            for sock in silent:
                sock.close()
    assert "no handshake within 2 s" in caplog.text


def test_guard_bounds_apply_behind_tls(
    tmp_path: Path, sqlite_db: sessionmaker[Session], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """An A-ASSOCIATE-RQ declaring 1 GiB over an authenticated TLS connection is aborted
    before its body is read, as on the plain port (``dicom_node.guard``)."""
    with tls_scp(tmp_path, sqlite_db, pki) as scp:
        tls = tls_client(pki, scp.tls_port)
        try:
            tls.sendall(struct.pack(">BBL", 0x01, 0, 1 << 30) + b"\x00" * 4096)
            tls.settimeout(5)
            answer = tls.recv(64)
            assert answer[:1] == b"\x07"  # A-ABORT (PS3.8 9.3.8)
            assert closed_by_peer(tls, 5)  # type: ignore[arg-type]
        finally:
            tls.close()
    assert "declared a PDU of type 0x01" in caplog.text


def tls_echo(pki: Pki, port: int, source: str = "127.0.0.1") -> int | None:
    """C-ECHO over TLS from ``source`` (pynetdicom, with the trusted client certificate):
    the status, or ``None`` when no association was established."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="FXTRIAGE",
        bind_address=(source, 0),
        tls_args=(context, "127.0.0.1"),
    )
    if not assoc.is_established:
        return None
    status = int(assoc.send_c_echo().Status)
    assoc.release()
    return status


def test_per_peer_cap_applies_on_the_tls_port(
    tmp_path: Path, sqlite_db: sessionmaker[Session], pki: Pki
) -> None:
    """With 2 connections per address, two idle TLS connections from 127.0.0.1 use up its
    share: a third from there is refused, one from 127.0.0.2 is served."""
    with tls_scp(tmp_path, sqlite_db, pki, max_associations_per_peer=2) as scp:
        assert tls_echo(pki, scp.tls_port) == 0x0000  # served while under the cap
        held = [tls_client(pki, scp.tls_port) for _ in range(2)]
        try:
            time.sleep(0.5)
            assert tls_echo(pki, scp.tls_port) is None
            assert tls_echo(pki, scp.tls_port, source="127.0.0.2") == 0x0000
        finally:
            for sock in held:
                sock.close()


def test_tls_connections_without_a_request_hold_no_association_and_end_at_shutdown(
    tmp_path: Path, sqlite_db: sessionmaker[Session], pki: Pki
) -> None:
    """20 TLS connections that finish their handshake and then send nothing (more than the
    SCP's 16 associations) leave a trusted client served at once: behind the relay, as on
    the plain port, no association exists before a whole A-ASSOCIATE-RQ. Stopping the SCP
    closes them without waiting out the ACSE timeout."""
    with tls_scp(
        tmp_path, sqlite_db, pki, max_associations_per_peer=32, dicom_acse_timeout_seconds=60.0
    ) as scp:
        held = [tls_client(pki, scp.tls_port) for _ in range(20)]
        try:
            time.sleep(0.5)
            assert tls_echo(pki, scp.tls_port) == 0x0000
            stopping = time.monotonic()
            scp.shutdown()
            assert time.monotonic() - stopping < 10
            assert all(closed_by_peer(sock, 5) for sock in held)  # type: ignore[arg-type]
        finally:
            for sock in held:
                sock.close()


# --- outbound: the SR sent to a TLS destination ----------------------------------------------


def sr_file(path: Path) -> Path:
    """A minimal Comprehensive 3D SR object (what the sender reads and C-STOREs)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@contextmanager
def storescp_tls(folder: Path, pki: Pki, trusted: Path) -> Iterator[int]:
    """dcmtk's storescp over TLS, requiring client certificates that chain to ``trusted``."""
    folder.mkdir(parents=True)
    with listening(
        lambda port: (
            [dcmtk("storescp"), "+tls", str(pki.server.key), str(pki.server.cert)]
            + ["+cf", str(trusted), "-aet", "PACS", "-od", str(folder), str(port)]
        ),
        folder.parent / f"{folder.name}-storescp",
        env=DCMTK_ENV,
    ) as port:
        yield port


def test_sr_is_sent_over_tls_with_the_node_certificate(tmp_path: Path, pki: Pki) -> None:
    from worker.sr_send import SendError, send_report

    sr = sr_file(tmp_path / "sr.dcm")
    received = tmp_path / "pacs"
    with storescp_tls(received, pki, pki.ca) as port:
        settings = Settings(
            data_dir=tmp_path,
            sr_destination_host="127.0.0.1",
            sr_destination_port=port,
            sr_destination_ae_title="PACS",
            sr_destination_tls=True,
            sr_destination_tls_ca=pki.ca,
            tls_cert=pki.client.cert,
            tls_key=pki.client.key,
        )
        send_report(settings, sr)
        assert len(list(received.iterdir())) == 1
        # Without TLS, or with a CA that did not sign the PACS' certificate: not sent.
        with pytest.raises(SendError):
            send_report(settings.model_copy(update={"sr_destination_tls": False}), sr)
        with pytest.raises(SendError):
            send_report(settings.model_copy(update={"sr_destination_tls_ca": pki.rogue_ca}), sr)


# --- outbound: a configured TLS destination, delivered by worker.delivery --------------------


@contextmanager
def tls_delivery(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    dicom_samples: Path,
    destination: Any,
    **node: Any,
) -> Iterator[tuple[Settings, int]]:
    """A reported study whose one delivery goes to ``destination``; yields the settings
    (``node``: the node's own ``tls_cert``/``tls_key``) and the delivery's id."""
    settings = Settings(
        data_dir=tmp_path, destinations=[destination], delivery_max_attempts=2, **node
    )
    doc = _reported_study(sessions, settings, dicom_samples, 0.9)
    yield settings, _delivery(sessions, doc, destination.name).id


def pacs(port: int, pki: Pki, *, host: str = "127.0.0.1", ca: Path | None = None) -> Destination:
    return Destination(
        name="pacs",
        kind="dicom",
        host=host,
        port=port,
        ae_title="PACS",
        tls=True,
        tls_ca=ca or pki.ca,
    )


def test_a_tls_destination_gets_the_sr_which_dcmtk_stores(
    tmp_path: Path, sqlite_db: sessionmaker[Session], pki: Pki, dicom_samples: Path
) -> None:
    """``"tls": true`` with the PACS' CA: the SR goes over TLS, offering the node's
    certificate, which storescp requires (``+cf``: client certificates must chain to it)."""
    from db.models import Delivery, DeliveryState, SRDocument
    from worker.delivery import deliver

    received = tmp_path / "pacs"
    with storescp_tls(received, pki, pki.ca) as port:
        node = {"tls_cert": pki.client.cert, "tls_key": pki.client.key}
        with (
            tls_delivery(tmp_path, sqlite_db, dicom_samples, pacs(port, pki), **node) as (
                settings,
                delivery_id,
            ),
            sqlite_db() as session,
        ):
            assert deliver(session, settings, delivery_id) == "sent"
            row = session.get(Delivery, delivery_id)
            assert row is not None and row.state == DeliveryState.sent
            doc = session.get(SRDocument, row.sr_document_id)
            assert doc is not None and doc.send_status == "sent"
    (stored,) = [pydicom.dcmread(p) for p in received.iterdir()]
    assert stored.SOPInstanceUID == doc.sop_instance_uid
    assert stored.SOPClassUID == Comprehensive3DSRStorage


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        # the PACS' certificate was signed by a CA the node was not told to trust (OpenSSL's
        # words depend on whether the server sends its CA along: storescp does)
        (
            "untrusted CA",
            "certificate verify failed: (self-signed certificate in certificate chain"
            "|unable to get local issuer certificate)",
        ),
        # a trusted certificate, but not issued for the address the node connects to
        ("wrong address", "certificate verify failed: IP address mismatch"),
        # mutual TLS: the PACS requires a certificate the node does not have (TLS 1.3 alert)
        ("no node certificate", "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
        # mutual TLS: the node's certificate is not one the PACS trusts
        ("untrusted node certificate", "TLSV1_ALERT_UNKNOWN_CA"),
    ],
)
def test_a_certificate_problem_fails_the_delivery_with_its_reason_and_gives_up(
    tmp_path: Path,
    sqlite_db: sessionmaker[Session],
    pki: Pki,
    dicom_samples: Path,
    case: str,
    reason: str,
) -> None:
    """Nothing is sent; the attempt ends at once (no hang on a handshake); the delivery is
    retried and gives up like any failure, its error (and the SR's) saying what to fix."""
    from db.models import Delivery, DeliveryState, SRDocument
    from worker.delivery import deliver

    received = tmp_path / "pacs"
    with storescp_tls(received, pki, pki.ca) as port:
        destination = pacs(port, pki)
        node: dict[str, Any] = {"tls_cert": pki.client.cert, "tls_key": pki.client.key}
        if case == "untrusted CA":
            destination = pacs(port, pki, ca=pki.rogue_ca)
        elif case == "wrong address":  # storescp listens on every address, 127.0.0.2 too
            destination = pacs(port, pki, host="127.0.0.2")
        elif case == "no node certificate":
            node = {}
        else:
            node = {"tls_cert": pki.rogue_client.cert, "tls_key": pki.rogue_client.key}
        with (
            tls_delivery(tmp_path, sqlite_db, dicom_samples, destination, **node) as (
                settings,
                delivery_id,
            ),
            sqlite_db() as session,
        ):
            started = time.monotonic()
            assert deliver(session, settings, delivery_id) == "retry"
            assert time.monotonic() - started < 10
            row = session.get(Delivery, delivery_id)
            assert row is not None and (row.state, row.attempts) == (DeliveryState.pending, 1)
            assert row.last_error is not None and row.last_error.startswith(
                f"SendError: association with PACS@{destination.host}:{port} not established: TLS "
            )
            assert re.search(reason, row.last_error), row.last_error
            assert deliver(session, settings, delivery_id, force=True) == "gave up"
            session.refresh(row)
            assert (row.state, row.attempts) == (DeliveryState.gave_up, 2)
            assert re.search(reason, row.last_error or "")
            doc = session.get(SRDocument, row.sr_document_id)
            assert doc is not None and doc.send_status == "failed"
            assert (doc.send_error or "").startswith("pacs: SendError: association with PACS@")
    assert list(received.iterdir()) == []
