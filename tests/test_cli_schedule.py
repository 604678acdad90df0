"""``bgservice schedule`` (bgservice/cli_schedule.py): what ``list`` prints (pure), and
``add`` against a real service."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

from bgservice.cli_schedule import schedules_lines
from tests.conftest import REPO

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


def test_schedule_add_takes_every_option_the_service_takes(service):
    # --backoff was missing ("No such option"), though queue:schedule and the HTTP API
    # take it: a schedule's jobs could not be given a retry delay from the shell.
    address = "{}:{}".format(*service.tcp)
    added = subprocess.run(
        [sys.executable, str(REPO / "service.py"), "schedule", "add", "cl1", "echo", "hi",
         "--every", "60", "--tz", "Europe/Berlin", "--missed", "skip", "--paused",
         "--priority", "3", "--retries", "2", "--backoff", "5", "--job-timeout", "7",
         "--json"],
        capture_output=True, env={**os.environ, "BGSERVICE_ADDRESS": address}, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    (made,) = json.loads(added.stdout)
    (kept,) = json.loads(service.call(b"queue:schedules"))
    assert made == kept
    assert (kept["name"], kept["module"], kept["every"]) == ("cl1", "echo", 60)
    assert (kept["tz"], kept["missed"], kept["paused"]) == ("Europe/Berlin", "skip", True)
    options = {name: float(value) for name, value in kept["options"].items()}  # (as sent)
    assert options == {"priority": 3, "retries": 2, "backoff": 5, "timeout": 7}
