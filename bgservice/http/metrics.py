"""``GET /metrics``: the service's counters in the Prometheus text format.

Nothing on the request path knows about Prometheus: the collector reads the counters the
service keeps anyway (``Stats``, the queue's stats, the registry) at scrape time and
turns them into metric families, on a registry of its own (not prometheus-client's
global one, so two services in one test process never mix). The queue's counts are read
before rendering because they may need the database or Redis.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from bgservice.errors import ServiceError
from bgservice.stats import Histogram, Stats

log = logging.getLogger(__name__)

NS = "bgservice"


class Metrics(Collector):
    """Collects at scrape time; ``render`` reads the queue first, then formats."""

    def __init__(
        self,
        stats: Stats,
        modules: Callable[[], list[dict[str, Any]]],
        queue_stats: Callable[[float], Any],
        alerts: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.stats = stats
        self.modules = modules
        self.queue_stats = queue_stats
        self.alerts = alerts
        self._queue: dict[str, Any] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)  # CPU, memory, open files, start time
        GCCollector(registry=self.registry)  # collections and objects collected, by generation

    async def render(self) -> tuple[bytes, str]:
        try:
            self._queue = await self.queue_stats(60.0)
        except ServiceError as exc:  # e.g. Redis away: the rest still reports
            log.debug("metrics: queue stats unavailable: %s", exc)
            self._queue = None
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._http()
        yield from self._service()
        yield from self._modules()
        yield from self._queue_metrics()
        if self.alerts is not None:
            counts = self.alerts()
            alerts = CounterMetricFamily(
                f"{NS}_alerts", "Alerts by what became of them.", labels=["outcome"]
            )
            for outcome in ("raised", "sent", "summarised", "failed", "dropped"):
                alerts.add_metric([outcome], counts.get(outcome, 0))
            yield alerts

    def _requests(self) -> Iterator[Metric]:
        s = self.stats
        labels = ["module", "transport"]
        requests = CounterMetricFamily(
            f"{NS}_requests", "Requests served, per module and transport.", labels=labels
        )
        errors = CounterMetricFamily(
            f"{NS}_errors", "Requests answered with an error code.", labels=labels
        )
        for key, n in s.requests.items():
            requests.add_metric(list(key), n)
            errors.add_metric(list(key), s.errors.get(key, 0))
        yield requests
        yield errors
        yield _histogram(
            f"{NS}_request_duration_seconds",
            "Time from a request's dispatch to its reply (or end, for datagrams).",
            labels,
            s.latency,
        )
        in_flight = GaugeMetricFamily(
            f"{NS}_in_flight", "Calls running now, per module.", labels=["module"]
        )
        for module, n in s.in_flight.items():
            in_flight.add_metric([module], n)
        yield in_flight

    def _http(self) -> Iterator[Metric]:
        """The HTTP API's own requests (bgservice.http.site counts them): by the route's
        template, never the path, so that job ids do not make a series each."""
        s = self.stats
        requests = CounterMetricFamily(
            f"{NS}_http_requests", "HTTP requests answered, by route template, method and "
            "status code.", labels=["route", "method", "code"],
        )  # fmt: skip
        for key, n in s.http_requests.items():
            requests.add_metric(list(key), n)
        yield requests
        yield _histogram(
            f"{NS}_http_request_seconds",
            "Time to answer an HTTP request (its head read to its reply made), by route.",
            ["route"],
            s.http_durations,
        )

    def _service(self) -> Iterator[Metric]:
        s = self.stats
        yield GaugeMetricFamily(f"{NS}_connections_open", "Open stream connections.",
                                value=s.connections)  # fmt: skip
        yield CounterMetricFamily(f"{NS}_connections", "Stream connections accepted.",
                                  value=s.connections_total)  # fmt: skip
        refused = CounterMetricFamily(
            f"{NS}_refused", "Connections or datagrams refused, by reason.", labels=["reason"]
        )
        for reason, n in s.refused.items():
            refused.add_metric([reason], n)
        yield refused
        ended = CounterMetricFamily(
            f"{NS}_one_shot_requests", "One-shot requests by what ended them, and those with "
            "bytes after their end (after_end).", labels=["ended"],
        )  # fmt: skip
        for how, n in s.one_shot().items():
            ended.add_metric([how], n)
        yield ended
        yield CounterMetricFamily(f"{NS}_udp_received", "Datagrams received.",
                                  value=s.udp_received)  # fmt: skip
        yield CounterMetricFamily(
            f"{NS}_udp_dropped", "Datagrams dropped: the datagram queue was full.",
            value=s.udp_dropped,
        )  # fmt: skip
        yield CounterMetricFamily(f"{NS}_reloads", "Module reloads that succeeded.",
                                  value=s.reloads)  # fmt: skip
        yield CounterMetricFamily(
            f"{NS}_reload_failures", "Module loads that failed (the old version keeps serving).",
            value=s.reload_failures,
        )  # fmt: skip
        yield GaugeMetricFamily(
            f"{NS}_event_loop_lag_seconds", "How late the event loop woke a timer, last check.",
            value=s.lag_ms / 1000,
        )  # fmt: skip
        yield GaugeMetricFamily(
            f"{NS}_event_loop_lag_max_seconds", "The largest event-loop lag since start.",
            value=s.lag_max_ms / 1000,
        )  # fmt: skip
        yield GaugeMetricFamily(
            f"{NS}_http_waiting", "GET /api/v1/jobs/{id}?wait= requests waiting for their job.",
            value=s.http_waiting,
        )  # fmt: skip
        yield GaugeMetricFamily(
            f"{NS}_gc_frozen_objects",
            "Objects start-up left that the garbage collector no longer walks (gc.freeze).",
            value=gc.get_freeze_count(),
        )  # fmt: skip

    def _modules(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{NS}_module_up",
            "1 when the module's file last loaded cleanly; 0 when its last load failed.",
            labels=["module"],
        )
        reloads = CounterMetricFamily(
            f"{NS}_module_reloads", "Reloads per module.", labels=["module"]
        )
        for row in self.modules():
            up.add_metric([row["name"]], 0 if row["error"] else 1)
            reloads.add_metric([row["name"]], row["reloads"])
        yield up
        yield reloads

    def _queue_metrics(self) -> Iterator[Metric]:
        queue = self._queue
        yield GaugeMetricFamily(
            f"{NS}_queue_up", "1 when the queue answered (0: e.g. Redis is away, or the "
            "SQLite store's last commit failed: a full disk, the database locked).",
            value=0 if queue is None else 1,
        )  # fmt: skip
        if queue is not None:
            jobs = GaugeMetricFamily(
                f"{NS}_queue_jobs", "Jobs in the queue per state (finished: kept ones).",
                labels=["state"],
            )  # fmt: skip
            for state, n in queue["counts"].items():
                jobs.add_metric([state], n)
            yield jobs
            yield GaugeMetricFamily(
                f"{NS}_queue_oldest_waiting_seconds", "Age of the oldest waiting job.",
                value=queue["oldest_waiting_age"] or 0,
            )  # fmt: skip
            yield GaugeMetricFamily(
                f"{NS}_queue_workers_held",
                "Workers held by handlers still running past their job's timeout.",
                value=queue["workers_held"],
            )  # fmt: skip
        yield _histogram(
            f"{NS}_job_duration_seconds",
            "Run time of job attempts run by this instance, per module, job name and outcome.",
            ["module", "name", "outcome"],
            self.stats.job_durations,
        )


def _histogram(name: str, doc: str, labels: list[str], source: Histogram) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key in list(source.rows):
        buckets, total = source.cumulative(key)
        family.add_metric(list(key), buckets, total)
    return family
