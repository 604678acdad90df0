"""The dashboard, rendered by a real headless Chromium against a real service.

A screenshot of every run is kept with pytest's temporary files (the path is printed;
pytest keeps the last three runs' folders) and in tests/artifacts/ (not in git).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, ServiceProcess, wait_until, write_module

pytest.importorskip("aiohttp")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("BGSERVICE_TEST_STRICT"),  # .ci/run sets it
    reason="chromium is not installed (apt-get install chromium)",
)
ARTIFACTS = REPO / "tests" / "artifacts"


def chromium(*args: str, tz: str | None = None) -> str:
    assert CHROMIUM is not None
    env = os.environ | ({"TZ": tz} if tz else {})
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--virtual-time-budget=8000", *args],
        capture_output=True, text=True, timeout=90, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def busy_service(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> tuple[ServiceProcess, int]:
    """A service with history, a failed job, a broken module, a job at 42% and one
    delayed by an hour."""
    write_module(modules_dir, "report", """
        import asyncio

        async def handle_tcp(request):
            request.job.progress(42, 100, "page 42 of 100")
            await asyncio.sleep(60)
            return "done"
    """)  # fmt: skip
    write_module(modules_dir, "boom", "def handle_tcp(request):\n    raise ValueError('boom')\n")
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    write_module(modules_dir, "broken", "def handle_tcp(request:\n")
    for _ in range(5):
        _, job, _ = svc.http("POST", "/api/v1/jobs", {"module": "sleep", "data": "200"})
    svc.http("GET", f"/api/v1/jobs/{job['id']}?wait=10")
    _, failed, _ = svc.http("POST", "/api/v1/jobs", {"module": "boom"})
    svc.http("GET", f"/api/v1/jobs/{failed['id']}?wait=10")
    _, running, _ = svc.http("POST", "/api/v1/jobs", {"module": "report"})
    wait_until(lambda: svc.http("GET", f"/api/v1/jobs/{running['id']}")[1]["progress"])
    later = {"module": "echo", "data": "later", "delay": 3600, "name": "Monthly invoices"}
    svc.http("POST", "/api/v1/jobs", {**later, "tags": ["billing", "eu"]})
    nightly = {"name": "nightly-import", "module": "echo", "cron": "0 3 * * *", "tz": "UTC"}
    wait_until(lambda: svc.http("POST", "/api/v1/schedules", nightly)[0] == 201)
    wait_until(lambda: "broken" in svc.http("GET", "/api/v1/modules")[1]["modules"].__repr__())
    return svc, running["id"]


def test_dashboard_renders_modules_progress_failures_and_the_chart(
    busy_service: tuple[ServiceProcess, int],
) -> None:
    svc, running = busy_service
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/")
    # Modules, with the broken one's error.
    assert re.search(r'<tr data-module="echo" data-state="loaded">', dom)
    broken = re.search(r'<tr data-module="broken" data-state="failed">(.*?)</tr>', dom, re.S)
    assert broken and "failed to load" in broken.group(1) and "SyntaxError" in broken.group(1)
    # The running job's live progress.
    row = re.search(rf'<tr data-job="{running}" class="job-running">(.*?)</tr>', dom, re.S)
    assert row, dom[:3000]
    assert 'aria-valuenow="42"' in row.group(1) and "width: 42%" in row.group(1)
    assert "page 42 of 100" in row.group(1)
    # Recently finished: the failed job, with its error and a Retry button, and the done
    # ones with how long each took (sleep:200, so 0.2 s and a little; the loop's timers
    # read their clock once per turn, so the sleep can end a fraction of a millisecond early).
    failed = re.search(r'<tr data-job="\d+" class="job-failed">(.*?)</tr>', dom, re.S)
    assert failed and "ValueError: boom" in failed.group(1) and "Retry" in failed.group(1)
    done = re.findall(r'<tr data-job="\d+" class="job-done">(.*?)</tr>', dom, re.S)
    assert len(done) == 5, dom[:3000]
    for row in done:
        took = re.search(r'<td class="duration">(\d+) ms</td>', row)
        assert took and 199 <= int(took.group(1)) < 2000, row
        assert "Retry" not in row
    # The delayed job: when it is due, not a "-" for its position.
    waiting = re.search(r'<tr data-job="\d+" class="job-waiting">(.*?)</tr>', dom, re.S)
    assert waiting and re.search(r'class="due"[^>]*>due in (59|60) min \(', waiting.group(1))
    # ... with its name and tags.
    assert '<span class="job-name"> Monthly invoices</span>' in waiting.group(1)
    assert '<span class="tag">billing</span><span class="tag">eu</span>' in waiting.group(1)
    # The busy-time chart: 7 days x 24 hours, this hour busy (5 x 0.2 s + the rest).
    chart = re.search(r'<svg id="busy-chart".*?</svg>', dom, re.S)
    assert chart
    cells = re.findall(r'data-busy="([\d.]+)"', chart.group(0))
    assert len(cells) == 7 * 24
    assert any(float(c) >= 0.9 for c in cells)
    # The schedule, with its next run (03:00 UTC, in the browser's zone) and its buttons.
    sched = re.search(r'<tr data-schedule="nightly-import">(.*?)</tr>', dom, re.S)
    assert sched and "0 3 * * * (UTC)" in sched.group(1), dom[-3000:]
    assert re.search(r'<td class="next-run">[^<]*\(in \d', sched.group(1))
    assert "Pause" in sched.group(1) and "Run now" in sched.group(1)
    assert "not updated" not in dom


@pytest.mark.parametrize("tz", ["Asia/Kolkata", "Australia/Eucla"])
def test_the_chart_shows_busy_hours_in_zones_off_the_whole_hour(
    busy_service: tuple[ServiceProcess, int], tz: str
) -> None:
    # The history is bucketed by UTC hour; a browser at UTC+5:30 (or +8:45) looked up
    # its local hours' starts, found none, and drew a blank week.
    svc, _ = busy_service
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/", tz=tz)
    chart = re.search(r'<svg id="busy-chart".*?</svg>', dom, re.S)
    assert chart
    cells = [float(c) for c in re.findall(r'data-busy="([\d.]+)"', chart.group(0))]
    assert len(cells) == 7 * 24 and sum(cells) >= 0.9


def test_dashboard_screenshot(busy_service: tuple[ServiceProcess, int], tmp_path: Path) -> None:
    svc, _ = busy_service
    shot = tmp_path / "dashboard.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,1200", svc.http_url + "/dashboard/")
    assert shot.exists() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"dashboard screenshot: {shot}")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "dashboard.png")


def test_an_empty_chart_says_why(make_service: Callable[..., ServiceProcess]) -> None:
    """A new install has no run history: the chart says so instead of a blank grid."""
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/")
    note = re.search(r'<p class="chart-empty">(.*?)</p>', dom, re.S)
    assert note and "No job has run in the last 7 days" in note.group(1)
    assert "nothing to show yet" in dom
    assert "no finished jobs kept" in dom and "nothing waiting" in dom


def test_dashboard_asks_for_the_token(make_service: Callable[..., ServiceProcess]) -> None:
    svc = make_service('[http]\nenabled = true\nport = 0\ntoken = "t0k-t0k-t0k"\n')
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/")
    assert re.search(r'<form id="login">', dom)  # shown: no longer hidden
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/#token=t0k-t0k-t0k")
    assert re.search(r'<form id="login" hidden="">', dom)
    assert 'data-module="echo"' in dom
