"""highdicom's module table read lazily (worker.standard_tables): the same answers, less held."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

import highdicom._standard_utils as standard_utils

from worker import standard_tables


def test_lazy_table_equals_highdicoms_whole_table() -> None:
    whole = json.loads(
        (resources.files("highdicom") / "_standard/module_attribute_map.json").read_bytes()
    )
    lazy = standard_tables.module_attribute_map()
    assert list(lazy) == list(whole)
    assert len(lazy) == len(whole)
    for key, value in whole.items():
        assert lazy[key] == value, key
    assert "not-a-module" not in lazy


def test_highdicom_uses_it_once_the_sr_module_is_imported() -> None:
    import worker.sr  # noqa: F401 - installs the lazy table

    assert standard_utils.get_module_attribute_map() is standard_tables.module_attribute_map()
    # highdicom's own question for every SOP instance it builds still gets its answer
    sc = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert standard_utils.is_attribute_in_iod("ContentDate", sc)
    assert not standard_utils.is_attribute_in_iod("NumberOfFrames", sc)


def test_building_evidence_and_sr_leaves_highdicoms_whole_table_unread() -> None:
    # In a fresh interpreter: build a Secondary Capture the way the worker does, then check
    # highdicom's own cached loader was never called (its 64 MB of objects not made).
    code = """
import highdicom as hd, numpy as np
import highdicom._standard_utils as su
original = su.get_module_attribute_map
import worker.sr  # installs the lazy table
from pydicom.sr.codedict import codes
sc = hd.sc.SCImage(
    pixel_array=np.zeros((8, 8, 3), np.uint8),
    photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
    bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT,
    study_instance_uid=hd.UID(), series_instance_uid=hd.UID(), series_number=1,
    sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test",
    patient_orientation=("A", "F"),
)
assert "ContentDate" in sc
print(original.cache_info().misses)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "0"
