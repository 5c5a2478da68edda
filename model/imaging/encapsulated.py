"""Sizes inside encapsulated (compressed) Pixel Data, read without decoding (PS3.5 A.4).

The storage SCP and the worker check these before any decoder runs: the fragments' items
must be well formed, and the size a JPEG / JPEG-LS / JPEG 2000 codestream declares is what
the decoders allocate, so it must not exceed the header's Rows x Columns.
"""

from __future__ import annotations

import struct

_ITEM = 0xE000FFFE  # (FFFE,E000) Item, read as a little-endian uint32 of group, element
_SEQ_DELIM = 0xE0DDFFFE  # (FFFE,E0DD) Sequence Delimitation Item

# JPEG start-of-frame markers (ITU-T T.81 Table B.1; JPEG-LS SOF55, ITU-T T.87 C.2.2).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def encapsulated_fragment_bytes(value: bytes) -> int:
    """Total length of the non-empty fragments of encapsulated Pixel Data (PS3.5 A.4).

    Walks the items after the Basic Offset Table; raises ``ValueError`` when an item is
    malformed or runs past the end of the value (a truncated stream).
    """
    offset, total, first = 0, 0, True
    while offset + 8 <= len(value):
        tag, length = struct.unpack_from("<II", value, offset)
        if tag == _SEQ_DELIM:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise ValueError(f"unexpected item at byte {offset} of the encapsulated Pixel Data")
        offset += 8
        if offset + length > len(value):
            raise ValueError("an encapsulated Pixel Data fragment is truncated")
        if not first:  # the first item is the Basic Offset Table, not image data
            total += length
        first = False
        offset += length
    return total


def first_fragment(value: bytes, frames: int) -> bytes:
    """The start of the first frame of encapsulated Pixel Data (PS3.5 A.4), or b"" if unparsable."""
    from pydicom.encaps import generate_frames

    try:
        return next(generate_frames(value, number_of_frames=frames))[:65536]
    except Exception:  # noqa: BLE001 - malformed items: the decoder will report it
        return b""


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream declares; None if unknown."""
    if frame[:4] == b"\xff\x4f\xff\x51" and len(frame) >= 24:
        # JPEG 2000 SOC + SIZ: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz (ISO/IEC 15444-1 A.5.1)
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[8:24])
        return max(ysiz - yosiz, 0), max(xsiz - xosiz, 0)
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2  # walk the marker segments after SOI up to the frame header (T.81 B.2.2)
    while pos + 9 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_SOF:
            rows, columns = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return (rows, columns) if rows else None  # 0 rows: defined later by DNL
        pos += 2 + struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
    return None
