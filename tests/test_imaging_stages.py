"""Each stage of model.imaging alone, on small synthetic pydicom datasets.

The sample-based tests (test_preprocess_samples.py, test_preprocess_parity.py) pin the whole
pipeline on real files; these say what one stage does, with numbers a reader can check by
hand (PS3.3 C.7.6.3 Image Pixel Module, C.11.1 Modality LUT, C.11.2 VOI LUT).
"""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from model.imaging import (
    PreprocessError,
    check_pixel_data,
    check_pixel_geometry,
    dataset_to_uint8,
    to_network_input,
)
from model.imaging.encapsulated import codestream_size
from model.imaging.lut import apply_window, first_window, modality_function
from model.imaging.read import ensure_transfer_syntax
from tests.conftest import REPO

# A 16 x 256 ramp of 12-bit values: column c holds 16 * c (0 .. 4080), every row alike.
RAMP = np.tile(np.arange(256, dtype=np.uint16) * 16, (16, 1))


def gray_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs: object) -> Dataset:
    """A native, unsigned, single-frame grayscale dataset holding ``pixels`` (uint16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def test_window_maps_its_range_to_black_through_white() -> None:
    """Window 2048/1024 (LINEAR, C.11.2.1.2.1): below 1536 black, above 2560 white."""
    image = dataset_to_uint8(gray_dataset(RAMP, WindowCenter=2048, WindowWidth=1024))
    row = image[0]
    assert image.shape == RAMP.shape and image.dtype == np.uint8
    assert row[RAMP[0] <= 1536].max() == 0
    assert row[RAMP[0] >= 2560].min() == 255
    assert abs(int(row[128]) - 128) <= 1  # 2048, the centre, is mid-gray
    assert np.all(np.diff(row.astype(int)) >= 0)  # brighter values stay brighter


def test_monochrome1_is_the_inverse_of_monochrome2() -> None:
    """PS3.3 C.7.6.3.1.2: MONOCHROME1 shows the minimum as white, so bone stays bright."""
    window = {"WindowCenter": 2048, "WindowWidth": 1024}
    mono2 = dataset_to_uint8(gray_dataset(RAMP, "MONOCHROME2", **window))
    mono1 = dataset_to_uint8(gray_dataset(RAMP, "MONOCHROME1", **window))
    assert np.array_equal(mono1, 255 - mono2)


def test_inverse_presentation_lut_shape_does_not_invert_monochrome1_twice() -> None:
    """C.8.11.6: INVERSE is the MONOCHROME1 inversion itself, not a second one."""
    plain = dataset_to_uint8(gray_dataset(RAMP, "MONOCHROME1"))
    shaped = dataset_to_uint8(gray_dataset(RAMP, "MONOCHROME1", PresentationLUTShape="INVERSE"))
    assert np.array_equal(plain, shaped)
    assert plain[0, 0] == 255 and plain[0, -1] < 10  # value 0 white, the top dark


def test_without_voi_deep_data_in_use_spans_its_representable_range() -> None:
    """No VOI (C.11.2 leaves it to the application): 0..4095 of 12 bits maps to 0..255."""
    image = dataset_to_uint8(gray_dataset(RAMP))
    assert image[0, 0] == 0
    assert image[0, -1] == round(4080 / 4095 * 255)


def test_rescale_slope_and_intercept_apply_before_the_window() -> None:
    """C.11.1: the window is in the Modality LUT's output space (here 2 * v - 1000)."""
    ds = gray_dataset(RAMP, RescaleSlope=2, RescaleIntercept=-1000)
    modality, linear = modality_function(ds)
    assert linear
    assert np.array_equal(modality(np.array([0.0, 1000.0])), np.array([-1000.0, 1000.0]))
    # 2 * 2048 - 1000 = 3096: the window centred there puts stored 2048 at mid-gray.
    ds.WindowCenter, ds.WindowWidth = 3096, 2048
    assert abs(int(dataset_to_uint8(ds)[0, 128]) - 128) <= 1


