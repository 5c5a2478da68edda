"""The study's result for the RIS: an HL7 v2.5.1 ORU^R01 (unsolicited observation result,
HL7 v2.5.1 chapter 7.3.1), sent over MLLP (HL7 v2.5.1 Appendix C, the Minimal Lower Layer
Protocol), its acknowledgement checked (original acknowledgement mode, chapter 2.9.2).

One message per produced SR (``deliveries`` row of kind hl7; its MSH-10 control id stays the
same on every retry, so a RIS that already took it can tell the repeat):

- MSH: this node (``ae_title``) to the destination, ``ORU^R01^ORU_R01``, version 2.5.1,
  UTF-8 (MSH-18 ``UNICODE UTF-8``);
- PID: the patient id (PID-3), name (PID-5), birth date (PID-7) and sex (PID-8) the study
  arrived with;
- OBR: the accession number as the filler order number (OBR-3, the RIS's order) and as
  placer field 1 (OBR-18, where IHE Radiology carries the accession number); the priority in
  OBR-27 quantity/timing component 6 (and in OBR-5, read by older systems), from HL7 table
  0027: ``S`` (stat) for a fracture, ``A`` (as soon as possible) for doubt, ``R`` (routine)
  otherwise; result status OBR-25 ``F`` (final), or ``C`` (correction) for an SR that
  replaces an earlier one of the study;
- OBX 1: the decision (CE, local codes ``FRACTURE``/``DOUBT``/``NOFRACTURE``/``NOTASSESSED``);
  OBX 2: the highest image probability (NM); OBX 3: the SR's SOP Instance UID (ST), by
  which the RIS or a viewer finds the report in the PACS.

The log names control ids, SR UIDs and destinations, never a patient identifier.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import datetime

import hl7
from hl7.client import CR, EB, SB
from hl7.exceptions import HL7Exception

from fracture_triage.verdict import Decision

log = logging.getLogger(__name__)

VERSION = "2.5.1"
#: Seconds to connect, and to wait for the acknowledgement.
TIMEOUT_S = 30.0
#: Largest acknowledgement read (an ACK is a few hundred bytes).
MAX_ACK_BYTES = 1 << 20

#: MSA-1 acknowledgement codes (HL7 table 0008) that mean "accepted": application accept,
#: and commit accept (enhanced mode's first acknowledgement).
ACCEPTED = frozenset({"AA", "CA"})

#: HL7 table 0027 (priority): what a RIS sorts its reading list by.
PRIORITY = {
    Decision.fracture.value: "S",
    Decision.doubt.value: "A",
    Decision.no_fracture.value: "R",
}

#: OBX-5 of the decision: (identifier, text) of a local code (coding system ``L``).
DECISION_CODES = {
    Decision.fracture.value: ("FRACTURE", "Fracture"),
    Decision.doubt.value: ("DOUBT", "Doubtful: needs a radiologist's reading"),
    Decision.no_fracture.value: ("NOFRACTURE", "No fracture"),
    None: ("NOTASSESSED", "Not assessed"),
}

# A message parsed once for its encoding characters (``^~\&``): what escape() uses.
_ENCODING = hl7.parse("MSH|^~\\&|FXTRIAGE")


def escape(value: str | None) -> str:
    """``value`` with the HL7 delimiters escaped (v2.5.1 2.7.4: ``\\F\\`` for ``|`` ...)."""
    return "" if not value else str(_ENCODING.escape(value.replace("\r", " ").replace("\n", " ")))


@dataclass(frozen=True)
class ResultForRis:
    """What the ORU carries, read from the database by the caller."""

    control_id: str
    sending_application: str
    receiving_application: str
    patient_id: str | None
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    accession_number: str | None
    study_instance_uid: str
    sr_sop_instance_uid: str
    decision: str | None
    probability: float | None
    reported_at: datetime
    correction: bool = False


def _person_name(dicom_pn: str | None) -> str:
    """DICOM PN (``Family^Given^Middle^Prefix^Suffix``, PS3.5 6.2) as HL7 XPN (family^given^
    middle^suffix^prefix): the alphabetic group only, each component escaped."""
    if not dicom_pn:
        return ""
    parts = (dicom_pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (escape(p.strip()) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def build_oru(result: ResultForRis) -> str:
    """The ORU^R01 message text, segments separated by carriage returns."""
    when = result.reported_at.strftime("%Y%m%d%H%M%S%z")  # DTM with its UTC offset
    priority = PRIORITY.get(result.decision or "", "R")
    code, text = DECISION_CODES.get(result.decision, DECISION_CODES[None])
    status = "C" if result.correction else "F"
    accession = escape(result.accession_number)
    probability = "" if result.probability is None else f"{result.probability:.4f}"
    segments = [
        "|".join(
            [
                "MSH",
                "^~\\&",
                escape(result.sending_application),
                "",
                escape(result.receiving_application),
                "",
                when,
                "",
                "ORU^R01^ORU_R01",
                escape(result.control_id),
                "P",
                VERSION,
                "",
                "",
                "",
                "",
                "",
                "UNICODE UTF-8",
            ]
        ),
        "|".join(
            [
                "PID",
                "1",
                "",
                escape(result.patient_id),
                "",
                _person_name(result.patient_name),
                "",
                escape(result.patient_birth_date),
                escape(result.patient_sex),
            ]
        ),
        "|".join(
            [
                "OBR",
                "1",
                "",  # OBR-2 placer order number: the order's placer (HIS) owns it
                accession,  # OBR-3 filler order number: the RIS's order, the accession number
                "FXTRIAGE^AI fracture triage of radiographs^L",
                priority,  # OBR-5, retained for backward compatibility in v2.5.1
                "",
                when,  # OBR-7 observation date/time
                *[""] * 10,  # OBR-8 .. OBR-17
                accession,  # OBR-18 placer field 1: the accession number (IHE Radiology)
                "",
                "",
                "",
                when,  # OBR-22 results report/status change
                "",
                "",
                status,  # OBR-25 result status
                "",
                f"^^^^^{priority}",  # OBR-27 quantity/timing: component 6 is the priority
            ]
        ),
        f"OBX|1|CE|DECISION^Fracture triage decision^L||{code}^{escape(text)}^L||||||{status}",
        f"OBX|2|NM|PROBABILITY^Highest fracture probability^L||{probability}||||||{status}",
        f"OBX|3|ST|SRUID^DICOM SR SOP Instance UID^L||{escape(result.sr_sop_instance_uid)}"
        f"||||||{status}",
    ]
    return "\r".join(segments) + "\r"


class MllpError(RuntimeError):
    """The message was not accepted (no connection, no answer, or a negative ACK)."""


def send_mllp(host: str, port: int, message: str, timeout: float = TIMEOUT_S) -> str:
    """Send one message in an MLLP block (``<VT>message<FS><CR>``, the framing bytes of
    ``hl7.client``) and return the acknowledgement's text; raise :class:`MllpError` when
    nothing (or no whole block) comes back within ``timeout``.

    A blocking socket with timeouts rather than ``hl7.client.MLLPClient``, which sets none
    (a RIS that accepts the connection and never answers would hold the worker for ever)
    and reads one ``recv`` only (an ACK split across TCP segments would be cut).
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(SB + message.encode("utf-8") + EB + CR)
            data = b""
            while EB + CR not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise MllpError(f"{host}:{port} closed the connection without an ACK")
                data += chunk
                if len(data) > MAX_ACK_BYTES:
                    raise MllpError(f"{host}:{port} answered more than {MAX_ACK_BYTES} bytes")
    except TimeoutError as exc:
        raise MllpError(f"no ACK from {host}:{port} within {timeout:.0f} s") from exc
    except OSError as exc:
        raise MllpError(f"cannot send to {host}:{port}: {exc.strerror or exc}") from exc
    start = data.find(SB)
    return data[start + 1 if start >= 0 else 0 : data.index(EB + CR)].decode("utf-8", "replace")


