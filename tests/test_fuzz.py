"""The fuzz harness (``dicom_node.fuzz``), small: 65 cases (5 of each kind) against the real
SCP process, run once for the module."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node import fuzz

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # the SCP in a subprocess


@pytest.fixture(scope="module")
def report(dicom_samples: Path) -> fuzz.Report:
    return fuzz.run(dicom_samples, count=65, seed=1)


def test_no_crash_hang_unanswered_store_or_lost_object(report: fuzz.Report) -> None:
    """Every kind runs; no crash, hang, unanswered C-STORE or Success for an object not stored
    byte-exact; the node stays small and answers C-ECHO at once."""
    figures = report.as_json(seed=1, wall_s=0.0)
    assert report.cases == 65
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


def test_closed_junk_connections_do_not_lock_other_peers_out(report: fuzz.Report) -> None:
    """After each burst of 16 connections the SCP aborts (8 from each of 2 addresses, every
    association slot), a C-ECHO from a third address is answered: none is a lockout."""
    assert report.kinds["pdu_abort_burst"] == 5
    assert report.lockouts == 0, report.defects
    assert report.ok()
