"""The ``fracture-triage`` command line.

``up`` runs the whole node on one machine; ``scp``, ``worker``, ``sweeper`` and ``api`` run
one role each (for scaling out, e.g. with docker compose); ``results`` prints what was stored;
``db upgrade`` applies the migrations; ``train``, ``evaluate`` and ``classify`` come from
``model.cli``. The ``Settings`` object is built once here, from the command line options and
``FRACTURE_TRIAGE_*`` variables, and handed to the role; role modules are imported only when
their command runs, so ``fracture-triage results`` does not pay for TensorFlow.

Every handler has one shape, :data:`Handler`. The database schema is brought up to date
here, once, before a node role starts (:data:`MIGRATING_COMMANDS`); the roles never migrate.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from fracture_triage import at_rest, logsafe
from fracture_triage.settings import Settings

log = logging.getLogger("fracture_triage.cli")

#: The shape of every subcommand handler: parsed arguments and settings in, exit status out.
Handler = Callable[[argparse.Namespace, Settings], int]

#: Commands that run a node role: the schema is migrated before they start (``up``'s
#: children are told it was done already).
MIGRATING_COMMANDS = (
    "up",
    "scp",
    "worker",
    "sweeper",
    "api",
    "purge",
    "resend",
    "user",
    "token",
    "audit",
    "calibrate",
)

#: Commands that ``model.cli.add_commands`` registers (imported only when one of them runs,
#: or for the full ``--help``).
MODEL_COMMANDS = ("train", "evaluate", "classify")

#: argparse destinations that map one-to-one onto ``Settings`` fields.
_SETTINGS_OPTIONS = (
    "data_dir",
    "database_url",
    "broker_url",
    "model_dir",
    "ae_title",
    "bind_address",
    "dicom_port",
    "http_port",
    "http_bind_address",
    "study_stable_seconds",
)


# --------------------------------------------------------------------------- parser


def _common(parser: argparse.ArgumentParser, *, broker: bool = True) -> None:
    """Options every node command accepts; unset ones fall back to the environment."""
    s = argparse.SUPPRESS
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=s,
        help="stored objects, SRs and the SQLite database (env FRACTURE_TRIAGE_DATA_DIR; ./data)",
    )
    parser.add_argument(
        "--database-url",
        default=s,
        help="SQLAlchemy URL (env FRACTURE_TRIAGE_DATABASE_URL; default SQLite in --data-dir)",
    )
    if broker:
        parser.add_argument(
            "--broker-url", default=s, help="Celery broker (env FRACTURE_TRIAGE_BROKER_URL)"
        )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def _dicom_options(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("--dicom-port", type=int, default=s, help="DICOM port (11112)")
    parser.add_argument("--ae-title", default=s, help="the node's AE title (FXTRIAGE)")
    parser.add_argument("--bind-address", default=s, help="address the SCP listens on (127.0.0.1)")


def _http_options(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument(
        "--http-port", type=int, default=s, help="port of the web application (8080)"
    )
    parser.add_argument(
        "--http-bind-address",
        default=s,
        help="address the web application listens on, apart from the SCP's (127.0.0.1; env "
        "FRACTURE_TRIAGE_HTTP_BIND_ADDRESS)",
    )


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="model artifact folder (env FRACTURE_TRIAGE_MODEL_DIR; default: the shipped model)",
    )


def build_parser(with_model_commands: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fracture-triage",
        description="DICOM node that triages radiographs for fractures.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = sub.add_parser(
        "up", help="everything on one machine: SQLite, embedded Redis, SCP, worker, sweeper"
    )
    _common(up, broker=False)
    _dicom_options(up)
    _model_option(up)
    _http_options(up)
    up.add_argument("--workers", type=int, default=1, help="Celery worker processes (1)")
    up.add_argument("--redis-port", type=int, default=None, help="embedded Redis port (free)")
    up.add_argument(
        "--study-stable-seconds",
        type=float,
        default=argparse.SUPPRESS,
        help="report a study after this many seconds without new images (10)",
    )
    up.set_defaults(handler=cmd_up)

    scp = sub.add_parser("scp", help="the DICOM storage SCP alone")
    _common(scp)
    _dicom_options(scp)
    scp.set_defaults(handler=cmd_scp)

    worker = sub.add_parser("worker", help="a Celery worker alone (classification and reports)")
    _common(worker)
    _model_option(worker)
    worker.add_argument(
        "--concurrency", type=int, default=1, help="worker processes in this worker (1)"
    )
    worker.set_defaults(handler=cmd_worker)

    sweeper = sub.add_parser(
        "sweeper", help="the sweeper alone: queues pending work, reports stable studies"
    )
    _common(sweeper)
    sweeper.add_argument(
        "--study-stable-seconds",
        type=float,
        default=argparse.SUPPRESS,
        help="report a study after this many seconds without new images (10)",
    )
    sweeper.set_defaults(handler=cmd_sweeper)

    api = sub.add_parser("api", help="the web application alone (worklist pages, JSON API)")
    _common(api, broker=False)
    _http_options(api)
    api.set_defaults(handler=cmd_api)

    echo = sub.add_parser(
        "echo", help="C-ECHO a node (default: this node's AE title and port): exit 0 if it answers"
    )
    _common(echo, broker=False)
    echo.add_argument("--host", default=None, help="default: the bind address, or 127.0.0.1")
    echo.add_argument("--dicom-port", type=int, default=argparse.SUPPRESS)
    echo.add_argument("--ae-title", default=argparse.SUPPRESS, help="called AE title")
    echo.add_argument("--calling-ae-title", default="FXECHO")
    echo.add_argument("--timeout", type=float, default=10.0)
    echo.add_argument(
        "--tls",
        action="store_true",
        help="over TLS to FRACTURE_TRIAGE_TLS_PORT, offering the node's certificate "
        "(the default when FRACTURE_TRIAGE_DICOM_PORT is 0)",
    )
    echo.set_defaults(handler=cmd_echo)

    results = sub.add_parser("results", help="print the stored results")
    _common(results, broker=False)
    results.add_argument("--json", action="store_true", help="one JSON object per line")
    results.add_argument("--study", metavar="STUDY_INSTANCE_UID", help="only this study")
    results.add_argument(
        "--include-patient",
        action="store_true",
        help="add patient id, name, birth date and accession number (off by default)",
    )
    results.set_defaults(handler=cmd_results)

    purge = sub.add_parser(
        "purge",
        help="delete stored objects and SRs past FRACTURE_TRIAGE_RETENTION_DAYS / "
        "_SR_RETENTION_DAYS (database rows stay, marked purged), and the records of refused "
        "C-STOREs past _REFUSAL_RETENTION_DAYS (30)",
    )
    _common(purge, broker=False)
    purge.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    purge.set_defaults(handler=cmd_purge)

    resend = sub.add_parser(
        "resend",
        help="put SR deliveries back to pending, due now: a study's (sent or not) or every "
        "one that gave up; the sweeper sends them",
    )
    _common(resend, broker=False)
    which = resend.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--study", metavar="STUDY_INSTANCE_UID", help="every delivery of this study's current SR"
    )
    which.add_argument("--failed", action="store_true", help="every delivery that gave up")
    resend.set_defaults(handler=cmd_resend)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    db_upgrade = db_sub.add_parser("upgrade", help="apply the migrations (creates the schema)")
    _common(db_upgrade, broker=False)
    db_upgrade.add_argument("--revision", default="head")
    db_upgrade.set_defaults(handler=cmd_db_upgrade)
    db_current = db_sub.add_parser("current", help="print the schema revision")
    _common(db_current, broker=False)
    db_current.set_defaults(handler=cmd_db_current)
    db_check = db_sub.add_parser(
        "check", help="exit 1 if the database schema differs from the models"
    )
    _common(db_check, broker=False)
    db_check.set_defaults(handler=cmd_db_check)

    from fracture_triage import cli_accounts

    cli_accounts.add_commands(sub, lambda p: _common(p, broker=False))

    if with_model_commands:
        _add_model_commands(sub)
    return parser


def _add_model_commands(sub: Any) -> None:
    try:
        from model.cli import add_commands
    except ImportError as exc:
        if exc.name not in ("model.cli", "model"):
            raise
        for name in MODEL_COMMANDS:
            p = sub.add_parser(name, help=f"{name} (model.cli is not available)")
            p.set_defaults(handler=_missing_model_cli)
        return
    add_commands(sub)  # its handlers take (args, settings) like the node's own


def _missing_model_cli(args: argparse.Namespace, settings: Settings) -> int:
    print(f"error: '{args.command}' needs model.cli, which is not installed", file=sys.stderr)
    return 2


def _wants_model_commands(argv: Sequence[str]) -> bool:
    """Import model.cli (and maybe TensorFlow) only for its commands or the top-level help."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return True
    return words[0] in MODEL_COMMANDS


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k) for k in _SETTINGS_OPTIONS if hasattr(args, k)}
    return Settings(**overrides)


