"""Recurring jobs against a real service: config and run-time schedules, each slot fired
once across restarts and across instances on one Redis (bgservice.queue.scheduler)."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from bgservice.errors import BadRequest
from bgservice.queue.schedules import make_schedule
from tests.conftest import (
    REPO,
    Framed,
    RedisServer,
    ServiceProcess,
    redis_command,
    redis_config,
    wait_until,
    write_module,
)

BOTH = pytest.mark.parametrize("queue_backend", ["sqlite", "redis"])

TICK = '[[schedule]]\nname = "tick"\nmodule = "echo"\ndata = "tock"\nevery = 1\n'


def runs(svc, name: str = "tick") -> list[str]:
    """The unique keys of the schedule's jobs (one per slot fired), every state. The states
    are listed one after another, so a job that moves meanwhile is counted once, by id."""
    keys: dict[int, str] = {}
    for state in ("waiting", "running", "done", "failed"):
        listed = json.loads(svc.call(b"queue:list?state=%s&limit=1000" % state.encode()))
        keys |= {
            j["id"]: j["unique"]
            for j in listed[state]
            if (j["unique"] or "").startswith(f"schedule:{name}@")
        }
    return list(keys.values())


def schedules(svc) -> list[dict]:
    """``queue:schedules``, once they are loaded (503 for the moment after the start)."""
    reply = wait_until(
        lambda: (r := svc.call(b"queue:schedules")) and not r.startswith(b"503") and r
    )
    return list(json.loads(reply))


def slots(keys: list[str]) -> list[float]:
    return sorted(float(k.rpartition("@")[2]) for k in keys)


def assert_each_slot_once(keys: list[str]) -> None:
    twice = [k for k, n in Counter(keys).items() if n > 1]
    assert not twice, f"slots fired more than once: {twice}"
    assert all(s == int(s) for s in slots(keys))  # every=1: on whole seconds


@BOTH
def test_a_config_schedule_fires_every_slot_once_across_restarts(make_service):
    svc = make_service(TICK)
    wait_until(lambda: len(runs(svc)) >= 3, timeout=10)
    listed = schedules(svc)
    assert listed[0]["name"] == "tick" and listed[0]["origin"] == "config"
    assert listed[0]["next_run"] > time.time() - 1
    svc.stop()
    time.sleep(2.5)  # slots pass while it is down: missed = "once" runs one of them
    again = make_service(TICK)
    before = len(runs(again))
    wait_until(lambda: len(runs(again)) >= before + 3, timeout=10)
    again.signal(signal.SIGKILL)  # no clean stop: the slot state is what the commits left
    again.wait()
    third = make_service(TICK)
    wait_until(lambda: len(runs(third)) >= before + 6, timeout=10)
    keys = runs(third)
    assert_each_slot_once(keys)
    fired = slots(keys)
    gaps = [b - a for a, b in itertools.pairwise(fired)]
    assert max(gaps) >= 2  # the downtime: its slots were not all run, one was (or none late)
    assert json.loads(third.call(b"queue:status:id:1"))["state"] == "done"


@pytest.mark.parametrize("queue_backend", ["redis"])
def test_two_instances_on_one_redis_fire_each_slot_once(make_service):
    first = make_service(TICK)  # both on the fixture's Redis and prefix: one queue
    second = make_service(TICK, root=first.root / "second")
    wait_until(lambda: len(runs(first)) >= 5, timeout=15)
    # The same queue, seen from the other instance (a job moving from running to done
    # between the two listings may be missed once: look again).
    keys = wait_until(lambda: (found := runs(second)) and len(found) >= 5 and found)
    assert_each_slot_once(keys)
    # A schedule added on one instance fires (once) from either.
    first.call(b"queue:schedule?name=late&every=1:echo:x")
    wait_until(lambda: any(s["name"] == "late" for s in schedules(second)))
    wait_until(lambda: len(runs(second, "late")) >= 3, timeout=10)
    assert_each_slot_once(runs(first, "late"))


@BOTH
def test_schedules_at_run_time(make_service):
    svc = make_service(TICK)
    schedules(svc)  # loaded
    made = json.loads(svc.call(b"queue:schedule?name=sweep&every=1&priority=4:echo:swept"))
    assert made["name"] == "sweep" and made["options"] == {"priority": "4"}
    wait_until(lambda: len(runs(svc, "sweep")) >= 2, timeout=10)
    jid = json.loads(svc.call(b"queue:list?state=done&limit=1"))["done"][0]["id"]
    assert json.loads(svc.call(b"queue:status:id:%d" % jid))["priority"] in (0, 4)

    paused = json.loads(svc.call(b"queue:pause:sweep"))
    assert paused["paused"] is True and paused["next_run"] is None
    time.sleep(0.5)
    count = len(runs(svc, "sweep"))
    time.sleep(2.2)
    assert len(runs(svc, "sweep")) == count  # paused: no run
    assert json.loads(svc.call(b"queue:resume:sweep"))["paused"] is False
    wait_until(lambda: len(runs(svc, "sweep")) > count, timeout=10)

    now_job = svc.call(b"queue:fire:sweep")  # a run now, an ordinary job
    assert now_job.startswith(b"id:")
    assert svc.call(b"queue:get:" + now_job) == b"swept"

    assert svc.call(b"queue:unschedule:sweep") == b"removed"
    assert "sweep" not in [s["name"] for s in schedules(svc)]
    assert svc.call(b"queue:unschedule:sweep", half_close=True).startswith(b"404:")
    assert svc.call(b"queue:unschedule:tick").startswith(b"409: schedule tick is defined in")
    for bad, why in [
        (b"queue:schedule?name=x:echo:x", b"give either cron or every"),
        (b"queue:schedule?name=x&cron=nope:echo:x", b"bad cron expression"),
        (b"queue:schedule?name=x&cron=0+3+*+*+*&tz=Mars%2FBase:echo:x", b"unknown time zone"),
        (b"queue:schedule?name=x&every=5&priority=high:echo:x", b"option priority"),
        (b"queue:schedule?name=x&every=5&colour=red:echo:x", b"unknown key 'colour'"),
        (b"queue:schedule?name=x&evrey=5:echo:x", b"'evrey', did you mean every?"),
        (b"queue:schedule?nmae=x&every=5:echo:x", b"schedule: unknown key 'nmae', did you"),
        (b"queue:schedule?name=..&every=5:echo:x", b"name must be"),
        (b"queue:schedule?name=x&every=5&missed=all:echo:x", b"missed must be one of"),
        # Refused as queue:add refuses its job (taken, each slot was logged and lost).
        (b"queue:schedule?name=x&every=5:ehco:x", b"Unknown request"),
    ]:
        reply = svc.call(bad)
        assert reply.startswith(b"400: ") and why in reply, (bad, reply)
    assert "x" not in [s["name"] for s in schedules(svc)]


@BOTH
def test_a_survived_restart_keeps_a_run_time_schedule_and_its_pause(make_service):
    svc = make_service()
    assert schedules(svc) == []
    svc.call(b"queue:schedule?name=kept&cron=0+3+*+*+*&tz=Europe%2FBerlin:echo:x")
    svc.call(b"queue:pause:kept")
    svc.stop()
    again = make_service()
    (kept,) = schedules(again)
    assert (kept["name"], kept["cron"], kept["tz"], kept["paused"]) == (
        "kept",
        "0 3 * * *",
        "Europe/Berlin",
        True,
    )
    resumed = json.loads(again.call(b"queue:resume:kept"))
    assert resumed["next_run"] > time.time()
    berlin = datetime.fromtimestamp(resumed["next_run"], ZoneInfo("Europe/Berlin"))
    assert (berlin.hour, berlin.minute) == (3, 0)


def test_a_bad_schedule_in_the_config_stops_the_start(tmp_path):
    config = tmp_path / "service.config"
    config.write_text('[[schedule]]\nname = "x"\nmodule = "echo"\ncron = "61 * * * *"\n')
    done = subprocess.run(
        [sys.executable, str(REPO / "service.py"), "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    # The key at fault and its line (every error once pointed at name, on line 2).
    assert "[[schedule]] #1 cron (line 4): schedule x: bad cron expression" in done.stderr


@pytest.mark.parametrize(
    ("table", "key", "line"),
    [
        ('name = "a b"\nmodule = "echo"\nevery = 60\n', "name", 2),
        ('name = "x"\nmodule = "e:cho"\nevery = 60\n', "module", 3),
        ('name = "x"\nmodule = "echo"\nevery = 0\n', "every", 4),
        ('name = "x"\nmodule = "echo"\nevery = true\n', "every", 4),
        ('name = "x"\nmodule = "echo"\nevery = 60\ncron = "* * * * *"\n', "every", 4),
        ('name = "x"\nmodule = "echo"\n', "cron", None),  # neither: no line to show
        ('name = "x"\nmodule = "echo"\ncron = "* * *"\n', "cron", 4),
        ('name = "x"\nmodule = "echo"\ncron = "0 3 * * *"\ntz = "Mars/Olympus"\n', "tz", 5),
        ('name = "x"\nmodule = "echo"\nevery = 60\ntz = "Europe/Berlin"\n', "tz", 5),
        ('name = "x"\nmodule = "echo"\nevery = 60\nmissed = "all"\n', "missed", 5),
        ('name = "x"\nmodule = "echo"\nevery = 60\npaused = "maybe"\n', "paused", 5),
        ('name = "x"\nmodule = "echo"\nevery = 60\ncolour = "red"\n', "colour", 5),
        ('name = "x"\nmodule = "echo"\nevery = 60\npriority = "high"\n', "priority", 5),
        ('name = "x"\nmodule = "echo"\nevery = 60\noptions = { retries = -1 }\n', "options", 5),
        ('name = "x"\nmodule = "echo"\nevery = 60\noptions = { wait = 1 }\n', "options", 5),
        # Each key of its TOML type: a table as data was sent as Python's repr of it,
        # true as "True"; every = "60" and name = 7 were taken.
        ('name = "x"\nmodule = "echo"\nevery = 60\ndata = { user = "bob" }\n', "data", 5),
        ('name = "x"\nmodule = "echo"\nevery = 60\ndata = true\n', "data", 5),
        ('name = 7\nmodule = "echo"\nevery = 60\n', "name", 2),
        ('name = "x"\nmodule = "echo"\nevery = "60"\n', "every", 4),
        ('name = "x"\nmodule = "echo"\nevery = 60\nretries = true\n', "retries", 5),
        ('name = "x"\nmodule = "echo"\nevery = 60\noptions = { priority = "5" }\n', "options", 5),
    ],
)
def test_a_bad_schedule_names_the_key_at_fault_and_its_line(tmp_path, table, key, line):
    from bgservice import config
    from bgservice.errors import ConfigError

    path = tmp_path / "service.config"
    path.write_text("[[schedule]]\n" + table)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    at = f" (line {line})" if line else ""
    assert f"[[schedule]] #1 {key}{at}: " in str(info.value)


def test_a_schedule_table_says_the_type_a_key_must_be(tmp_path):
    from bgservice import config
    from bgservice.errors import ConfigError

    path = tmp_path / "service.config"
    path.write_text('[[schedule]]\nname = "x"\nmodule = "echo"\nevery = 60\ndata = { a = 1 }\n')
    with pytest.raises(ConfigError, match="schedule x: data must be a string, not a table"):
        config.load(path)
    path.write_text('[[schedule]]\nname = "x"\nmodule = "echo"\nevery = 60\ndata = "{}"\n'
                    'options = { priority = 5, backoff = 1.5 }\n')  # fmt: skip
    (made,) = config.load(path).schedules  # numbers, a string of data: as before
    assert (made.data, made.options) == (b"{}", {"priority": "5", "backoff": "1.5"})


def test_a_repeated_schedule_name_points_at_the_second_one(tmp_path):
    from bgservice import config
    from bgservice.errors import ConfigError

    one = '[[schedule]]\nname = "x"\nmodule = "echo"\nevery = 60\n'
    path = tmp_path / "service.config"
    path.write_text(one + one)
    with pytest.raises(ConfigError, match=r"\[\[schedule\]\] #2 name \(line 6\): 'x' is the name"):
        config.load(path)


def test_slots_of_cron_and_interval():
    nightly = make_schedule({"name": "n", "module": "m", "cron": "30 2 * * *", "tz": "UTC"}, b"")
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()
    assert nightly.next_slot(start) == datetime(2026, 3, 2, 2, 30, tzinfo=UTC).timestamp()
    two_days = start + 2 * 86400
    assert nightly.latest_slot(two_days) == datetime(2026, 3, 3, 2, 30, tzinfo=UTC).timestamp()
    assert nightly.due(start, two_days) == nightly.latest_slot(two_days)  # once, the latest
    skip = make_schedule({"name": "s", "module": "m", "every": 3600, "missed": "skip"}, b"")
    assert skip.due(start, start + 3600 + 90) is None  # 90 s late: missed, skipped
    assert skip.due(start, start + 3600 + 30) == start + 3600  # 30 s late: on time
    with pytest.raises(BadRequest):
        make_schedule({"name": "s", "module": "m", "every": 0.5}, b"")


def test_a_fractional_interval_never_gives_the_same_slot_twice():
    # Slot n is n * every; for every = 1.3 the quotient rounds either way: the slot after
    # a moment was sometimes not after it, and the latest slot at a slot an earlier one
    # (one moment in ten): a slot fired twice, or never.
    schedule = make_schedule({"name": "f", "module": "m", "every": 1.3}, b"")
    moments = random.Random(7)
    for _ in range(20_000):
        moment = moments.uniform(1.7e9, 3e9)
        slot = schedule.next_slot(moment)
        assert moment < slot <= moment + 1.3
        assert schedule.latest_slot(slot) == slot and schedule.latest_slot(moment) < slot
        assert schedule.next_slot(slot) > slot


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"cron": "0 */5 * * * *"}, "five fields (minute hour day-of-month month day-of-week)"),
        ({"cron": "0 0 3 * * ?"}, "five fields"),
        ({"every": 60, "paused": "maybe"}, "paused must be true or false, got 'maybe'"),
        ({"every": 60, "paused": [1]}, "paused must be true or false"),
    ],
)
def test_a_schedule_says_what_is_wrong_with_it(values, message):
    # A six-field cron was read by cronsim as seconds first (a run every second where
    # Quartz meant daily); paused = "maybe" was read as false, silently.
    with pytest.raises(BadRequest, match=re.escape(message)):
        make_schedule({"name": "s", "module": "m", **values}, b"")
    no = make_schedule({"name": "s", "module": "m", "every": 60, "paused": "No"}, b"")
    assert no.paused is False


def test_a_cron_schedule_fires_each_slot_once_through_a_dst_fall_back():
    # Berlin's clocks go back at 03:00 CEST on 2026-10-25: 02:00-02:59 happens twice. Going
    # back from "now" misses the second pass, and once fired a first-pass slot every minute
    # of that hour (61 jobs) while the second pass's slots never ran (a review found it).
    every20 = make_schedule(
        {"name": "d", "module": "m", "cron": "*/20 * * * *", "tz": "Europe/Berlin"}, b""
    )
    start = datetime(2026, 10, 24, 23, 50, tzinfo=UTC).timestamp()  # 01:50 CEST
    last, fired = start, []
    for now in range(int(start), int(start) + 3 * 3600, 60):  # a tick a minute, 3 hours
        if (slot := every20.due(last, now)) is not None:
            fired.append(slot)
            last = slot
    assert fired == sorted(set(fired))  # each once, in order
    berlin = [datetime.fromtimestamp(t, ZoneInfo("Europe/Berlin")) for t in fired]
    second_pass = [b.strftime("%H:%M") for b in berlin if b.utcoffset().seconds == 3600]
    assert second_pass[:3] == ["02:00", "02:20", "02:40"]
    assert len(fired) == 9  # 02:00 to 04:40 CEST/CET: 3 hours of wall time, 3 slots each


@BOTH
def test_a_resumed_schedule_skips_the_slots_of_its_pause(make_service):
    # Resuming once fired the slot that fell during the pause (docs: "resumes from its next
    # slot"); and a slot due at start (missed while the service was down) waited for the
    # next one or a minute's recheck instead of running at once.
    svc = make_service()
    schedules(svc)  # loaded (503 "Schedules not loaded yet" for a moment after the start)
    svc.call(b"queue:schedule?name=p&every=3:echo:x")
    svc.call(b"queue:pause:p")
    time.sleep(3.5)  # at least one slot falls in the pause
    resumed_at = time.time()
    svc.call(b"queue:resume:p")
    wait_until(lambda: slots(runs(svc, "p")), timeout=10)
    assert min(slots(runs(svc, "p"))) > resumed_at


@BOTH
def test_a_replace_keeps_a_pause_unless_it_says_paused_and_lifting_it_is_a_resume(make_service):
    # A paused schedule given new data (its times the same) was unpaused, and a slot that
    # fell during the pause fired at once (with missed=once, one of any age): a replace is
    # no resume. Over HTTP too: "paused" left out (null) keeps the pause.
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    schedules(svc)  # loaded
    svc.call(b"queue:schedule?name=p&every=2:echo:one")
    paused = json.loads(svc.call(b"queue:pause:p"))
    time.sleep(4.5)  # two slots fall in the pause
    kept = json.loads(svc.call(b"queue:schedule?name=p&every=2:echo:two"))
    assert (kept["paused"], kept["next_run"], kept["last_slot"]) == (
        True, None, paused["last_slot"]), kept  # fmt: skip
    body = {"name": "p", "module": "echo", "data": "three", "every": 2, "paused": None}
    status, kept, _ = svc.http("POST", "/api/v1/schedules", body)
    assert (status, kept["paused"]) == (201, True), kept
    time.sleep(2.5)  # a slot passes: still none fires
    assert slots(runs(svc, "p")) == ([paused["last_slot"]] if paused["last_slot"] else [])
    lifted_at = time.time()
    lifted = json.loads(svc.call(b"queue:schedule?name=p&every=2&paused=0:echo:four"))
    assert lifted["paused"] is False and lifted["next_run"] > lifted_at, lifted
    wait_until(lambda: max(slots(runs(svc, "p")), default=0) > lifted_at, timeout=10)
    assert [s for s in slots(runs(svc, "p")) if s > (paused["last_slot"] or 0)] == sorted(
        s for s in slots(runs(svc, "p")) if s > lifted_at)  # none of the pause's


@BOTH
def test_a_slot_missed_while_down_runs_at_the_start(make_service):
    # missed = "once" (the default): the latest slot missed while the service was down
    # runs at the start. It once waited for the timer, which only looked at later slots.
    every5 = '[[schedule]]\nname = "five"\nmodule = "echo"\ndata = "x"\nevery = 5\n'
    svc = make_service(every5)
    schedules(svc)
    svc.stop()
    time.sleep(5 - time.time() % 5 + 0.3)  # a slot falls while it is down
    missed = time.time() // 5 * 5
    again = make_service(every5)
    wait_until(lambda: missed in slots(runs(again, "five")), timeout=10)


@BOTH
def test_a_long_schedule_name_runs_under_a_small_max_name_chars(make_service):
    """A run's unique key (schedule:NAME@SLOT, up to 88 characters) is the service's own:
    [queue] max_name_chars bounds what clients send. It once refused every run of a
    schedule whose key was longer, at each slot, for as long as the schedule lived."""
    name = "n" * 64
    svc = make_service(f'[queue]\nmax_name_chars = 40\n[[schedule]]\nname = "{name}"\n'
                       'module = "echo"\ndata = "x"\nevery = 1\n')  # fmt: skip
    wait_until(lambda: len(runs(svc, name)) >= 2, timeout=10)
    assert "refused" not in svc.log()
    too_long = svc.call(b"queue:add?unique=%s:echo:x" % (b"k" * 41))
    assert too_long == b"400: option unique: at most 40 characters"


def test_schedules_through_the_clients_and_the_cli(service):
    from bgservice.client import AsyncClient, Client, ReplyError
    from tests.test_cli import bg

    schedules(service)
    address = "{}:{}".format(*service.tcp)
    with Client(address) as client:
        made = client.schedule("nightly", "echo", "n", cron="0 3 * * *", tz="Europe/Berlin")
        assert made["cron"] == "0 3 * * *" and made["next_run"] > time.time()
        assert client.pause("nightly")["paused"] is True
        assert client.resume("nightly")["paused"] is False
        assert client.get(client.fire("nightly")) == b"n"
        assert [s["name"] for s in client.schedules()] == ["nightly"]
        with pytest.raises(ReplyError) as err:
            client.schedule("bad", "echo", every=0)
        assert err.value.code == 400

    async def from_async() -> list[str]:
        async with AsyncClient(address) as client:
            await client.schedule("hourly", "echo", every=3600, priority=2)
            names = [s["name"] for s in await client.schedules()]
            await client.unschedule("hourly")
            return names

    assert asyncio.run(from_async()) == ["hourly", "nightly"]

    listed = bg(service, "schedule", "list")
    assert listed.returncode == 0
    assert re.search(rb"nightly\s+echo\s+0 3 \* \* \*\s+Europe/Berlin\s+\d{4}-", listed.stdout)
    added = bg(service, "schedule", "add", "sweep", "echo", "x", "--every", "60", "--paused")
    assert added.returncode == 0 and b"paused" in added.stdout
    assert bg(service, "schedule", "run", "sweep").stdout.strip().isdigit()
    assert bg(service, "schedule", "remove", "sweep").stdout == b"removed\n"
    gone = bg(service, "schedule", "remove", "sweep")
    assert gone.returncode == 1 and gone.stderr.startswith(b"404: Schedule 'sweep' not found")
    as_json = json.loads(bg(service, "schedule", "list", "--json").stdout)
    assert [s["name"] for s in as_json] == ["nightly"]


def named(svc, name: str) -> dict:
    return next(s for s in schedules(svc) if s["name"] == name)


def every2(paused: str = "", data: str = "x", every: int = 2) -> str:
    head = f'[[schedule]]\nname = "two"\nmodule = "echo"\ndata = "{data}"\n'
    return f"{head}every = {every}\n{paused}"


@BOTH
def test_a_pause_from_the_config_ends_when_the_config_drops_it(make_service):
    # The start once took any stored pause for one made at run time, the config's own too:
    # a schedule once paused in service.config stayed paused for good.
    svc = make_service(every2("paused = true\n", every=5))
    assert named(svc, "two")["paused"] is True
    svc.stop()
    time.sleep(5 - time.time() % 5 + 0.3)  # a slot falls while it is down, paused: no run
    started = time.time()
    again = make_service(every2(every=5))
    two = named(again, "two")
    assert two["paused"] is False and two["next_run"] > started
    wait_until(lambda: runs(again, "two"), timeout=15)
    assert min(slots(runs(again, "two"))) > started  # from its next slot, as a resume does


@BOTH
def test_a_pause_made_at_run_time_outlasts_config_changes(make_service):
    svc = make_service(every2())
    schedules(svc)
    assert json.loads(svc.call(b"queue:pause:two"))["paused"] is True
    svc.stop()
    again = make_service(every2("paused = true\n", data="changed"))  # paused by both
    assert named(again, "two")["paused"] is True
    again.stop()
    third = make_service(every2(data="changed"))  # the config's pause gone, not the other
    assert named(third, "two")["paused"] is True
    assert json.loads(third.call(b"queue:resume:two"))["paused"] is False
    third.stop()
    fourth = make_service(every2("paused = true\n"))  # the config pauses it whatever ran
    assert named(fourth, "two")["paused"] is True
    assert json.loads(fourth.call(b"queue:resume:two"))["paused"] is False
    fourth.stop()
    assert named(make_service(every2("paused = true\n")), "two")["paused"] is True


def test_a_pause_stored_by_an_older_version_still_loads():
    # Stored before pauses recorded where they came from: kept while the config does not
    # pause the schedule itself (a run-time pause, as before), the config's while it does.
    from bgservice.config import QueueSettings
    from bgservice.queue.scheduler import Scheduler
    from bgservice.queue.schedules import Schedule

    class Store:
        settings = QueueSettings()

        def __init__(self, stored: Schedule) -> None:
            self.stored = {stored.name: (stored, 0.0)}

        async def load_schedules(self):
            return dict(self.stored)

        async def put_schedule(self, schedule, last, reset=False):
            self.stored[schedule.name] = (schedule, self.stored[schedule.name][1])

        async def remove_schedule(self, name):
            return self.stored.pop(name, None) is not None

        def check_schedule(self, schedule):
            pass

        def schedules_changed(self):
            pass

    old = '{"name": "two", "module": "echo", "data": "x", "cron": null, "every": 2.0,'
    old += ' "tz": "UTC", "missed": "once", "options": {}, "paused": true, "origin": "config"}'
    assert Schedule.from_stored(old).paused_by is None

    def start(config: str) -> Schedule:
        (configured,) = make_schedules(config)
        store = Store(Schedule.from_stored(old))

        async def run() -> None:
            scheduler = Scheduler(store, (configured,))
            await scheduler.start()
            scheduler.stop()

        asyncio.run(run())
        return store.stored["two"][0]

    kept = start(every2())
    assert (kept.paused, kept.paused_by) == (True, "runtime")
    configs = start(every2("paused = true\n"))
    assert (configs.paused, configs.paused_by) == (True, "config")


def make_schedules(config: str) -> list:
    """The ``[[schedule]]`` tables of ``config``, as the service reads them."""
    import tomllib

    tables = tomllib.loads(config)["schedule"]
    return [make_schedule(t, str(t.pop("data", "")).encode(), "config") for t in tables]


def test_a_run_a_module_can_never_take_is_refused_once_per_slot_not_retried(make_service):
    # A schedule of a module without a TCP handler (501) was retried every second as if
    # the queue were full (503): up to 9 warnings a second, for ever.
    # (Such a schedule is refused when made: the module loses its handler after.)
    svc = make_service("")
    module = svc.modules / "udponly.py"
    module.write_text("def handle_tcp(request):\n    pass\n")
    wait_until(lambda: b"udponly" in svc.call(b"service:modules"))
    assert svc.call(b"queue:schedule?name=never&every=1:udponly:x").startswith(b"{")
    module.write_text("def handle_udp(request):\n    pass\n")
    wait_until(lambda: svc.call(b"queue:add:udponly:x").startswith(b"501:"))
    assert svc.call(b"queue:schedule?name=again&every=1:udponly:x").startswith(b"501:")
    wait_until(lambda: "schedule never: the run of" in svc.log(), timeout=10)
    time.sleep(2.5)
    log = svc.log()
    assert "refused: 501" in log
    assert "retrying" not in log, log


# Loaded into the service's own process: counts the slots its schedules work out (a
# CronSim each for a cron schedule), the work a change or a listing must not do for all.
SLOT_COUNTER = """
import json
from bgservice.queue.schedules import Schedule

