"""Job names and tags against a real service, on both engines: stored, validated, shown
in status, lists and queue:stats (and /metrics: tests/test_metrics.py)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from bgservice.client import Client
from bgservice.queue.sqlite_schema import SCHEMA
from tests.queue_helpers import add, both_engines, status  # noqa: F401 (a fixture)
from tests.test_cli import bg


def test_a_named_tagged_job_shows_its_name_everywhere(service):
    jid = add(service, b"queue:add?name=Monthly+invoices&tags=billing,eu:sleep:300")
    job = status(service, jid)
    assert (job["name"], job["tags"]) == ("Monthly invoices", ["billing", "eu"])
    listed = json.loads(service.call(b"queue:list"))
    assert [(j["name"], j["tags"]) for j in listed["running"] + listed["waiting"]] == [
        ("Monthly invoices", ["billing", "eu"])
    ]
    stats = json.loads(service.call(b"queue:stats"))
    assert stats["names"] == {"Monthly invoices": {"waiting": 0, "running": 1}}
    assert service.call(b"queue:get:id:%d" % jid) == b"slept 300"
    assert status(service, jid)["name"] == "Monthly invoices"  # kept once finished
    plain = add(service, b"queue:add:echo:x")
    assert (status(service, plain)["name"], status(service, plain)["tags"]) == (None, [])


def test_the_names_counted_follow_jobs_as_they_come_and_go(service, queue_backend):
    # The embedded engine keeps the count of each name as jobs come and go (a count at
    # each call held the loop 9 ms with 100,000 waiting): cancelled, retried, done and
    # added again, each name counted as the jobs in memory are, and gone at none.
    def named(name: bytes) -> int:
        return add(service, b"queue:add?delay=60&name=" + name + b":echo:x")

    first_a, *_ = [named(b"A") for _ in range(3)]
    named(b"B"), named(b"B")
    only_c = named(b"C")
    assert service.call(b"queue:cancel:id:%d" % first_a) == b"cancelled"
    assert service.call(b"queue:cancel:id:%d" % only_c) == b"cancelled"
    assert json.loads(service.call(b"queue:stats"))["names"] == {
        "A": {"waiting": 2, "running": 0}, "B": {"waiting": 2, "running": 0}
    }
    assert service.call(b"queue:retry:id:%d" % first_a) == b"id:%d" % first_a  # runs now
    assert service.call(b"queue:get:id:%d" % first_a) == b"x"
    done = add(service, b"queue:add?name=D:echo:y")
    assert service.call(b"queue:get:id:%d" % done) == b"y"
    assert service.call(b"queue:retry:id:%d" % only_c) == b"id:%d" % only_c
    assert service.call(b"queue:get:id:%d" % only_c) == b"x"
    named(b"C")
    assert json.loads(service.call(b"queue:stats"))["names"] == {
        "A": {"waiting": 2, "running": 0}, "B": {"waiting": 2, "running": 0},
        "C": {"waiting": 1, "running": 0},
    }


def test_bad_names_and_tags_are_400(make_service):
    svc = make_service("[queue]\nmax_name_chars = 10\nmax_tags = 2\n")
    for request, why in [
        (b"queue:add?tags=a,b%20c:echo:x", b"option tags: each tag is 1-64 of"),
        (b"queue:add?tags=a,b,c:echo:x", b"option tags: at most 2 tags"),
        (b"queue:add?tags=a,a,b:echo:x", b"option tags: at most 2 tags"),  # a repeat counts
        (b"queue:add?name=eleven+char:echo:x", b"option name: at most 10 characters"),
        (b"queue:add?name=%01bell:echo:x", b"option name: printable characters"),
    ]:
        reply = svc.call(request)
        assert reply.startswith(b"400: ") and why in reply, (request, reply)
    assert status(svc, add(svc, b"queue:add?tags=b,b:echo:x"))["tags"] == ["b"]  # kept once


def test_names_and_tags_from_the_clients_and_the_cli(service):
    with Client("{}:{}".format(*service.tcp)) as client:
        jid = client.add("echo", "x", name="thumbnail", tags=["img", "small"])
        assert client.status(jid)["tags"] == ["img", "small"]
        assert client.run("echo", "y", name="inline") == b"y"
    out = bg(service, "queue", "add", "echo", "z", "--name", "from shell", "--tag", "t1")
    assert out.returncode == 0
    job = status(service, int(out.stdout))
    assert (job["name"], job["tags"]) == ("from shell", ["t1"])
    table = bg(service, "queue", "list", "done").stdout.decode()
    assert "echo (from shell)" in table and "echo (thumbnail)" in table


@pytest.mark.parametrize("queue_backend", ["sqlite"])
def test_a_database_of_an_earlier_version_gains_the_columns(make_service, tmp_path):
    # The schema before names, tags and checkpoints: every column after ``expires`` cut.
    head, _, tail = SCHEMA.partition(",\n    name TEXT,")
    old = head + "\n);" + tail.partition(");")[2]
    assert "tags TEXT" not in old and "checkpoint" not in old and "source" not in old
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(old)
    svc = make_service()
    jid = add(svc, b"queue:add?name=after+upgrade:echo:x")
    assert svc.call(b"queue:get:id:%d" % jid) == b"x"
    svc.stop()
    again = make_service()
    assert status(again, jid)["name"] == "after upgrade"
