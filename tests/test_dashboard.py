"""The dashboard, rendered by a real headless Chromium against a real service.

A screenshot of every run is kept with pytest's temporary files (the path is printed;
pytest keeps the last three runs' folders) and in tests/artifacts/ (not in git).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, ServiceProcess, wait_until, write_module

from tests.test_queue_redis import shared

__all__ = ["shared"]  # (a fixture: instances sharing one queue on Redis)

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


def test_on_redis_the_chart_and_counts_are_of_every_instance_s_workers(shared: Any) -> None:
    # The run history and the counts are of every instance sharing the queue; the chart
    # divided their busy time by the workers of the instance asked (2 here, of 5).
    here = shared("a", "workers = 2\n[http]\nenabled = true\nport = 0")
    shared("b", "workers = 3")
    wait_until(lambda: json.loads(here.call(b"queue:stats"))["cluster_workers"] == 5)
    assert here.call(b"queue:get:id:%s" % here.call(b"queue:add:echo:x")[3:]) == b"x"
    dom = chromium("--dump-dom", here.http_url + "/dashboard/")
    counts = re.search(r'id="queue-counts"[^>]*>(.*?)<', dom, re.S)
    assert counts and "5 workers (2 on this instance)" in counts.group(1), dom[:3000]
    titles = re.findall(r"<title>([^<]*)</title>", dom)
    assert len([t for t in titles if t.endswith("of 5 workers)")]) == 7 * 24, titles[:3]


def test_an_empty_chart_says_why(make_service: Callable[..., ServiceProcess]) -> None:
    """A new install has no run history: the chart says so instead of a blank grid."""
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/")
    note = re.search(r'<p class="chart-empty">(.*?)</p>', dom, re.S)
    assert note and "No job has run in the last 7 days" in note.group(1)
    assert "nothing to show yet" in dom
    assert "no finished jobs kept" in dom and "nothing waiting" in dom


def test_a_job_due_next_year_shows_days_and_its_date(
    make_service: Callable[..., ServiceProcess],
) -> None:
    """A job delayed 400 days read "due in 9600.0 h (Mon 10:00)": its weekday, no date."""
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    status, job, _ = svc.http("POST", "/api/v1/jobs", {"module": "echo", "delay": 400 * 86400})
    assert status == 201, job
    due = time.localtime(job["run_at"])
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/")
    jid = job["id"]
    row = re.search(rf'<tr data-job="{jid}" class="job-waiting">(.*?)</tr>', dom, re.S)
    assert row, dom[:3000]
    shown = re.search(r'class="due"[^>]*>due in ([^<]*)<', row.group(1))
    assert shown and re.fullmatch(r"(399|400) d \(.*\)", shown.group(1)), row.group(1)
    assert str(due.tm_year) in shown.group(1) and str(due.tm_mday) in shown.group(1)


def test_dashboard_asks_for_the_token(make_service: Callable[..., ServiceProcess]) -> None:
    svc = make_service('[http]\nenabled = true\nport = 0\ntoken = "t0k-t0k-t0k"\n')
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/")
    assert re.search(r'<form id="login">', dom)  # shown: no longer hidden
    dom = chromium("--dump-dom", svc.http_url + "/dashboard/#token=t0k-t0k-t0k")
    assert re.search(r'<form id="login" hidden="">', dom)
    assert 'data-module="echo"' in dom


# --- the page over time: a tab driven over the DevTools protocol --------------------------


class Page:
    """One headless Chromium tab, driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: the browser reads fd 3 and writes fd 4; no port), for
    what ``--dump-dom`` cannot show: sizes, behaviour over time, clicks."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()

        def child() -> None:  # (dup first: a pipe's own fd may be 3 or 4 already)
            read, write = os.dup(to_browser), os.dup(from_browser)
            os.dup2(read, 3)
            os.dup2(write, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        assert CHROMIUM is not None
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run",
             "about:blank"],
            pass_fds=(3, 4), preexec_fn=child,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id = b"", 0
        target = self._send("Target.createTarget", url="about:blank")["targetId"]
        attached = self._send("Target.attachToTarget", targetId=target, flatten=True)
        self._session = attached["sessionId"]
        self.size(width, height)
        self.send("Page.enable")
        # What the page's Content-Security-Policy refused, and the most API requests open
        # at once (a poll is 7 in parallel; polls that pile up are more).
        self.send("Page.addScriptToEvaluateOnNewDocument", source="""
            window.refused = []; window.open_now = 0; window.most_open = 0;
            document.addEventListener("securitypolicyviolation",
              (e) => refused.push(e.violatedDirective + " " + e.blockedURI));
            const fetched = window.fetch;
            window.fetch = async (...args) => {
              most_open = Math.max(most_open, ++open_now);
              try { return await fetched(...args); } finally { open_now--; }
            };""")  # fmt: skip

    def _send(self, method: str, session: str | None = None, **params: Any) -> Any:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method}")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise ConnectionError("chromium closed its pipe")
                self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # (events: not needed, skipped)
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def send(self, method: str, **params: Any) -> Any:
        return self._send(method, self._session, **params)

    def size(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)  # fmt: skip
        if "exceptionDetails" in result:
            raise AssertionError(result["exceptionDetails"])
        return result["result"].get("value")

    def until(self, expression: str, timeout: float = 15) -> Any:
        """The expression's value once truthy (polled; an error counts as not yet)."""
        deadline, value = time.monotonic() + timeout, None
        while True:
            try:
                value = self.js(expression)
            except AssertionError as exc:
                value = exc
            if value and not isinstance(value, AssertionError):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout} s: {expression}: {value}")
            time.sleep(0.05)

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.until("location.href !== 'about:blank' && document.readyState === 'complete'")

    def status(self) -> str:
        return str(self.js("document.getElementById('status').textContent"))

    def close(self) -> None:
        try:
            self._send("Browser.close")
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    tab = Page(tmp_path / "chromium-profile")
    yield tab
    tab.close()


