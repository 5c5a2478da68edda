"""Worklist figures: ``python -m api.benchmark --database-url URL`` fills an empty database
with synthetic studies (default 30,000 studies, 100,000 instances, 90 % classified, no
patient data of anyone), serves the web application on loopback and prints the latency
of ``GET /api/v1/worklist`` (first page, and a filtered page) as JSON: p50, p95, max in ms.

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

BATCH = 5000


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
                        "threshold": 0.5,
                        "fracture": p >= 0.5,
                        "preprocess_ms": 1.0,
                        "inference_ms": 1.0,
                        "created_at": received + timedelta(seconds=2),
                    }
                )
        _bulk(s, Instance, inst_rows)
        _bulk(s, Result, result_rows)
        triage.rebuild_all(s)
        _, token = accounts.create_token(s, "bench", Role.radiologist)
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


def measure(url: str, token: str, requests: int) -> dict[str, Any]:
    import httpx
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
    figures: dict[str, Any] = {}
    cases = {
        "first_page": {},
        "filtered_page": {"flag": "fracture", "body_part": "WRIST", "reviewed": "false"},
        "page_100": {"page": "100"},
    }
    try:
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
                times.sort()
                figures[name] = {
                    "p50_ms": round(statistics.median(times), 1),
                    "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1),
                    "max_ms": round(times[-1], 1),
                    "total": r.json()["total"],
                }
    finally:
        server.should_exit = True
        thread.join(30)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.benchmark", description=__doc__)
    parser.add_argument("--database-url")
    parser.add_argument("--throwaway-postgres", action="store_true")
    parser.add_argument("--studies", type=int, default=30_000)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args(argv)

    def run(url: str) -> int:
        started = time.monotonic()
        token = populate(url, args.studies, args.instances)
        filled = time.monotonic() - started
        figures = measure(url, token, args.requests)
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
