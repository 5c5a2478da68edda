"""TLS contexts for DICOM (PS3.15 Annex B, Secure Transport Connection Profiles; BCP 195).

The node's server side (:mod:`dicom_node.tls`) and its outbound associations (the SR
sender, ``worker.sr_send``) build their ``ssl.SSLContext`` here, so both follow one
profile: TLS 1.2 at least, and for TLS 1.2 only the forward-secret AEAD cipher suites BCP
195 (RFC 9325 4.2) recommends; TLS 1.3's suites are OpenSSL's defaults, all AEAD.
Imports nothing of the project.
"""

from __future__ import annotations

import ssl
from pathlib import Path

#: BCP 195 (RFC 9325 4.2) for TLS 1.2: ECDHE or DHE key exchange, AES-GCM or ChaCha20.
#: dcmtk's default "Non-downgrading BCP 195" profile offers these too.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


def server_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """The TLS server context: the node's certificate chain and key (PEM); with ``ca``,
    client certificates required and verified against it (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    # RFC 9325 3.5: no renegotiation (TLS 1.2); compression is off by default (CRIME).
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    if ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(ca))
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """The context for an outbound association: the peer's certificate verified against
    ``ca`` (or the system's trusted CAs) and its host name checked; the node's own
    certificate offered when given (for peers that require client certificates)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    if cert is not None and key is not None:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context


def client_tls_args(
    host: str, ca: Path | None, cert: Path | None, key: Path | None
) -> tuple[ssl.SSLContext, str]:
    """``tls_args`` for ``AE.associate``: the context and the host name to check."""
    return client_context(ca, cert, key), host
