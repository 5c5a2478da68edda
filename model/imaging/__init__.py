"""One imaging package shared by the storage SCP, training, evaluation and the worker.

Pure numpy / pydicom / Pillow: nothing here loads a network, so the storage SCP can import
the Image Pixel Module checks without TensorFlow. One module per stage of the DICOM pipeline
(PS3.3 C.11 "Look Up Tables and Presentation States", PS3.4 N.2.1):

1. :mod:`~model.imaging.read`: Part 10 files or bare datasets, the transfer syntax inferred
   when the File Meta Information lacks it (PS3.5 A.1, 10.1); pictures are told apart.
2. :mod:`~model.imaging.pixel_module`: the Image Pixel Module (PS3.3 C.7.6.3) checked against
   Pixel Data before anything is allocated (PS3.5 8.1.1); :mod:`~model.imaging.encapsulated`
   reads the fragments' and codestreams' sizes of compressed data (PS3.5 A.4).
3. :mod:`~model.imaging.decode`: the first frame only.
4. :mod:`~model.imaging.render` with :mod:`~model.imaging.lut`: Modality LUT, VOI LUT or
   window, MONOCHROME1, Presentation LUT Shape, colour to gray; 8 bits, bone bright.
5. :mod:`~model.imaging.network_input`: resize to a square, 3 channels, as for pictures.

Errors: :mod:`~model.imaging.errors`.
"""

from model.imaging.encapsulated import encapsulated_fragment_bytes
from model.imaging.errors import PreprocessError, UnreadablePixelDataError
from model.imaging.network_input import (
    dicom_to_uint8,
    image_to_uint8,
    load_gray_uint8,
    load_network_input,
    to_network_input,
)
from model.imaging.pixel_module import (
    DEFAULT_MAX_PIXELS,
    PixelGeometry,
    check_pixel_data,
    check_pixel_geometry,
)
from model.imaging.read import is_dicom, read_dataset
from model.imaging.render import dataset_to_uint8

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PixelGeometry",
    "PreprocessError",
    "UnreadablePixelDataError",
    "check_pixel_data",
    "check_pixel_geometry",
    "dataset_to_uint8",
    "dicom_to_uint8",
    "encapsulated_fragment_bytes",
    "image_to_uint8",
    "is_dicom",
    "load_gray_uint8",
    "load_network_input",
    "read_dataset",
    "to_network_input",
]
