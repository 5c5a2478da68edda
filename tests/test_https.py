"""The web application over HTTPS with the node's DICOM TLS certificate: one certificate for
the node, as a hospital's security review asks (``Settings.http_tls_files``)."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from api.server import http_url
from fracture_triage.settings import Settings
from tests.certs import Pki, make_pki
from tests.servers import free_port, wait_for_port
from tests.test_cli_results import cli


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_the_dicom_certificate_serves_https_unless_the_web_has_its_own(pki: Pki) -> None:
    plain = Settings(http_port=8443)
    assert plain.http_tls_files is None and http_url(plain) == "http://127.0.0.1:8443/"
    dicom = Settings(tls_cert=pki.server.cert, tls_key=pki.server.key, http_port=8443)
    assert dicom.http_tls_files == (pki.server.cert, pki.server.key)
    assert http_url(dicom) == "https://127.0.0.1:8443/"
    own = Settings(
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        http_tls_certfile=pki.client.cert,
        http_tls_keyfile=pki.client.key,
    )
    assert own.http_tls_files == (pki.client.cert, pki.client.key)
    with pytest.raises(ValidationError, match="HTTP_TLS_CERTFILE and FRACTURE_TRIAGE_HTTP_TLS"):
        Settings(http_tls_certfile=pki.client.cert)


@pytest.mark.slow  # runs the API role
def test_api_role_serves_https_with_the_dicom_tls_certificate(pki: Pki, tmp_path: Path) -> None:
    """``fracture-triage api`` given only FRACTURE_TRIAGE_TLS_CERT/KEY: /health answers over
    HTTPS to a client trusting the node's CA, a client trusting another CA is refused in the
    handshake, and plain HTTP on that port gets no answer."""
    port = free_port()
    env = {
        **os.environ,
        "FRACTURE_TRIAGE_TLS_CERT": str(pki.server.cert),
        "FRACTURE_TRIAGE_TLS_KEY": str(pki.server.key),
    }
    proc = subprocess.Popen(
        [*cli(), "api", "--http-port", str(port), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        wait_for_port(port, timeout=60, proc=proc)
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        answer = httpx.get(f"https://127.0.0.1:{port}/health", verify=trusted, timeout=30)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
        assert answer.http_version == "HTTP/1.1"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(
                f"https://127.0.0.1:{port}/health",
                verify=ssl.create_default_context(cafile=str(pki.rogue_ca)),
                timeout=30,
            )
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
        # curl with the CA, as an administrator would check it
        curl = subprocess.run(
            ["curl", "-sS", "--cacert", str(pki.ca), f"https://localhost:{port}/health"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert curl.returncode == 0 and '"status":"ok"' in curl.stdout.replace(" ", ""), curl.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        proc.stderr.close()
    assert f"web application on https://127.0.0.1:{port}/" in log