def test_voi_lut_functions_at_the_window_centre_and_edges() -> None:
    """C.11.2.1.2.1 LINEAR, C.11.2.1.3.1 LINEAR_EXACT, C.11.2.1.3.2 SIGMOID."""
    values = np.array([900.0, 1000.0, 1100.0])
    linear_exact = apply_window(values, 1000.0, 200.0, "LINEAR_EXACT")
    assert np.allclose(linear_exact, [0.0, 0.5, 1.0])
    sigmoid = apply_window(values, 1000.0, 200.0, "SIGMOID")
    assert sigmoid[1] == pytest.approx(0.5)
    assert sigmoid[0] < 0.15 and sigmoid[2] > 0.85  # smooth, not clipped
    ds = gray_dataset(RAMP, WindowCenter=[1000, 40], WindowWidth=[200, 400])
    ds.VOILUTFunction = "SIGMOID"
    assert first_window(ds) == (1000.0, 200.0, "SIGMOID")  # only the first pair counts


@pytest.mark.parametrize(
    ("function", "width", "match"),
    [
        ("LINEAR", 0, r"Window Width \(0028,1051\): 0.0 \(PS3.3 C.11.2.1.2 requires at least 1"),
        ("LINEAR", 0.5, r"Window Width \(0028,1051\): 0.5 \(PS3.3 C.11.2.1.2"),
        ("LINEAR", -10, r"Window Width \(0028,1051\): -10.0"),
        ("LINEAR_EXACT", 0, r"Window Width \(0028,1051\): 0.0 \(LINEAR_EXACT requires more"),
        ("SIGMOID", 0, r"Window Width \(0028,1051\): 0.0 \(SIGMOID requires more"),
        ("LINEAR", "NaN", r"Window Width \(0028,1051\): nan is not a finite number"),
        ("LINEAR_EXACT", "inf", r"Window Width \(0028,1051\): inf is not a finite number"),
    ],
)
def test_an_invalid_window_width_refuses_the_image(
    function: str, width: float | str, match: str
) -> None:
    """PS3.3 C.11.2.1.2: Window Width >= 1 for LINEAR, > 0 for LINEAR_EXACT (C.11.2.1.3)
    and SIGMOID (it divides by the width); NaN and infinity are no widths. Refused, not
    ignored: the image would otherwise be classified through a rendering nobody chose."""
    ds = gray_dataset(RAMP, WindowCenter=2048, VOILUTFunction=function)
    ds.WindowWidth = width
    with pytest.raises(PreprocessError, match=match):
        first_window(ds)
    with pytest.raises(PreprocessError, match=match):
        dataset_to_uint8(ds)


def test_a_width_valid_for_one_voi_lut_function_only() -> None:
    """0.5 is a LINEAR_EXACT width (> 0) but not a LINEAR one (>= 1)."""
    ds = gray_dataset(RAMP, WindowCenter=2048, WindowWidth=0.5, VOILUTFunction="LINEAR_EXACT")
    assert first_window(ds) == (2048.0, 0.5, "LINEAR_EXACT")
    ds.WindowWidth = 1  # LINEAR's smallest width: a threshold at the centre
    ds.VOILUTFunction = "LINEAR"
    assert first_window(ds) == (2048.0, 1.0, "LINEAR")


def test_a_non_finite_window_center_refuses_the_image() -> None:
    ds = gray_dataset(RAMP, WindowCenter="NaN", WindowWidth=1024)
    with pytest.raises(PreprocessError, match=r"Window Center \(0028,1050\): nan"):
        dataset_to_uint8(ds)


def test_rescale_slope_zero_refuses_the_image() -> None:
    """PS3.3 C.11.1: a slope of 0 maps every stored value to the intercept (one gray level).
    It used to be read as absent (``0 or 1.0``) and the image classified."""
    ds = gray_dataset(RAMP, RescaleSlope=0, RescaleIntercept=0)
    with pytest.raises(PreprocessError, match=r"Rescale Slope \(0028,1053\): 0 maps every"):
        modality_function(ds)
    with pytest.raises(PreprocessError, match=r"Rescale Slope \(0028,1053\)"):
        dataset_to_uint8(ds)


@pytest.mark.parametrize(
    ("keyword", "value", "match"),
    [
        ("RescaleSlope", "NaN", r"Rescale Slope \(0028,1053\): nan is not a finite"),
        ("RescaleIntercept", "-inf", r"Rescale Intercept \(0028,1052\): -inf is not a finite"),
    ],
)
def test_non_finite_rescale_values_refuse_the_image(keyword: str, value: str, match: str) -> None:
    ds = gray_dataset(RAMP, RescaleSlope=1, RescaleIntercept=0)
    setattr(ds, keyword, value)
    with pytest.raises(PreprocessError, match=match):
        dataset_to_uint8(ds)


