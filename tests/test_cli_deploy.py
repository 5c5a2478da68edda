"""The deployment files say what the code expects: compose services, settings names, Dockerfile.

No Docker engine runs here, so these check the files' structure against the code (a setting
misspelt in docker-compose.yml would otherwise be silently ignored by pydantic-settings).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from fracture_triage.settings import Settings

REPO = Path(__file__).resolve().parent.parent
NODE_ROLES = ("migrate", "scp", "worker", "sweeper", "api")


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_services_and_health_checks() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", *NODE_ROLES} <= services.keys()
    for name in ("redis", "postgres", "scp", "worker", "api"):
        assert "healthcheck" in services[name], name
    assert "--requirepass" in services["redis"]["command"]
    assert services["scp"]["healthcheck"]["test"][:3] == ["CMD", "fracture-triage", "echo"]
    # `docker compose up --scale worker=N` needs no fixed name and no published port.
    assert "container_name" not in services["worker"]
    assert "ports" not in services["worker"]
    assert all(p.startswith("127.0.0.1:") for p in services["api"]["ports"])
    for role in ("scp", "worker", "sweeper", "api"):
        deps = services[role]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["db", "upgrade"]


def test_compose_roles_share_the_data_volume_and_valid_settings() -> None:
    services = compose()["services"]
    fields = set(Settings.model_fields)
    for role in NODE_ROLES:
        env = services[role]["environment"]
        for key in env:
            assert key.startswith("FRACTURE_TRIAGE_"), key
            assert key.removeprefix("FRACTURE_TRIAGE_").lower() in fields, f"unknown setting {key}"
        assert "objects:/data" in services[role]["volumes"]
        assert env["FRACTURE_TRIAGE_DATA_DIR"] == "/data"
        assert env["FRACTURE_TRIAGE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["FRACTURE_TRIAGE_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
    assert "objects" in compose()["volumes"]


def test_dockerfile_copies_every_package() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    copied = set(re.findall(r"^COPY (\w+) ", dockerfile, flags=re.M))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in patterns if (REPO / p.rstrip("*")).is_dir()}
    assert packages <= copied, packages - copied
    assert 'ENTRYPOINT ["fracture-triage"]' in dockerfile


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    command = re.search(r'^TEST_COMMAND="([^"]+)"', ci, flags=re.M)
    assert command is not None
    assert f"&& {command.group(1)}\n" in (REPO / "README.md").read_text()
    assert "set -euo pipefail" in ci
    assert (REPO / ".ci" / "run").stat().st_mode & 0o111
