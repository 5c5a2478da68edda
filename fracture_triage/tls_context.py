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


def handshake_failure(exc: Exception) -> str:
    """Why a TLS connection failed, in words for a log or a delivery's error: for a
    certificate that did not verify, X.509's reason (``unable to get local issuer
    certificate``, ``certificate has expired``, ``IP address mismatch, ...``); otherwise
    OpenSSL's (``TLSV13_ALERT_CERTIFICATE_REQUIRED``: the peer wanted our certificate,
    ``SSLV3_ALERT_BAD_CERTIFICATE``, ``UNKNOWN_CA``: it did not trust the one we gave)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else type(exc).__name__


class ClientContext(ssl.SSLContext):
    """An outbound context that keeps what ended its last TLS connection
    (:attr:`failure`). pynetdicom only logs a failed handshake and reports the association
    as not established, the same as a PACS that is down; a delivery records the reason
    instead, since an untrusted or expired certificate is for someone to fix, not waited
    out. One context per association (:func:`client_tls_args`), so the record is its own."""

    #: The TLS error of the last connection made with this context (None: none so far).
    failure: OSError | None = None


class _ClientSocket(ssl.SSLSocket):
    """Records TLS errors on its :class:`ClientContext`: in the handshake (our check of the
    peer's certificate) and in the first reads after it. With TLS 1.3 the server checks our
    certificate after the client's handshake has finished, so its alert (certificate
    required, bad certificate, unknown CA) arrives with the first read, as the A-ASSOCIATE-AC
    is awaited."""

    def _record(self, exc: OSError) -> None:
        context = self.context
        if isinstance(context, ClientContext) and context.failure is None:
            context.failure = exc

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            self._record(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:  # only TLS alerts: a timeout here is the DICOM layer's
            self._record(exc)
            raise


ClientContext.sslsocket_class = _ClientSocket


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ClientContext:
    """The context for an outbound association: the peer's certificate verified against
    ``ca`` (or the system's trusted CAs) and its host name checked; the node's own
    certificate offered when given (for peers that require client certificates). What
    ``ssl.create_default_context(Purpose.SERVER_AUTH)`` makes, as a :class:`ClientContext`."""
    context = ClientContext(
        ssl.PROTOCOL_TLS_CLIENT
    )  # verify_mode CERT_REQUIRED, host names checked
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    if cert is not None and key is not None:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context


def client_tls_args(
    host: str, ca: Path | None, cert: Path | None, key: Path | None
) -> tuple[ClientContext, str]:
    """``tls_args`` for ``AE.associate``: a new context and the host name to check."""
    return client_context(ca, cert, key), host
