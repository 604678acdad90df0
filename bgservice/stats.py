"""Counters for ``service:stats`` and the event-loop lag monitor."""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


# Upper bounds (seconds) of the latency buckets: a cached call to a minute-long compile.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0)  # fmt: skip
# A job's run: the same, then up to an hour (a report, an import), which would all be +Inf.
JOB_BUCKETS = (*BUCKETS, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Histogram:
    """Durations counted per key in fixed buckets: one bisect per observation, read by
    ``/metrics`` at scrape time (cheaper on the request path than a metrics library)."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.rows: dict[Any, list[float]] = {}  # key -> counts per bucket, +Inf, then sum

    def observe(self, key: Any, seconds: float) -> None:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = [0.0] * (len(self.buckets) + 2)
        row[bisect_left(self.buckets, seconds)] += 1
        row[-1] += seconds

    def cumulative(self, key: Any) -> tuple[list[tuple[str, float]], float]:
        """Prometheus' form: ``[(le, count of observations <= le), ...]`` and the sum."""
        row = self.rows[key]
        out, total = [], 0.0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), row[:-1], strict=True):
            total += n
            out.append((bound, total))
        return out, row[-1]


@dataclass
class Stats:
    """Plain counters, touched only from the event loop thread."""

    started: float = field(default_factory=time.time)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    ran: set[str] = field(default_factory=set)  # modules called since the lag was last measured
    connections: int = 0
    connections_total: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    # One-shot requests by what ended them and those with bytes after their end, where a
    # request cut short shows (docs/protocol.md); ints, not a Counter: every request counts.
    one_shot_half_close: int = 0
    one_shot_short_write: int = 0
    one_shot_gap: int = 0
    one_shot_after_end: int = 0
    buffered_bytes: int = 0  # held by requests still being received, every connection
    udp_received: int = 0
    udp_dropped: int = 0
    http_waiting: int = 0  # GET /api/v1/jobs/{id}?wait= requests waiting now (/metrics only)
    # HTTP requests answered, (route template, method, code) -> count, and route -> their
    # seconds (/metrics only: bgservice.http.site keeps both, its labels bounded). The
    # jobs' buckets: a ?wait= request is held up to [http] max_wait, 300 s by default.
    http_requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    http_durations: Histogram = field(default_factory=lambda: Histogram(JOB_BUCKETS))
    reloads: int = 0
    reload_failures: int = 0
    lag_ms: float = 0.0
    lag_max_ms: float = 0.0
    latency: Histogram = field(default_factory=Histogram)  # (module, transport) -> calls
    # (module, name, outcome) -> attempts, in buckets up to an hour
    job_durations: Histogram = field(default_factory=lambda: Histogram(JOB_BUCKETS))

    def one_shot(self) -> dict[str, int]:
        ends = ("half_close", "short_write", "gap", "after_end")
        return {end: n for end in ends if (n := getattr(self, f"one_shot_{end}"))}

    def snapshot(self) -> dict[str, Any]:
        modules: dict[str, dict[str, dict[str, int]]] = {}
        for (module, transport), n in self.requests.items():
            row = modules.setdefault(module, {}).setdefault(transport, {})
            row["requests"] = n
            row["errors"] = self.errors.get((module, transport), 0)
        return {
            "uptime": round(time.time() - self.started, 3),
            "requests": sum(self.requests.values()),
            "errors": sum(self.errors.values()),
            "modules": modules,
            "in_flight": {k: v for k, v in self.in_flight.items() if v},
            "connections": {"open": self.connections, "total": self.connections_total},
            "refused": dict(self.refused),
            "one_shot": self.one_shot(),
            "buffered_bytes": self.buffered_bytes,
            "udp": {"received": self.udp_received, "dropped": self.udp_dropped},
            "reloads": {"ok": self.reloads, "failed": self.reload_failures},
            "loop_lag_ms": {"last": round(self.lag_ms, 3), "max": round(self.lag_max_ms, 3)},
        }


# A lag logged without -v too: a handler that blocked the loop this long (time.sleep in an
# async def) stalled every client without a word (a newcomer's report: 1.8 s, unsaid).
SEVERE_LAG_MS = 1000.0


def lag_warning_ms(warn_ms: float, verbose: bool) -> float:
    """The lag above which LagMonitor warns: ``[log] lag_warn_ms`` with -v, else a second
    (or lag_warn_ms if higher)."""
    return warn_ms if verbose else max(warn_ms, SEVERE_LAG_MS)


class LagMonitor:
    """Measures how late the loop wakes a sleeping task: the lag every client feels.

    A lag above ``warn_ms`` (lag_warning_ms) is logged with the modules that were running
    at the time, which is almost always the culprit.
    """

    def __init__(
        self,
        stats: Stats,
        interval: float = 0.1,
        warn_ms: float | None = None,
        running: Callable[[], list[str]] = list,
    ) -> None:
        self.stats = stats
        self.interval = interval
        self.warn_ms = warn_ms
        self.running = running

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = self.running()
            start = loop.time()
            await asyncio.sleep(self.interval)
            lag = max(0.0, (loop.time() - start - self.interval) * 1000)
            self.stats.lag_ms = lag
            self.stats.lag_max_ms = max(self.stats.lag_max_ms, lag)
            if self.warn_ms is not None and lag > self.warn_ms:
                # Running before or after the wait, or called meanwhile: a call that
                # blocked and ended within the wait (its first step, often) is only there.
                suspects = sorted(set(before) | self.stats.ran | set(self.running())) or ["none"]
                log.warning(
                    "event loop lagged %.1f ms; modules running or called meanwhile: %s",
                    lag, ", ".join(suspects),
                )  # fmt: skip
            self.stats.ran.clear()
