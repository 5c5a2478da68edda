"""Results that always arrive: several destinations, each with its own backoff, "gave up"
and ``fracture-triage resend``; the HL7 ORU^R01 to a RIS over MLLP.

Real parts: two Orthanc PACS (one stopped, then started again), the ``fracture-triage``
command line, and an MLLP listener started by the test that answers like a RIS. The tests
that record deliveries run on SQLite and on PostgreSQL (``database_url``): the claim, the
backoff times, the sweeper's due query and the correction order are SQL, and PostgreSQL
answers with time-zone-aware datetimes where SQLite gives naive ones.
"""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import hl7
import pytest
from hl7.client import CR, EB, SB
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.deliveries import CLAIM_LEASE, claim, due_deliveries, resend
from db.migrations import upgrade
from db.models import Delivery, DeliveryState, SRDocument, Study
from db.repository import as_utc, utcnow
from db.session import make_engine, make_session_factory
from fracture_triage.results import collect_results, write_table
from fracture_triage.settings import Destination, Settings
from tests.conftest import require
from tests.databases import migrated
from tests.servers import OrthancServer, free_port, orthanc_server
from tests.test_cli_results import cli
from tests.test_sr import RG3, classify, receive, report, study_id_of
from tests.test_sr_send import orthanc_instance
from tests.webapp import ADMIN_PASSWORD, login, serve
from worker import hl7 as ris
from worker.delivery import deliver
from worker.tasks import WorkerState
from worker.tasks import deliver as deliver_task

ACCESSION = "ACC|77^X"  # HL7 delimiters inside: must arrive escaped and come back whole


#: The PostgreSQL server's time zone in these tests: a hospital's server keeps local time
#: (initdb takes the system's), and +13:45 cannot pass for UTC by accident.
SERVER_TIME_ZONE = "Pacific/Chatham"


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """The node's database, migrated (revision 0009 made `deliveries`), on SQLite and on
    PostgreSQL (``database_url``'s parameters), the latter in :data:`SERVER_TIME_ZONE`."""
    if database_url.startswith("postgresql"):
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        name = make_url(database_url).database
        admin = create_engine(database_url)
        with admin.begin() as conn:
            conn.execute(text(f"ALTER DATABASE \"{name}\" SET timezone TO '{SERVER_TIME_ZONE}'"))
        admin.dispose()
    migrated(database_url)
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


def _patient_id(samples: Path) -> str:
    """The Patient ID the sample (and so the study) carries."""
    import pydicom

    return str(pydicom.dcmread(require(samples / RG3), stop_before_pixels=True).PatientID)


def _reported_study(
    sessions: sessionmaker[Session], settings: Settings, samples: Path, probability: float
) -> SRDocument:
    instance = receive(sessions, require(samples / RG3))
    study_id = study_id_of(sessions, instance)
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        study.accession_number = ACCESSION
        session.commit()
    classify(sessions, instance, probability)
    return report(sessions, settings, study_id)


def _delivery(sessions: sessionmaker[Session], doc: SRDocument, name: str) -> Delivery:
    with sessions() as session:
        row = session.scalars(
            select(Delivery).where(Delivery.sr_document_id == doc.id, Delivery.destination == name)
        ).one()
        session.expunge(row)
        return row


