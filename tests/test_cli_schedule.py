"""``bgservice schedule`` (bgservice/cli_schedule.py): what ``list`` prints (pure), and
``add`` against a real service."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

from bgservice.cli_schedule import schedules_lines
from tests.conftest import REPO, wait_until

NOW = dt.datetime(2026, 12, 4, 16, 0, tzinfo=dt.UTC).timestamp()


def _schedule(**values: object) -> dict[str, object]:
    return {"name": "nightly", "module": "echo", "cron": None, "every": None, "tz": "UTC",
            "paused": False, "last_slot": None, "next_run": None, "origin": "runtime",
            **values}  # fmt: skip


def test_a_cron_schedules_times_are_in_its_own_zone_named():
    # "30 2 * * *" in Berlin showed as 01:30:00, the host's (UTC) time, with no zone.
    next_run = dt.datetime(2026, 12, 5, 1, 30, tzinfo=dt.UTC).timestamp()
    last = dt.datetime(2026, 7, 4, 0, 30, tzinfo=dt.UTC).timestamp()  # summer time
    berlin = _schedule(cron="30 2 * * *", tz="Europe/Berlin", next_run=next_run, last_slot=last)
    row = schedules_lines([berlin], NOW)[1]
    assert "2026-12-05 02:30:00 CET (in 9 h 30 min)" in row
    assert "2026-07-04 02:30:00 CEST (" in row
    # An every schedule's times are the host's, named too: a table can mix zones.
    sweep = _schedule(name="sweep", every=60, next_run=NOW + 60)
    local = dt.datetime.fromtimestamp(NOW + 60).astimezone().strftime("%H:%M:%S %Z")
    assert f"{local} (in 1 min)" in schedules_lines([berlin, sweep], NOW)[2]


def schedule_cli(service, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``bgservice schedule ARGS`` once the schedules are loaded (a 503 for a moment)."""
    wait_until(lambda: not service.call(b"queue:schedules").startswith(b"503"))
    address = "{}:{}".format(*service.tcp)
    return subprocess.run(
        [sys.executable, str(REPO / "service.py"), "schedule", *args],
        capture_output=True, env={**os.environ, "BGSERVICE_ADDRESS": address}, timeout=60,
    )  # fmt: skip


def test_schedule_add_takes_every_option_the_service_takes(service):
    # --backoff was missing ("No such option"), though queue:schedule and the HTTP API
    # take it: a schedule's jobs could not be given a retry delay from the shell.
    added = schedule_cli(
        service, "add", "cl1", "echo", "hi", "--cron", "0 3 * * *", "--tz", "Europe/Berlin",
        "--missed", "skip", "--paused", "--priority", "3", "--retries", "2", "--backoff", "5",
        "--job-timeout", "7", "--json",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    (made,) = json.loads(added.stdout)
    (kept,) = json.loads(service.call(b"queue:schedules"))
    assert made == kept
    assert (kept["name"], kept["module"], kept["cron"]) == ("cl1", "echo", "0 3 * * *")
    assert (kept["tz"], kept["missed"], kept["paused"]) == ("Europe/Berlin", "skip", True)
    options = {name: float(value) for name, value in kept["options"].items()}  # (as sent)
    assert options == {"priority": 3, "retries": 2, "backoff": 5, "timeout": 7}


def test_schedule_add_refuses_a_time_zone_for_every(service):
    # --every 86400 --tz Europe/Berlin was taken, the zone ignored (every counts seconds of
    # the epoch) and hidden by the list: a user thought it ran at midnight Berlin time.
    added = schedule_cli(service, "add", "x", "echo", "d", "--every", "86400", "--tz",
                         "Europe/Berlin")  # fmt: skip
    assert added.returncode == 1 and added.stdout == b""
    assert added.stderr.startswith(b"400: schedule x: tz is for cron schedules"), added.stderr
    assert schedule_cli(service, "list").stdout == b"no schedules\n"


def test_schedule_add_of_an_unknown_module_names_it(service):
    # A bare "400: Unknown request", which read as if the service did not know `schedule`
    # (call and queue add say which module is not loaded).
    added = schedule_cli(service, "add", "s8", "nosuch", "x", "--every", "30")
    assert added.returncode == 1
    assert added.stderr == (b"400: Unknown request\n(no module named 'nosuch' is loaded: "
                            b"see 'bgservice modules')\n"), added.stderr  # fmt: skip
