"""``/health`` (anyone) and ``/metrics`` (an API token, or a client on loopback).

The metrics are read from the database at each scrape (the SCP, worker and sweeper are other
processes; the database is what they share), in the Prometheus text format. Counters are
totals over rows that are appended and never deleted (instances, results, SRs), or, for the
refused C-STOREs, whose records are pruned after ``refusal_retention_days``, the rows kept
plus the per-status totals of those pruned (``store_refusal_totals``): no counter ever
decreases, which Prometheus would read as a restart. The histograms (C-STORE handling
time, time to result) are computed in SQL over the same rows with fixed buckets
(``db.node_state``), so they survive restarts of any role.
"""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Iterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.deps import AppSettings, MaybePrincipal, client_address
from db import node_state
from fracture_triage.disk import storage_health

router = APIRouter(include_in_schema=False)


@router.get("/health")
def health(request: Request, settings: AppSettings) -> Response:
    """200 ``{"status": "ok", "storage": {...}}`` when the database answers and the data
    directory is above its free-space watermark (``fracture_triage.disk``); 503 with
    ``"status": "storage low"`` while the SCP refuses C-STOREs for space, or when the
    database does not answer (no credentials: for load balancers)."""
    sessions: sessionmaker[Session] = request.app.state.sessions
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001 - any database failure is "unavailable"
        return JSONResponse({"status": "unavailable", "error": "database unavailable"}, 503)
    storage = storage_health(settings)
    if storage["status"] != "ok":
        return JSONResponse({"status": f"storage {storage['status']}", "storage": storage}, 503)
    return JSONResponse({"status": "ok", "storage": storage})


def is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class NodeCollector(Collector):
    """The node's state as gauges, read when scraped."""

    def __init__(
        self, sessions: sessionmaker[Session], data_dir_free: Iterator[float], broker_url: str
    ) -> None:
        self.sessions = sessions
        self.data_dir_free = data_dir_free
        self.broker_url = broker_url

    def queue_depth(self) -> int | None:
        """Messages waiting on the node's queue, or None when the broker does not answer
        within half a second (a scrape must not hang on it)."""
        import redis

        from fracture_triage.messages import QUEUE

        try:
            client = redis.Redis.from_url(
                self.broker_url, socket_timeout=0.5, socket_connect_timeout=0.5
            )
            try:
                return int(client.llen(QUEUE))
            finally:
                client.close()
        except (redis.RedisError, OSError, ValueError):
            return None

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            instances = node_state.instance_counts(session)
            reports = node_state.sr_counts(session)
            studies = node_state.study_count(session)
            report_failures = node_state.report_failures(session)
            refused = node_state.refused_count(session)
            totals = node_state.totals(session)
            refusals = node_state.refusals_by_status(session)
            store = node_state.store_seconds(session)
            to_result = node_state.result_seconds(session)
        yield from counters(totals, refusals)
        yield histogram(
            "fracture_triage_cstore_seconds",
            "C-STORE handling time of each stored instance (data set received to recorded "
            "and queued)",
            store,
        )
        yield histogram(
            "fracture_triage_time_to_result_seconds",
            "Time from an instance received to its first result",
            to_result,
        )
        by_status = GaugeMetricFamily(
            "fracture_triage_instances", "Received instances by state", labels=["status"]
        )
        for status, n in instances.items():
            by_status.add_metric([status], n)
        yield by_status
        srs = GaugeMetricFamily(
            "fracture_triage_sr_documents", "Produced SRs by send state", labels=["send_status"]
        )
        for status, n in reports.items():
            srs.add_metric([status], n)
        yield srs
        yield GaugeMetricFamily("fracture_triage_studies", "Studies received", value=studies)
        yield GaugeMetricFamily(
            "fracture_triage_report_failures",
            "Studies whose latest report could not be built",
            value=report_failures,
        )
        yield GaugeMetricFamily(
            "fracture_triage_refused_instances",
            "Objects the SCP refused (counted among the failed instances)",
            value=refused,
        )
        depth = self.queue_depth()
        yield GaugeMetricFamily(
            "fracture_triage_broker_up", "Whether the broker answered", value=int(depth is not None)
        )
        if depth is not None:
            yield GaugeMetricFamily(
                "fracture_triage_queue_depth", "Messages waiting on the queue", value=depth
            )
        yield GaugeMetricFamily(
            "fracture_triage_data_dir_free_bytes",
            "Free bytes of the data directory's file system",
            value=next(self.data_dir_free),
        )


def counters(totals: node_state.Totals, refusals: dict[str, int]) -> Iterator[Metric]:
    """The counter-like totals (``_total`` samples)."""
    simple = (
        ("fracture_triage_instances_received", "Instances stored and recorded", totals.received),
        ("fracture_triage_instances_classified", "Classifications stored", totals.classified),
        (
            "fracture_triage_instances_failed",
            "Received instances that could not be classified",
            totals.failed,
        ),
        ("fracture_triage_srs_built", "SR documents built", totals.srs_built),
        ("fracture_triage_srs_sent", "SR documents sent to the destination", totals.srs_sent),
        (
            "fracture_triage_srs_failed",
            "SR documents whose sending was given up",
            totals.srs_failed,
        ),
    )
    for name, documentation, value in simple:
        yield CounterMetricFamily(name, documentation, value=value)
    refused = CounterMetricFamily(
        "fracture_triage_instances_refused",
        "C-STOREs answered with a failure status, by status (PS3.4 Table B.2-1); records "
        "pruned after FRACTURE_TRIAGE_REFUSAL_RETENTION_DAYS stay counted",
        labels=["status"],
    )
    for status, n in sorted(refusals.items()):
        refused.add_metric([status], n)
    yield refused


def histogram(name: str, documentation: str, h: node_state.Histogram) -> Metric:
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], buckets=[(_le(bound), n) for bound, n in h.buckets], sum_value=h.total)
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _free_bytes(settings: AppSettings) -> Iterator[float]:
    while True:
        folder = settings.data_dir if settings.data_dir.exists() else settings.data_dir.parent
        yield float(shutil.disk_usage(folder).free)


def make_registry(sessions: sessionmaker[Session], settings: AppSettings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(sessions, _free_bytes(settings), settings.broker_url))
    return registry


@router.get("/metrics")
def metrics(request: Request, principal: MaybePrincipal) -> Response:
    if not (principal is not None and principal.kind == "token") and not is_loopback(
        client_address(request)
    ):
        raise HTTPException(401, "metrics need an API token or a loopback client")
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")
