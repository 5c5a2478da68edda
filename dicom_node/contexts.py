"""What the node accepts at association negotiation (PS3.7 Annex D.3.3.2, PS3.8 9.3.3).

Storage SOP classes (PS3.4 Annex B.5): radiographs only. Transfer syntaxes: every one whose
pixel data pydicom can decode with the installed codecs (pylibjpeg, pyjpegls), so that
whatever is acknowledged can later be classified. Anything else is refused per presentation
context (result 3, abstract syntax not supported / 4, transfer syntaxes not supported).
"""

from __future__ import annotations

import logging

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

logger = logging.getLogger(__name__)

#: Verification SOP Class (PS3.4 Annex A): C-ECHO.
VERIFICATION = UID("1.2.840.10008.1.1")

#: Storage SOP classes accepted (PS3.4 Table B.5-1), with the names used in logs.
STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}

#: Candidate transfer syntaxes, in the order the node prefers them when one presentation
#: context proposes several (pynetdicom accepts the first of this list the SCU offers):
#: uncompressed, then lossless, then lossy (or possibly lossy) ones, so that the node never
#: makes an SCU compress an image lossily to send it; a lossy file is received as it is.
CANDIDATE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,  # retired in PS3.5 but still sent by old modalities
    # Lossless
    JPEGLosslessSV1,  # Process 14, Selection Value 1
    JPEGLossless,  # Process 14, any predictor
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    # Lossy, or possibly lossy
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
)
#: The candidates whose compression may lose information.
LOSSY_TRANSFER_SYNTAXES = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K}
)


def decodable(uid: UID) -> bool:
    """Whether pydicom has a working pixel data decoder for ``uid`` in this environment."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def supported_transfer_syntaxes() -> list[UID]:
    """The candidate transfer syntaxes pydicom can decode here; logs the ones it cannot."""
    accepted: list[UID] = []
    for uid in CANDIDATE_TRANSFER_SYNTAXES:
        if decodable(uid):
            accepted.append(uid)
        else:
            logger.warning("not accepting %s (%s): no pixel data decoder installed", uid, uid.name)
    return accepted
