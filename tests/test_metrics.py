"""``GET /metrics`` (bgservice/http/metrics.py), parsed with prometheus-client's parser."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ServiceProcess, wait_until, write_module

from bgservice.client import Client

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

HTTP = "[http]\nenabled = true\nport = 0\n"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(svc: ServiceProcess) -> Samples:
    status, text, headers = svc.http("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, /, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def svc(make_service: Callable[..., ServiceProcess], modules_dir: Path) -> ServiceProcess:
    write_module(modules_dir, "boom", "def handle_tcp(request):\n    raise ValueError('boom')\n")
    return make_service(HTTP)


def test_requests_errors_and_latency_move_with_calls(svc: ServiceProcess) -> None:
    before = scrape(svc)
    for _ in range(5):
        assert svc.call(b"test:x") == b"Test"
    assert svc.call(b"boom:x").startswith(b"500:")
    after = scrape(svc)
    tcp = {"module": "test", "transport": "tcp"}
    assert (
        value(after, "bgservice_requests_total", **tcp)
        - value(before, "bgservice_requests_total", **tcp)
        == 5
    )
    assert value(after, "bgservice_errors_total", **tcp) == 0
    assert value(after, "bgservice_errors_total", module="boom", transport="tcp") == 1
    count = value(after, "bgservice_request_duration_seconds_count", **tcp)
    assert count == value(after, "bgservice_requests_total", **tcp)
    inf = value(after, "bgservice_request_duration_seconds_bucket", le="+Inf", **tcp)
    fast = value(after, "bgservice_request_duration_seconds_bucket", le="0.0005", **tcp)
    assert inf == count and 0 <= fast <= inf
    assert value(after, "bgservice_request_duration_seconds_sum", **tcp) > 0


def test_udp_counts(svc: ServiceProcess) -> None:
    for i in range(20):
        svc.send_udp(b"test:%d" % i)
    wait_until(lambda: value(scrape(svc), "bgservice_udp_received_total") == 20)
    samples = scrape(svc)
    assert value(samples, "bgservice_udp_dropped_total") == 0
    assert value(samples, "bgservice_requests_total", module="test", transport="udp") == 20


def test_queue_depth_and_job_durations(svc: ServiceProcess) -> None:
    for _ in range(3):
        svc.http("POST", "/api/v1/jobs", {"module": "echo", "data": "x", "delay": 60})
    _, job, _ = svc.http("POST", "/api/v1/jobs", {"module": "sleep", "data": "50"})
    svc.http("GET", f"/api/v1/jobs/{job['id']}?wait=10")
    _, failed, _ = svc.http("POST", "/api/v1/jobs", {"module": "boom"})
    svc.http("GET", f"/api/v1/jobs/{failed['id']}?wait=10")
    samples = scrape(svc)
    assert value(samples, "bgservice_queue_up") == 1
    assert value(samples, "bgservice_queue_jobs", state="waiting") == 3
    assert value(samples, "bgservice_queue_jobs", state="done") == 1
    assert value(samples, "bgservice_queue_jobs", state="failed") == 1
    assert value(samples, "bgservice_queue_oldest_waiting_seconds") >= 0
    done = {"module": "sleep", "name": "", "outcome": "done"}
    assert value(samples, "bgservice_job_duration_seconds_count", **done) == 1
    # sleep:50; libuv reads its clock once per loop turn, so a timer set late in a turn
    # can end a fraction of a millisecond before 50 ms of wall time.
    assert value(samples, "bgservice_job_duration_seconds_sum", **done) >= 0.045
    assert value(samples, "bgservice_job_duration_seconds_bucket", le="0.025", **done) == 0
    # Jobs run for minutes: buckets up to an hour (they stopped at 60 s, the requests').
    assert value(samples, "bgservice_job_duration_seconds_bucket", le="3600.0", **done) == 1
    assert not any(name == "bgservice_request_duration_seconds_bucket" and ("le", "3600.0")
                   in labels for name, labels in samples)  # fmt: skip
    assert value(samples, "bgservice_job_duration_seconds_count",
                 module="boom", name="", outcome="failed") == 1  # fmt: skip


def test_job_names_label_the_durations_up_to_a_bound(
    make_service: Callable[..., ServiceProcess],
) -> None:
    svc = make_service(HTTP + "[queue]\nmetrics_names = 2\n")
    for name in ["invoice", "invoice", "thumbnail", "report", "export"]:
        _, job, _ = svc.http("POST", "/api/v1/jobs", {"module": "echo", "name": name})
        svc.http("GET", f"/api/v1/jobs/{job['id']}?wait=10")
    samples = scrape(svc)
    count = "bgservice_job_duration_seconds_count"
    labels = {"module": "echo", "outcome": "done"}
    assert value(samples, count, name="invoice", **labels) == 2
    assert value(samples, count, name="thumbnail", **labels) == 1
    assert value(samples, count, name="other", **labels) == 2  # report, export: past the bound
    assert value(samples, count, name="report", **labels) == 0


def test_reloads_failures_module_state_and_loop_lag(svc: ServiceProcess, modules_dir: Path) -> None:
    samples = scrape(svc)
    assert value(samples, "bgservice_module_up", module="echo") == 1
    assert value(samples, "bgservice_event_loop_lag_seconds") >= 0
    assert value(samples, "process_resident_memory_bytes") > 1e6  # the process collector
    write_module(modules_dir, "echo", "async def handle_tcp(request):\n    return 'v2'\n")
    wait_until(lambda: svc.call(b"echo:x") == b"v2")
    time.sleep(0.05)
    write_module(modules_dir, "echo", "def handle_tcp(request:\n")  # a syntax error
    wait_until(lambda: value(scrape(svc), "bgservice_reload_failures_total") == 1)
    samples = scrape(svc)
    assert value(samples, "bgservice_reloads_total") == 1
    assert value(samples, "bgservice_module_up", module="echo") == 0
    assert value(samples, "bgservice_module_reloads_total", module="echo") == 1
    assert svc.call(b"echo:x") == b"v2"  # the last good version keeps serving


def test_a_backlog_recovered_at_start_is_frozen_out_of_full_collections(
    svc: ServiceProcess,
) -> None:
    """The jobs waiting when the service starts (and the modules) are left out of the
    garbage collector's full collections (gc.freeze): each would walk them all again."""
    with Client(f"{svc.tcp[0]}:{svc.tcp[1]}", timeout=60) as bg:
        ids = bg.add_many([("echo", b"x", {"delay": 3600})] * 20_000)
    frozen_before = value(scrape(svc), "bgservice_gc_frozen_objects")
    svc.stop()
    svc.start()
    samples = scrape(svc)
    assert json.loads(svc.call(b"queue:status:id:%d" % ids[-1]))["state"] == "waiting"
    # Each recovered job is at least one object (its Job): 20,000 more, less the few
    # hundred others by which two start-ups differ (what survives their collections).
    assert value(samples, "bgservice_gc_frozen_objects") >= frozen_before + 19_000
    assert value(samples, "python_gc_collections_total", generation="2") >= 1