def _setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Peer-supplied text (AE titles, UIDs) reaches log messages, pynetdicom's too: control
    # characters are escaped so no peer can forge or garble a log line.
    logsafe.install()
    # highdicom warns about single-component person names by quoting the name, and Celery
    # turns warnings into log lines: a patient name must never reach a log (forked pool
    # processes inherit this filter).
    warnings.filterwarnings(
        "ignore", message=r"The string .* is unlikely to represent the intended person name"
    )
    if level != "DEBUG":
        # Alembic narrates every plugin it loads at INFO; a migration that runs still says so.
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _migrate(settings: Settings) -> None:
    """Bring the schema up to date (under a lock) so a fresh database works; the one place a
    node command migrates. ``up`` migrates here and tells its children it did."""
    if os.environ.get("FRACTURE_TRIAGE_SKIP_MIGRATE") == "1":
        return
    _upgrade(settings)
    log.info("database schema is up to date")


def _upgrade(settings: Settings, revision: str = "head") -> str:
    """Apply the migrations up to ``revision`` (a SQLite file gets its folder); return the URL."""
    from db.migrations import upgrade

    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url, revision)
    return url


# --------------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from fracture_triage.up import UpOptions, run_up

    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    return run_up(settings, UpOptions(workers=args.workers, redis_port=args.redis_port))


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM (docker stop, ``up``'s shutdown) and Ctrl-C set ``stop``: the role finishes
    what it is doing, then returns."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_scp(args: argparse.Namespace, settings: Settings) -> int:
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    from dicom_node.scp import run_scp
    from worker.queue import CeleryEnqueuer

    # run_scp turns SIGTERM into an orderly stop itself (in-flight C-STOREs finish first).
    enqueuer = CeleryEnqueuer(settings)
    try:
        run_scp(settings, enqueuer)
    except KeyboardInterrupt:
        log.info("SCP stopped")
    finally:
        enqueuer.close()
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.celery_app import run_worker

    # Celery installs its own SIGTERM/SIGINT handlers: warm shutdown, the task in hand finishes.
    return run_worker(settings, concurrency=args.concurrency, loglevel=args.log_level)


def _run_until_signal(settings: Settings, run: Callable[[Settings, threading.Event], None]) -> int:
    """``run(settings, stop)`` until SIGINT/SIGTERM sets ``stop``."""
    stop = threading.Event()
    _stop_on_signals(stop)
    run(settings, stop)
    return 0


def cmd_sweeper(args: argparse.Namespace, settings: Settings) -> int:
    from worker.sweeper import run_sweeper

    return _run_until_signal(settings, run_sweeper)


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from api.server import run_api

    return _run_until_signal(settings, run_api)


def cmd_echo(args: argparse.Namespace, settings: Settings) -> int:
    """Verification (PS3.4 Annex A): the health check of the SCP container, and a quick test."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    host = args.host or (
        "127.0.0.1" if settings.bind_address in ("0.0.0.0", "::", "") else settings.bind_address
    )
    ae = AE(ae_title=args.calling_ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    port, tls_args = settings.dicom_port, None
    if args.tls or settings.dicom_port == 0:
        if not settings.tls_enabled:
            print("error: --tls needs FRACTURE_TRIAGE_TLS_CERT and _KEY", file=sys.stderr)
            return 2
        import ssl

        from fracture_triage.tls_context import client_context

        # A liveness check of this node: its own certificate is offered (trusted by
        # FRACTURE_TRIAGE_TLS_CA when that is set); the server's is not verified.
        context = client_context(None, settings.tls_cert, settings.tls_key)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        port, tls_args = settings.tls_port, (context, host)
    assoc = ae.associate(host, port, ae_title=settings.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        print(f"no association with {settings.ae_title}@{host}:{port}")
        return 1
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    # 0x0000 Success is the only answer a Verification SCP gives when it works.
    if status is not None and int(status.get("Status", -1)) == 0x0000:
        print(f"{settings.ae_title}@{host}:{port} answered C-ECHO: Success")
        return 0
    print(f"{settings.ae_title}@{host}:{port}: C-ECHO failed ({status!r})")
    return 1


def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.resolved_database_url
    if not settings.database_url:
        db_file = settings.data_dir / "triage.db"
        if not db_file.is_file():
            print(
                f"error: no database at {db_file.resolve()} (wrong --data-dir, or the node "
                "never ran there)",
                file=sys.stderr,
            )
            return 1
    from db.session import make_engine, make_session_factory
    from fracture_triage.results import collect_results, write_json_lines, write_table

    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            rows = collect_results(
                session, study_instance_uid=args.study, include_patient=args.include_patient
            )
    finally:
        engine.dispose()
    if args.json:
        write_json_lines(rows, sys.stdout)
    else:
        write_table(rows, sys.stdout)
    return 0


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    """Retention (``fracture_triage.retention``): run daily from cron or a timer."""
    from db.session import make_engine, make_session_factory
    from fracture_triage.retention import purge, retention_configured

    engine = make_engine(settings.resolved_database_url)
    try:
        done = purge(make_session_factory(engine), settings, dry_run=args.dry_run)
    finally:
        engine.dispose()
    if retention_configured(settings):
        print(done.summary())
    else:  # the refusal records have their own retention, always on
        print(
            "file retention is off (FRACTURE_TRIAGE_RETENTION_DAYS and _SR_RETENTION_DAYS "
            f"unset): no file is deleted; {done.refusals_summary()}"
        )
    return 0


def cmd_resend(args: argparse.Namespace, settings: Settings) -> int:
    """``db.deliveries.resend``; prints what was put back (UIDs and destinations only)."""
    from db.deliveries import resend
    from db.session import make_engine, make_session_factory

    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            requeued = resend(session, study_instance_uid=args.study, gave_up=args.failed)
            session.commit()
    finally:
        engine.dispose()
    if requeued is None:
        print(f"error: no study with Study Instance UID {args.study}", file=sys.stderr)
        return 1
    configured = {d.name for d in settings.all_destinations}
    for r in requeued:
        note = "" if r.destination in configured else " (destination not configured: waits)"
        print(
            f"requeued study {r.study_instance_uid} SR {r.sr_sop_instance_uid} to "
            f"{r.destination} (was {r.was.value}){note}"
        )
    if not requeued:
        print(
            "nothing to requeue: no delivery gave up"
            if args.failed
            else f"nothing to requeue: study {args.study} has no SR delivery yet"
        )
    else:
        print(f"{len(requeued)} delivery(ies) due now: the sweeper queues them")
    return 0


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from db.migrations import current_revision
    from fracture_triage.up import mask_url

    url = _upgrade(settings, args.revision)
    print(f"{mask_url(url)} is at revision {current_revision(url)}")
    return 0


def cmd_db_current(args: argparse.Namespace, settings: Settings) -> int:
    from db.migrations import current_revision

    print(current_revision(settings.resolved_database_url) or "(empty: no revision)")
    return 0


def cmd_db_check(args: argparse.Namespace, settings: Settings) -> int:
    from db.migrations import schema_differences

    diffs = schema_differences(settings.resolved_database_url)
    for diff in diffs:
        print(diff)
    if diffs:
        print("the database schema differs from db/models.py: run `fracture-triage db upgrade`")
        return 1
    print("the database schema matches db/models.py")
    return 0


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_model_commands=_wants_model_commands(argv))
    args = parser.parse_args(argv)
    role = args.command if args.command != "db" else "db"
    _setup_logging(getattr(args, "log_level", "INFO"), role)
    try:
        settings = settings_from_args(args)
        if args.command in ("up", "scp"):
            from dicom_node.peers import policy

            policy(settings)  # a malformed FRACTURE_TRIAGE_ALLOWED_PEERS entry is named here
    except Exception as exc:  # noqa: BLE001 - a bad setting is a usage error, not a crash
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    # Before anything is created: the database, its journal, folders and logs are private.
    at_rest.set_umask()
    try:
        on_sqlite = settings.resolved_database_url.startswith("sqlite")
        if args.command in MIGRATING_COMMANDS or (args.command == "db" and on_sqlite):
            at_rest.protect(settings.data_dir)
        if args.command in MIGRATING_COMMANDS:
            _migrate(settings)
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `fracture-triage results --json | head`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