def _run_cli(tmp_path: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FRACTURE_TRIAGE_DATA_DIR": str(tmp_path),
        "FRACTURE_TRIAGE_DATABASE_URL": database_url,
    }
    return subprocess.run(
        [*cli(), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def two_pacs(tmp_path: Path) -> Iterator[tuple[OrthancServer, OrthancServer]]:
    with (
        orthanc_server(tmp_path / "orthanc-a") as a,
        orthanc_server(tmp_path / "orthanc-b") as b,
    ):
        yield a, b


@pytest.mark.slow  # two Orthanc servers
def test_one_pacs_down_retries_gives_up_and_resend_delivers_it_when_back(
    tmp_path: Path,
    dicom_samples: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    two_pacs: tuple[OrthancServer, OrthancServer],
) -> None:
    up, down = two_pacs
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,  # the worker's own sessions (WorkerState) open it
        destinations=[
            Destination(
                name="pacs-a",
                kind="dicom",
                host="127.0.0.1",
                port=up.dicom_port,
                ae_title=up.ae_title,
            ),
            Destination(
                name="pacs-b",
                kind="dicom",
                host="127.0.0.1",
                port=down.dicom_port,
                ae_title=down.ae_title,
            ),
        ],
        delivery_max_attempts=2,
    )
    down.stop()
    doc = _reported_study(sessions, settings, dicom_samples, 0.9)
    a, b = _delivery(sessions, doc, "pacs-a"), _delivery(sessions, doc, "pacs-b")
    assert (a.state, b.state) == (DeliveryState.pending, DeliveryState.pending)

    # The worker's task body, from the queue message (ids only).
    state = WorkerState(settings)
    message = {"schema_version": 2, "delivery_id": a.id}
    assert deliver_task(state, message) == "sent"
    assert orthanc_instance(up, doc.sop_instance_uid) is not None
    assert deliver_task(state, message) == "exists"  # a redelivered message: nothing sent

    before = utcnow()
    with sessions() as session:
        assert deliver(session, settings, b.id) == "retry"
    b = _delivery(sessions, doc, "pacs-b")
    assert (b.state, b.attempts) == (DeliveryState.pending, 1)
    assert b.last_error and "not established" in b.last_error
    assert b.next_attempt_at is not None
    wait = as_utc(b.next_attempt_at) - before
    assert timedelta(seconds=29) <= wait <= timedelta(seconds=32)  # the first backoff: 30 s
    # Shown in UTC whatever the database server's time zone (the pages print the first 19
    # characters under "UTC"): results, the API and the study page read delivery_dict.
    with sessions() as session:
        (shown_b,) = [
            d for d in collect_results(session)[0]["deliveries"] if d["destination"] == "pacs-b"
        ]
    assert shown_b["next_attempt_at"].endswith("+00:00")
    assert datetime.fromisoformat(shown_b["next_attempt_at"]) == as_utc(b.next_attempt_at)
    with sessions() as session:
        assert deliver(session, settings, b.id) == "not due"  # the sweeper's early message
        # The SR is not delivered while one destination waits: retention keeps its images.
        row = session.get(SRDocument, doc.id)
        assert row is not None and row.send_status == "pending"

    with sessions() as session:  # the second (last allowed) attempt, as if 30 s later
        assert deliver(session, settings, b.id, force=True) == "gave up"
        row = session.get(SRDocument, doc.id)
        assert row is not None and row.send_status == "failed"
        assert row.send_error and row.send_error.startswith("pacs-b: ")
    b = _delivery(sessions, doc, "pacs-b")
    assert (b.state, b.attempts, b.next_attempt_at) == (DeliveryState.gave_up, 2, None)

    # Results say so, per destination, and loudly in the table.
    with sessions() as session:
        rows = collect_results(session)
    states = {d["destination"]: d["state"] for d in rows[0]["deliveries"]}
    assert states == {"pacs-a": "sent", "pacs-b": "gave up"}
    import io

    table = io.StringIO()
    write_table(rows, table)
    assert "pacs-a:sent pacs-b:GAVE-UP(2)" in table.getvalue()
    assert "1 deliveries GAVE UP" in table.getvalue()
    shown = _run_cli(tmp_path, database_url, "results", "--json")
    assert shown.returncode == 0, shown.stderr
    assert '"state": "gave up"' in shown.stdout and _patient_id(dicom_samples) not in shown.stdout

    # resend: an unknown study is an error; --failed puts back only what gave up.
    unknown = _run_cli(tmp_path, database_url, "resend", "--study", "1.2.3.4.999")
    assert unknown.returncode == 1 and "no study with Study Instance UID 1.2.3.4.999" in (
        unknown.stderr
    )
    requeued = _run_cli(tmp_path, database_url, "resend", "--failed")
    assert requeued.returncode == 0, requeued.stderr
    assert f"SR {doc.sop_instance_uid} to pacs-b (was gave up)" in requeued.stdout
    assert "pacs-a" not in requeued.stdout
    b = _delivery(sessions, doc, "pacs-b")
    assert (b.state, b.attempts) == (DeliveryState.pending, 0)
    assert b.next_attempt_at is not None and as_utc(b.next_attempt_at) <= utcnow()

    down.start()  # the PACS is back (same ports)
    with sessions() as session:
        assert deliver(session, settings, b.id) == "sent"  # due now, no force needed
        row = session.get(SRDocument, doc.id)
        assert row is not None and row.send_status == "sent" and row.sent_at is not None
    assert orthanc_instance(down, doc.sop_instance_uid) is not None
    assert _run_cli(tmp_path, database_url, "resend", "--failed").stdout.startswith(
        "nothing to requeue"
    )

    # --study sends a study's current SR again everywhere (say, after a PACS lost it).
    study_uid = rows[0]["study_instance_uid"]
    again = _run_cli(tmp_path, database_url, "resend", "--study", study_uid)
    assert again.returncode == 0, again.stderr
    assert "pacs-a (was sent)" in again.stdout and "pacs-b (was sent)" in again.stdout


# --------------------------------------------------------------------------- HL7 to the RIS


class _Ris(socketserver.ThreadingTCPServer):
    """An MLLP listener answering every message with ``MSA|<code>|<control id>|<text>``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, code: str, text: str = "") -> None:
        super().__init__(("127.0.0.1", free_port()), _RisHandler)
        self.code, self.text = code, text
        self.received: list[str] = []


class _RisHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _Ris)
        data = b""
        while EB + CR not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        text = data[data.index(SB) + 1 : data.index(EB)].decode("utf-8")
        server.received.append(text)
        control_id = str(hl7.parse(text).segment("MSH")[10])
        ack = (
            f"MSH|^~\\&|RIS||FXTRIAGE||20261202120000||ACK^R01^ACK|A{control_id}|P|2.5.1\r"
            f"MSA|{server.code}|{control_id}|{server.text}\r"
        )
        self.request.sendall(SB + ack.encode("utf-8") + EB + CR)


@contextmanager
def ris_listener(code: str, text: str = "") -> Iterator[_Ris]:
    server = _Ris(code, text)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _hl7_settings(tmp_path: Path, port: int) -> Settings:
    return Settings(
        data_dir=tmp_path,
        destinations=[Destination(name="ris", kind="hl7", host="127.0.0.1", port=port)],
        delivery_max_attempts=2,
    )


@pytest.mark.slow  # an MLLP server on loopback
def test_the_ris_receives_an_oru_it_can_sort_by_priority(
    tmp_path: Path, dicom_samples: Path, sessions: sessionmaker[Session]
) -> None:
    with ris_listener("AA") as server:
        settings = _hl7_settings(tmp_path, server.server_address[1])
        doc = _reported_study(sessions, settings, dicom_samples, 0.99)
        row = _delivery(sessions, doc, "ris")
        assert row.kind == "hl7" and row.message_control_id
        with sessions() as session:
            assert deliver(session, settings, row.id) == "sent"
            assert deliver(session, settings, row.id) == "exists"  # once per report
        assert len(server.received) == 1
    row = _delivery(sessions, doc, "ris")
    assert (row.state, row.attempts, row.last_error) == (DeliveryState.sent, 1, None)

    message = hl7.parse(server.received[0])
    msh, pid, obr = message.segment("MSH"), message.segment("PID"), message.segment("OBR")
    assert str(msh[9]) == "ORU^R01^ORU_R01" and str(msh[12]) == "2.5.1"
    assert str(msh[10]) == row.message_control_id
    assert str(pid[3]) == _patient_id(dicom_samples)
    # the accession number: filler order number and placer field 1, delimiters escaped
    assert "ACC\\F\\77\\S\\X" in server.received[0]
    assert message.unescape(str(obr[3])) == ACCESSION
    assert message.unescape(str(obr[18])) == ACCESSION
    assert doc.decision == "fracture"
    assert str(obr[5]) == "S"  # stat: HL7 table 0027
    assert str(obr[27][0][5]) == "S"  # OBR-27 quantity/timing, component 6: priority
    assert str(obr[25]) == "F"
    obx = {str(s[3][0][0]): s for s in message.segments("OBX")}
    assert str(obx["DECISION"][2]) == "CE" and str(obx["DECISION"][5][0][0]) == "FRACTURE"
    assert str(obx["PROBABILITY"][2]) == "NM"
    assert float(str(obx["PROBABILITY"][5])) == pytest.approx(0.99, abs=1e-4)
    assert str(obx["SRUID"][5]) == doc.sop_instance_uid


@pytest.mark.slow  # an MLLP server on loopback
def test_a_refusing_ris_is_retried_with_its_text_then_gives_up(
    tmp_path: Path,
    dicom_samples: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with ris_listener("AE", "unknown order \\F\\ check accession") as server:
        settings = _hl7_settings(tmp_path, server.server_address[1])
        doc = _reported_study(sessions, settings, dicom_samples, 0.1)
        row = _delivery(sessions, doc, "ris")
        with sessions() as session:
            assert deliver(session, settings, row.id) == "retry"
        row = _delivery(sessions, doc, "ris")
        assert (row.state, row.attempts) == (DeliveryState.pending, 1)
        assert row.last_error == "ACK AE: unknown order | check accession"
        with sessions() as session:
            assert deliver(session, settings, row.id, force=True) == "gave up"
    row = _delivery(sessions, doc, "ris")
    assert row.state == DeliveryState.gave_up
    # the same message (same control id) both times, so the RIS can tell the repeat
    ids = {str(hl7.parse(m).segment("MSH")[10]) for m in server.received}
    assert ids == {row.message_control_id}
    assert str(hl7.parse(server.received[0]).segment("OBR")[5]) == "R"  # no fracture: routine
    # never a patient identifier in the log; the control id is there
    assert _patient_id(dicom_samples) not in caplog.text and "ACC" not in caplog.text
    assert str(row.message_control_id) in caplog.text
    assert "ACK AE" in caplog.text and "check accession" not in caplog.text  # the RIS's words

    # What an administrator sees: the admin page, the API's study detail, the study page.
    with sessions() as session:
        study_uid = session.scalars(select(Study.study_instance_uid)).one()
    with serve(database_url, tmp_path) as app:
        admin, _ = login(app, "boss", ADMIN_PASSWORD)
        with closing(admin):
            page = admin.get("/admin").text
            gave_up = page.split('id="gave-up"')[1].split("</table>")[0]
            assert study_uid in gave_up and doc.sop_instance_uid in gave_up
            assert "ris" in gave_up and "unknown order | check accession" in gave_up
            counts = page.split('id="deliveries"')[1].split("</table>")[0]
            assert '<tr class="gave-up"><td>ris</td><td>0</td><td>0</td><td>1</td>' in counts
            study_page = admin.get(f"/studies/{study_uid}").text
            assert '<li class="gave-up">ris (hl7): gave up after 2 attempt(s)' in study_page
        with closing(app.api()) as api:
            detail = api.get(f"/api/v1/studies/{study_uid}").json()
        (delivery,) = detail["reports"][0]["deliveries"]
        assert (delivery["destination"], delivery["state"], delivery["attempts"]) == (
            "ris",
            "gave up",
            2,
        )
        assert delivery["message_control_id"] == row.message_control_id


def test_ack_codes() -> None:
    msh = "MSH|^~\\&|RIS||FX||20261202||ACK|1|P|2.5.1\r"
    assert ris.ack_error(msh + "MSA|AA|X1\r", "X1") is None
    assert ris.ack_error(msh + "MSA|CA|X1\r", "X1") is None
    assert ris.ack_error(msh + "MSA|AR|X1|no such patient\r", "X1") == "ACK AR: no such patient"
    assert ris.ack_error(msh + "MSA|CR|X1\r", "X1") == "ACK CR"
    assert "names message 'X2'" in (ris.ack_error(msh + "MSA|AA|X2\r", "X1") or "")
    assert "not an HL7 ACK" in (ris.ack_error("garbage", "X1") or "")


def test_nothing_listening_is_an_error_not_a_hang(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(ris.MllpError, match=f"127.0.0.1:{port}"):
        ris.send_mllp("127.0.0.1", port, "MSH|^~\\&|X\r", timeout=2)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:  # accepts the connection (the backlog), never answers
        with pytest.raises(ris.MllpError, match="no ACK"):
            ris.send_mllp("127.0.0.1", silent.getsockname()[1], "MSH|^~\\&|X\r", timeout=1)
    finally:
        silent.close()


def test_srs_sent_before_revision_0009_keep_their_state_as_deliveries(database_url: str) -> None:
    """An upgraded node shows the old single destination's history, and `resend --failed`
    can put back an SR that failed before the upgrade."""
    from sqlalchemy import create_engine, text

    url = database_url
    upgrade(url, "0008")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO studies (id, study_instance_uid, last_received_at, revision) "
                "VALUES (1, '1.2.3', '2026-01-01 00:00:00', 1)"
            )
        )
        for i, status in enumerate(["pending", "sent", "failed", "none"], start=1):
            conn.execute(
                text(
                    "INSERT INTO sr_documents (id, study_id, study_revision, sop_instance_uid,"
                    " series_instance_uid, path, created_at, fracture, instance_count,"
                    " send_status, send_attempts, send_error) VALUES (:i, 1, :i, :uid, '1.9',"
                    " 'x.dcm', '2026-01-01 00:00:00', false, 1, :s, 5, :e)"
                ),
                {"i": i, "uid": f"1.2.3.{i}", "s": status, "e": "refused" if i == 3 else None},
            )
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with sessions() as session:
        rows = session.scalars(select(Delivery).order_by(Delivery.sr_document_id)).all()
        got = [(r.sr_document_id, r.destination, r.state, r.attempts, r.last_error) for r in rows]
        assert got == [
            (1, "sr_destination", DeliveryState.pending, 5, None),
            (2, "sr_destination", DeliveryState.sent, 5, None),
            (3, "sr_destination", DeliveryState.gave_up, 5, "refused"),
        ]
        requeued = resend(session, gave_up=True)
        assert requeued is not None and [r.sr_sop_instance_uid for r in requeued] == ["1.2.3.3"]
    engine.dispose()


@pytest.mark.slow  # Redis, a Celery worker, Orthanc and an MLLP listener
def test_the_whole_node_delivers_each_report_to_a_pacs_and_a_ris(
    tmp_path: Path, dicom_samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Received, classified and reported by the real worker; the report task queues one
    delivery per destination; the SR lands in Orthanc and the ORU at the RIS."""
    import json

    from model.artifact import resolve_model_dir
    from tests.test_worker import celery_worker, redis_node, scp_store, sweeper_thread, wait_until

    study = "1.2.826.0.1.3680043.10.1.78"
    with orthanc_server(tmp_path / "orthanc") as pacs, ris_listener("AA") as ris_server:
        destinations = [
            Destination(
                name="pacs",
                kind="dicom",
                host="127.0.0.1",
                port=pacs.dicom_port,
                ae_title=pacs.ae_title,
            ),
            Destination(
                name="ris", kind="hl7", host="127.0.0.1", port=ris_server.server_address[1]
            ),
        ]
        # the worker process reads its destinations from the environment, like everything
        monkeypatch.setenv(
            "FRACTURE_TRIAGE_DESTINATIONS",
            json.dumps([d.model_dump(mode="json") for d in destinations]),
        )
        database_url = f"sqlite:///{tmp_path / 'node.db'}"
        with redis_node(
            tmp_path,
            database_url,
            resolve_model_dir(None),
            study_stable_seconds=1.0,
            destinations=destinations,
        ) as (settings, node_sessions, enqueuer):
            assert scp_store(node_sessions, enqueuer, require(dicom_samples / RG3), study)
            with celery_worker(settings, tmp_path / "worker.log"), sweeper_thread(settings):

                def delivered() -> bool:
                    with node_sessions() as session:
                        states = session.scalars(select(Delivery.state)).all()
                    return len(states) == 2 and set(states) == {DeliveryState.sent}

                wait_until(delivered, 150, "the report delivered to the PACS and the RIS")
            with node_sessions() as session:
                doc = session.scalars(select(SRDocument)).one()
                assert doc.send_status == "sent"
        assert orthanc_instance(pacs, doc.sop_instance_uid) is not None
        (message,) = ris_server.received
        obx = {str(s[3][0][0]): s for s in hl7.parse(message).segments("OBX")}
        assert str(obx["SRUID"][5]) == doc.sop_instance_uid


@pytest.mark.slow  # an MLLP server on loopback
def test_a_newer_report_is_a_correction_and_an_older_one_never_follows_it(
    tmp_path: Path, dicom_samples: Path, sessions: sessionmaker[Session]
) -> None:
    from tests.test_sr import RG3_J2K, RG3_JLS

    with ris_listener("AA") as server:
        settings = _hl7_settings(tmp_path, server.server_address[1])
        first = _reported_study(sessions, settings, dicom_samples, 0.1)
        with sessions() as session:
            assert deliver(session, settings, _delivery(sessions, first, "ris").id) == "sent"
        study_id = first.study_id
        # A second image: a new report, which the RIS gets as a correction (C) ...
        second_image = receive(sessions, require(dicom_samples / RG3_JLS))
        classify(sessions, second_image, 0.95)
        second = report(sessions, settings, study_id)
        # ... and a third, reported before the second could be delivered (RIS down).
        third_image = receive(sessions, require(dicom_samples / RG3_J2K))
        classify(sessions, third_image, 0.2)
        third = report(sessions, settings, study_id)
        with sessions() as session:
            assert deliver(session, settings, _delivery(sessions, third, "ris").id) == "sent"
            # the older, superseded one is not sent after the newer one
            assert deliver(session, settings, _delivery(sessions, second, "ris").id) == "superseded"
        assert len(server.received) == 2
    statuses = [str(hl7.parse(m).segment("OBR")[25]) for m in server.received]
    assert statuses == ["F", "C"]
    uids = [str(hl7.parse(m).segments("OBX")[2][5]) for m in server.received]
    assert uids == [first.sop_instance_uid, third.sop_instance_uid]
    skipped = _delivery(sessions, second, "ris")
    assert skipped.state == DeliveryState.gave_up and "superseded" in (skipped.last_error or "")


@pytest.mark.slow  # Redis
def test_the_sweeper_queues_only_what_is_due_to_a_configured_destination(
    tmp_path: Path, dicom_samples: Path, sessions: sessionmaker[Session]
) -> None:
    from tests.servers import RedisServer
    from worker.queue import CeleryEnqueuer
    from worker.sweeper import Sweeper

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    settings = Settings(
        data_dir=tmp_path,
        broker_url=redis.url,
        destinations=[
            Destination(
                name="pacs", kind="dicom", host="127.0.0.1", port=free_port(), ae_title="PACS"
            ),
            Destination(name="ris", kind="hl7", host="127.0.0.1", port=free_port()),
        ],
    )
    enqueuer = CeleryEnqueuer(settings)
    try:
        doc = _reported_study(sessions, settings, dicom_samples, 0.5)
        with sessions() as session:  # the RIS is down: its delivery waits 30 s
            assert deliver(session, settings, _delivery(sessions, doc, "ris").id) == "retry"
        sweeper = Sweeper(settings, sessions, enqueuer)
        assert sweeper.sweep_once().sends == 1  # the PACS delivery only
        assert sweeper.sweep_once().sends == 0  # queued recently: not again
        # A destination no longer configured is left alone (resend shows it waiting).
        only_ris = settings.model_copy(update={"destinations": settings.destinations[1:]})
        assert Sweeper(only_ris, sessions, enqueuer).sweep_once().sends == 0
        assert enqueuer.queue_length() == 1
    finally:
        enqueuer.close()
        redis.stop()


def test_of_several_simultaneous_attempts_one_claims_the_delivery(
    tmp_path: Path, dicom_samples: Path, sessions: sessionmaker[Session]
) -> None:
    """The sweeper's message and the report task's (or two workers) reach one delivery at
    once: exactly one attempt is made. The claim is one conditional UPDATE; on PostgreSQL
    the losers wait for the winner's commit and then find the row no longer due."""
    from concurrent.futures import ThreadPoolExecutor

    settings = _hl7_settings(tmp_path, free_port())  # nothing is sent: claims only
    doc = _reported_study(sessions, settings, dicom_samples, 0.5)
    delivery_id = _delivery(sessions, doc, "ris").id
    attempts = 6
    start = threading.Barrier(attempts)

    def attempt(_: int) -> bool:
        with sessions() as session:
            start.wait(timeout=30)
            won = claim(session, delivery_id) is not None
            session.commit()
            return won

    with ThreadPoolExecutor(attempts) as pool:
        outcomes = list(pool.map(attempt, range(attempts)))
    assert outcomes.count(True) == 1
    row = _delivery(sessions, doc, "ris")
    assert row.state == DeliveryState.pending and row.next_attempt_at is not None
    lease_left = as_utc(row.next_attempt_at) - utcnow()
    assert CLAIM_LEASE - timedelta(minutes=1) < lease_left <= CLAIM_LEASE  # held, not due
    with sessions() as session:  # while the lease holds, the sweeper does not queue it
        assert due_deliveries(session, ["ris"]) == []
