"""The delivery backoff rule (fracture_triage.backoff) and the destinations setting."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fracture_triage.backoff import MAX_DELAY, next_attempt_at, retry_delay
from fracture_triage.settings import LEGACY_DESTINATION, Destination, Settings

T0 = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def test_retries_double_from_30_seconds_and_stop_growing_at_4_hours() -> None:
    delays = [retry_delay(n).total_seconds() for n in range(1, 13)]
    assert delays[:5] == [30, 60, 120, 240, 480]
    assert delays[9] == 4 * 3600  # 30 s x 2**9 = 4 h 16 min: capped
    assert all(d == MAX_DELAY.total_seconds() for d in delays[9:])
    assert retry_delay(10_000) == MAX_DELAY
    with pytest.raises(ValueError):
        retry_delay(0)


def test_gives_up_after_max_attempts_or_max_age() -> None:
    assert next_attempt_at(1, T0, T0) == T0 + timedelta(seconds=30)
    assert next_attempt_at(3, T0, T0, max_attempts=3) is None
    assert next_attempt_at(2, T0, T0, max_attempts=3) == T0 + timedelta(seconds=60)
    # three days pending by default
    late = T0 + timedelta(days=3)
    assert next_attempt_at(30, T0, late) is None
    # the last retry is moved to the limit rather than overshooting it
    near = T0 + timedelta(days=3) - timedelta(minutes=10)
    assert next_attempt_at(30, T0, near) == T0 + timedelta(days=3)
    assert next_attempt_at(1, T0, T0, max_age=timedelta(seconds=10)) == T0 + timedelta(seconds=10)


def test_a_day_of_outage_costs_about_a_dozen_attempts() -> None:
    """What a PACS team would ask: how often does the node knock while we are down?"""
    now, attempts = T0, 0
    while True:
        attempts += 1
        following = next_attempt_at(attempts, T0, now)
        if following is None:
            break
        now = following
    assert now == T0 + timedelta(days=3)
    assert 20 <= attempts <= 30  # 9 fast tries in the first 4.3 h, then one every 4 h


def test_destinations_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(
        "FRACTURE_TRIAGE_DESTINATIONS",
        json.dumps(
            [
                {
                    "name": "pacs",
                    "kind": "dicom",
                    "host": "10.0.0.5",
                    "port": 104,
                    "ae_title": "PACS",
                },
                {"name": "ris", "kind": "hl7", "host": "10.0.0.6", "port": 2575},
            ]
        ),
    )
    settings = Settings(data_dir=tmp_path)
    assert [(d.name, d.kind) for d in settings.all_destinations] == [
        ("pacs", "dicom"),
        ("ris", "hl7"),
    ]
    # the legacy settings still count, as one more dicom destination
    both = Settings(
        data_dir=tmp_path,
        sr_destination_host="127.0.0.1",
        sr_destination_port=11112,
        sr_destination_ae_title="OLDPACS",
    )
    assert [d.name for d in both.all_destinations] == ["pacs", "ris", LEGACY_DESTINATION]
    legacy = both.destination(LEGACY_DESTINATION)
    assert legacy is not None and (legacy.ae_title, legacy.port) == ("OLDPACS", 11112)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not json", "not JSON"),
        ('{"name": "x"}', "must be a JSON list"),
        ('[{"name": "pacs", "kind": "dicom", "host": "h", "port": 104}]', "'pacs'.*needs ae_title"),
        ('[{"name": "p", "kind": "dicom", "host": "h", "port": 0, "ae_title": "P"}]', "#1.*port"),
        (
            '[{"name": "r", "kind": "hl7", "host": "h", "port": 2575, "tls": true}]',
            "host and port only",
        ),
        ('[{"name": "r", "kind": "fhir", "host": "h", "port": 1}]', "kind"),
        (
            '[{"name": "a", "kind": "hl7", "host": "h", "port": 1},'
            ' {"name": "a", "kind": "hl7", "host": "h", "port": 2}]',
            "unique: a given twice",
        ),
        ('[{"name": "a b", "kind": "hl7", "host": "h", "port": 1}]', "name"),
        (
            '[{"name": "p", "kind": "dicom", "host": "h", "port": 1,'
            ' "ae_title": "WAYTOOLONGAETITLE1"}]',
            "AE title",
        ),
    ],
)
def test_bad_destinations_are_refused_with_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str, message: str
) -> None:
    monkeypatch.setenv("FRACTURE_TRIAGE_DESTINATIONS", value)
    with pytest.raises(ValueError, match=message):
        Settings(data_dir=tmp_path)


def test_the_legacy_name_cannot_be_taken_twice(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sr_destination"):
        Settings(
            data_dir=tmp_path,
            destinations=[Destination(name=LEGACY_DESTINATION, kind="hl7", host="h", port=1)],
            sr_destination_host="h",
            sr_destination_port=104,
            sr_destination_ae_title="P",
        )


def test_destinations_travel_to_up_s_children(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`fracture-triage up` hands its settings to each role as environment variables."""
    from fracture_triage.up import settings_environment

    settings = Settings(
        data_dir=tmp_path,
        destinations=[
            Destination(
                name="pacs",
                kind="dicom",
                host="h",
                port=104,
                ae_title="PACS",
                tls=True,
                tls_ca=tmp_path / "ca.pem",
            ),
            Destination(name="ris", kind="hl7", host="r", port=2575),
        ],
    )
    for key, value in settings_environment(settings).items():
        monkeypatch.setenv(key, value)
    assert Settings().all_destinations == settings.all_destinations