def test_absent_or_empty_rescale_and_window_mean_none() -> None:
    """Type 1C/2 attributes sent empty are absent, not 0 (PS3.5 7.4): the identity, no VOI."""
    ds = gray_dataset(RAMP, RescaleSlope="", RescaleIntercept="", WindowCenter="", WindowWidth="")
    modality, linear = modality_function(ds)
    assert linear and np.array_equal(modality(np.array([7.0])), np.array([7.0]))
    assert first_window(ds) is None
    assert np.array_equal(dataset_to_uint8(ds), dataset_to_uint8(gray_dataset(RAMP)))


def test_geometry_refuses_a_frame_larger_than_the_limit_before_reading_pixels() -> None:
    """46341 x 46341 over 16 bytes: refused on the header, with a reason free of values."""
    ds = gray_dataset(np.zeros((2, 4), dtype=np.uint16))
    ds.Rows = ds.Columns = 46341
    with pytest.raises(PreprocessError, match="more than the limit of 100000000") as caught:
        check_pixel_geometry(ds)
    assert caught.value.reason is not None
    assert "46341" not in caught.value.reason
    assert "exceeds the node's limit" in caught.value.reason


def test_geometry_refuses_native_pixel_data_shorter_than_the_header_needs() -> None:
    """PS3.5 8.1.1: 16 x 256 x 16 bits need 8192 bytes."""
    ds = gray_dataset(RAMP)
    ds.PixelData = ds.PixelData[:4096]
    with pytest.raises(PreprocessError, match="holds 4096 bytes") as caught:
        check_pixel_geometry(ds)
    assert caught.value.reason == "Pixel Data (7FE0,0010) has 4096 bytes, the header needs 8192"


def test_geometry_reads_the_image_pixel_module() -> None:
    geometry = check_pixel_geometry(gray_dataset(RAMP, "MONOCHROME1"))
    assert (geometry.rows, geometry.columns, geometry.frames) == (16, 256, 1)
    assert (geometry.bits_allocated, geometry.bits_stored, geometry.signed) == (16, 12, False)
    assert geometry.photometric == "MONOCHROME1" and not geometry.encapsulated
    assert geometry.native_bytes == 16 * 256 * 2


def _jpeg_header(rows: int, columns: int) -> bytes:
    """SOI, then a baseline SOF0 frame header (ITU-T T.81 B.2.2) for one 8-bit component."""
    return (
        b"\xff\xd8" + b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, rows, columns, 1) + b"\x01\x11\x00"
    )


def test_codestream_size_reads_the_jpeg_frame_header() -> None:
    assert codestream_size(_jpeg_header(480, 640)) == (480, 640)
    assert codestream_size(b"not a codestream") is None


def test_pixel_data_check_refuses_a_codestream_larger_than_rows_x_columns() -> None:
    """The decoder allocates what the codestream declares, so it must fit Rows x Columns."""
    from pydicom.encaps import encapsulate

    ds = gray_dataset(np.zeros((8, 8), dtype=np.uint16))
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([_jpeg_header(4000, 4000) + b"\xff\xd9"])
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(PreprocessError, match="declares 4000 x 4000 pixels"):
        check_pixel_data(ds)


def test_a_dataset_built_in_memory_gets_implicit_vr_little_endian() -> None:
    """PS3.5 10.1: Implicit VR Little Endian is the default transfer syntax."""
    ds = Dataset()
    ds.Rows = 1
    ensure_transfer_syntax(ds)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_network_input_is_a_square_three_channel_uint8() -> None:
    gray = np.arange(300 * 200, dtype=np.uint32).reshape(300, 200) % 256
    network_input = to_network_input(gray.astype(np.uint8), 224)
    assert network_input.shape == (224, 224, 3) and network_input.dtype == np.uint8
    assert np.array_equal(network_input[..., 0], network_input[..., 2])  # gray repeated
    with pytest.raises(TypeError, match="2-D uint8"):
        to_network_input(gray.astype(np.float32), 224)


def test_the_storage_scp_checks_load_no_network_runtime() -> None:
    """dicom_node.validate imports model.imaging only: no TensorFlow, Keras, ONNX or LiteRT."""
    code = (
        "import dicom_node.validate, sys; print(sorted(m for m in sys.modules if "
        "m.split('.')[0] in ('tensorflow', 'keras', 'onnxruntime', 'ai_edge_litert') "
        "or m == 'model.inference'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
