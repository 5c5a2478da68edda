"""The three decision levels: the rule, the card's two thresholds, the migrated results and
the worklist order (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from db import repository as repo
from db.migrations import downgrade, upgrade
from db.session import make_engine, make_session_factory
from db.worklist import worklist
from fracture_triage.results import collect_results
from fracture_triage.verdict import Decision, decide, study_decision, study_verdict
from model.artifact import CARD_FILE, ModelCard, read_card, write_card
from tests.test_cli_results import _rec

FRACTURE, DOUBT, NONE = Decision.fracture, Decision.doubt, Decision.no_fracture


def test_decision_values_are_the_three_words() -> None:
    assert [d.value for d in Decision] == ["fracture", "doubt", "no fracture"]


@pytest.mark.parametrize(
    ("probability", "expected"),
    [(0.0, NONE), (0.2999, NONE), (0.3, DOUBT), (0.5, DOUBT), (0.6999, DOUBT), (0.7, FRACTURE),
     (1.0, FRACTURE)],
)  # fmt: skip
def test_decide_at_and_between_the_two_thresholds(probability: float, expected: Decision) -> None:
    assert decide(probability, 0.3, 0.7) is expected


def test_one_threshold_never_gives_doubt() -> None:
    grid = [i / 1000 for i in range(1001)]
    for upper in (None, 0.4):
        decisions = {decide(p, 0.4, upper) for p in grid}
        assert decisions == {FRACTURE, NONE}
        assert all((decide(p, 0.4, upper) is FRACTURE) == (p >= 0.4) for p in grid)


def test_decide_refuses_thresholds_in_the_wrong_order() -> None:
    with pytest.raises(ValueError, match=r"upper_threshold \(0.2\) must be >= threshold \(0.3\)"):
        decide(0.5, 0.3, 0.2)
    with pytest.raises(ValueError, match="within"):
        decide(0.5, 0.3, 1.5)


def test_study_decision_is_the_highest_level() -> None:
    assert study_decision([NONE, DOUBT, NONE]) is DOUBT
    assert study_decision([DOUBT, None, "fracture", NONE]) is FRACTURE
    assert study_decision([NONE, None]) is NONE
    assert study_decision([None]) is None and study_decision([]) is None
    verdict = study_verdict([(0.6, True, "doubt"), (0.1, False, "no fracture"), (None, None, None)])
    assert (verdict.decision, verdict.fracture, verdict.probability) == (DOUBT, True, 0.6)
    # A result without a decision counts by its flag (a card with one threshold).
    assert study_verdict([(0.9, True, None)]).decision is FRACTURE


def _card(**kw: object) -> ModelCard:
    fields: dict[str, object] = {
        "name": "m",
        "version": "1",
        "uid": "2.25.1",
        "threshold": 0.3,
        "input_size": 64,
    }
    return ModelCard(**{**fields, **kw})  # type: ignore[arg-type]


def test_card_with_two_thresholds_round_trips(tmp_path: Path) -> None:
    write_card(tmp_path, _card(upper_threshold=0.7))
    assert json.loads((tmp_path / CARD_FILE).read_text())["upper_threshold"] == 0.7
    card = read_card(tmp_path)
    assert (card.threshold, card.upper_threshold, card.upper) == (0.3, 0.7, 0.7)
    assert "upper_threshold" not in card.extra


def test_card_without_upper_threshold_has_upper_equal_lower(tmp_path: Path) -> None:
    write_card(tmp_path, _card())
    assert "upper_threshold" not in json.loads((tmp_path / CARD_FILE).read_text())
    card = read_card(tmp_path)
    assert card.upper_threshold is None and card.upper == card.threshold == 0.3


@pytest.mark.parametrize(
    ("upper", "message"),
    [
        (0.2, r"upper_threshold \(0.2\) must be >= threshold \(0.3\)"),
        (1.2, r"upper_threshold must be within \[0, 1\], got 1.2"),
        ("0.7", r"upper_threshold must be a number, got '0.7'"),
    ],
)
def test_card_with_a_bad_upper_threshold_is_refused_naming_the_file(
    tmp_path: Path, upper: object, message: str
) -> None:
    data = {"name": "m", "version": "1", "uid": "2.25.1", "threshold": 0.3, "input_size": 64}
    (tmp_path / CARD_FILE).write_text(json.dumps({**data, "upper_threshold": upper}))
    with pytest.raises(ValueError, match=message) as info:
        read_card(tmp_path)
    assert str(tmp_path / CARD_FILE) in str(info.value)


def test_results_classified_before_0004_get_a_decision(database_url: str) -> None:
    """Migrating a database with results of one threshold: upper = lower and the decision
    that gives, never doubt."""
    # The instances are recorded with today's models, then the schema is taken back to 0003
    # (the ORM selects columns of later revisions) and results are stored as 0003 stored them.
    upgrade(database_url)
    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:
        for n in (1, 2, 3):
            repo.record_received(s, _rec("1.2.826.0.1.3680043.8.498.900", n))
        s.commit()
    engine.dispose()
    downgrade(database_url, "0003")
    with engine.begin() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id FROM instances ORDER BY id"))]
        for instance_id, p in zip(ids, (0.91, 0.5, 0.12), strict=True):
            conn.execute(
                text(
                    "INSERT INTO results (instance_id, model_name, model_version, model_uid, "
                    "probability, threshold, fracture, preprocess_ms, inference_ms, created_at) "
                    "VALUES (:i, 'm', '1.1.0', '2.25.1', :p, 0.5, :f, 1, 1, :t)"
                ),
                {"i": instance_id, "p": p, "f": p >= 0.5, "t": repo.utcnow()},
            )
    upgrade(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT probability, upper_threshold, decision FROM results ORDER BY id")
        ).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [
        (0.91, 0.5, "fracture"),
        (0.5, 0.5, "fracture"),
        (0.12, 0.5, "no fracture"),
    ]


def _classify(
    s: object, instance_id: int, p: float, lower: float = 0.3, upper: float | None = 0.7
) -> None:
    repo.save_result(
        s,  # type: ignore[arg-type]
        instance_id,
        repo.Classification(
            probability=p,
            threshold=lower,
            upper_threshold=upper,
            fracture=p >= lower,
            model_name="m",
            model_version="2.0.0",
            model_uid="2.25.2",
            preprocess_ms=1,
            inference_ms=1,
        ),
    )


def test_worklist_is_fracture_then_doubt_then_no_fracture_by_probability(
    database_url: str,
) -> None:
    """Studies as they arrive: one level each (a doubt study with a no-fracture image too),
    a study still waiting, and one classified by a model with one threshold (0.5), whose
    0.6 is a fracture: the worklist ranks by level first, then probability."""
    base = "1.2.826.0.1.3680043.8.498."
    images = {
        "401": [0.2],  # no fracture
        "402": [0.5, 0.1],  # doubt (and a normal image)
        "403": [],  # waiting
        "404": [0.75],  # fracture
        "405": [0.65],  # doubt, higher
        "406": [0.95, 0.4],  # fracture, higher (and a doubt image)
        "407": [0.6],  # fracture at one threshold 0.5, below the doubt study 405
    }
    upgrade(database_url)
    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:
        for study, probabilities in images.items():
            first, _ = repo.record_received(s, _rec(base + study, 0))
            if not probabilities:
                repo.mark_queued(s, first.id)
            for n, p in enumerate(probabilities):
                inst = first if n == 0 else repo.record_received(s, _rec(base + study, n))[0]
                if study == "407":
                    _classify(s, inst.id, p, lower=0.5, upper=None)
                else:
                    _classify(s, inst.id, p)
        s.commit()
        order = [(e.study_instance_uid[len(base) :], e.decision) for e in worklist(s)]
        rows = collect_results(s)
    engine.dispose()
    assert order == [
        ("406", FRACTURE),
        ("404", FRACTURE),
        ("407", FRACTURE),
        ("405", DOUBT),
        ("402", DOUBT),
        ("401", NONE),
        ("403", None),
    ]
    seen = {
        (r["study_instance_uid"][len(base) :], r["probability"]): (
            r["decision"],
            r["study_decision"],
        )
        for r in rows
    }
    assert seen == {
        ("401", 0.2): ("no fracture", "no fracture"),
        ("402", 0.5): ("doubt", "doubt"),
        ("402", 0.1): ("no fracture", "doubt"),
        ("403", None): (None, None),
        ("404", 0.75): ("fracture", "fracture"),
        ("405", 0.65): ("doubt", "doubt"),
        ("406", 0.95): ("fracture", "fracture"),
        ("406", 0.4): ("doubt", "fracture"),
        ("407", 0.6): ("fracture", "fracture"),
    }
    assert {(r["threshold"], r["upper_threshold"]) for r in rows if r["probability"]} == {
        (0.3, 0.7),
        (0.5, 0.5),
    }
