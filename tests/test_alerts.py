"""Alerts (bgservice/alerts.py) delivered by the shipped notify_email to a real SMTP sink."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from conftest import STRAY_ERROR, ServiceProcess, wait_until, write_module

pytest.importorskip("aiosmtpd")
from aiosmtpd.controller import Controller


class Inbox:
    """aiosmtpd's handler: keeps every mail it is given."""

    def __init__(self) -> None:
        self.mails: list[Message] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.mails.append(message_from_bytes(envelope.content))
        return "250 OK"

    def subjects(self) -> list[str]:
        with self.lock:
            return [str(m["Subject"]) for m in self.mails]


@pytest.fixture
def smtp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Inbox]:
    inbox = Inbox()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    monkeypatch.setenv("BGSERVICE_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("BGSERVICE_SMTP_PORT", str(port))
    monkeypatch.setenv("BGSERVICE_SMTP_TO", "ops@example.org, dev@example.org")
    monkeypatch.setenv("BGSERVICE_SMTP_FROM", "bgservice@example.org")
    yield inbox
    controller.stop()


def alerts_config(max_per_minute: int = 5, summary_seconds: float = 1.0, events: str = "") -> str:
    return (
        f'[alerts]\nmodule = "notify_email"\nmax_per_minute = {max_per_minute}\n'
        f"summary_seconds = {summary_seconds}\n{events}"
    )


@pytest.fixture
def boom(modules_dir: Path) -> Path:
    source = "def handle_tcp(request):\n    raise ValueError('boom ' + request.text)\n"
    return write_module(modules_dir, "boom", source)


def alert_stats(svc: ServiceProcess) -> dict[str, int]:
    return json.loads(svc.call(b"service:stats"))["alerts"]


def job_id(reply: bytes) -> int:
    return int(reply.decode().split(":")[1])


def test_a_failed_job_sends_a_mail(
    make_service: Callable[..., ServiceProcess], smtp: Inbox, boom: Path
) -> None:
    svc = make_service(alerts_config())
    jid = job_id(svc.call(b"queue:add?retries=1&backoff=0:boom:payload"))
    assert svc.call(f"queue:get:id:{jid}".encode()).startswith(b"500:")
    wait_until(lambda: smtp.mails)
    (mail,) = smtp.mails
    # with the error's first line: a subject that says what went wrong (a long subject
    # is folded over lines: unfolded, as a mail reader shows it)
    subject = mail["Subject"].replace("\r\n", "")
    assert f"job {jid} (boom) failed after 2 attempt(s): 500 Module boom raised" in subject
    assert "ValueError: boom payload" in subject
    assert mail["Subject"].startswith(f"[bgservice@{socket.gethostname()}]")
    assert mail["To"] == "ops@example.org, dev@example.org"
    body = mail.get_payload()
    assert "ValueError: boom payload" in body and f"job:    {jid}" in body
    # the mail reaches the sink a moment before the module's reply reaches the service
    wait_until(lambda: alert_stats(svc)["sent"] == 1)
    stats = alert_stats(svc)
    assert (stats["raised"], stats["sent"], stats["failed"]) == (1, 1, 0)


def test_a_reload_failure_and_an_unexpected_error_send_mails(
    make_service: Callable[..., ServiceProcess], smtp: Inbox, modules_dir: Path
) -> None:
    write_module(modules_dir, "stray", """
        import asyncio

        async def handle_tcp(request):
            asyncio.get_running_loop().call_soon(lambda: 1 / 0)  # outside every request
            return "ok"
    """)  # fmt: skip
    svc = make_service(alerts_config(), "-E")
    write_module(modules_dir, "broken", "def handle_tcp(request:\n")
    wait_until(lambda: any("module broken failed to load" in s for s in smtp.subjects()))
    assert svc.call(b"stray:x") == b"ok"
    wait_until(lambda: any("unexpected error" in s for s in smtp.subjects()))
    unexpected = next(m for m in smtp.mails if "unexpected error" in m["Subject"])
    assert "ZeroDivisionError" in unexpected.get_payload()
    reload = next(m for m in smtp.mails if "broken" in m["Subject"])
    assert "SyntaxError" in reload.get_payload() or "line 1" in reload.get_payload()
    assert svc.call(b"service:ping") == b"pong"  # -E: logged, alerted, still serving


def test_a_storm_of_failures_sends_a_summary_not_a_hundred_mails(
    make_service: Callable[..., ServiceProcess], smtp: Inbox, boom: Path
) -> None:
    svc = make_service(alerts_config(max_per_minute=2, summary_seconds=1.0))
    ids = [job_id(svc.call(b"queue:add:boom:%d" % i)) for i in range(100)]
    for jid in ids:
        svc.call(f"queue:get:id:{jid}".encode())
    wait_until(lambda: any("more alerts" in s for s in smtp.subjects()), timeout=15)
    subjects = smtp.subjects()
    assert len(subjects) == 3, subjects
    assert sum("failed after 1 attempt" in s for s in subjects) == 2
    (summary,) = [m for m in smtp.mails if "more alerts" in m["Subject"]]
    assert "98 more alerts (98 job)" in summary["Subject"]
    assert "counts: job 98" in summary.get_payload()
    assert "... and 88 more" in summary.get_payload()
    wait_until(lambda: alert_stats(svc)["sent"] == 3)
    stats = alert_stats(svc)
    assert (stats["raised"], stats["summarised"], stats["sent"]) == (100, 98, 3)


def test_only_the_chosen_events_alert(
    make_service: Callable[..., ServiceProcess], smtp: Inbox, boom: Path
) -> None:
    svc = make_service(alerts_config(events='events = ["call"]\n'))
    jid = job_id(svc.call(b"queue:add:boom:queued"))
    svc.call(f"queue:get:id:{jid}".encode())  # a job: not chosen
    assert svc.call(b"boom:direct").startswith(b"500:")  # a direct call: chosen
    wait_until(lambda: smtp.mails)
    assert [s for s in smtp.subjects() if "boom" in s] == [
        next(s for s in smtp.subjects() if "Module boom raised ValueError: boom direct" in s)
    ]


def test_a_broken_mailer_is_logged_not_looped(
    make_service: Callable[..., ServiceProcess], boom: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("BGSERVICE_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("BGSERVICE_SMTP_PORT", str(closed))
    monkeypatch.setenv("BGSERVICE_SMTP_TO", "ops@example.org")
    svc = make_service(alerts_config(events='events = ["job", "call"]\n'))
    jid = job_id(svc.call(b"queue:add:boom:x"))
    svc.call(f"queue:get:id:{jid}".encode())
    svc.wait_for_log("not delivered by module notify_email: 502")
    stats = alert_stats(svc)  # counted before the warning is logged
    assert (stats["raised"], stats["sent"], stats["failed"]) == (1, 0, 1)


def test_a_missing_alert_module_is_reported_at_start(
    make_service: Callable[..., ServiceProcess],
) -> None:
    svc = make_service('[alerts]\nmodule = "pager"\n')
    assert "[alerts] module 'pager' is not loaded" in svc.log()


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ('[alerts]\nevents = ["job", "sms"]\n', "[alerts] events"),
        ("[alerts]\nmax_per_minute = 0\n", "[alerts] max_per_minute"),
        ("[http]\nport = 70000\n", "[http] port"),
        ("[http]\nenabled = 1\n", "[http] enabled"),
    ],
)
def test_bad_settings_are_refused(
    make_service: Callable[..., ServiceProcess], config: str, problem: str
) -> None:
    svc = make_service(config, start=False)
    svc.start(wait=False)
    assert svc.wait() == 2
    assert problem in svc.log()


def test_notify_email_takes_any_bytes_and_odd_fields(
    make_service: Callable[..., ServiceProcess], smtp: Inbox
) -> None:
    svc = make_service()
    # Not UTF-8: the text (with replacement characters) is the message, no traceback.
    assert svc.call(b"notify_email:\xff oops") == b"sent to 2"
    odd = json.dumps({"title": "odd", "time": "x", "counts": [1], "message": "m"}).encode()
    assert svc.call(b"notify_email:" + odd) == b"sent to 2"
    assert svc.call(b"notify_email:" + json.dumps({"time": 1e300}).encode()) == b"sent to 2"
    wait_until(lambda: len(smtp.mails) == 3)
    assert "\ufffd oops" in smtp.mails[0].get_payload()
    assert "Traceback" not in svc.log()


# --- issue 19, item 9: a start after an unclean stop, unknown-module bursts ------------

RECORDER = """
from pathlib import Path

def handle_tcp(request):
    with open(Path(__file__).with_name("alerts.log"), "a") as f:
        f.write(request.text + "\\n")
    return "ok"
"""


def recorded(modules_dir: Path) -> list[dict[str, Any]]:
    log = modules_dir / "alerts.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def recorder_config() -> str:
    return '[alerts]\nmodule = "recorder"\n'


def test_a_start_after_kill_9_alerts_and_a_clean_stop_does_not(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    write_module(modules_dir, "recorder", RECORDER)
    svc = make_service(recorder_config())
    assert alert_stats(svc)["raised"] == 0  # a first start: nothing to say
    assert svc.proc is not None
    svc.proc.kill()
    svc.proc.wait()
    svc.start()
    wait_until(lambda: [a for a in recorded(modules_dir) if a["event"] == "restart"])
    (alert,) = recorded(modules_dir)
    assert "unclean stop" in alert["title"]
    assert "did not stop cleanly" in alert["message"]
    assert svc.stop() == 0
    svc.start()  # after a clean stop: no alert (raised before the service is ready)
    assert alert_stats(svc)["raised"] == 0


def test_a_marker_whose_pid_is_now_another_process_still_means_an_unclean_stop(
    make_service: Callable[..., ServiceProcess], modules_dir: Path, tmp_path: Path
) -> None:
    # After a reboot (or once the crashed process was reaped) its pid belongs to some
    # other live process: the marker was taken for a live instance's, and no alert came.
    write_module(modules_dir, "recorder", RECORDER)
    svc = make_service(recorder_config(), start=False)
    (tmp_path / "jobs.db.running").write_text(json.dumps({"pid": 1, "started": 1.0}))
    svc.start()
    wait_until(lambda: [a for a in recorded(modules_dir) if a["event"] == "restart"])
    assert "the last run (pid 1, started" in svc.log()
    assert svc.stop() == 0


def test_an_instance_sharing_the_folder_keeps_its_marker(
    make_service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    # Instances sharing a folder (Redis engine) share the marker path: one running holds
    # it locked; another start leaves it alone, and its clean stop does not remove it.
    marker = tmp_path / "jobs.db.running"
    other = json.dumps({"pid": os.getpid(), "started": 1.0})
    marker.write_text(other)
    with open(marker, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the other instance, running
        svc = make_service()
        assert "started after an unclean stop" not in svc.log()
        assert "belongs to another instance running from this folder" in svc.log()
        assert svc.stop() == 0
        assert marker.read_text() == other
    svc.start()  # the other one ended without removing it: an unclean stop
    assert "started after an unclean stop" in svc.log()
    assert svc.stop() == 0
    assert not marker.exists()


def test_repeated_requests_for_an_unknown_module_alert_once_per_minute(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    write_module(modules_dir, "recorder", RECORDER)
    svc = make_service(recorder_config())
    for _ in range(9):
        assert svc.call(b"mistyped_job:x") == b"400: Unknown request"
        svc.send_udp(b"other_name:x")
    assert alert_stats(svc)["raised"] == 0  # nine of each: not yet
    for _ in range(20):
        svc.call(b"mistyped_job:x")
    wait_until(lambda: recorded(modules_dir))
    assert alert_stats(svc)["raised"] == 1  # once, however many more came
    (alert,) = recorded(modules_dir)
    assert alert["event"] == "unknown"
    assert alert["module"] == "mistyped_job"
    assert "10 requests for unknown module 'mistyped_job'" in alert["title"]


def test_mistyped_job_names_alert_as_mistyped_calls_do(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    # Only calls were counted: a deploy that queues jobs for a renamed module never said.
    write_module(modules_dir, "recorder", RECORDER)
    svc = make_service(recorder_config())
    for _ in range(30):
        assert svc.call(b"queue:add:mistyped_job:x") == b"400: Unknown request"
    wait_until(lambda: recorded(modules_dir))
    (alert,) = recorded(modules_dir)
    assert alert["event"] == "unknown" and alert["module"] == "mistyped_job"


# --- alerts at a stop ---------------------------------------------------------------------


def held_config(max_per_minute: int, summary_seconds: float) -> str:
    return (
        f'[alerts]\nmodule = "recorder"\nmax_per_minute = {max_per_minute}\n'
        f"summary_seconds = {summary_seconds}\n"
    )


def test_held_alerts_are_summarised_at_a_stop_not_thrown_away(
    make_service: Callable[..., ServiceProcess], modules_dir: Path, boom: Path
) -> None:
    write_module(modules_dir, "recorder", RECORDER)
    svc = make_service(held_config(1, 600))
    for n in range(4):
        svc.call(b"queue:add:boom:%d" % n)
    wait_until(lambda: alert_stats(svc)["held"] == 3)
    assert svc.stop() == 0
    summaries = [a for a in recorded(modules_dir) if a["event"] == "summary"]
    assert len(summaries) == 1 and summaries[0]["counts"] == {"job": 3}


def test_the_alert_saying_why_the_service_stops_is_delivered(
    make_service: Callable[..., ServiceProcess], modules_dir: Path, boom: Path
) -> None:
    # An error outside any request stops the service (exit 70); held (the minute's
    # budget spent), its alert was dropped at the stop, with no log line.
    write_module(modules_dir, "recorder", RECORDER)
    write_module(modules_dir, "crash", STRAY_ERROR)
    svc = make_service(held_config(1, 600))
    svc.call(b"queue:add:boom:first")
    wait_until(lambda: len(recorded(modules_dir)) == 1)
    assert svc.call(b"crash:x") == b"scheduled"
    assert svc.wait() == 70
    errors = [a for a in recorded(modules_dir) if a["event"] == "error"]
    assert errors and "stray callback" in errors[0]["message"]


def test_a_single_held_alert_is_sent_as_itself(
    make_service: Callable[..., ServiceProcess], modules_dir: Path, boom: Path
) -> None:
    # Held alone, it came as "1 more alerts (1 job)" without its message.
    write_module(modules_dir, "recorder", RECORDER)
    svc = make_service(held_config(1, 0.5))
    svc.call(b"queue:add:boom:first")
    svc.call(b"queue:add:boom:second")
    wait_until(lambda: len(recorded(modules_dir)) == 2)
    second = recorded(modules_dir)[1]
    assert second["event"] == "job" and "boom second" in second["message"]


def test_a_process_mode_module_failing_a_call_raises_a_call_alert(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    # Errors from a worker process are ServiceErrors already: they skipped the 'call'
    # alert a thread or loop handler's failure raises.
    write_module(modules_dir, "recorder", RECORDER)
    write_module(modules_dir, "inproc", """
        EXECUTION = "process"
        TIMEOUT = 1

        def handle_tcp(request):
            if request.text == "slow":
                import time
                time.sleep(5)
            raise ValueError("boom in a worker")
    """)  # fmt: skip
    svc = make_service('[alerts]\nmodule = "recorder"\nevents = ["error", "call"]\n')
    assert svc.call(b"inproc:x").startswith(b"500: Module inproc raised ValueError")
    assert svc.call(b"inproc:slow").startswith(b"504: ")
    wait_until(lambda: len([a for a in recorded(modules_dir) if a["event"] == "call"]) == 2)
    titles = [a["title"] for a in recorded(modules_dir) if a["event"] == "call"]
    assert "raised ValueError" in titles[0] and "timed out" in titles[1]


# --- floods of alerts: the log, the summaries -----------------------------------------------

STUCK = """
import asyncio
from pathlib import Path

TIMEOUT = 300

async def handle_tcp(request):
    # Stuck (a mail server that does not answer) until the test lets it go.
    while not Path(__file__).with_name("release").exists():
        await asyncio.sleep(0.05)
    return "ok"
"""

DROPPED = re.compile(
    r"alert dropped \(1000 waiting\): .*?(?: \((\d+) more since the last line\))?$"
    r"|(\d+) more alerts? dropped \(1000 waiting\) since the last line, the first: ",
    re.M,
)


def _dropped_lines(log: str) -> tuple[int, int]:
    """(the log's lines about dropped alerts, the alerts they count)."""
    said = DROPPED.findall(log)
    return len(said), sum(int(more or 1) if not later else int(later) for more, later in said)


def test_dropped_alerts_are_logged_once_per_interval_with_counts(
    make_service: Callable[..., ServiceProcess], modules_dir: Path, boom: Path
) -> None:
    # With the alert module stuck and 1000 alerts waiting, each further alert logged a
    # warning of its own: a line per failure of a flood, the flood the limit is for.
    write_module(modules_dir, "stuck", STUCK)
    svc = make_service('[alerts]\nmodule = "stuck"\nevents = ["call"]\nmax_per_minute = 100000\n')
    started = time.monotonic()
    client = svc.framed()
    for _ in range(11):  # 1100 failing calls, a "call" alert each
        client.send(*[b"boom:x"] * 100)
        assert all(client.recv()[0] == 500 for _ in range(100))
    client.close()
    elapsed = time.monotonic() - started
    dropped = alert_stats(svc)["dropped"]
    assert dropped >= 99  # 1100 raised, one with the module, 1000 waiting
    # The first at once, the rest counted and said (with the first's title) when due.
    wait_until(lambda: _dropped_lines(svc.log())[1] == dropped, timeout=15)
    lines, _ = _dropped_lines(svc.log())
    assert lines <= 2 + elapsed / 5, svc.log()  # (99 before: one per alert dropped)
    assert "since the last line, the first: Module boom raised ValueError: boom x" in svc.log()
    (modules_dir / "release").touch()
    assert svc.stop() == 0


def test_a_summary_of_reload_failures_says_what_failed(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    # A summary lists titles only, and a reload failure's was "module broken failed to
    # load": twice, it said nothing of why.
    write_module(modules_dir, "recorder", RECORDER)
    make_service(f'{held_config(1, 0.5)}events = ["reload"]\n')
    write_module(modules_dir, "first", "raise RuntimeError('no database configured')\n")
    wait_until(lambda: recorded(modules_dir))
    write_module(modules_dir, "broken", "def handle_tcp(request:\n")
    write_module(modules_dir, "other", "import no_such_package_here\n")
    wait_until(lambda: [a for a in recorded(modules_dir) if a["event"] == "summary"])
    (alone,) = [a for a in recorded(modules_dir) if a["event"] == "reload"]
    assert alone["title"].startswith("module first failed to load: ")
    assert "no database configured" in alone["title"]
    (summary,) = [a for a in recorded(modules_dir) if a["event"] == "summary"]
    titles = dict(line.split(" failed to load: ", 1) for line in summary["message"].splitlines())
    assert set(titles) == {"- module broken", "- module other"}
    assert "SyntaxError" in titles["- module broken"] or "never closed" in titles["- module broken"]
    assert "no_such_package_here" in titles["- module other"]
    assert all(len(title) <= 100 for title in titles.values())
