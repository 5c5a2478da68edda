"""highdicom's module table and pydicom's concept dictionary read lazily
(worker.standard_tables): the same answers, less held."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import highdicom._standard_utils as standard_utils
import pytest

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


def _real_concepts() -> dict[str, dict[str, standard_tables.SchemeEntries]]:
    """pydicom's concept dictionary as its own module builds it (read whole, under another
    name, so this process's lazy one stays in place)."""
    spec = importlib.util.spec_from_file_location("real_concepts", standard_tables._concepts_path())
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    whole: dict[str, dict[str, standard_tables.SchemeEntries]] = module.concepts
    return whole


@pytest.mark.slow  # every one of 18,735 entries parsed: ~3 s, for the whole suite
def test_lazy_concepts_equal_pydicoms_whole_dictionary() -> None:
    whole = _real_concepts()
    lazy = standard_tables.read_concepts(standard_tables._concepts_path())
    assert list(lazy) == list(whole)
    for scheme, keywords in whole.items():
        assert list(lazy[scheme]) == list(keywords), scheme
        assert len(lazy[scheme]) == len(keywords)
        for keyword, entries in keywords.items():
            assert lazy[scheme][keyword] == entries, (scheme, keyword)
    assert "NotAKeyword" not in lazy["DCM"]
    assert 'Bad"Keyword' not in lazy["SCT"]


def test_codes_in_a_worker_process_come_from_the_lazy_dictionary() -> None:
    # A fresh interpreter, as a pool child starts: the worker package first, then what the
    # SR and the evidence capture name. The codes are pydicom's; few entries were parsed.
    code = """
import sys, worker.sr, worker.evidence
from pydicom.sr.codedict import codes
lazy = sys.modules["pydicom.sr._concepts_dict"].concepts
parsed = sum(len(scheme._parsed) for scheme in lazy.values())
print(parsed, codes.SCT.Present.value, codes.DCM.Probability.value, codes.CID7151.Femur.value)
try:
    codes.DCM.NotAKeyword
except AttributeError as exc:
    print("AttributeError", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    parsed, present, probability, femur = out.stdout.splitlines()[0].split()
    assert int(parsed) < 100  # of 18,735
    assert (present, probability, femur) == ("52101004", "122157", "71341001")
    whole = _real_concepts()
    assert (present, "Present") == next(
        (code, meaning) for code, (meaning, _) in whole["SCT"]["Present"].items()
    )
    assert "AttributeError No matching code for keyword 'NotAKeyword'" in out.stdout


def test_concepts_of_another_layout_are_read_whole(tmp_path: Path) -> None:
    other = tmp_path / "_concepts_dict.py"
    other.write_text('concepts = {"DCM": {"Probability": {"122157": ("Probability", [])}}}\n')
    assert standard_tables.read_concepts(other) == {
        "DCM": {"Probability": {"122157": ("Probability", [])}}
    }


def test_concepts_without_their_source_file_are_read_from_bytecode(tmp_path: Path) -> None:
    import py_compile

    source = tmp_path / "src" / "_concepts_dict.py"
    source.parent.mkdir()
    source.write_text('concepts = {"UCUM": {"NoUnits": {"1": ("no units", [])}}}\n')
    compiled = tmp_path / "_concepts_dict.pyc"
    py_compile.compile(str(source), cfile=str(compiled))
    assert standard_tables.read_concepts(tmp_path / "_concepts_dict.py") == {
        "UCUM": {"NoUnits": {"1": ("no units", [])}}
    }
