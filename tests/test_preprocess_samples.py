"""Preprocessing of every real DICOM sample in ../shared/dicom-samples.

Each radiograph must become a sane 8-bit image (right size, not flat, not all black or
white, bone bright); each ``BAD_`` file must be refused with a :class:`PreprocessError` that
says why. Lossless variants of the same image must give identical pixels, lossy ones nearly.
"""

from __future__ import annotations

import copy
import logging
import tracemalloc
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from model.imaging import (
    PreprocessError,
    check_pixel_data,
    dataset_to_uint8,
    dicom_to_uint8,
    image_to_uint8,
    is_dicom,
    load_gray_uint8,
    load_network_input,
    read_dataset,
    to_network_input,
)
from tests.conftest import DICOM_SAMPLES, require

# Every file of the sample set, with the refusal reason expected (None: must decode).
EXPECTED: dict[str, str | None] = {
    "BAD_CR_chest_noPixelData_Carestream.dcm": "no Pixel Data",
    "BAD_CR_extremity_RG3_JPEGExtended_SOS_Se0.dcm": "cannot decode the pixel data",
    "BAD_CR_hip_RG2_JPEGExtended_SOS_Se0.dcm": "cannot decode the pixel data",
    "BAD_DX_chest_J2K_invalid_COM_marker_966.dcm": "cannot decode the pixel data",
    "BAD_DX_extremity_noPixelData_VOILUTSeq_Agfa.dcm": "no Pixel Data",
    "BAD_MR_missing_Rows.dcm": "missing required attribute Rows",
    "BAD_MR_truncated_pixeldata.dcm": "Pixel Data holds 8130 bytes",
    "BAD_RTDOSE_badVR_IS_value_1A.dcm": "invalid value for Number of Frames",
    "BAD_SC_declared46341x46341_tiny_pixeldata.dcm": "more than the limit",
    "BAD_SC_rgb_jpeg_explicitVR_mixed_implicit.dcm": "explicit and implicit VR mixed",
    "BAD_meta_missing_TransferSyntaxUID.dcm": "missing required attribute",
    "DERIVED_BAD_CR_extremity_RG3_truncated_at60000.dcm": "truncated",
    "CR_MONO1_10b_ModalityLUTSeq_JPEGLosslessSV1.dcm": None,
    "CR_MONO1_8b_JPEGBaseline_KonicaMinolta.dcm": None,
    "CR_chest_MONO1_10b_440_EVRLE_gdcm.dcm": None,
    "CR_chest_MONO1_10b_440_IVRLE_noFileMeta.dcm": None,
    "CR_chest_RG1_MONO1_15b_odd1955x1841_J2K_lossy.dcm": None,
    "CR_chest_RG1_MONO1_15b_odd1955x1841_JPEGLS_nearlossless.dcm": None,
    "CR_cspine_MONO1_12b_16x16_tiny.dcm": None,
    "CR_extremity_RG3_MONO1_10b_EVRLE.dcm": None,
    "CR_extremity_RG3_MONO1_10b_J2K_lossless.dcm": None,
    "CR_extremity_RG3_MONO1_10b_J2K_lossy.dcm": None,
    "CR_extremity_RG3_MONO1_10b_JPEGLS_lossless.dcm": None,
    "CR_extremity_RG3_MONO1_10b_JPEGLS_nearlossless.dcm": None,
    "CR_extremity_RG3_MONO1_10b_JPEGLosslessSV1.dcm": None,
    "CR_extremity_RG3_MONO1_10b_RLE.dcm": None,
    "CR_hand_MONO2_12b_J2K_lossless_KakaduSOT.dcm": None,
    "CR_hip_RG2_MONO2_10b_EVRLE.dcm": None,
    "CR_hip_RG2_MONO2_10b_J2K_lossless.dcm": None,
    "CR_hip_RG2_MONO2_10b_JPEGExtended_lossy_fixed.dcm": None,
    "CR_hip_RG2_MONO2_10b_JPEGLosslessSV1.dcm": None,
    "CR_hip_RG2_MONO2_10b_RLE.dcm": None,
    "DERIVED_CR_chest_MONO1_10b_440_DeflatedEVRLE.dcm": None,
    "DERIVED_CR_chest_MONO1_10b_440_ExplicitBigEndian.dcm": None,
    "DERIVED_CR_chest_MONO1_10b_440_ImplicitVRLE_withMeta.dcm": None,
    "DERIVED_CR_chest_MONO1_10b_440_JPEGLossless_P14_SV6.dcm": None,
    "DERIVED_CR_chest_MONO1_10b_440_VOILUTSequence.dcm": None,
    "DERIVED_CR_extremity_RG3_MONO1_10b_JPEGExtended_lossy_SeFixed.dcm": None,
    "DERIVED_SC_modDX_chest_NIH_MONO2_8b_JPEGBaseline.dcm": None,
    # Real GE "For Processing" headers whose pixels were cut to 2x2 upstream: valid DICOM,
    # so accepted (the SCP decides which SOP classes it takes; a 2x2 image is no radiograph
    # but nothing in it is malformed).
    "DX_ForProcessing_GE_XR220_MONO1_10b_2x2px.dcm": None,
    "DX_ForProcessing_GE_XR220_MONO1_8b_2x2px.dcm": None,
    "DX_chest_MONO1_12b_J2K_lossless_Canon.dcm": None,
    "DX_chest_MONO2_16b_J2K_lossless_0Padding.dcm": None,
    "DX_thorax_MONO1_8b_odd169x211_EVRLE.dcm": None,
    "SC_OT_MONO2_8b_Deflated_dclunie.dcm": None,
    "SC_OT_MONO2_VOILUTSequence_vlut04.dcm": None,
    "SC_modDX_chest_NIH_MONO2_8b_IVRLE.dcm": None,
}