UPDATED = "document.getElementById('status').textContent.startsWith('updated')"
WIDE = "[document.documentElement.scrollWidth, window.innerWidth]"


def test_long_unbroken_strings_do_not_widen_the_page_at_any_width(
    make_service: Callable[..., ServiceProcess], modules_dir: Path, page: Page
) -> None:
    # One 20,000-character word in an error made the page 145,000 px wide; a phone's
    # 390 px laid out 1,085 px, the chart cut off.
    write_module(modules_dir, "refuse", """
        from bgservice import ReplyError

        def handle_tcp(request):
            raise ReplyError(400, request.text)
    """)  # fmt: skip
    write_module(modules_dir, "step", """
        import asyncio

        async def handle_tcp(request):
            request.job.progress(1, 3, request.text)
            await asyncio.sleep(60)
    """)  # fmt: skip
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    write_module(modules_dir, "broken", f"def handle_tcp(request:\n    '{'B' * 5000}'\n")
    _, failed, _ = svc.http("POST", "/api/v1/jobs", {"module": "refuse", "data": "E" * 20000})
    svc.http("GET", f"/api/v1/jobs/{failed['id']}?wait=10")
    svc.http("POST", "/api/v1/jobs", {"module": "step", "data": "P" * 20000, "name": "N" * 200})
    svc.http("POST", "/api/v1/jobs", {"module": "echo", "delay": 600, "tags": ["T" * 50]})
    wait_until(lambda: "broken" in str(svc.http("GET", "/api/v1/modules")[1]))
    page.goto(svc.http_url + "/dashboard/")
    page.until(f"{UPDATED} && document.querySelectorAll('pre.error').length >= 2"
               " && !!document.querySelector('.progress-message')")  # fmt: skip
    width, window = page.js(WIDE)
    assert width <= window
    # The page's Content-Security-Policy lets it do all it does: the bar is drawn.
    assert page.js("refused") == []
    assert page.js("document.querySelector('.bar > span').getBoundingClientRect().width") > 0
    page.size(390, 800)
    page.until("window.innerWidth === 390")
    width, window = page.js(WIDE)
    assert width <= window == 390
    chart = page.js("document.getElementById('busy-chart').getBoundingClientRect().right")
    assert chart <= 390
    # The whole error is there, one click away.
    page.js("document.querySelector('button.more').click()")
    assert page.js("document.querySelector('pre.error.whole').textContent.length") >= 20000


