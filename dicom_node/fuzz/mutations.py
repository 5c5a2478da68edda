"""Data set mutations of real samples, on their encoded bytes (PS3.5 7.1: explicit and
implicit VR Little Endian elements; sequences and encapsulated Pixel Data skipped whole)."""

from __future__ import annotations

import contextlib
import copy
import random
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom.dsutils import split_dataset

from dicom_node.contexts import STORAGE_SOP_CLASSES

DATASET_KINDS = (
    "flip_header",
    "flip_pixels",
    "truncate",
    "absurd_attributes",
    "bad_uid",
    "bad_length",
    "deep_sequence",
    "bad_vr",
)
#: Samples larger than this are left out (speed; the large ones add nothing to the parsing).
MAX_SAMPLE_BYTES = 1_200_000
EXPLICIT_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class Element:
    """One top-level element of an encoded data set: offsets into the file's bytes."""

    tag: int
    start: int  # the tag's first byte
    vr_at: int | None  # explicit VR only
    length_at: int
    length_size: int
    value_at: int
    length: int


class Walker:
    """Top-level elements of an encoded Little Endian data set (sequences skipped whole)."""

    def __init__(self, data: bytes, offset: int, implicit: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.elements: list[Element] = []
        # a data set we cannot walk further: the elements found so far
        with contextlib.suppress(struct.error, IndexError, ValueError):
            self._walk(offset, len(data), top=True)

    def _header(self, pos: int) -> tuple[int, bytes | None, int, int, int]:
        """(tag, VR, length offset, length size, value offset) of the element at ``pos``."""
        group, elem = struct.unpack_from("<HH", self.data, pos)
        tag = group << 16 | elem
        if self.implicit or group == 0xFFFE:
            return tag, None, pos + 4, 4, pos + 8
        vr = self.data[pos + 4 : pos + 6]
        if vr in EXPLICIT_LONG_VRS:
            return tag, vr, pos + 8, 4, pos + 12
        return tag, vr, pos + 6, 2, pos + 8

    def _length(self, at: int, size: int) -> int:
        return int(struct.unpack_from("<L" if size == 4 else "<H", self.data, at)[0])

    def _walk(self, pos: int, end: int, top: bool) -> int:
        """Elements from ``pos`` to ``end`` or an item delimiter; the offset after them."""
        while pos + 8 <= end:
            tag, vr, length_at, size, value_at = self._header(pos)
            length = self._length(length_at, size)
            if tag == ITEM_END:
                return value_at
            if top:
                self.elements.append(
                    Element(tag, pos, pos + 4 if vr else None, length_at, size, value_at, length)
                )
            if length == UNDEFINED:
                pos = self._undefined(value_at, end, tag == PIXEL_DATA)
            else:
                pos = value_at + length
        return pos

    def _undefined(self, pos: int, end: int, fragments: bool) -> int:
        """Skip the items of an undefined-length sequence (or encapsulated pixel data)."""
        while pos + 8 <= end:
            tag, _vr, length_at, _size, value_at = self._header(pos)
            length = self._length(length_at, 4)
            if tag == SEQ_END:
                return value_at
            if tag != ITEM:
                raise ValueError("not an item")
            if length == UNDEFINED and not fragments:
                pos = self._walk(value_at, end, top=False)
            else:
                pos = value_at + length
        return pos

    def header_end(self) -> int:
        """Where the Pixel Data element starts (or the end of the data)."""
        for el in self.elements:
            if el.tag == PIXEL_DATA:
                return el.start
        return len(self.data)

    def pixel_value(self) -> int | None:
        for el in self.elements:
            if el.tag == PIXEL_DATA:
                return el.value_at
        return None


@dataclass
class Sample:
    name: str
    dataset: Dataset
    implicit: bool


def load_samples(folder: Path) -> list[Sample]:
    """The samples stored as they are: ours to mutate (small, Little Endian, not deflated)."""
    out = []
    for path in sorted(folder.glob("*.dcm")):
        if path.name.startswith(("BAD_", "DERIVED_BAD_")) or path.stat().st_size > MAX_SAMPLE_BYTES:
            continue
        try:
            meta, _offset = split_dataset(path)
            ts = UID(str(meta.TransferSyntaxUID))
            if str(meta.MediaStorageSOPClassUID) not in STORAGE_SOP_CLASSES:
                continue
        except (InvalidDicomError, AttributeError, KeyError, ValueError):
            continue
        if not ts.is_little_endian or ts.is_deflated:
            continue
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue
        out.append(Sample(path.name, ds, ts.is_implicit_VR))
    if not out:
        raise SystemExit(f"no usable samples in {folder}")
    return out


def encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def fresh(sample: Sample, uid: str) -> Dataset:
    ds = copy.deepcopy(sample.dataset)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    return ds


def dataset_offset(data: bytes) -> int:
    """Offset of the data set in a Part 10 file (after preamble and File Meta)."""
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


BAD_UIDS = (
    "../../etc",
    "1.2.3/4",
    "1." + "2" * 63,  # 65 characters
    "/etc/passwd",
    "..",
    "1..2",
    ".1.2",
    "1.2.",
    "01.2.3",
    "1.2.3 4",
    "1.2.3\\4",
    "a" * 64,
    "1.2.3\x00",  # "1.2.3" padded: valid, and the same UID each time (a re-send)
    "{uid}\x00",  # a fresh UID padded with NUL: valid
    "",
    "1.2.3\n4",
)


def mutate_flip(rng: random.Random, data: bytes, lo: int, hi: int) -> tuple[bytes, str]:
    out = bytearray(data)
    if hi <= lo:
        return data, "nothing to flip"
    positions = sorted(rng.randrange(lo, hi) for _ in range(rng.choice((1, 1, 2, 4, 16))))
    for p in positions:
        out[p] ^= rng.randrange(1, 256)
    return bytes(out), f"flipped {len(positions)} bytes at {positions[:4]}"


def mutate_dataset(rng: random.Random, kind: str, sample: Sample, uid: str) -> tuple[bytes, str]:
    ds = fresh(sample, uid)
    if kind == "absurd_attributes":
        choices: dict[str, list[object]] = {
            "Rows": [0, 1, 65535],
            "Columns": [0, 1, 65535],
            "BitsAllocated": [0, 1, 3, 7, 9, 64, 65535],
            "BitsStored": [0, 17, 65535],
            "HighBit": [0, 64, 65535],
            "SamplesPerPixel": [0, 2, 3, 4, 65535],
            "PixelRepresentation": [2, 65535],
            "PhotometricInterpretation": ["", "FOO", "RGB", "PALETTE COLOR", "YBR_FULL", "A" * 16],
            "NumberOfFrames": ["0", "-1", "999999999", "abc", "1.5", "2"],
            "PlanarConfiguration": [1, 2, 65535],
        }
        picked = rng.sample(sorted(choices), rng.choice((1, 1, 2, 3)))
        for name in picked:
            setattr(ds, name, rng.choice(choices[name]))
        return encode(ds), ", ".join(f"{n}={getattr(ds, n)!r}"[:40] for n in picked)
    if kind == "bad_uid":
        target = rng.choice(
            ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")
        )
        value = rng.choice(BAD_UIDS).replace("{uid}", uid)
        setattr(ds, target, value)
        if target == "SOPInstanceUID":  # the command's Affected SOP Instance UID too
            ds.file_meta.MediaStorageSOPInstanceUID = UID(value)
        return encode(ds), f"{target}={value!r}"
    if kind == "deep_sequence":
        depth = rng.choice((1, 10, 100, 500, 1000, 3000, 10000))
        if "ReferencedImageSequence" in ds:
            del ds.ReferencedImageSequence
        data = encode(ds)
        offset = dataset_offset(data)
        walker = Walker(data, offset, sample.implicit)
        at = next((e.start for e in walker.elements if e.tag > 0x00081140), len(data))
        tag = struct.pack("<HH", 0x0008, 0x1140)
        sq = tag + (b"" if sample.implicit else b"SQ\x00\x00") + b"\xff" * 4
        item = struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED)
        close = struct.pack("<HHLHHL", 0xFFFE, 0xE00D, 0, 0xFFFE, 0xE0DD, 0)
        nested = (sq + item) * depth + close * depth
        return data[:at] + nested + data[at:], f"depth {depth}"
    data = encode(ds)
    offset = dataset_offset(data)
    walker = Walker(data, offset, sample.implicit)
    header_end = walker.header_end()
    if kind == "flip_header":
        return mutate_flip(rng, data, offset, header_end)
    if kind == "flip_pixels":
        pixel = walker.pixel_value()
        return mutate_flip(rng, data, pixel if pixel is not None else header_end, len(data))
    if kind == "truncate":
        cut = rng.randrange(offset + 1, len(data))
        return data[:cut], f"cut at {cut} of {len(data)}"
    elements = [e for e in walker.elements if e.start < header_end] or walker.elements
    if kind == "bad_length":
        if rng.random() < 0.2:
            el = next((e for e in walker.elements if e.tag == PIXEL_DATA), elements[-1])
        else:
            el = rng.choice(elements)
        limit = 0xFFFF if el.length_size == 2 else 0xFFFFFFFF
        new = rng.choice(
            (el.length + 1, max(el.length - 1, 0), 0, limit, limit - 1, el.length + 1001)
        )
        new = min(new, limit)
        packed = struct.pack("<H" if el.length_size == 2 else "<L", new)
        out = data[: el.length_at] + packed + data[el.length_at + el.length_size :]
        return out, f"({el.tag >> 16:04X},{el.tag & 0xFFFF:04X}) length {el.length} -> {new}"
    if kind == "bad_vr":
        explicit = [e for e in elements if e.vr_at is not None]
        if not explicit:  # implicit VR: a VR where none belongs, in the tag's place
            el = rng.choice(elements)
            out = data[: el.start + 2] + b"PN" + data[el.start + 4 :]
            return out, f"({el.tag >> 16:04X},{el.tag & 0xFFFF:04X}) element number -> 'PN'"
        el = rng.choice(explicit)
        assert el.vr_at is not None
        vr = rng.choice((b"ZZ", b"\x00\x00", b"  ", b"SQ", b"OB", b"UN", b"xx", rng.randbytes(2)))
        out = data[: el.vr_at] + vr + data[el.vr_at + 2 :]
        return out, f"({el.tag >> 16:04X},{el.tag & 0xFFFF:04X}) VR -> {vr!r}"
    raise ValueError(kind)
