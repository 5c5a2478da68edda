"""Read-only HTTP query API: results, a fracture-first worklist and a health check.

Standard library only (``http.server``), JSON out, bound to ``Settings.bind_address`` and
``Settings.http_port``. Endpoints:

- ``GET /health``: 200 ``{"status": "ok", "storage": {...}}`` when the database answers
  and the data directory is above its free-space watermark (``fracture_triage.disk``);
  503 with ``"status": "storage low"`` while C-STOREs are refused for space, or when the
  database does not answer.
- ``GET /results[?study=UID]``: what ``fracture-triage results --json`` prints, as a list.
- ``GET /worklist``: one entry per study in the order of :mod:`db.worklist` (fracture, then
  doubt, then no fracture, each by highest probability; unclassified last).

Patient identifiers are left out unless ``include_patient=1`` is given: the API has no
authentication, so it listens on loopback unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.worklist import worklist as worklist_order
from fracture_triage.attributes import PATIENT_IDENTIFIERS
from fracture_triage.disk import storage_health
from fracture_triage.results import collect_results
from fracture_triage.settings import Settings
from fracture_triage.verdict import study_verdict

log = logging.getLogger(__name__)


def worklist(rows: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Group result rows by study, in ``order`` (Study Instance UIDs in the order of
    :func:`db.worklist.worklist`, the one place studies are ranked)."""
    studies: dict[str, dict[str, Any]] = {}
    scores: dict[str, list[tuple[float | None, bool | None, str | None]]] = {}
    for row in rows:
        uid = row["study_instance_uid"]
        entry = studies.setdefault(
            uid,
            {
                "study_instance_uid": uid,
                "instances": 0,
                "classified": 0,
                "failed": 0,
                "waiting": 0,
                "fracture": None,
                "decision": None,
                "max_probability": None,
                "last_received_at": row["received_at"],
                "sr_path": row["sr_path"],
                "report_failure": row["report_failure"],
                **{k: row[k] for k in PATIENT_IDENTIFIERS if k in row},
            },
        )
        entry["instances"] += 1
        entry["last_received_at"] = max(entry["last_received_at"], row["received_at"])
        if row["status"] == "done":
            entry["classified"] += 1
            scores.setdefault(uid, []).append(
                (row["probability"], row["fracture"], row["decision"])
            )
        elif row["status"] == "failed":
            entry["failed"] += 1
        else:
            entry["waiting"] += 1
    for uid, entry in studies.items():
        verdict = study_verdict(scores.get(uid, []))
        entry["max_probability"] = verdict.probability
        # No classified image: no verdict either way (sorted last).
        entry["fracture"] = verdict.fracture if verdict.assessed else None
        entry["decision"] = None if verdict.decision is None else verdict.decision.value
        entry["reported"] = entry["sr_path"] is not None
    ranked = [uid for uid in order if uid in studies]
    # A study recorded between the two queries (PostgreSQL reads committed rows per
    # statement) is not dropped: it goes last, unranked until the next request.
    ranked += [uid for uid in studies if uid not in set(ranked)]
    return [studies[uid] for uid in ranked]


class _Handler(BaseHTTPRequestHandler):
    server: QueryServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # Paths carry Study Instance UIDs at most, never patient data.
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: Any) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # stdlib naming
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        include_patient = query.get("include_patient", ["0"])[0] in ("1", "true", "yes")
        try:
            if url.path == "/health":
                with self.server.sessions() as session:
                    session.execute(text("SELECT 1"))
                storage = storage_health(self.server.settings)
                if storage["status"] == "ok":
                    self._send(HTTPStatus.OK, {"status": "ok", "storage": storage})
                else:  # the SCP refuses C-STOREs (fracture_triage.disk)
                    body = {"status": f"storage {storage['status']}", "storage": storage}
                    self._send(HTTPStatus.SERVICE_UNAVAILABLE, body)
            elif url.path == "/results":
                study = query.get("study", [None])[0]
                with self.server.sessions() as session:
                    rows = collect_results(session, study, include_patient=include_patient)
                self._send(HTTPStatus.OK, rows)
            elif url.path == "/worklist":
                with self.server.sessions() as session:
                    rows = collect_results(session, include_patient=include_patient)
                    order = [e.study_instance_uid for e in worklist_order(session)]
                self._send(HTTPStatus.OK, worklist(rows, order))
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {url.path}"})
        except Exception:
            log.exception("request failed: %s", url.path)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "database unavailable"})

    def do_POST(self) -> None:  # stdlib naming
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "read-only API"})


class QueryServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], sessions: sessionmaker[Session], settings: Settings
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        super().__init__(address, _Handler)


def run_api(settings: Settings, stop_event: threading.Event) -> None:
    """Serve until ``stop_event`` is set (the ``fracture-triage api`` role)."""
    from db.session import make_engine, make_session_factory

    engine = make_engine(settings.resolved_database_url)
    server = QueryServer(
        (settings.bind_address, settings.http_port), make_session_factory(engine), settings
    )
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    log.info("query API on http://%s:%d/", settings.bind_address, settings.http_port)
    try:
        while not stop_event.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        engine.dispose()
        log.info("query API stopped")
