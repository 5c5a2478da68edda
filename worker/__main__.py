"""``python -m worker [worker|sweeper]``: run one role with settings from the environment.

The ``fracture-triage worker`` command is the supported entry; this one needs nothing but the
``FRACTURE_TRIAGE_*`` environment, which makes it handy for subprocesses (tests). It does not
migrate: the database must be at the current schema (``fracture-triage db upgrade``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from fracture_triage import logsafe
from fracture_triage.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("role", nargs="?", default="worker", choices=["worker", "sweeper"])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--hostname", default=None)
    args = parser.parse_args(argv)
    settings = Settings()
    if args.role == "worker":
        from worker.celery_app import run_worker

        run_worker(
            settings, concurrency=args.concurrency, loglevel=args.loglevel, hostname=args.hostname
        )
        return
    logging.basicConfig(
        level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logsafe.install()  # control characters escaped in every message (fracture_triage.logsafe)
    from worker.sweeper import run_sweeper

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_sweeper(settings, stop)


if __name__ == "__main__":
    main()
