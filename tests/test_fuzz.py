"""The fuzz harness (``dicom_node.fuzz``), small: 60 cases against the real SCP process."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node import fuzz

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # the SCP in a subprocess


def test_sixty_fuzz_cases_crash_hang_or_lose_nothing(dicom_samples: Path) -> None:
    """Every kind runs; no crash, hang, unanswered C-STORE or Success for an object not stored
    byte-exact; the node stays small and answers C-ECHO at once."""
    report = fuzz.run(dicom_samples, count=60, seed=1)
    figures = report.as_json(seed=1, wall_s=0.0)
    assert report.cases == 60
    assert set(report.kinds) == set(fuzz.KINDS), figures
    assert report.crashes == 0, figures
    assert report.hangs == 0, figures
    assert report.unanswered == 0, figures
    assert report.missing_or_different == 0, figures
    assert report.echo_failures == 0, figures
    assert report.success_answers > 0  # some mutations are storable: the check ran
    assert report.stored_byte_exact == report.success_answers
    assert report.max_rss_mb < 300, figures
    assert 0 < report.max_echo_s < 1, figures
    assert report.ok()