def test_open_waits_for_a_job_are_counted_while_they_wait(svc: ServiceProcess) -> None:
    _, job, _ = svc.http("POST", "/api/v1/jobs", {"module": "echo", "data": "x", "delay": 250})
    assert value(scrape(svc), "bgservice_http_waiting") == 0
    replies: list[tuple[int, Any]] = []

    def wait() -> None:
        status, body, _ = svc.http("GET", f"/api/v1/jobs/{job['id']}?wait=60")
        replies.append((status, body["state"]))

    waits = [threading.Thread(target=wait) for _ in range(2)]
    for thread in waits:
        thread.start()
    wait_until(lambda: value(scrape(svc), "bgservice_http_waiting") == 2)
    assert svc.http("POST", f"/api/v1/jobs/{job['id']}/cancel")[0] == 200  # the job ends
    for thread in waits:
        thread.join(20)
    assert replies == [(200, "cancelled")] * 2  # answered at its end, not at the 60 s
    assert value(scrape(svc), "bgservice_http_waiting") == 0


# A def handler that waits until the file its data names exists: past its job's timeout.
STUCK = """
import time
from pathlib import Path

def handle_tcp(request):
    while not Path(request.text).exists():
        time.sleep(0.01)
    return "free"
"""


def test_workers_held_past_a_jobs_timeout_are_a_gauge(
    make_service: Callable[..., ServiceProcess], modules_dir: Path, tmp_path: Path
) -> None:
    write_module(modules_dir, "stuck", STUCK)
    svc = make_service(HTTP + "[queue]\nworkers = 2\n")
    go = tmp_path / "go"
    assert value(scrape(svc), "bgservice_queue_workers_held") == 0
    _, job, _ = svc.http("POST", "/api/v1/jobs", {"module": "stuck", "data": str(go),
                                                  "timeout": 0.3, "retries": 0})  # fmt: skip
    _, ended, _ = svc.http("GET", f"/api/v1/jobs/{job['id']}?wait=10")
    assert ended["state"] == "failed"  # at its timeout
    samples = scrape(svc)  # its handler runs on, holding one of the two workers
    assert value(samples, "bgservice_queue_workers_held") == 1
    assert value(samples, "bgservice_queue_jobs", state="running") == 0
    go.touch()
    wait_until(lambda: value(scrape(svc), "bgservice_queue_workers_held") == 0)


