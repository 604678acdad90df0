"""The dashboard, rendered by a real headless Chromium against a real service.

A screenshot of every run is kept in tests/artifacts/dashboard.png (not in git).
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


def chromium(*args: str) -> str:
    assert CHROMIUM is not None
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--virtual-time-budget=8000", *args],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def busy_service(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> tuple[ServiceProcess, int]:
    """A service with history, a failed job, a broken module and a job at 42%."""
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
    # The failed job, with its error and a Retry button.
    failed = re.search(r'<tr data-job="\d+" class="job-failed">(.*?)</tr>', dom, re.S)
    assert failed and "ValueError: boom" in failed.group(1) and "Retry" in failed.group(1)
    # The busy-time chart: 7 days x 24 hours, this hour busy (5 x 0.2 s + the rest).
    chart = re.search(r'<svg id="busy-chart".*?</svg>', dom, re.S)
    assert chart
    cells = re.findall(r'data-busy="([\d.]+)"', chart.group(0))
    assert len(cells) == 7 * 24
    assert any(float(c) >= 0.9 for c in cells)
    assert "not updated" not in dom


def test_dashboard_screenshot(busy_service: tuple[ServiceProcess, int]) -> None:
    svc, _ = busy_service
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium(f"--screenshot={shot}", "--window-size=1280,1000", svc.http_url + "/dashboard/")
    assert shot.exists() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dashboard_asks_for_the_token(make_service: Callable[..., ServiceProcess]) -> None:
    svc = make_service('[http]\nenabled = true\nport = 0\ntoken = "t0k"\n')
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/")
    assert re.search(r'<form id="login">', dom)  # shown: no longer hidden
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/#token=t0k")
    assert re.search(r'<form id="login" hidden="">', dom)
    assert 'data-module="echo"' in dom