def test_a_service_that_hangs_or_stops_is_shown_as_such(
    make_service: Callable[..., ServiceProcess], page: Page
) -> None:
    # A stopped (SIGSTOP) service looked healthy, "updated" in the normal style, while
    # polls piled up; a dead one left its last tables on screen as if current.
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    page.goto(svc.http_url + "/dashboard/")
    page.until(f"{UPDATED} && !!document.querySelector('tr[data-module=echo]')")
    svc.signal(signal.SIGSTOP)
    try:
        page.until("document.getElementById('main').classList.contains('stale')", timeout=25)
        assert "no answer within" in page.status()
        assert "not updated since" in page.status()
        assert page.js("most_open") <= 7  # one poll at a time, however long it takes
    finally:
        svc.signal(signal.SIGCONT)
    page.until(f"{UPDATED} && !document.getElementById('main').classList.contains('stale')")
    svc.stop()
    page.until("document.getElementById('main').classList.contains('stale')")
    assert page.status().startswith("not updated since")
    assert page.js("document.querySelector('tr[data-module=echo]') !== null")  # kept, dimmed


def test_actions_keep_focus_ask_first_and_say_what_came_of_them(
    make_service: Callable[..., ServiceProcess], modules_dir: Path, page: Page
) -> None:
    write_module(modules_dir, "boom", "def handle_tcp(request):\n    raise ValueError('boom')\n")
    write_module(modules_dir, "nap", "import time\n\ndef handle_tcp(request):\n"
                 "    time.sleep(20)\n")  # a thread: a cancel waits for it  # fmt: skip
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    _, failed, _ = svc.http("POST", "/api/v1/jobs", {"module": "boom"})
    svc.http("GET", f"/api/v1/jobs/{failed['id']}?wait=10")
    _, nap, _ = svc.http("POST", "/api/v1/jobs", {"module": "nap"})
    every = {"name": "hourly", "module": "echo", "every": 3600}
    wait_until(lambda: svc.http("POST", "/api/v1/schedules", every)[0] == 201)
    page.goto(svc.http_url + "/dashboard/")
    retry = f"document.querySelector('tr[data-job=\"{failed['id']}\"] button')"
    page.until(f"{UPDATED} && !!{retry}")
    # Focus stays on a button while polls come and go (each rebuilt every table).
    page.js(f"{retry}.focus()")
    polls = "performance.getEntriesByType('resource').filter((e) => /stats$/.test(e.name)).length"
    seen = page.js(polls)
    page.until(f"{polls} >= {seen + 2}")
    assert page.js(f"document.activeElement === {retry}")
    # A refused action says why, on the page, until dismissed: here the job is gone.
    page.js(f"""(async () => {{ const b = {retry};
        await fetch('../api/v1/jobs/{failed["id"]}', {{ method: 'DELETE' }}); b.click(); }})()""")
    message = page.until("!document.getElementById('message').hidden"
                         " && document.getElementById('message-text').textContent")  # fmt: skip
    assert message.startswith(f"Retry of job {failed['id']} failed:") and "not found" in message
    page.js("document.getElementById('message-close').click()")
    assert page.js("document.getElementById('message').hidden")
    # Cancel asks first; a running job that has been asked to stop says so.
    cancel = f"document.querySelector('tr[data-job=\"{nap['id']}\"] button')"
    page.until(f"!!{cancel}")
    page.js("window.asked = [];"
            "window.confirm = (q) => { asked.push(q); return asked.length > 1; }")  # fmt: skip
    page.js(f"{cancel}.click()")  # declined
    assert svc.http("GET", f"/api/v1/jobs/{nap['id']}")[1]["cancel_requested"] is False
    page.js(f"{cancel}.click()")  # confirmed
    page.until(f"!!document.querySelector('tr[data-job=\"{nap['id']}\"] .cancelling')")
    assert page.js("asked")[1].startswith(f"Cancel job {nap['id']} (nap)?")
    assert "cancelling" in page.js("document.getElementById('message-text').textContent")
    # Run now says which job it added.
    page.js("document.querySelector('tr[data-schedule=hourly] button:last-child').click()")
    added = page.until("document.getElementById('message-text').textContent.match(/job (\\d+)/)")
    assert svc.http("GET", f"/api/v1/jobs/{added[1]}")[0] == 200