def sample(name: str) -> Path:
    return require(DICOM_SAMPLES / name)


@cache
def gray(name: str) -> np.ndarray:
    """Each sample decoded once per test session (the large JPEG 2000 files take ~1 s)."""
    return load_gray_uint8(sample(name))


def small(image: np.ndarray, size: int = 64) -> np.ndarray:
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float64)


def test_sample_set_is_the_expected_one(dicom_samples: Path) -> None:
    present = {p.name for p in dicom_samples.glob("*.dcm")}
    assert present == set(EXPECTED), (
        f"missing: {sorted(set(EXPECTED) - present)}, unexpected: {sorted(present - set(EXPECTED))}"
    )


@pytest.mark.parametrize("name", sorted(k for k, v in EXPECTED.items() if v is not None))
def test_bad_file_is_refused_with_reason(name: str) -> None:
    with pytest.raises(PreprocessError) as info:
        load_network_input(sample(name), 64)
    reason = EXPECTED[name]
    assert reason is not None and reason in str(info.value)


@pytest.mark.parametrize("name", sorted(k for k, v in EXPECTED.items() if v is None))
def test_radiograph_decodes_to_sane_image(name: str) -> None:
    ds = pydicom.dcmread(sample(name), force=True, stop_before_pixels=True)
    image = gray(name)
    assert image.dtype == np.uint8
    assert image.shape == (int(ds.Rows), int(ds.Columns))
    if image.size >= 256:
        assert image.std() > 5, "flat image"
        assert np.mean(image == 0) < 0.5, "mostly black"
        assert np.mean(image == 255) < 0.5, "mostly white"
    else:  # the 2x2 GE headers: only check that nothing degenerate comes out
        assert 0 < image.mean() < 255
    net = to_network_input(image, 64)
    assert net.shape == (64, 64, 3) and net.dtype == np.uint8
    assert np.array_equal(net[:, :, 0], net[:, :, 2])


