"""Shared fixtures: real Redis, SQLite and PostgreSQL, a small real model, the DICOM samples."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.servers import OrthancServer, RedisServer, postgres_server, redis_server

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(__import__("os").environ.get("FRACTURE_TRIAGE_SHARED", REPO.parent / "shared"))
DICOM_SAMPLES = SHARED / "dicom-samples"


#: Fixtures that start a server (Redis, PostgreSQL, Orthanc, the whole node) or build a Keras
#: network (``tiny_model_dir``: TensorFlow's import and the build take 10-20 s); a test using
#: one, directly or through another fixture, is marked ``slow`` (left out of the fast tier).
SLOW_FIXTURES = frozenset({"redis", "postgres_url", "broker", "orthanc", "node", "tiny_model_dir"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that needs a server or a network: by its fixtures, or by the
    PostgreSQL parameter of ``database_url`` (which asks for ``postgres_url`` only at run
    time). Tests that start servers or tools themselves, or that train or build networks,
    carry an explicit ``slow`` mark (or their module's ``pytestmark``)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("database_url") == "postgresql"
        if fixtures & SLOW_FIXTURES or on_postgres:
            item.add_marker(pytest.mark.slow)


#: Programs only ``slow`` tests may run: servers, dcmtk and dicom3tools.
SLOW_PROGRAMS = frozenset(
    {"redis-server", "Orthanc", "initdb", "pg_ctl", "createdb", "postgres"}
    | {"echoscu", "storescu", "dcmsend", "dsrdump", "dciodvfy"}
)


@pytest.fixture(autouse=True)
def _every_body_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """Most of the DICOM samples are chest films, which the node's default scope
    (``fracture_triage.scope``) leaves unclassified: tests of classification, reports and
    the worklist classify whatever they send (``FRACTURE_TRIAGE_BODY_PARTS=*``, inherited by
    the roles they start). The scope's own tests set or delete the variable themselves."""
    monkeypatch.setenv("FRACTURE_TRIAGE_BODY_PARTS", "*")


@pytest.fixture(autouse=True)
def _no_server_outside_slow_tests(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test not marked ``slow`` (the fast tier, ``-m "not slow"``) fails when it starts
    Redis, Orthanc, a Celery worker or one of :data:`SLOW_PROGRAMS`, so a missing mark is
    found at once rather than on a machine without them."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(what: object) -> None:
        pytest.fail(f"{request.node.nodeid} runs {what}: mark it @pytest.mark.slow")

    monkeypatch.setattr(RedisServer, "start", lambda self: refuse("redis-server"))
    monkeypatch.setattr(OrthancServer, "start", lambda self: refuse("Orthanc"))

    class CheckedPopen(subprocess.Popen):
        def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
            argv = [str(a) for a in args] if isinstance(args, list | tuple) else str(args).split()
            if Path(argv[0]).name in SLOW_PROGRAMS:
                refuse(Path(argv[0]).name)
            if argv[1:3] == ["-m", "worker"]:
                refuse("a Celery worker")
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", CheckedPopen)


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


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated database of each kind (``database_url``); a module
    that needs its database otherwise defines its own ``sessions``."""
    from db.session import make_engine, make_session_factory
    from tests.databases import migrated

    migrated(database_url)
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A migrated SQLite database, for tests about the network rather than the database."""
    from db.session import make_engine, make_session_factory
    from tests.databases import migrated

    url = f"sqlite:///{tmp_path / 'net.db'}"
    migrated(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


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