def test_http_requests_are_counted_by_route_template_method_and_code(
    svc: ServiceProcess,
) -> None:
    _, job, _ = svc.http("POST", "/api/v1/jobs", {"module": "echo", "data": "x"})
    assert svc.http("GET", f"/api/v1/jobs/{job['id']}?wait=10")[0] == 200
    assert svc.http("GET", f"/api/v1/jobs/{job['id'] + 1000}")[0] == 404  # no such job
    assert svc.http("GET", "/api/v1/nowhere")[0] == 404  # no route at all
    samples = scrape(svc)
    total, one = "bgservice_http_requests_total", "/api/v1/jobs/{id}"
    assert value(samples, total, route="/api/v1/jobs", method="POST", code="201") == 1
    assert value(samples, total, route=one, method="GET", code="200") == 1
    assert value(samples, total, route=one, method="GET", code="404") == 1
    assert value(samples, total, route="unmatched", method="GET", code="404") == 1
    seconds = "bgservice_http_request_seconds"
    assert value(samples, f"{seconds}_count", route=one) == 2
    assert value(samples, f"{seconds}_bucket", route=one, le="+Inf") == 2
    assert value(samples, f"{seconds}_sum", route=one) > 0
    assert value(samples, f"{seconds}_count", route="unmatched") == 1
    # The scrape before counts as the next one reads it.
    assert value(scrape(svc), total, route="/metrics", method="GET", code="200") == 1


def test_no_http_label_holds_a_job_id_a_path_or_a_method_sent(svc: ServiceProcess) -> None:
    """Labels are series: a job id, a path or a made-up method in them would let any
    client grow /metrics without bound."""
    ids = [svc.http("POST", "/api/v1/jobs", {"module": "echo", "delay": 60})[1]["id"]
           for _ in range(3)]  # fmt: skip
    for jid in [*ids, 987654321]:
        svc.http("GET", f"/api/v1/jobs/{jid}")
        svc.http("POST", f"/api/v1/jobs/{jid}:cancel")
    assert svc.http("GET", "/nowhere-123456789")[0] == 404
    assert svc.http("PROPFIND", "/api/v1/jobs")[0] == 405  # WebDAV's: aiohttp takes it
    samples = scrape(svc)
    labels = [dict(pairs) for name, pairs in samples if name.startswith("bgservice_http_req")]
    routes = {"/api/v1/jobs", "/api/v1/jobs/{id}", "/api/v1/jobs/{id}:cancel", "unmatched"}
    assert {row["route"] for row in labels} == routes
    assert {row["method"] for row in labels if "method" in row} == {"GET", "POST", "other"}
    assert {row["code"] for row in labels if "code" in row} == {"200", "201", "404", "405"}
    total = "bgservice_http_requests_total"
    assert value(samples, total, route="/api/v1/jobs/{id}:cancel", method="POST",
                 code="404") == 1  # fmt: skip
    assert value(samples, total, route="unmatched", method="other", code="405") == 1