def test_tokens_from_the_address_refused_or_of_a_narrow_scope(
    make_service: Callable[..., ServiceProcess], page: Page
) -> None:
    # "#token=50%off-token" threw a URIError and the page stayed at "connecting...";
    # a changed #token= was ignored; a wrong token said "a token is needed" and was kept.
    svc = make_service(
        '[http]\nenabled = true\nport = 0\ntoken = "50%off-token"\n'
        'tokens = { ro = { token = "read-only-token", scope = "read" } }\n'
    )
    _, job, _ = svc.http("POST", "/api/v1/jobs", {"module": "echo", "delay": 600},
                         token="50%off-token")  # fmt: skip
    page.goto(svc.http_url + "/dashboard/#token=wrong-token")
    page.until("!document.getElementById('login').hidden")
    assert "token refused" in page.status()
    assert page.js("localStorage.getItem('bgservice-token')") is None
    page.js("location.hash = '#token=50%off-token'")
    page.until(f"{UPDATED} && !!document.querySelector('tr[data-module=echo]')")
    assert page.js("localStorage.getItem('bgservice-token')") == "50%off-token"
    assert page.js("location.hash") == ""
    assert page.js("document.getElementById('login').hidden")
    # A token of scope read: no buttons it could not use.
    page.js("location.hash = '#token=read-only-token'")
    page.until("document.getElementById('status').textContent.includes('scope read')")
    assert page.js("document.querySelectorAll('main button').length") == 0
    assert page.js(f"document.querySelector('tr[data-job=\"{job['id']}\"]') !== null")


def test_the_page_leaves_the_api_alone_while_hidden(
    make_service: Callable[..., ServiceProcess], page: Page
) -> None:
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    page.goto(svc.http_url + "/dashboard/")
    page.until(UPDATED)
    page.js("Object.defineProperty(document, 'hidden', { value: true, configurable: true });"
            "document.dispatchEvent(new Event('visibilitychange'))")  # fmt: skip
    page.until("open_now === 0")
    before = svc.stats()["requests"], page.js("performance.getEntriesByType('resource').length")
    time.sleep(4.5)  # two polls' time: none is made
    assert page.js("performance.getEntriesByType('resource').length") == before[1]
    page.js("Object.defineProperty(document, 'hidden', { value: false, configurable: true });"
            "document.dispatchEvent(new Event('visibilitychange'))")  # fmt: skip
    page.until(f"performance.getEntriesByType('resource').length > {before[1]}")


# Its first run fails once the file "once.fail" is beside it; later runs wait for
# "once.open" (each 60 s at most: a test that failed must not hang).
ONCE = """
import time
from pathlib import Path

def handle_tcp(request):
    here = Path(__file__)
    first = not here.with_name("once.ran").exists()
    here.with_name("once.ran").touch()
    for _ in range(600):
        if first and here.with_name("once.fail").exists():
            raise ValueError("first run fails")
        if not first and here.with_name("once.open").exists():
            return "fine"
        time.sleep(0.1)
    return "never opened"
"""


def test_a_job_others_failed_with_offers_to_bring_them_back_too(
    make_service: Callable[..., ServiceProcess], modules_dir: Path, page: Page
) -> None:
    # A failed job that listed jobs failed because of (424) has a second button, Retry
    # with dependents (queue:retry?dependents=1): they come back, waiting on it again.
    write_module(modules_dir, "once", ONCE)
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    try:
        _, parent, _ = svc.http("POST", "/api/v1/jobs", {"module": "once"})
        _, child, _ = svc.http("POST", "/api/v1/jobs",
                               {"module": "echo", "data": "x", "after": parent["id"]})  # fmt: skip
        (modules_dir / "once.fail").touch()  # (the child added: after= a failed job is a 424)
        wait_until(lambda: svc.http("GET", f"/api/v1/jobs/{child['id']}")[1]["state"] == "failed")
        page.goto(svc.http_url + "/dashboard/")
        buttons = "tr[data-job=\"{}\"] button"
        labels = "[...document.querySelectorAll('{}')].map((b) => b.textContent)"
        page.until(f"{UPDATED} && !!document.querySelector('{buttons.format(parent['id'])}')")
        assert page.js(labels.format(buttons.format(parent["id"]))) == [
            "Retry", "Retry with dependents"]
        assert page.js(labels.format(buttons.format(child["id"]))) == ["Retry"]  # none failed by it
        page.js(f"document.querySelectorAll('{buttons.format(parent['id'])}')[1].click()")
        message = page.until("!document.getElementById('message').hidden"
                             " && document.getElementById('message-text').textContent")  # fmt: skip
        assert message.startswith(f"Retry of job {parent['id']} and the 1 listed"), message
        wait_until(lambda: svc.http("GET", f"/api/v1/jobs/{parent['id']}")[1]["state"] == "running")
        back = svc.http("GET", f"/api/v1/jobs/{child['id']}")[1]
        assert (back["state"], back["attempts"]) == ("waiting", 0), back  # after its parent
    finally:
        (modules_dir / "once.open").touch()
