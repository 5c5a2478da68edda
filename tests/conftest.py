"""Shared fixtures: real Redis, SQLite and PostgreSQL, a small real model, the DICOM samples."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import RedisServer, postgres_server, redis_server

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(__import__("os").environ.get("FRACTURE_TRIAGE_SHARED", REPO.parent / "shared"))
DICOM_SAMPLES = SHARED / "dicom-samples"


def require(path: Path) -> Path:
    """A file from ../shared the test needs; fail loudly (not skip) when it is absent."""
    if not path.exists():
        pytest.fail(f"test data missing: {path} (../shared must sit beside the repository)")
    return path


@pytest.fixture(scope="session")
def dicom_samples() -> Path:
    return require(DICOM_SAMPLES)


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each database test runs on SQLite and on PostgreSQL (a fresh database per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'triage.db'}"
        return
    import uuid

    from sqlalchemy import create_engine, text

    base_url = request.getfixturevalue("postgres_url")
    name = "t_" + uuid.uuid4().hex[:12]
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield base_url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real network saved as a model artifact: the shared ImageNet base at 96 px and
    a seeded random head, so probabilities depend on the picture (a randomly initialised base
    lets the pooled features vanish and answers 0.5 for everything)."""
    import keras

    from model.artifact import MODEL_FILE, ModelCard, write_card
    from model.training.network import build_classifier

    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("model")
    weights = require(SHARED / "weights" / "mobilenet_v2_imagenet_1.0_224_no_top.h5")
    model, _ = build_classifier(input_size=96, weights=weights)
    model.save(out / MODEL_FILE)
    write_card(
        out,
        ModelCard(
            name="test-mobilenetv2",
            version="test-0",
            uid="2.25.1234567890",
            threshold=0.5,
            input_size=96,
        ),
    )
    from model.training.export import export

    export(out)  # the node loads the LiteRT export, as it does the shipped model's
    return out
