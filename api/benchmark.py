"""Worklist figures: ``python -m api.benchmark --database-url URL`` fills an empty database
with synthetic studies (default 30,000 studies, 100,000 instances, 90 % classified, no
patient data of anyone), serves the web application on loopback and prints the latency
of ``GET /api/v1/worklist`` (first page, and a filtered page) as JSON: p50, p95, max in ms,
next to the issue's targets; then logs in with a headless Chromium (Debian's ``chromium`` and
``chromium-driver``, through Selenium) and times the worklist page fully rendered over
``--browser-loads`` loads (``--no-browser`` to skip).

The database must be empty (it is migrated here); use a throwaway PostgreSQL. From a source
checkout, ``--throwaway-postgres`` starts one with the test suite's helper.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from db import accounts, triage
from db.migrations import upgrade
from db.models import Base, Instance, InstanceStatus, Result, Role, Series, Study
from db.session import make_engine, make_session_factory
from fracture_triage.settings import Settings
from fracture_triage.verdict import decide

BATCH = 5000
#: The benchmark's radiologist account (a throwaway database only).
BENCH_USER, BENCH_PASSWORD = "bench-rad", "bench horse battery staple"
#: The issue's targets (ms): worklist API first page and filtered page p95, page rendered.
TARGETS_MS = {"first_page": 50.0, "filtered_page": 100.0, "browser_worklist": 1000.0}


def _bulk(session: Session, table: type[Base], rows: list[dict[str, Any]]) -> None:
    for k in range(0, len(rows), BATCH):
        session.execute(insert(table), rows[k : k + BATCH])


def populate(url: str, studies: int, instances: int, seed: int = 0) -> str:
    """Synthetic rows, in bulk; returns an API token."""
    rng = random.Random(seed)
    upgrade(url)
    engine = make_engine(url)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    body_parts = ["HAND", "WRIST", "ANKLE", "FOOT", "KNEE", "ELBOW", "SHOULDER", "HIP"]
    with make_session_factory(engine)() as s:
        study_rows, series_rows = [], []
        for i in range(1, studies + 1):
            when = start + timedelta(seconds=i * 60)
            study_rows.append(
                {
                    "id": i,
                    "study_instance_uid": f"2.25.{i}",
                    "study_date": when.strftime("%Y%m%d"),
                    "last_received_at": when,
                    "revision": 1,
                }
            )
            series_rows.append(
                {
                    "id": i,
                    "series_instance_uid": f"2.25.{i}.1",
                    "study_id": i,
                    "modality": rng.choice(["CR", "DX"]),
                    "body_part_examined": rng.choice(body_parts),
                }
            )
        _bulk(s, Study, study_rows)
        _bulk(s, Series, series_rows)
        inst_rows: list[dict[str, Any]] = []
        result_rows: list[dict[str, Any]] = []
        for n in range(1, instances + 1):
            study = 1 + (n - 1) % studies
            classified = rng.random() < 0.9
            status = InstanceStatus.done if classified else rng.choice(list(InstanceStatus))
            received = start + timedelta(seconds=study * 60 + n % 7)
            inst_rows.append(
                {
                    "id": n,
                    "sop_instance_uid": f"2.25.{study}.1.{n}",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
                    "series_id": study,
                    "received_at": received,
                    "storage_path": f"/nonexistent/{n}.dcm",
                    "status": status,
                    "attempts": 1,
                    "conflicting_resends": 0,
                }
            )
            if status is InstanceStatus.done:
                p = rng.betavariate(0.6, 2.0)
                result_rows.append(
                    {
                        "instance_id": n,
                        "model_name": "bench",
                        "model_version": "0",
                        "model_uid": "2.25.1",
                        "probability": p,
                        # One threshold (no doubt level), as when the figures were first
                        # measured: the filtered page selects the same share of studies.
                        "threshold": 0.5,
                        "upper_threshold": 0.5,
                        "fracture": p >= 0.5,
                        "decision": decide(p, 0.5),
                        "preprocess_ms": 1.0,
                        "inference_ms": 1.0,
                        "created_at": received + timedelta(seconds=2),
                    }
                )
        _bulk(s, Instance, inst_rows)
        _bulk(s, Result, result_rows)
        triage.rebuild_all(s)
        _, token = accounts.create_token(s, "bench", Role.radiologist)
        accounts.add_user(s, BENCH_USER, Role.radiologist, BENCH_PASSWORD)
        s.commit()
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
            # Ids were given explicitly: move the sequences past them.
            for table in ("studies", "series", "instances"):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
    engine.dispose()
    return token


def _spread(times: list[float]) -> dict[str, float]:
    """p50, p95 (nearest rank) and max of ``times`` (ms)."""
    times = sorted(times)
    return {
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1),
        "max_ms": round(times[-1], 1),
    }


def measure(url: str, token: str, requests: int, browser_loads: int = 10) -> dict[str, Any]:
    import uvicorn

    from api.server import make_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    settings = Settings(data_dir=Path(tempfile.mkdtemp()), database_url=url, http_port=port)
    server = make_server(settings)
    assert isinstance(server, uvicorn.Server)
    server.config.access_log = False
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        figures = _measure_api(port, token, requests)
        if browser_loads > 0:
            figures["browser_worklist"] = measure_browser(f"http://127.0.0.1:{port}", browser_loads)
    finally:
        server.should_exit = True
        thread.join(30)
    for name, target in TARGETS_MS.items():
        if name in figures:
            figures[name]["target_p95_ms"] = target
            figures[name]["meets_target"] = figures[name]["p95_ms"] <= target
    return figures


def _measure_api(port: int, token: str, requests: int) -> dict[str, Any]:
    import httpx

    figures: dict[str, Any] = {}
    cases = {
        "first_page": {},
        "filtered_page": {"flag": "fracture", "body_part": "WRIST", "reviewed": "false"},
        "page_100": {"page": "100"},
    }
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
    ) as client:
        for name, params in cases.items():
            client.get("/api/v1/worklist", params=params).raise_for_status()  # warm
            times = []
            for _ in range(requests):
                started = time.perf_counter()
                r = client.get("/api/v1/worklist", params=params)
                times.append((time.perf_counter() - started) * 1000)
                r.raise_for_status()
            figures[name] = {**_spread(times), "total": r.json()["total"]}
    return figures


#: Per load: when the navigation's load event ended and when the page first painted, ms
#: after the navigation started (Navigation Timing Level 2, Paint Timing), and the rows.
_TIMING_SCRIPT = """
const nav = performance.getEntriesByType("navigation")[0];
const paint = performance.getEntriesByName("first-contentful-paint")[0];
const rows = document.querySelectorAll("#worklist tr.study");
const shown = [...rows].filter((r) => r.getBoundingClientRect().height > 0).length;
return [nav.loadEventEnd, paint ? paint.startTime : null, rows.length, shown];
"""


def measure_browser(base_url: str, loads: int) -> dict[str, Any]:
    """Log in as :data:`BENCH_USER` in a headless Chromium, then load ``/worklist``
    ``loads`` times (after one warm-up load). A load is rendered when its load event has
    ended and its rows are painted: ``max(loadEventEnd, first-contentful-paint)`` from the
    browser's own timeline (the rows are in the HTML, so they paint with the first content);
    each load also waits until the rows are visible. ``wall`` adds WebDriver's round trips."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        return {"error": "Debian's chromium and chromium-driver are not installed"}
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,1000")
    profile = tempfile.mkdtemp(prefix="bench-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    rendered: list[float] = []
    wall: list[float] = []
    rows = 0
    try:
        wait = WebDriverWait(chrome, 30)
        chrome.get(f"{base_url}/login")
        chrome.find_element(By.ID, "name").send_keys(BENCH_USER)
        chrome.find_element(By.ID, "password").send_keys(BENCH_PASSWORD)
        chrome.find_element(By.ID, "login").click()
        wait.until(ec.url_to_be(f"{base_url}/worklist"))
        visible_row = (By.CSS_SELECTOR, "#worklist tr.study")
        for k in range(loads + 1):
            started = time.perf_counter()
            chrome.get(f"{base_url}/worklist")  # returns after the load event
            wait.until(ec.visibility_of_element_located(visible_row))
            elapsed = (time.perf_counter() - started) * 1000
            load_end, paint, rows, shown = chrome.execute_script(_TIMING_SCRIPT)
            if not rows or shown != rows:
                return {"error": f"worklist rows not all visible ({shown} of {rows})"}
            if k > 0:  # the first load warms the browser's cache of the CSS and script
                rendered.append(max(float(load_end), float(paint or 0.0)))
                wall.append(elapsed)
    finally:
        chrome.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return {**_spread(rendered), "loads": loads, "rows": rows, "wall": _spread(wall)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.benchmark", description=__doc__)
    parser.add_argument("--database-url")
    parser.add_argument("--throwaway-postgres", action="store_true")
    parser.add_argument("--studies", type=int, default=30_000)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--browser-loads", type=int, default=10)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args(argv)

    def run(url: str) -> int:
        started = time.monotonic()
        token = populate(url, args.studies, args.instances)
        filled = time.monotonic() - started
        loads = 0 if args.no_browser else args.browser_loads
        figures = measure(url, token, args.requests, loads)
        out = {
            "studies": args.studies,
            "instances": args.instances,
            "fill_s": round(filled, 1),
            "database": url.split(":", 1)[0],
            **figures,
        }
        print(json.dumps(out, indent=2))
        return 0

    if args.throwaway_postgres:
        from tests.servers import postgres_server

        with postgres_server() as url:
            return run(url)
    if not args.database_url:
        parser.error("--database-url or --throwaway-postgres")
    return run(args.database_url)


if __name__ == "__main__":
    sys.exit(main())
