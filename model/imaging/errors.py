"""The errors of the imaging package: a file that cannot become a network input."""

from __future__ import annotations


class PreprocessError(ValueError):
    """The file cannot be turned into a network input; the message is meant for users.

    ``reason``, set by :func:`model.imaging.pixel_module.check_pixel_geometry`, says the same
    without any attribute value: the storage SCP sends it to its peer and logs it, so it must
    not carry patient identifiers. ``None`` where no such text was given.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class UnreadablePixelDataError(PreprocessError):
    """The Pixel Data element itself cannot be read (the SCP answers "Cannot understand")."""


def is_decoder_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a panic of a Rust decoder (``pyo3_runtime.PanicException``).

    pyo3 turns a Rust panic (e.g. pylibjpeg-rle indexing past its frame on corrupt RLE
    segment offsets) into ``pyo3_runtime.PanicException``, which derives from
    ``BaseException`` so that ``except Exception`` does not swallow it. It cannot be imported
    (pyo3 creates the module inside each extension), so it is recognised by its class's
    module and name. Nothing else derived from ``BaseException`` (KeyboardInterrupt,
    SystemExit, GeneratorExit) matches.
    """
    return any(
        cls.__module__ == "pyo3_runtime" and cls.__name__ == "PanicException"
        for cls in type(exc).__mro__
    )