def ack_error(ack: str, control_id: str) -> str | None:
    """``None`` when ``ack`` accepts the message ``control_id`` (MSA-1 AA or CA, MSA-2 its
    control id); otherwise why not: the code and MSA-3's text (AE/AR/CE/CR), or what is
    wrong with the answer."""
    try:
        parsed = hl7.parse(ack.replace("\n", "\r").strip("\r") + "\r")
        msa = parsed.segment("MSA")
    except (HL7Exception, KeyError, ValueError, IndexError) as exc:
        return f"the answer is not an HL7 ACK ({type(exc).__name__})"
    code = str(msa[1]).strip() if len(msa) > 1 else ""
    acked = str(msa[2]).strip() if len(msa) > 2 else ""
    text = str(parsed.unescape(str(msa[3]))).strip() if len(msa) > 3 else ""
    if acked != control_id:
        return f"ACK {code or '?'} names message {acked!r}, not {control_id!r}"
    if code in ACCEPTED:
        return None
    return f"ACK {code or '(no MSA-1)'}" + (f": {text}" if text else "")


def loggable(error: str) -> str:
    """``error`` fit for the log: an ACK's free text (MSA-3, the RIS's words, which may quote
    the patient) is left out; it is kept in the database's ``last_error`` only."""
    if error.startswith("ACK ") and ": " in error:
        return error.split(": ", 1)[0] + " (its text is in the delivery's last_error)"
    return error


def send_oru(host: str, port: int, result: ResultForRis) -> str | None:
    """Send the ORU of ``result`` and check its ACK; ``None`` when accepted, else the error."""
    try:
        ack = send_mllp(host, port, build_oru(result))
    except MllpError as exc:
        return str(exc)
    error = ack_error(ack, result.control_id)
    if error is None:
        log.info(
            "HL7 ORU %s (SR %s) accepted by %s:%d",
            result.control_id,
            result.sr_sop_instance_uid,
            host,
            port,
        )
    return error
