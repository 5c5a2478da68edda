"""``fracture-triage api``, ``user``, ``token`` and ``audit`` through the console script: the
web application as its own role over a populated database, accounts made from the command
line."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from db import repository as repo
from db.session import make_engine, make_session_factory
from tests.servers import free_port, wait_for_port
from tests.test_cli_results import PATIENT_NAME, STUDY_A, STUDY_B, _rec, cli, populate, run_cli
from tests.webapp import cookie_header, form_token

# Each test starts the node's API role as its own process (a server).
pytestmark = pytest.mark.slow

STUDY_C = "1.2.826.0.1.3680043.8.498.300"


def get(port: int, path: str, token: str | None = None) -> tuple[int, Any]:
    """GET on the node's web application (JSON answers), with a bearer token if given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=30)
    return r.status_code, r.json()


def listening_addresses(port: int) -> list[str]:
    """IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
            found.append(str(ipaddress.IPv4Address(bytes.fromhex(address)[::-1])))
    return found


def test_accounts_from_the_command_line(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    added = subprocess.run(
        [*cli(), "user", "add", "alice", "--role", "radiologist", *data],
        input="a long enough password\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    assert "a long enough password" not in added.stdout
    generated = run_cli("user", "add", "root", "--role", "admin", "--generate-password", *data)
    assert generated.returncode == 0
    (password,) = [ln.split(": ", 1)[1] for ln in generated.stdout.splitlines() if "once" in ln]
    assert len(password) >= 20

    again = run_cli("user", "add", "alice", "--role", "admin", "--generate-password", *data)
    assert again.returncode == 1 and "exists already" in again.stderr
    short = subprocess.run(
        [*cli(), "user", "add", "bob", "--role", "radiologist", *data],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert short.returncode == 1 and "at least 10 characters" in short.stderr
    assert (
        run_cli("user", "add", "x y", "--role", "admin", "--generate-password", *data).returncode
        == 1
    )

    assert run_cli("user", "disable", "alice", *data).returncode == 0
    listing = run_cli("user", "list", *data).stdout.splitlines()
    assert [ln.split("\t")[:3] for ln in listing] == [
        ["alice", "radiologist", "disabled"],
        ["root", "admin", "active"],
    ]
    assert run_cli("user", "disable", "nobody", *data).returncode == 1

    trail = run_cli("audit", "--json", *data)
    details = [json.loads(ln)["detail"] for ln in trail.stdout.splitlines()]
    assert details == ["user disable alice", "user add root", "user add alice"]


def test_api_role_serves_tokens_and_stops_on_sigterm(database_url: str, tmp_path: Path) -> None:
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path / 'triage.db'}"
    populate(database_url)
    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:  # a third study: classified, no fracture
        inst, _ = repo.record_received(s, _rec(STUDY_C, 1))
        repo.save_result(
            s,
            inst.id,
            repo.Classification(
                probability=0.2,
                threshold=0.5,
                fracture=False,
                model_name="mnv2",
                model_version="1.0",
                model_uid="2.25.7",
                preprocess_ms=1,
                inference_ms=1,
            ),
        )
        s.commit()
    engine.dispose()
    db_args = (
        ["--data-dir", str(tmp_path)]
        if database_url.startswith("sqlite")
        else ["--database-url", database_url]
    )
    created = run_cli("token", "create", "ris", "--role", "radiologist", *db_args)
    assert created.returncode == 0, created.stderr
    token = created.stdout.splitlines()[-1]
    assert token.startswith("ftt_")
    assert token not in run_cli("token", "list", *db_args).stdout

    port = free_port()
    proc = subprocess.Popen(
        [*cli(), "api", "--http-port", str(port), *db_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # The SCP open to the modalities does not open the web application with it.
        env={**os.environ, "FRACTURE_TRIAGE_BIND_ADDRESS": "0.0.0.0"},
    )
    try:
        wait_for_port(port, timeout=60, proc=proc)
        assert listening_addresses(port) == ["127.0.0.1"]
        status, health = get(port, "/health")
        assert (status, health["status"], health["storage"]["status"]) == (200, "ok", "ok")
        assert get(port, "/api/v1/worklist")[0] == 401
        assert get(port, "/api/v1/worklist?include_patient=true")[0] == 401

        status, body = get(port, "/api/v1/worklist", token)
        assert status == 200
        assert [s["study_instance_uid"] for s in body["studies"]] == [STUDY_A, STUDY_C, STUDY_B]
        assert PATIENT_NAME not in json.dumps(body)
        _, with_patient = get(port, "/api/v1/worklist?include_patient=true", token)
        assert with_patient["studies"][0]["patient_name"] == PATIENT_NAME
        status, results = get(port, f"/api/v1/results?study={STUDY_B}", token)
        assert [r["study_instance_uid"] for r in results["results"]] == [STUDY_B]
        assert get(port, "/api/v1/nothing", token) == (404, {"error": "Not Found"})

        # A failed browser login shows up in `fracture-triage audit`.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            page = c.get("/login")
            c.post(
                "/login",
                data={"name": "mallory", "password": "guess", "csrf_token": form_token(page.text)},
                headers={"Cookie": f"ft_login_csrf={cookie_header(page, 'ft_login_csrf')}"},
            )
        trail = run_cli("audit", "--action", "login_failed", *db_args).stdout
        assert "mallory" in trail and "127.0.0.1" in trail

        assert run_cli("token", "revoke", "ris", *db_args).returncode == 0
        assert get(port, "/api/v1/worklist", token)[0] == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        proc.stderr.close()
    assert f"web application on http://127.0.0.1:{port}/" in log
    assert "GET /api/v1/worklist" in log  # uvicorn's access log
    assert PATIENT_NAME not in log and "guess" not in log
