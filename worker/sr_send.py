"""Send a produced SR, with the study's evidence Secondary Captures, to one DICOM
destination with C-STORE (PS3.4 B.2, PS3.7 9.1.1), over TLS when it asks (PS3.15 Annex B).

:func:`send_files` stores files in one association and returns each one's outcome;
:func:`send_report` stores one SR and raises :class:`SendError` on failure. What is
recorded, retried and given up is ``worker.delivery``'s business (one rule for every kind of
destination).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
)

from fracture_triage import tls_context
from fracture_triage.settings import Destination, Settings

log = logging.getLogger(__name__)

#: Seconds to wait for association, DIMSE replies and network activity.
TIMEOUT_S = 30.0

#: Warning statuses still mean "stored" (PS3.4 Table B.2-1): B000 coercion of data
#: elements, B007 data set does not match SOP class, B006 elements discarded.
_STORED_WITH_WARNING = {0xB000, 0xB006, 0xB007}


class SendError(RuntimeError):
    """The SR could not be stored at the destination; retrying may help."""


def send_report(
    settings: Settings, sr_path: str | Path, destination: Destination | None = None
) -> None:
    """C-STORE the SR at ``sr_path`` to ``destination`` (default: the first dicom one
    configured); raise on failure.

    The calling AE title is ``settings.ae_title``. Success is status 0x0000 or one of the
    B0xx warnings; anything else (association rejected or aborted, no accepted
    presentation context, a failure status, no reply) raises :class:`SendError`.
    """
    (error,) = send_files(settings, [sr_path], destination)
    if error is not None:
        raise SendError(error)


def send_files(
    settings: Settings, paths: list[str | Path], destination: Destination | None = None
) -> list[str | None]:
    """C-STORE each file (SRs and Secondary Captures) in one association to ``destination``
    (default: the first dicom destination configured), in order; return each one's error
    (None: stored). Raises :class:`SendError` when there is no association (nothing was
    sent) or no destination."""
    if destination is None:
        destination = next((d for d in settings.all_destinations if d.kind == "dicom"), None)
    if destination is None or destination.kind != "dicom" or destination.ae_title is None:
        raise SendError("no SR destination configured (host, port and AE title)")
    host, port, called_aet = destination.host, destination.port, destination.ae_title
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = TIMEOUT_S
    ae.dimse_timeout = TIMEOUT_S
    ae.network_timeout = TIMEOUT_S
    ae.connection_timeout = TIMEOUT_S
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = None
    if destination.tls:  # PS3.15 Annex B; the node's certificate when it has one
        tls_args = tls_context.client_tls_args(
            host, destination.tls_ca, settings.tls_cert, settings.tls_key
        )
    assoc = ae.associate(
        host, port, ae_title=called_aet, max_pdu=settings.max_pdu, tls_args=tls_args
    )
    if not assoc.is_established:
        why = ""
        if tls_args is not None and tls_args[0].failure is not None:
            # Not a PACS that is down: a certificate someone has to change (the delivery
            # retries and gives up all the same, with this in its error).
            why = f": TLS {tls_context.handshake_failure(tls_args[0].failure)}"
        raise SendError(f"association with {called_aet}@{host}:{port} not established{why}")
    errors: list[str | None] = []
    try:
        for ds in datasets:
            if not assoc.is_established:
                errors.append(f"association with {called_aet}@{host}:{port} ended early")
                continue
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:  # no accepted presentation context
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == 0x0000 or code in _STORED_WITH_WARNING:
                log.info(
                    "%s stored at %s@%s:%d (status 0x%04X)",
                    ds.SOPInstanceUID,
                    called_aet,
                    host,
                    port,
                    code,
                )
                errors.append(None)
            elif code == -1:
                errors.append(f"no C-STORE response from {called_aet}@{host}:{port}")
            else:
                errors.append(
                    f"C-STORE to {called_aet}@{host}:{port} failed with status 0x{code:04X}"
                )
    finally:
        if assoc.is_established:
            assoc.release()
    return errors
