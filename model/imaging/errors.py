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
