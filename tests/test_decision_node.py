"""The three decision levels through the real node: ``fracture-triage up`` (SCP, Redis,
Celery worker, sweeper, query API) with the tiny test model given two thresholds, three
studies sent with dcmtk's ``storescu``, read back with ``results --json``, ``/worklist``
and the SRs (checked with ``dciodvfy``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from model.artifact import ModelCard, read_card, write_card
from model.inference import Classifier
from tests.conftest import require
from tests.test_cli_api import get
from tests.test_cli_up import GOOD, _results, _wait_for_banner, dcmtk, running_node

#: One image each of three different studies (uncompressed: storescu sends them as they are).
SAMPLES = [GOOD[0], GOOD[2], GOOD[3]]


def three_level_model(model_dir: Path, files: list[Path], out: Path) -> dict[str, float]:
    """A copy of ``model_dir`` whose two thresholds lie between the probabilities of
    ``files`` (computed on the worker's path), so each file gets another level; returns
    each file's probability by name."""
    classifier = Classifier.load(model_dir)
    probability = {f.name: classifier.classify_file(f).probability for f in files}
    low, mid, high = sorted(probability.values())
    assert mid - low > 1e-4 and high - mid > 1e-4, probability  # distinct levels possible
    shutil.copytree(model_dir, out)
    card = read_card(out)
    thresholds = {"threshold": (low + mid) / 2, "upper_threshold": (mid + high) / 2}
    write_card(out, ModelCard(**{**card.__dict__, **thresholds}))
    return probability


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_study_between_the_thresholds_is_doubt_everywhere(
    tmp_path: Path, tiny_model_dir: Path, dicom_samples: Path
) -> None:
    files = [require(dicom_samples / name) for name in SAMPLES]
    headers = {f.name: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    study_of = {name: str(h.StudyInstanceUID) for name, h in headers.items()}
    assert len(set(study_of.values())) == 3
    probability = three_level_model(tiny_model_dir, files, tmp_path / "model")
    by_p = sorted(probability, key=probability.__getitem__)
    expected = dict(zip(by_p, ("no fracture", "doubt", "fracture"), strict=True))
    card = read_card(tmp_path / "model")

    with running_node(tmp_path, tmp_path / "model") as node:
        banner = _wait_for_banner(node)
        assert f"thresholds {card.threshold} / {card.upper}: doubt between" in banner
        port = int(str(node["port"]))
        send = subprocess.run(
            [dcmtk("storescu"), "-aec", "FXTRIAGE", "127.0.0.1", str(port), *map(str, files)],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert send.returncode == 0, send.stdout + send.stderr
        data_dir = Path(str(node["data_dir"]))
        deadline = time.monotonic() + 240
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            rows = _results(data_dir)
            if len(rows) == 3 and all(r["status"] == "done" and r["sr_path"] for r in rows):
                break
            time.sleep(1.0)
        else:
            pytest.fail(f"no results and SRs after 240 s: {rows}")
        status, worklist = get(int(str(node["http_port"])), "/worklist")

    by_study = {str(r["study_instance_uid"]): r for r in rows}
    for name, level in expected.items():
        row = by_study[study_of[name]]
        assert row["probability"] == pytest.approx(probability[name], abs=1e-5)
        assert (row["decision"], row["study_decision"]) == (level, level), name
        assert (row["threshold"], row["upper_threshold"]) == (card.threshold, card.upper)
        assert row["fracture"] is (level != "no fracture")

    # The worklist: fracture, then doubt, then no fracture.
    assert status == 200
    assert [s["study_instance_uid"] for s in worklist] == [
        study_of[name] for name in reversed(by_p)
    ]
    assert [s["decision"] for s in worklist] == ["fracture", "doubt", "no fracture"]

    # The SRs: Present / Undetermined / Absent, each naming both thresholds; valid DICOM.
    evaluation = {
        "fracture": codes.SCT.Present,
        "doubt": codes.SCT.Undetermined,
        "no fracture": codes.SCT.Absent,
    }
    for name, level in expected.items():
        path = str(by_study[study_of[name]]["sr_path"])
        verify = subprocess.run(["dciodvfy", path], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (verify.stdout + verify.stderr).splitlines() if "Error" in ln]
        assert errors == [], "\n".join(errors)
        sr = hd.sr.srread(path)
        assert isinstance(sr.content, hd.sr.MeasurementReport)
        (group,) = sr.content.get_image_measurement_groups()
        (qualitative,) = group.get_qualitative_evaluations()
        assert qualitative.value == evaluation[level], name
        parameters = [
            item.TextValue
            for item in group[0].ContentSequence  # type: ignore[index]
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111002"
        ]
        assert parameters == [
            f"lower_threshold={card.threshold:g}",
            f"upper_threshold={card.upper:g}",
        ]