if not hasattr(Schedule, "slots_counted"):
    Schedule.slots_counted = [0]

    def _counting(real):
        def counted(self, moment):
            Schedule.slots_counted[0] += 1
            return real(self, moment)
        return counted

    Schedule.next_slot = _counting(Schedule.next_slot)
    Schedule.latest_slot = _counting(Schedule.latest_slot)

async def handle_tcp(request):
    return json.dumps(Schedule.slots_counted[0])
"""


@BOTH
def test_a_change_among_1000_schedules_costs_one_schedule(make_service, modules_dir):
    """With ``max_schedules`` (1,000) schedules, half of them cron, a pause or a resume
    works out that schedule's next slot, not every one's: each change took 22 ms on SQLite
    when the scheduler read and planned them all again (and on Redis each instance did it
    again on hearing its own change); listing them (the dashboard, every 2 s) works out no
    slot again (33 ms before, 3.5 now), and says the same. Replaced by one due every
    second, a schedule fires. (Counted, not timed: a busy machine makes any change slow.)"""
    write_module(modules_dir, "slotcount", SLOT_COUNTER)
    svc = make_service("[queue]\nworkers = 2\n")
    schedules(svc)  # loaded
    conn = Framed(svc.tcp, timeout=60)

    def counted() -> int:
        code, body = conn.call(b"slotcount:x")
        assert code == 200, body
        return int(body)

    # None may fire while the test runs (a fired one's last_slot is no longer null): the
    # cron ones at an hour 12 h away, the every ones with their next slot 2 h away or more
    # (their slots are multiples of their interval: 500 of every=3600+i had one in a
    # minute now and then).
    now = time.time()
    far_hour = (datetime.fromtimestamp(now, UTC).hour + 12) % 24
    everys = list(itertools.islice((n for n in itertools.count(14_400) if n - now % n > 7200), 500))
    try:
        for i in range(1000):
            timing = (b"cron=%d%%20%d%%20*%%20*%%20*" % (i % 60, far_hour) if i % 2
                      else b"every=%d" % everys[i // 2])  # fmt: skip
            assert conn.call(b"queue:schedule?name=s%d&%s:echo:x" % (i, timing))[0] == 200
        made = counted()
        for i in range(20):
            for verb in (b"pause", b"resume"):
                code, body = conn.call(b"queue:%s:s%d" % (verb, i))
                assert code == 200 and json.loads(body)["paused"] is (verb == b"pause")
        changed = counted()
        listed = []
        for _ in range(5):  # (the dashboard lists them every 2 s)
            listed_at = time.time()
            code, body = conn.call(b"queue:schedules")
            listed = json.loads(body)
        after_listing = counted()
        code, body = conn.call(b"queue:schedule?name=s7&every=1:echo:now")
        assert code == 200 and json.loads(body)["every"] == 1
        assert [row["name"] for row in listed] == sorted(f"s{i}" for i in range(1000))
        for row in listed:
            schedule = make_schedule({k: row[k] for k in ("name", "module", "cron", "every",
                                      "tz") if row[k] is not None}, b"x")  # fmt: skip
            assert row["next_run"] == schedule.next_slot(listed_at), row
            assert (row["last_slot"], row["paused"]) == (None, False)
        wait_until(lambda: len(runs(svc, "s7")) >= 2, timeout=10)
        at_end = counted()
    finally:
        conn.close()
    # A few slots a change (its own), none a listing; all 1,000 again would be 1,000 more.
    assert changed - made <= 4 * 40, f"40 changes worked out {changed - made} slots"
    assert after_listing - changed <= 10, f"5 listings worked out {after_listing - changed}"
    # Nor later (a reload on hearing its own changes, on Redis, comes a moment after them).
    assert at_end - made < 1000, f"{at_end - made} slots worked out after the 1,000 were made"


def _listed(svc, name: str) -> dict | None:
    return next((s for s in schedules(svc) if s["name"] == name), None)


@pytest.mark.parametrize("queue_backend", ["redis"])
def test_a_change_racing_a_reload_stays_made(make_service):
    """Instance B pauses X while it reloads what A changed (a large read): B's change must
    outlast the reload's older copy. With the sender skipping its own message, that copy
    once replaced it on B for good, and B fired the paused schedule (found in review,
    2026-12-05: at trial 27-35 of 40, three runs out of three)."""
    a = make_service("[queue]\nworkers = 2\n")
    b = make_service("[queue]\nworkers = 2\n", root=a.root / "b")
    url = re.search(r'url = "([^"]+)"', b.config.read_text())
    prefix = re.search(r'prefix = "([^"]+)"', b.config.read_text())
    assert url and prefix
    schedules(a), schedules(b)  # loaded
    ca, cb = Framed(a.tcp, timeout=60), Framed(b.tcp, timeout=60)
    try:
        for i in range(900):  # a reload reads them all: 2 MB
            ca.send(b"queue:schedule?name=f%d&every=%d:echo:%s" % (i, 3600 + i, b"y" * 2000))
        assert all(ca.recv()[0] == 200 for _ in range(900))
        assert cb.call(b"queue:schedule?name=X&every=1:echo:x")[0] == 200
        for trial in range(60):
            ca.send(b"queue:%s:f1" % (b"pause" if trial % 2 == 0 else b"resume"))
            time.sleep(0.001 * (trial % 8))
            assert json.loads(cb.call(b"queue:pause:X")[1])["paused"] is True
            assert ca.recv()[0] == 200
            time.sleep(0.3)  # B's reload is done
            stored = redis_command(url[1], "HGET", f"{prefix[1]}:schedules", "X")
            assert b'"paused": true' in stored
            assert _listed(b, "X")["paused"] is True, f"B lost its pause at trial {trial}"
            assert cb.call(b"queue:resume:X")[0] == 200
    finally:
        ca.close()
        cb.close()


@pytest.mark.parametrize("queue_backend", ["redis"])
def test_a_schedule_made_again_starts_afresh(make_service):
    """X fired on B, removed on A, made again on B: no last slot (B once kept the removed
    one's, and planned from it)."""
    a = make_service("[queue]\nworkers = 2\n")
    b = make_service("[queue]\nworkers = 2\n", root=a.root / "b")
    schedules(a), schedules(b)  # loaded
    assert b.call(b"queue:schedule?name=X&every=1:echo:x").startswith(b"{")
    wait_until(lambda: (x := _listed(b, "X")) is not None and x["last_slot"] is not None)
    assert a.call(b"queue:unschedule:X") == b"removed"
    wait_until(lambda: _listed(b, "X") is None)  # B heard it
    again = json.loads(b.call(b"queue:schedule?name=X&every=3600:echo:x"))
    assert again["last_slot"] is None and again["next_run"] > time.time()


def test_a_replaced_schedule_shows_a_last_slot_only_if_it_is_one_of_its_own(make_service):
    """X (every second) fired, then replaced by one every 7,199 s: its last slot is not one
    of the new schedule's, listed before or not (a memo of the old answer once showed it
    when the schedules had been listed before the replace)."""
    svc = make_service("[queue]\nworkers = 2\n")
    schedules(svc)
    assert svc.call(b"queue:schedule?name=X&every=1:echo:x").startswith(b"{")
    wait_until(lambda: (x := _listed(svc, "X")) is not None and x["last_slot"] is not None)
    last = _listed(svc, "X")["last_slot"]  # listed: the memo is made
    replaced = json.loads(svc.call(b"queue:schedule?name=X&every=7199:echo:x"))
    assert replaced["last_slot"] == (last if last % 7199 == 0 else None)
    assert _listed(svc, "X")["last_slot"] == replaced["last_slot"]


def test_the_last_slot_outlasts_a_pause_and_a_resume(make_service):
    # last_slot became null after pause + resume: the resume recorded its moment as the
    # schedule's last (so no slot that fell while paused fires), which hid the last slot.
    svc = make_service("[queue]\nworkers = 2\n")
    schedules(svc)  # loaded
    assert svc.call(b"queue:schedule?name=X&every=1:echo:x").startswith(b"{")
    wait_until(lambda: _listed(svc, "X")["last_slot"] is not None)
    fired = json.loads(svc.call(b"queue:pause:X"))["last_slot"]
    time.sleep(2.5)  # slots pass while it is paused: none fires
    resumed = json.loads(svc.call(b"queue:resume:X"))
    assert resumed["last_slot"] == fired, resumed
    wait_until(lambda: _listed(svc, "X")["last_slot"] > fired + 2)  # from its next slot on


# --- DST, through a service whose wall clock is set ----------------------------------

# Loaded by site at the interpreter's start (PYTHONPATH): the service's time.time(), what
# the scheduler reads, starts at START and runs at the real pace; its monotonic clock (the
# loop's timers) is untouched. libfaketime does the same for every clock, but is not a
# dependency of the tests.
FAKE_CLOCK = """
import time
_offset = {start!r} - time.time()
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _offset
time.time_ns = lambda: _time_ns() + int(_offset * 1e9)
"""


def started_at(svc, moment: datetime):
    """Start ``svc`` (made with start=False) with its wall clock at ``moment``."""
    folder = svc.root / f"clock-{moment.timestamp():.0f}"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(FAKE_CLOCK.format(start=moment.timestamp()))
    inherited = svc.env.get("PYTHONPATH")
    svc.env["PYTHONPATH"] = str(folder) + (os.pathsep + inherited if inherited else "")
    return svc.start()


def zoned_tables(tz: str, **crons: str) -> str:
    return "".join(
        f'[[schedule]]\nname = "{name}"\nmodule = "echo"\ndata = "x"\ncron = "{cron}"\n'
        f'tz = "{tz}"\n'
        for name, cron in crons.items()
    )


# Each zone's repeated hour on its fall-back day (the first pass, then the second).
FALL_BACK = [("Europe/Berlin", (2025, 10, 26, 2)), ("America/New_York", (2025, 11, 2, 1))]


@pytest.mark.parametrize(("tz", "hour"), FALL_BACK)
def test_a_restart_in_the_repeated_hour_runs_the_missed_slot_once(make_service, tz, hour):
    """Down from the first pass of the hour the clocks repeat to its second: missed =
    "once" runs the latest slot once. Found by review: 61 jobs of "* * * * *" and 4 of
    "*/15 * * * *" at the start (a moment of the second pass read as the first, an hour
    earlier: every slot from there fired, one by one), and last_slot null in that hour."""
    zone = ZoneInfo(tz)
    tables = zoned_tables(tz, minutely="* * * * *", quarterly="*/15 * * * *")
    first = make_service(tables, start=False)
    started_at(first, datetime(*hour, 43, 57, tzinfo=zone, fold=0))
    schedules(first)  # stored: their last is this moment, in the first pass
    first.stop()
    second = make_service(tables, start=False)
    started_at(second, datetime(*hour, 44, 5, tzinfo=zone, fold=1))
    for name, latest in [("minutely", 44), ("quarterly", 30)]:
        slot = datetime(*hour, latest, tzinfo=zone, fold=1).timestamp()
        # Slots fire in order: once this one has, any earlier would have too.
        wait_until(lambda n=name, s=slot: s in slots(runs(second, n)))
        fired = [s for s in slots(runs(second, name)) if s <= slot]
        assert fired == [slot], (name, [datetime.fromtimestamp(s, zone) for s in fired])
        assert named(second, name)["last_slot"] >= slot  # a slot of that hour, shown


def test_a_fixed_time_job_in_the_gap_of_spring_forward_runs_at_its_end(make_service):
    """As Debian cron: "30 2 * * *" on the night Berlin skips 02:00-02:59 runs at 03:00."""
    zone = ZoneInfo("Europe/Berlin")
    svc = make_service(zoned_tables("Europe/Berlin", nightly="30 2 * * *"), start=False)
    started_at(svc, datetime(2025, 3, 30, 1, 59, 52, tzinfo=zone))
    three = datetime(2025, 3, 30, 3, 0, tzinfo=zone).timestamp()
    assert named(svc, "nightly")["next_run"] == three
    wait_until(lambda: slots(runs(svc, "nightly")) == [three], timeout=20)


def reference_slots(cron: str, tz: str, start: float, end: float) -> list[float]:
    """Debian cron's slots of a minute-and-hour-only expression, minute by minute: one
    at a fixed hour and minute (no * in either field) runs in the first pass of a repeated
    hour only, and at the end of a gap its time fell in; one with a * by the clock."""

    def field(text: str, size: int) -> set[int]:
        if text.startswith("*"):
            return set(range(0, size, int(text[2:] or 1)))
        return {int(part) for part in text.split(",")}

    minute, hour = cron.split()[:2]
    minutes, hours = field(minute, 60), field(hour, 24)
    fixed = not minute.startswith("*") and not hour.startswith("*")
    zone, out = ZoneInfo(tz), []
    for moment in range(int(start), int(end), 60):
        wall = datetime.fromtimestamp(moment, zone)
        if wall.minute in minutes and wall.hour in hours and not (fixed and wall.fold):
            out.append(float(moment))
        # The wall times the clock jumps over to the next minute (none but in a gap).
        skipped = wall.replace(tzinfo=None) + timedelta(minutes=1)
        following = datetime.fromtimestamp(moment + 60, zone).replace(tzinfo=None)
        while fixed and skipped < following:
            if skipped.minute in minutes and skipped.hour in hours:
                out.append(float(moment + 60))  # at the gap's end, once
                break
            skipped += timedelta(minutes=1)
    return out


DST_DAYS = [("Europe/Berlin", "2025-03-30"), ("Europe/Berlin", "2025-10-26"),
            ("America/New_York", "2025-03-09"), ("America/New_York", "2025-11-02")]  # fmt: skip


@pytest.mark.parametrize(("tz", "day"), DST_DAYS)
@pytest.mark.parametrize(
    "cron",
    ["* * * * *", "*/15 * * * *", "0 * * * *", "30 2 * * *", "0,30 1 * * *", "0 3 * * *"],
)
def test_slots_on_both_dst_days_of_two_zones_are_debian_crons(tz, day, cron):
    """Every 29 s of the night around each change: the slot before, the one after, and
    each slot known as one (last_slot was null for the second pass of a repeated hour,
    and a restart there fired an hour of slots)."""
    schedule = make_schedule({"name": "d", "module": "m", "cron": cron, "tz": tz}, b"")
    midnight = datetime.fromisoformat(day).replace(tzinfo=ZoneInfo(tz)).timestamp()
    start, end = midnight - 3600, midnight + 6 * 3600
    known = reference_slots(cron, tz, start - 86400, end + 86400)
    for now in range(int(start), int(end), 29):
        at = bisect.bisect_right(known, now)
        before, after = known[at - 1], known[at]
        assert (schedule.latest_slot(now), schedule.next_slot(now)) == (before, after), now
        # A restart at ``now`` after an hour down: the latest slot, once.
        if start + 3600 < now and before > now - 3600:
            assert schedule.due(now - 3600, now) == before, now
    for slot in (s for s in known if start <= s <= end):
        assert schedule.latest_slot(slot) == slot and schedule.is_slot(slot), slot


# --- changes, config and replies --------------------------------------------------------


@BOTH
def test_a_schedule_given_new_times_fires_from_its_first_slot_after(make_service):
    """Replaced with other times, a schedule fires from its first slot after the change,
    as a new one: a slot of the new times between its last and the change once fired at
    once, while the reply said its next run was later (found by review). Replaced with
    other job options only, it keeps its last slot."""
    svc = make_service()
    schedules(svc)
    made = json.loads(svc.call(b"queue:schedule?name=ed&cron=0+0+1+1+*:echo:x"))  # yearly
    time.sleep(2.2)  # a slot of every=2 falls between its making and its change
    replaced = json.loads(svc.call(b"queue:schedule?name=ed&every=2:echo:x"))
    assert replaced["last_slot"] is None and made["cron"] == "0 0 1 1 *"
    wait_until(lambda: runs(svc, "ed"), timeout=10)
    assert min(slots(runs(svc, "ed"))) == replaced["next_run"]
    last = wait_until(lambda: named(svc, "ed")["last_slot"])
    kept = json.loads(svc.call(b"queue:schedule?name=ed&every=2&priority=3:echo:x"))
    assert kept["last_slot"] is not None and kept["last_slot"] >= last  # (or fired since)


def test_a_config_schedule_given_new_times_fires_from_its_first_slot_after(make_service):
    """The same through service.config and a restart: "0 0 1 1 *" changed to "42 * * *
    *" and started at 11:42:15 once ran the 11:42 slot at the start (next_run: 12:42)."""
    tick = '[[schedule]]\nname = "tick"\nmodule = "echo"\ndata = "x"\nevery = 1\n'
    edited = '[[schedule]]\nname = "ed"\nmodule = "echo"\ndata = "x"\ncron = "{}"\n'
    first = make_service(tick + edited.format("0 0 1 1 *"), start=False)
    started_at(first, datetime(2026, 6, 1, 11, 41, 50, tzinfo=UTC))
    schedules(first)
    first.stop()
    second = make_service(tick + edited.format("42 * * * *"), start=False)
    restart = datetime(2026, 6, 1, 11, 42, 15, tzinfo=UTC)
    started_at(second, restart)
    listed = named(second, "ed")
    assert listed["next_run"] == datetime(2026, 6, 1, 12, 42, tzinfo=UTC).timestamp()
    # The start fires whatever is due in one pass: two ticks later, any slot of ed would
    # have been added.
    wait_until(lambda: max(slots(runs(second)), default=0) >= restart.timestamp() + 2)
    assert runs(second, "ed") == []
    assert named(second, "ed")["last_slot"] is None


def only(name: str) -> str:
    return f'[[schedule]]\nname = "{name}"\nmodule = "echo"\ndata = "x"\nevery = 1\n'


@pytest.mark.parametrize("queue_backend", ["redis"])
def test_a_config_schedule_of_one_instance_is_seen_and_fired_by_the_others(make_service):
    """A's config has a-only, B's b-only, on one Redis: each lists both, and b-only goes on
    firing once B stops. A never heard of b-only (the start stored it without telling the
    others): it was not listed there, and stopped with B."""
    a = make_service(only("a-only"))
    schedules(a)
    b = make_service(only("b-only"), root=a.root / "b")
    wait_until(lambda: _listed(a, "b-only") is not None)
    assert _listed(b, "a-only") is not None
    b.stop()
    stopped = time.time()
    wait_until(lambda: max(slots(runs(a, "b-only")), default=0) > stopped + 1, timeout=10)


def test_a_config_schedule_of_a_missing_module_is_warned_of_at_the_start(make_service):
    """Not an error (the module may be added later), but said at once: each slot used to
    log an error of its own, the run lost, and nothing at the start."""
    ghost = '[[schedule]]\nname = "ghost"\nmodule = "nosuch"\ncron = "0 3 * * *"\n'
    svc = make_service(ghost)
    schedules(svc)
    svc.wait_for_log("WARNING")
    line = next(ln for ln in svc.log().splitlines() if "WARNING" in ln)
    assert "schedule ghost: module nosuch refuses its runs for now (400 " in line, line


def test_slots_skipped_or_run_once_after_a_downtime_are_logged(make_service):
    """An hour down: the 59 slots before the latest do not run, which was said nowhere."""
    tables = "".join(
        f'[[schedule]]\nname = "{m}"\nmodule = "echo"\ndata = "x"\nevery = 60\nmissed = "{m}"\n'
        for m in ("skip", "once")
    )
    down = datetime(2026, 6, 1, 11, 0, 20, tzinfo=UTC)
    first = make_service(tables, start=False)
    started_at(first, down)
    schedules(first)
    first.stop()
    again = make_service(tables, start=False)
    started_at(again, down + timedelta(hours=1, seconds=10))  # 12:00:30: 12:00 is on time
    for missed in ("skip", "once"):
        wait_until(lambda m=missed: runs(again, m))
        again.wait_for_log(f"schedule {missed}: 59 missed slots before the run of ")
        assert re.search(rf'schedule {missed}: 59 missed slots before .* not run \(missed = '
                         rf'"{missed}"\)', again.log())  # fmt: skip


@pytest.mark.parametrize(
    ("alias", "fields"),
    [("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"),
     ("@weekly", "0 0 * * 0"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"),
     ("@hourly", "0 * * * *")],
)  # fmt: skip
def test_cron_nicknames_are_their_five_fields(alias, fields):
    made = make_schedule({"name": "n", "module": "m", "cron": alias}, b"")
    assert made.cron == fields


def test_an_unknown_key_is_named_with_the_keys_there_are():
    with pytest.raises(BadRequest) as info:
        make_schedule({"name": "c", "module": "m", "every": 5, "colour": "red"}, b"", "config")
    assert info.value.message == (
        "schedule c: unknown key 'colour' (keys: backoff, cron, data, every, missed, module, "
        "name, options, paused, priority, retries, timeout, tz)"
    )
    # A typo is named first, and the key it is near: evrey was "give either cron or every"
    # (what it left out), nmae "name must be 1-64 letters ..., got ''".
    for typo, meant in (("evrey", "every"), ("nmae", "name"), ("crno", "cron")):
        values = {"name": "c", "module": "m", "every": 5, "cron": "* * * * *"}
        values[typo] = values.pop(meant)
        with pytest.raises(BadRequest, match=rf"unknown key '{typo}', did you mean {meant}\?"):
            make_schedule(values, b"", "config")


def test_schedule_replies_to_bad_input(make_service):
    """Found by review: a tz with every taken and ignored; an unknown option named without
    the ones there are; queue:unschedule without a name a 404; queue:schedules:x a list."""
    svc = make_service()
    schedules(svc)
    for bad, reply in [
        (b"queue:schedule?name=x&every=86400&tz=Europe%2FBerlin:echo:x",
         b"400: schedule x: tz is for cron schedules (every counts seconds, in no time zone)"),
        (b"queue:schedule?name=x&every=86400&tz=Etc%2FUTC:echo:x",
         b"400: schedule x: tz is for cron schedules (every counts seconds, in no time zone)"),
        (b"queue:schedule?name=t2&every=5&unique=k:echo:x",
         b"400: schedule t2: unknown key 'unique' (keys: backoff, cron, every, missed, name, "
         b"paused, priority, retries, timeout, tz)"),
        (b"queue:schedule?name=r&cron=%40reboot:echo:x", b"400: schedule r: bad cron "
         b"expression '@reboot': five fields (minute hour day-of-month month day-of-week), "
         b"or one of @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly"),
        (b"queue:unschedule", b"400: queue:unschedule: name the schedule "
         b"(queue:unschedule:NAME)"),
        (b"queue:pause:", b"400: queue:pause: name the schedule (queue:pause:NAME)"),
        (b"queue:schedules:x", b"400: queue:schedules takes no argument"),
        (b"queue:unschedule:\xff", b"400: queue:unschedule: the name is not valid UTF-8 "
         b"text"),  # (it acted on a schedule named "\ufffd")
        (b"queue:schedule?name=&every=5:echo:x", b"400: option name: empty (a schedule needs "
         b"a name)"),
    ]:  # fmt: skip
        assert svc.call(bad) == reply, bad
    # UTC, as listed, is what every counts in: a listed schedule can be sent back.
    assert json.loads(svc.call(b"queue:schedule?name=u&every=60&tz=UTC:echo:x"))["tz"] == "UTC"
    assert svc.call(b"queue:unschedule:u") == b"removed"
    daily = json.loads(svc.call(b"queue:schedule?name=d&cron=%40daily:echo:x"))
    assert daily["cron"] == "0 0 * * *" and named(svc, "d")["cron"] == "0 0 * * *"
    assert [s["name"] for s in json.loads(svc.call(b"queue:schedules:"))] == ["d"]


# --- defects found by a review of several instances on one Redis (2026-12-07) ----------


@pytest.mark.parametrize("queue_backend", ["redis"])
def test_a_schedule_of_a_module_only_one_instance_has_is_left_to_it_quietly(make_service):
    """B alone has module onlyb: each run was added once, by B, yet A logged at every run
    "ERROR ... the run of ... refused: 400 Unknown request", though no run was refused.
    A leaves the runs to B, said once; only when no instance adds a run is it an error."""
    a = make_service("")
    b = make_service("", root=a.root / "b", start=False)
    write_module(b.modules, "onlyb", "def handle_tcp(request):\n    return 'by b'\n")
    b.start()
    schedules(b)  # (loaded: 503 for a moment after the start)
    assert b.call(b"queue:schedule?name=ob2&every=1:onlyb:sched").startswith(b"{")
    wait_until(lambda: _listed(a, "ob2") is not None)
    wait_until(lambda: len(runs(b, "ob2")) >= 4, timeout=15)
    assert_each_slot_once(runs(a, "ob2"))
    assert "ERROR" not in a.log(), [line for line in a.log().splitlines() if "ERROR" in line]
    left = "schedule ob2: module onlyb takes no run here (400 Unknown request)"
    assert a.log().count(left) == 1, a.log()
    # No instance has it any more: its runs are added by none, and that is an error.
    (b.modules / "onlyb.py").unlink()
    lost = "was added by no instance in 10 s (not here: 400 Unknown request): it is lost"
    wait_until(lambda: lost in a.log() and lost in b.log(), timeout=30)
    line = next(line for line in a.log().splitlines() if lost in line)
    assert " ERROR " in line and "schedule ob2: the run of " in line, line


def test_schedules_load_as_soon_as_redis_answers_after_a_start_without_it(tmp_path):
    """Started with Redis away, an instance answered "503: Schedules not loaded yet" up to
    30 s after Redis was back (its retry backed off to 30 s, and nothing woke it), and
    logged each retry at ERROR, where the rest of Redis away is a WARNING."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)  # not started yet
    svc = ServiceProcess(tmp_path, TICK, backend_config=redis_config(server.url, "late"))
    try:
        svc.start()
        svc.wait_for_log("schedules not loaded")
        assert svc.call(b"queue:schedules").startswith(b"503")
        # The outage itself, past the old retries 1, 3 and 7 s after the first failure:
        # the next one came 15 s after it, over 7 s after Redis is back here.
        time.sleep(7.5)
        server.start()
        back = time.monotonic()
        assert [s["name"] for s in schedules(svc)] == ["tick"]
        took = time.monotonic() - back
        assert took < 3.0, took  # (the reconnection's backoff is 1 s at most)
        said = [line for line in svc.log().splitlines() if "schedules not loaded" in line]
        assert said and all(" WARNING " in line for line in said), said
    finally:
        svc.stop()
        server.stop()