@pytest.mark.parametrize(
    "group",
    [
        [
            "CR_extremity_RG3_MONO1_10b_EVRLE.dcm",
            "CR_extremity_RG3_MONO1_10b_J2K_lossless.dcm",
            "CR_extremity_RG3_MONO1_10b_JPEGLS_lossless.dcm",
            "CR_extremity_RG3_MONO1_10b_JPEGLosslessSV1.dcm",
            "CR_extremity_RG3_MONO1_10b_RLE.dcm",
        ],
        [
            "CR_hip_RG2_MONO2_10b_EVRLE.dcm",
            "CR_hip_RG2_MONO2_10b_J2K_lossless.dcm",
            "CR_hip_RG2_MONO2_10b_JPEGLosslessSV1.dcm",
            "CR_hip_RG2_MONO2_10b_RLE.dcm",
        ],
        [
            "CR_chest_MONO1_10b_440_EVRLE_gdcm.dcm",
            "CR_chest_MONO1_10b_440_IVRLE_noFileMeta.dcm",
            "DERIVED_CR_chest_MONO1_10b_440_DeflatedEVRLE.dcm",
            "DERIVED_CR_chest_MONO1_10b_440_ExplicitBigEndian.dcm",
            "DERIVED_CR_chest_MONO1_10b_440_ImplicitVRLE_withMeta.dcm",
            "DERIVED_CR_chest_MONO1_10b_440_JPEGLossless_P14_SV6.dcm",
        ],
    ],
    ids=["RG3", "RG2", "chest440"],
)
def test_lossless_variants_are_identical(group: list[str]) -> None:
    reference = gray(group[0])
    for name in group[1:]:
        assert np.array_equal(gray(name), reference), name


@pytest.mark.parametrize(
    ("reference", "lossy"),
    [
        ("CR_extremity_RG3_MONO1_10b_EVRLE.dcm", "CR_extremity_RG3_MONO1_10b_J2K_lossy.dcm"),
        (
            "CR_extremity_RG3_MONO1_10b_EVRLE.dcm",
            "CR_extremity_RG3_MONO1_10b_JPEGLS_nearlossless.dcm",
        ),
        (
            "CR_extremity_RG3_MONO1_10b_EVRLE.dcm",
            "DERIVED_CR_extremity_RG3_MONO1_10b_JPEGExtended_lossy_SeFixed.dcm",
        ),
        ("CR_hip_RG2_MONO2_10b_EVRLE.dcm", "CR_hip_RG2_MONO2_10b_JPEGExtended_lossy_fixed.dcm"),
        (
            "CR_chest_RG1_MONO1_15b_odd1955x1841_J2K_lossy.dcm",
            "CR_chest_RG1_MONO1_15b_odd1955x1841_JPEGLS_nearlossless.dcm",
        ),
        (
            "SC_modDX_chest_NIH_MONO2_8b_IVRLE.dcm",
            "DERIVED_SC_modDX_chest_NIH_MONO2_8b_JPEGBaseline.dcm",
        ),
    ],
)
def test_lossy_variants_are_close(reference: str, lossy: str) -> None:
    diff = np.abs(gray(reference).astype(np.int16) - gray(lossy).astype(np.int16))
    assert diff.mean() < 2.0


@pytest.mark.parametrize(
    "name",
    [
        "CR_chest_MONO1_10b_440_EVRLE_gdcm.dcm",  # MONOCHROME1, window
        "DERIVED_CR_chest_MONO1_10b_440_VOILUTSequence.dcm",  # MONOCHROME1, VOI LUT Sequence
        "CR_chest_RG1_MONO1_15b_odd1955x1841_J2K_lossy.dcm",  # MONOCHROME1, 15 bits
        "CR_MONO1_8b_JPEGBaseline_KonicaMinolta.dcm",  # MONOCHROME1, 8-bit JPEG
        "DX_chest_MONO1_12b_J2K_lossless_Canon.dcm",  # MONOCHROME1 + INVERSE
        "SC_modDX_chest_NIH_MONO2_8b_IVRLE.dcm",  # MONOCHROME2, no window
    ],
)
def test_chest_radiographs_show_bone_bright(name: str) -> None:
    """On a PA chest the spine and mediastinum (centre) are brighter than the lungs."""
    image = small(gray(name))
    centre = image[16:48, 28:36].mean()
    lungs = (image[16:48, 8:20].mean() + image[16:48, 44:56].mean()) / 2
    assert centre > lungs + 25, (centre, lungs)


