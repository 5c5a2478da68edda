"""The Celery application, built from :class:`Settings` by a factory (never at import time).

Delivery guarantees come from the broker configuration here:

- ``task_acks_late``: a message is acknowledged only after its task returned, so a worker that
  dies mid-task leaves the message unacknowledged on the broker.
- ``task_reject_on_worker_lost``: when a pool child is killed (SIGKILL, OOM), the parent
  requeues its message at once instead of marking the task failed.
- ``worker_prefetch_multiplier=1``: a worker process holds one message at a time, so a killed
  worker strands at most one message per process and a backlog is shared fairly.
- Redis transport ``visibility_timeout`` / ``unacked_restore_interval`` /
  ``unacked_restore_throttle``: when the whole worker dies (machine crash, SIGKILL of the
  main process), kombu's Redis transport moves a message that has been unacknowledged for
  ``visibility_timeout`` seconds back to its queue; the scan runs every
  ``unacked_restore_interval * unacked_restore_throttle`` seconds in any live worker
  (kombu >= 5.7; its defaults are 3600 s and 10 x 10 s). With 20 s and 2 s x 1, a killed task
  is re-run at most ~22 s after it was delivered (measured: 21-25 s after a SIGKILL,
  including the new worker's start).

  The price: a task still running after ``visibility_timeout`` seconds is delivered a second
  time. Classification takes about a second (the first task of a process also loads the
  model, ~10 s), and every task is idempotent (one result per instance and model version),
  so a rare duplicate costs CPU, never a second result.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from celery import Celery

from fracture_triage.messages import QUEUE
from fracture_triage.settings import Settings

#: Seconds an unacknowledged message stays invisible before kombu restores it to the queue.
VISIBILITY_TIMEOUT_S = 20
#: Seconds between restore scans (with a throttle of 1, every timer tick scans).
UNACKED_RESTORE_INTERVAL_S = 2
UNACKED_RESTORE_THROTTLE = 1

#: Hard limit per task; a pool child stuck in a decoder is killed and the task fails.
TASK_TIME_LIMIT_S = 300
TASK_SOFT_TIME_LIMIT_S = 270


def celery_config(
    settings: Settings,
    *,
    visibility_timeout: float = VISIBILITY_TIMEOUT_S,
    restore_interval: float = UNACKED_RESTORE_INTERVAL_S,
) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (a plain dict, easy to inspect in tests)."""
    return {
        "broker_url": settings.broker_url,
        # Messages are JSON dicts built from fracture_triage.messages models; never pickle.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # Results live in the database, not in a Celery result backend.
        "result_backend": None,
        "task_ignore_result": True,
        "task_default_queue": QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # An exception inside a task is an answer (logged; the database says what happened):
        # the message is acknowledged, not redelivered forever.
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": TASK_TIME_LIMIT_S,
        "task_soft_time_limit": TASK_SOFT_TIME_LIMIT_S,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": restore_interval,
            "unacked_restore_throttle": UNACKED_RESTORE_THROTTLE,
            # Each restore scan holds a Redis mutex for milliseconds; if a worker is killed
            # while holding it, it must expire well within the 30 s re-run budget (default
            # 300 s would block every restore for five minutes).
            "unacked_mutex_expire": 5,
            # A broker that is down must fail a publish quickly (the SCP then leaves the
            # instance pending for the sweeper) rather than block a C-STORE.
            "socket_connect_timeout": 1,
            # A broker that vanished without closing TCP must not hang a publish forever.
            "socket_timeout": 10,
            "socket_keepalive": True,
            "health_check_interval": 10,
        },
        "broker_connection_timeout": 2,
        # Workers wait for the broker as long as it takes (start-up included).
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Let a running classification finish when the broker connection drops: its result
        # goes to the database; the redelivered message then finds the result and stops.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "broker_channel_error_retry": True,
    }


def make_celery(
    settings: Settings,
    *,
    visibility_timeout: float = VISIBILITY_TIMEOUT_S,
    restore_interval: float = UNACKED_RESTORE_INTERVAL_S,
    register_tasks: bool = True,
) -> Celery:
    """A configured Celery app with the node's tasks registered (``worker.tasks``).

    The enqueue side (SCP, sweeper) may pass ``register_tasks=False``: it only sends by name.
    """
    app = Celery("fracture_triage", set_as_current=False)
    app.conf.update(
        celery_config(
            settings, visibility_timeout=visibility_timeout, restore_interval=restore_interval
        )
    )
    if register_tasks:
        from worker.tasks import register_tasks as _register

        _register(app, settings)
    return app


def worker_options(
    concurrency: int = 1,
    loglevel: str = "INFO",
    hostname: str | None = None,
    pool: str = "prefork",
) -> dict[str, Any]:
    """Options for ``app.Worker``: our queue, no gossip/mingle/heartbeat chatter."""
    from celery.utils.nodenames import default_nodename

    return {
        "hostname": default_nodename(hostname),
        "concurrency": concurrency,
        "loglevel": loglevel,
        "queues": [QUEUE],
        "pool_cls": pool,
        "without_gossip": True,
        "without_mingle": True,
        "without_heartbeat": True,
    }


def quiet_third_party_logs() -> None:
    """Keep patient identifiers and per-attribute chatter out of the worker's log.

    highdicom warns about odd person names *quoting the name* (a patient identifier) and
    logs every module it copies at INFO. Set before the pool forks, so children inherit it.
    """
    warnings.filterwarnings("ignore", message=r".*unlikely to represent the intended person name")
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def run_worker(
    settings: Settings,
    concurrency: int = 1,
    loglevel: str = "INFO",
    *,
    hostname: str | None = None,
) -> int:
    """Run a Celery worker in this process until it is stopped (SIGTERM/SIGINT: warm shutdown);
    return its exit code.

    Must be called from the main thread (Celery installs signal handlers). The schema is the
    entry point's business (``fracture_triage.cli`` migrates once, before any role starts).
    ``app.Worker`` is started directly, not through ``app.worker_main``: Celery's click
    command line imports every subcommand (its interactive shell pulls in prompt_toolkit
    and pygments), ~20 MB that each pool child would inherit.
    """
    quiet_third_party_logs()
    if settings.worker_nice:
        # Classification is background work: ingestion goes first (``Settings.worker_nice``).
        # Inherited by the prefork pool's children, which do the inference.
        os.nice(settings.worker_nice)
    app = make_celery(settings)
    worker = app.Worker(**worker_options(concurrency, loglevel, hostname))
    worker.start()
    return int(worker.exitcode or 0)
