"""The export's file pages are handed back once LiteRT has packed the weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from model.artifact import checked_export, read_card, resolve_model_dir
from model.inference import Classifier

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")


def resident_kib(path: Path) -> int:
    """Rss of this process's mappings of ``path`` (PS: /proc/PID/smaps, proc(5))."""
    target, total, inside = os.path.realpath(path), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            inside = len(fields) == 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_export_pages_released_and_answers_unchanged() -> None:
    model_dir = resolve_model_dir(None)
    export = checked_export(model_dir, read_card(model_dir))
    classifier = Classifier.load(model_dir)
    size = classifier.input_size
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3)).astype(np.float32)
    first = classifier.predict(image)
    # the weights live in XNNPACK's packed copy: the file's pages are not touched again
    assert export.stat().st_size > 4 * 2**20
    assert resident_kib(export) < 512
    for _ in range(3):
        assert classifier.predict(image) == first
    assert resident_kib(export) < 512