def _inverted_copy(ds: pydicom.Dataset, photometric: str, shape: str | None) -> pydicom.Dataset:
    """The same picture stored the other way round: complementary values and window."""
    out = copy.deepcopy(ds)
    arr = ds.pixel_array
    top = (1 << int(ds.BitsStored)) - 1
    out.PixelData = (top - arr).astype(arr.dtype).tobytes()
    out.PhotometricInterpretation = photometric
    if "WindowCenter" in ds:
        # LINEAR window of PS3.3 C.11.2.1.2.1 mirrored about the value range: c' = 2^n - c
        out.WindowCenter = top + 1 - float(ds.WindowCenter)
    if shape is None:
        out.pop("PresentationLUTShape", None)
    else:
        out.PresentationLUTShape = shape
    return out


@pytest.mark.parametrize(
    ("name", "photometric", "shape"),
    [
        ("CR_extremity_RG3_MONO1_10b_EVRLE.dcm", "MONOCHROME2", None),
        ("CR_hip_RG2_MONO2_10b_EVRLE.dcm", "MONOCHROME1", None),
        # MONOCHROME1 + INVERSE is ONE inversion (PS3.3 C.8.11.6): its MONOCHROME2 + IDENTITY
        # twin must look the same.
        ("DX_thorax_MONO1_8b_odd169x211_EVRLE.dcm", "MONOCHROME2", "IDENTITY"),
    ],
)
def test_monochrome1_and_monochrome2_twins_look_the_same(
    name: str, photometric: str, shape: str | None
) -> None:
    ds = read_dataset(sample(name))
    twin = _inverted_copy(ds, photometric, shape)
    diff = np.abs(dataset_to_uint8(ds).astype(np.int16) - dataset_to_uint8(twin))
    assert diff.max() <= 1


