"""Free space of the data directory, and the watermark below which the node stops storing.

A full disk must not be found out by a failed write half-way through an object (which is
answered 0xA700 anyway, nothing is acknowledged that is not durably written) nor leave the
database without room for its journal. So the SCP keeps a reserve: a C-STORE that would
leave less free space than the watermark is answered 0xA700 "Refused: Out of Resources"
(PS3.4 Table B.2-1; the sender keeps the object and retries later) with an Error Comment
saying so, and nothing of it is written. The watermark is the smaller of
``Settings.min_free_bytes`` (5 GiB) and ``Settings.min_free_percent`` (10 %) of the file
system; 0 turns either off, both 0 the check (a write that does not fit then fails, and is
answered 0xA700 all the same).

:func:`storage_health` is what ``/health`` reports; :class:`Watermark` is the SCP's check,
which logs when the node goes below the watermark and when it has room again. Imports
nothing of the project but the settings.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fracture_triage.settings import Settings

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass(frozen=True)
class Space:
    """Free space of one file system, as an unprivileged writer sees it."""

    path: str
    free_bytes: int
    total_bytes: int
    watermark_bytes: int

    @property
    def low(self) -> bool:
        return self.free_bytes < self.watermark_bytes

    def describe(self) -> str:
        return (
            f"{self.free_bytes / MiB:.0f} MiB free of {self.total_bytes / MiB:.0f} MiB "
            f"(watermark {self.watermark_bytes / MiB:.0f} MiB)"
        )


def watermark(total_bytes: int, min_free_bytes: int, min_free_percent: float) -> int:
    """The reserve kept free: the smaller of the two settings that are not 0."""
    limits = [min_free_bytes] if min_free_bytes > 0 else []
    if min_free_percent > 0:
        limits.append(int(total_bytes * min_free_percent / 100))
    return min(limits) if limits else 0


def storage_path(settings: Settings) -> Path:
    """Where received objects go (the data directory until the objects folder exists)."""
    return settings.storage_dir if settings.storage_dir.is_dir() else settings.data_dir


def space(settings: Settings) -> Space:
    """The data directory's file system now (``statvfs``: blocks available to non-root)."""
    path = storage_path(settings)
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return Space(
        path=str(path),
        free_bytes=st.f_bavail * st.f_frsize,
        total_bytes=total,
        watermark_bytes=watermark(total, settings.min_free_bytes, settings.min_free_percent),
    )


def storage_health(settings: Settings) -> dict[str, Any]:
    """What ``/health`` reports about storage: ``status`` "ok", "low" (C-STOREs are being
    refused) or "unavailable" (the data directory cannot be read), and the figures."""
    try:
        now = space(settings)
    except OSError as exc:
        return {"status": "unavailable", "error": exc.strerror or type(exc).__name__}
    return {
        "status": "low" if now.low else "ok",
        "free_bytes": now.free_bytes,
        "total_bytes": now.total_bytes,
        "watermark_bytes": now.watermark_bytes,
    }


class Watermark:
    """The SCP's check before it writes an object; logs each change of state once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._low = False
        self._refused = 0

    def refusal(self, needed_bytes: int) -> str | None:
        """An Error Comment (at most 64 characters, PS3.7 C.4) when storing ``needed_bytes``
        more would go below the watermark, else ``None``."""
        try:
            now = space(self.settings)
        except OSError:
            return None  # the write itself will fail and say so
        # Both settings 0: no reserve and no check (a write that does not fit fails, 0xA700).
        low = now.watermark_bytes > 0 and now.free_bytes - needed_bytes < now.watermark_bytes
        with self._lock:
            if low and not self._low:
                log.error(
                    "storage low at %s: %s, storing %.1f MiB more would go below it; "
                    "C-STOREs are answered 0xA700 Out of Resources until there is room",
                    now.path,
                    now.describe(),
                    needed_bytes / MiB,
                )
            elif not low and self._low:
                log.warning(
                    "storage has room again at %s: %s; storing (%d C-STORE(s) were refused)",
                    now.path,
                    now.describe(),
                    self._refused,
                )
                self._refused = 0
            self._low = low
            if low:
                self._refused += 1
        if not low:
            return None
        return f"storage full: {now.free_bytes // MiB} MiB free; retry later"
