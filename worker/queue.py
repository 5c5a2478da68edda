"""The enqueue side of the queue, used by the SCP and the sweeper.

Every send fails fast when the broker is unreachable (:class:`EnqueueError` within a few
seconds): the SCP then leaves the instance ``pending`` in the database, answers the C-STORE,
and the sweeper queues it once the broker is back. Nothing acknowledged depends on the broker.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from db import repository
from db.models import Instance
from fracture_triage.messages import (
    QUEUE,
    ClassifyInstance,
    Deliver,
    QueueMessage,
    ReportStudy,
    SendReport,
)
from fracture_triage.settings import Settings
from worker.celery_app import make_celery

log = logging.getLogger(__name__)

#: One quick reconnection attempt: a connection left stale by a broker restart is replaced,
#: but a broker that is down fails the send in about a second instead of retrying forever.
RETRY_POLICY: dict[str, Any] = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 0.5,
}


#: Seconds a publish may wait for a broker that does not answer (see CeleryEnqueuer).
PUBLISH_TIMEOUT_S = 1


class _NoResult:
    """What ``send_task`` returns here instead of Celery's ``AsyncResult``.

    The node keeps no task results (they live in the database; ``result_backend`` is None),
    but ``AsyncResult(task_id)`` still reads ``app.backend``, which Celery builds once per
    *thread*: the SCP runs each association in a new thread, so every association's first
    C-STORE built a result backend (importlib entry points, module imports). Profiled with
    py-spy under 4 parallel associations, that was ~40 % of the SCP's time in ``_store``.
    """

    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.ignored = True


class EnqueueError(RuntimeError):
    """The message could not be handed to the broker; the caller keeps the work pending."""


class CeleryEnqueuer:
    """Send queue messages by task name. Thread-safe; call :meth:`close` when done.

    ``enqueuer(ClassifyInstance(...))`` queues a classification (the SCP's call).
    """

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        if app is None:
            app = make_celery(settings, register_tasks=False)
            # A publisher answers a C-STORE: a broker that is frozen (TCP open, nothing
            # answering) must fail the send within seconds, not the consumer's 10 s, so that the
            # sender gets its Success (the instance is pending in the database) well inside
            # its own DIMSE timeout.
            options = app.conf.broker_transport_options
            app.conf.broker_transport_options = {**options, "socket_timeout": PUBLISH_TIMEOUT_S}
        self._app = app
        # The producer pool, made now rather than by the first send: making it imports the
        # broker's transport module, and under parallel associations the first C-STOREs all
        # waited on that import's lock (py-spy). Nothing connects before a send.
        app.amqp.producer_pool  # noqa: B018 - the property builds and caches the pool

    @property
    def app(self) -> Celery:
        return self._app

    def __call__(self, msg: ClassifyInstance) -> None:
        self.enqueue_classify(msg)

    def enqueue_classify(self, msg: ClassifyInstance) -> None:
        self._send(msg)

    def enqueue_report(self, msg: ReportStudy) -> None:
        self._send(msg)

    def enqueue_send(self, msg: SendReport) -> None:
        self._send(msg)

    def enqueue_delivery(self, msg: Deliver) -> None:
        self._send(msg)

    def _send(self, msg: QueueMessage) -> None:
        """Send ``msg`` to the task it names (``msg.task``) on the node's queue."""
        try:
            self._app.send_task(
                msg.task,
                args=[msg.model_dump(mode="json")],
                queue=QUEUE,
                retry=True,
                retry_policy=RETRY_POLICY,
                ignore_result=True,
                result_cls=_NoResult,
            )
        except Exception as exc:  # kombu/redis raise many types for "broker unreachable"
            raise EnqueueError(f"cannot queue {msg.task}: {type(exc).__name__}: {exc}") from exc

    def queue_length(self) -> int | None:
        """Messages waiting in the queue (not those being worked on); ``None`` if unknown."""
        try:
            with self._app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                declared = conn.default_channel.queue_declare(queue=QUEUE)
                return int(declared.message_count)
        except Exception as exc:  # noqa: BLE001 - any broker failure: the length is unknown
            log.debug("queue length unknown: %s", exc)
            return None

    def held_instances(self) -> set[int] | None:
        """Ids of the instances whose classify messages the broker holds: waiting in the
        queue (every priority) or delivered and not yet acknowledged (kombu's Redis
        ``unacked`` hash, restored to the queue after the visibility timeout). ``None``
        when that cannot be read (broker unreachable, or not Redis).

        What "held" means is kombu's Redis transport's layout (kombu 5, ``Channel._q_for_pri``,
        ``unacked_key``); an unknown message format is skipped, never taken for an instance.
        """
        try:
            with self._app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                channel = conn.default_channel
                client = channel.client
                keys = {channel._q_for_pri(QUEUE, p) for p in channel.priority_steps}
                raw: list[Any] = []
                for key in sorted(keys):
                    raw.extend(_lrange_all(client, key))
                unacked = client.hvals(channel.unacked_key)
        except Exception as exc:  # noqa: BLE001 - any broker failure: unknown
            log.debug("broker contents unknown: %s", exc)
            return None
        held = set(_instance_ids(raw, wrapped=False))
        held.update(_instance_ids(unacked, wrapped=True))
        return held

    def close(self) -> None:
        self._app.close()


def _lrange_all(client: Any, key: str, page: int = 1000) -> list[Any]:
    out: list[Any] = []
    start = 0
    while True:
        chunk = client.lrange(key, start, start + page - 1)
        out.extend(chunk)
        if len(chunk) < page:
            return out
        start += page


def _instance_ids(items: Iterable[Any], *, wrapped: bool) -> Iterable[int]:
    """The ``instance_id`` of each classify message among kombu's stored messages (JSON; in
    the ``unacked`` hash wrapped as ``[message, exchange, routing_key]``)."""
    for item in items:
        try:
            message = json.loads(item)
            if wrapped:
                message = message[0]
            if message["headers"]["task"] != ClassifyInstance.task:
                continue
            body = message["body"]
            if message["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            instance_id = args[0]["instance_id"]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if isinstance(instance_id, int):
            yield instance_id


Enqueue = Callable[[ClassifyInstance], None]


def classify_message(instance: Instance) -> ClassifyInstance:
    """The queue message for one recorded instance: ids, never pixel data."""
    return ClassifyInstance(instance_id=instance.id, sop_instance_uid=instance.sop_instance_uid)


def queue_instance(session: Session, enqueue: Enqueue, instance: Instance) -> bool:
    """Queue one recorded instance and mark it ``queued`` (the caller commits); ``False`` if
    the broker is down.

    On failure the instance stays ``pending`` and the sweeper queues it later. The message is
    sent before the status changes: a crash in between leaves it pending, and the worst case
    is a duplicate message, which the idempotent task ignores.
    """
    try:
        enqueue(classify_message(instance))
    except EnqueueError as exc:
        log.warning("instance %s left pending: %s", instance.sop_instance_uid, exc)
        return False
    repository.mark_queued(session, instance.id)
    return True