def test_contradicting_presentation_lut_shape_follows_photometric_interpretation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MONOCHROME2 + INVERSE is non-conformant for DX (C.8.11.6): no second inversion, a warning."""
    ds = read_dataset(sample("DX_thorax_MONO1_8b_odd169x211_EVRLE.dcm"))
    twin = _inverted_copy(ds, "MONOCHROME2", "INVERSE")
    with caplog.at_level(logging.WARNING, logger="model.imaging"):
        rendered = dataset_to_uint8(twin)
    assert np.abs(rendered.astype(np.int16) - dataset_to_uint8(ds)).max() <= 1
    assert "contradicts MONOCHROME2" in caplog.text


def test_window_in_offset_value_space_is_recovered(caplog: pytest.LogCaptureFixture) -> None:
    """DX_J2K_0Padding: values 32744..65535 against a window of 2725/5310.

    Applied as stored (pydicom's apply_windowing does that) every pixel is above the window
    and the image is a single grey level; the window fits the values less 32768. The header
    (MONOCHROME2, IDENTITY, Pixel Intensity Relationship LIN with sign +1) asks for low beam
    intensity, i.e. bone, to be shown dark: this file is rendered as its header says.
    """
    name = "DX_chest_MONO2_16b_J2K_lossless_0Padding.dcm"
    from pydicom.pixels import apply_voi_lut

    ds = read_dataset(sample(name))
    naive = apply_voi_lut(ds.pixel_array, ds)
    assert naive.min() == naive.max(), "pydicom changed: the trap is gone"
    with caplog.at_level(logging.WARNING, logger="model.imaging"):
        image = dataset_to_uint8(ds)
    assert "shifted by -32768" in caplog.text
    assert np.mean((image > 0) & (image < 255)) > 0.3


def test_modality_lut_sequence_takes_precedence_over_rescale() -> None:
    """PS3.3 C.11.1: a Modality LUT Sequence replaces Rescale Slope/Intercept."""
    from pydicom.pixels import apply_modality_lut

    ds = read_dataset(sample("CR_MONO1_10b_ModalityLUTSeq_JPEGLosslessSV1.dcm"))
    assert "RescaleSlope" in ds and "ModalityLUTSequence" in ds and "WindowCenter" not in ds
    arr = ds.pixel_array
    # No VOI: the 10-bit LUT output 0..1023 is the full range; MONOCHROME1 inverts it.
    expected = np.rint((1.0 - apply_modality_lut(arr, ds) / 1023.0) * 255).astype(np.uint8)
    rendered = dataset_to_uint8(ds)
    assert np.abs(rendered.astype(np.int16) - expected).max() <= 1
    del ds.ModalityLUTSequence
    assert np.abs(dataset_to_uint8(ds).astype(np.int16) - rendered).mean() > 1.0


def test_huge_declared_size_is_refused_before_allocating() -> None:
    """46341 x 46341 x 16 bits would be 4 GB; refused on the Pixel Data length alone."""
    path = sample("BAD_SC_declared46341x46341_tiny_pixeldata.dcm")
    tracemalloc.start()
    try:
        with pytest.raises(PreprocessError, match="Pixel Data holds 9330 bytes"):
            dicom_to_uint8(path, max_pixels=10**12)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"peak allocation {peak / 2**20:.0f} MiB"


def test_max_pixels_is_enforced_on_valid_files() -> None:
    with pytest.raises(PreprocessError, match="more than the limit of 1000000"):
        load_network_input(sample("CR_hip_RG2_MONO2_10b_J2K_lossless.dcm"), 64, max_pixels=10**6)


def test_file_without_meta_gets_implicit_little_endian() -> None:
    ds = read_dataset(sample("CR_chest_MONO1_10b_440_IVRLE_noFileMeta.dcm"))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert is_dicom(sample("CR_chest_MONO1_10b_440_IVRLE_noFileMeta.dcm"))


def test_check_pixel_data_works_on_a_dataset_in_memory() -> None:
    """What the SCP can call on a received dataset before storing it."""
    ds = pydicom.dcmread(sample("CR_hip_RG2_MONO2_10b_RLE.dcm"))
    geometry = check_pixel_data(ds, max_pixels=10**8)
    assert (geometry.rows, geometry.columns, geometry.encapsulated) == (2140, 1760, True)
    ds.Rows = 60000
    ds.Columns = 60000
    with pytest.raises(PreprocessError, match="more than the limit"):
        check_pixel_data(ds, max_pixels=10**8)


def test_pictures_are_not_taken_for_dicom(tmp_path: Path) -> None:
    image = gray("SC_modDX_chest_NIH_MONO2_8b_IVRLE.dcm")
    png = tmp_path / "chest.dcm"  # a misleading suffix: the content decides
    Image.fromarray(image).save(png, format="PNG")
    assert not is_dicom(png)
    assert np.array_equal(load_gray_uint8(png), image)


def test_truncated_picture_is_refused(tmp_path: Path) -> None:
    image = gray("SC_modDX_chest_NIH_MONO2_8b_IVRLE.dcm")
    full = tmp_path / "full.jpg"
    Image.fromarray(image).save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(PreprocessError, match="unreadable image cut.jpg"):
        image_to_uint8(cut)


def test_jpeg_cut_just_before_its_end_is_refused(tmp_path: Path) -> None:
    """Pillow refuses it unless someone sets ``ImageFile.LOAD_TRUNCATED_IMAGES`` (which
    would let grey-filled pictures into training); trailing padding after EOI is fine."""
    image = gray("SC_modDX_chest_NIH_MONO2_8b_IVRLE.dcm")
    full = tmp_path / "full.jpg"
    Image.fromarray(image).save(full, quality=90)
    assert np.abs(image_to_uint8(full).astype(np.int16) - image).mean() < 3
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:-2])
    with pytest.raises(PreprocessError, match="truncated"):
        image_to_uint8(cut)
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(full.read_bytes() + bytes(1000))
    assert np.array_equal(image_to_uint8(padded), image_to_uint8(full))


def test_sixteen_bit_picture_is_scaled_over_its_range(tmp_path: Path) -> None:
    image = gray("SC_modDX_chest_NIH_MONO2_8b_IVRLE.dcm")
    deep = (image.astype(np.uint16) * 200 + 1000).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    lo, hi = int(image.min()), int(image.max())
    expected = np.rint((image.astype(np.float64) - lo) * 255 / (hi - lo))
    assert np.abs(image_to_uint8(path) - expected).max() <= 1


def test_missing_file_is_a_preprocess_error(tmp_path: Path) -> None:
    with pytest.raises(PreprocessError, match="cannot open"):
        load_network_input(tmp_path / "absent.dcm", 64)


CHEST_440 = "CR_chest_MONO1_10b_440_EVRLE_gdcm.dcm"  # MONOCHROME1, 10 bits, WC 550 / WW 1024


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions_match_pydicom(function: str) -> None:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3, checked against pydicom's independent implementation."""
    from pydicom.pixels import apply_windowing

    ds = read_dataset(sample(CHEST_440))
    ds.VOILUTFunction = function
    ds.WindowCenter, ds.WindowWidth = 400, 300
    # pydicom returns the window's output within 0..2^10-1; MONOCHROME1 then inverts.
    windowed = apply_windowing(ds.pixel_array.astype(np.float64), ds) / 1023.0
    expected = np.rint((1.0 - windowed) * 255)
    assert np.abs(dataset_to_uint8(ds) - expected).max() <= 1


def test_signed_pixels_render_like_unsigned() -> None:
    ds = read_dataset(sample(CHEST_440))
    signed = copy.deepcopy(ds)
    signed.PixelRepresentation = 1
    signed.PixelData = (ds.pixel_array.astype(np.int16) - 512).tobytes()
    signed.WindowCenter = float(ds.WindowCenter) - 512
    assert np.array_equal(dataset_to_uint8(signed), dataset_to_uint8(ds))


def test_a_window_width_of_zero_refuses_the_image() -> None:
    """PS3.3 C.11.2.1.2 (Window Width >= 1): refused with the attribute named, not rendered
    without the window and classified."""
    ds = read_dataset(sample(CHEST_440))
    ds.WindowWidth = 0
    with pytest.raises(PreprocessError, match=r"invalid Window Width \(0028,1051\): 0.0"):
        dataset_to_uint8(ds)


def test_multiframe_uses_the_first_frame_and_counts_every_frame() -> None:
    ds = read_dataset(sample(CHEST_440))
    single = dataset_to_uint8(ds)
    frames = copy.deepcopy(ds)
    arr = ds.pixel_array
    frames.NumberOfFrames = 2
    frames.PixelData = arr.tobytes() + (1023 - arr).astype(arr.dtype).tobytes()
    assert np.array_equal(dataset_to_uint8(frames), single)
    with pytest.raises(PreprocessError, match="2 frames"):
        dataset_to_uint8(frames, max_pixels=arr.size + 1)
    frames.PixelData = arr.tobytes()  # one frame's worth for two declared
    with pytest.raises(PreprocessError, match="Pixel Data holds"):
        dataset_to_uint8(frames)


@pytest.mark.parametrize(
    "name",
    [
        "DERIVED_SC_modDX_chest_NIH_MONO2_8b_JPEGBaseline.dcm",  # JPEG SOF0
        "CR_extremity_RG3_MONO1_10b_JPEGLS_lossless.dcm",  # JPEG-LS SOF55
        "CR_hip_RG2_MONO2_10b_J2K_lossless.dcm",  # JPEG 2000 SIZ
    ],
)
def test_codestream_larger_than_header_is_refused_before_decoding(name: str) -> None:
    """A decompression bomb: small Rows/Columns, a codestream declaring 50000 x 50000."""
    import struct

    from pydicom.encaps import encapsulate, generate_frames

    ds = read_dataset(sample(name))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    if frame[:2] == b"\xff\x4f":
        frame[8:16] = struct.pack(">II", 50000, 50000)  # Xsiz, Ysiz
    else:
        pos = frame.find(b"\xff\xc0") if b"\xff\xc0" in frame[:2000] else frame.find(b"\xff\xf7")
        frame[pos + 5 : pos + 9] = struct.pack(">HH", 50000, 50000)
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(PreprocessError, match="compressed frame declares 50000 x 50000"):
        dataset_to_uint8(ds)


def test_voi_lut_is_normalised_by_its_real_range() -> None:
    """Vendors declare 16-bit VOI LUTs holding 12-bit values (the Agfa header in the set):
    the output is scaled by the table's range, so the image does not come out dark."""
    ds = read_dataset(sample("DERIVED_CR_chest_MONO1_10b_440_VOILUTSequence.dcm"))
    reference = dataset_to_uint8(ds)
    item = ds.VOILUTSequence[0]
    assert list(item.LUTDescriptor) == [1024, 0, 12]
    item.LUTDescriptor = [1024, 0, 16]
    assert np.array_equal(dataset_to_uint8(ds), reference)
    # And the LUT is really applied: it differs from the window it replaced.
    ds.WindowCenter, ds.WindowWidth = 550, 1024
    del ds.VOILUTSequence
    assert np.abs(dataset_to_uint8(ds).astype(np.int16) - reference).mean() > 5


def test_palette_color_is_refused_with_reason() -> None:
    ds = read_dataset(sample(CHEST_440))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(PreprocessError, match="unsupported Photometric Interpretation"):
        dataset_to_uint8(ds)


RLE_HIP = "CR_hip_RG2_MONO2_10b_RLE.dcm"  # RLE Lossless, 16 bits allocated: two segments


def write_corrupt_rle(target: Path) -> Path:
    """The RLE hip radiograph with its second segment offset (PS3.5 G.5, the RLE header's
    third 32-bit word) moved from 190866 to 100, still increasing so the decoder's own
    header check passes: the second segment then decodes far more than Rows x Columns bytes
    and pylibjpeg-rle's Rust code indexes past its frame and panics
    (``pyo3_runtime.PanicException``)."""
    import struct

    from pydicom.encaps import encapsulate, generate_fragments

    ds = pydicom.dcmread(sample(RLE_HIP))
    fragments = list(generate_fragments(ds.PixelData))  # basic offset table, then the frame
    frame = fragments[-1]
    header = list(struct.unpack("<16I", frame[:64]))
    assert header[:2] == [2, 64] and header[2] > 100  # two segments, the first at 64
    header[2] = 100
    ds.PixelData = encapsulate([struct.pack("<16I", *header) + frame[64:]])
    ds.save_as(target, enforce_file_format=True)
    return target


def test_a_decoder_panic_on_corrupt_rle_is_a_preprocess_error(tmp_path: Path) -> None:
    """pylibjpeg-rle panics on these offsets; the panic (a BaseException) is refused like
    any decoding failure, with a reason, instead of escaping ``except Exception``."""
    path = write_corrupt_rle(tmp_path / "corrupt_rle.dcm")
    with pytest.raises(PreprocessError, match="cannot decode the pixel data .*decoder crashed"):
        load_network_input(path, 64)


def test_only_a_pyo3_panic_counts_as_a_decoder_panic(tmp_path: Path) -> None:
    """The real panic is recognised by its class (it cannot be imported); interpreter exits
    and interrupts are not, so they still stop the process."""
    from model.imaging.errors import is_decoder_panic

    with pytest.raises(PreprocessError) as caught:
        load_network_input(write_corrupt_rle(tmp_path / "corrupt_rle.dcm"), 64)
    panic = caught.value.__cause__
    assert panic is not None and not isinstance(panic, Exception)
    assert is_decoder_panic(panic)
    for other in (KeyboardInterrupt(), SystemExit(1), GeneratorExit(), MemoryError()):
        assert not is_decoder_panic(other)
