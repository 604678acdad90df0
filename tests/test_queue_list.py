"""``queue:list``'s filters (``module=``, ``name=``, ``tag=``) on both engines, over real
sockets: each state lists only the jobs that match every filter given, in the order the
unfiltered list has them, ``limit`` and ``offset`` counting the matches; a waiting job's
position is still its place among every job in line. Bad filters are a 400 that says why.
On Redis a filtered list looks at the first 10,000 jobs of each state (docs/queue.md)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import pytest

from bgservice.client import Client
from bgservice.queue.job import COLUMNS
from bgservice.queue.sqlite_schema import SCHEMA
from tests.conftest import wait_until, write_module

# both_engines is the queue_backend fixture: every test here that asks for it runs twice.
from tests.queue_helpers import add, both_engines, status  # noqa: F401

BOOM = "def handle_tcp(request):\n    raise ValueError('boom')\n"


@pytest.fixture
def redis_url(own_redis: Any) -> str:
    """Each Redis test a redis-server of its own (make_service asks for this fixture)."""
    return str(own_redis.url)


def listed(svc: Any, query: bytes) -> dict[str, list[tuple[int, int | None]]]:
    """``queue:list?QUERY``: each state's (id, position) pairs."""
    reply = json.loads(svc.call(b"queue:list?" + query))
    return {state: [(j["id"], j["position"]) for j in jobs] for state, jobs in reply.items()}


def ids(svc: Any, query: bytes) -> list[int]:
    """The ids ``queue:list?QUERY`` lists, of the one state it asks for."""
    (jobs,) = listed(svc, query).values()
    return [jid for jid, _ in jobs]


def _finish(svc: Any, command: bytes) -> int:
    jid = add(svc, command)
    svc.call(b"queue:get:id:%d" % jid)  # (its result, or its error)
    return jid


def test_each_state_lists_only_the_jobs_every_filter_matches(
    make_service, modules_dir, queue_backend
):
    write_module(modules_dir, "boom", BOOM)
    svc = make_service("[queue]\nworkers = 1\n")
    d1 = _finish(svc, b"queue:add?name=report&tags=monthly,pdf:echo:1")
    d2 = _finish(svc, b"queue:add?name=report&tags=weekly:echo:2")
    d3 = _finish(svc, b"queue:add?name=report&tags=monthly:test:3")
    f1 = _finish(svc, b"queue:add?name=report&tags=monthly:boom:4")
    _finish(svc, b"queue:add?name=other&tags=monthly:boom:5")
    run = add(svc, b"queue:add?name=report&tags=monthly:sleep:30000")
    wait_until(lambda: status(svc, run)["state"] == "running")
    w1 = add(svc, b"queue:add?name=report&tags=monthly:echo:w1")
    w2 = add(svc, b"queue:add?name=report&tags=weekly:echo:w2")
    w3 = add(svc, b"queue:add?priority=5&name=report&tags=monthly:test:w3")
    w4 = add(svc, b"queue:add?priority=9&name=Report&tags=monthly:echo:w4")
    w5 = add(svc, b"queue:add?delay=600&name=report&tags=monthly:echo:w5")
    blocked = add(svc, b"queue:add?after=%d&name=report&tags=monthly:echo:b" % run)
    # In line: w4, w3, w1, w2 (positions 0-3), then w5 (delayed); on the embedded engine
    # the one waiting for the running job last (Redis keeps it in no line: not listed).
    last = [(blocked, None)] if queue_backend == "sqlite" else []
    assert listed(svc, b"name=report&tag=monthly") == {
        "waiting": [(w3, 1), (w1, 2), (w5, None), *last],
        "running": [(run, None)],
        "failed": [(f1, None)],
    }
    assert listed(svc, b"module=echo&name=report&tag=monthly") == {
        "waiting": [(w1, 2), (w5, None), *last], "running": [], "failed": [],
    }  # fmt: skip
    assert listed(svc, b"state=waiting&name=Report") == {"waiting": [(w4, 0)]}  # (exactly)
    assert listed(svc, b"tag=month") == {"waiting": [], "running": [], "failed": []}
    assert listed(svc, b"module=test") == {"waiting": [(w3, 1)], "running": [], "failed": []}
    # Finished ones newest finished first, as unfiltered.
    assert ids(svc, b"state=done&tag=monthly") == [d3, d1]
    assert ids(svc, b"state=done&module=echo&name=report") == [d2, d1]
    assert ids(svc, b"state=done&tag=pdf") == [d1]
    assert ids(svc, b"state=failed&name=report") == [f1]
    # limit and offset count the jobs that match: pages of one, then none.
    pages = [listed(svc, b"state=waiting&name=report&limit=1&offset=%d" % n)["waiting"]
             for n in range(5 + len(last))]  # fmt: skip
    assert pages == [[(w3, 1)], [(w1, 2)], [(w2, 3)], [(w5, None)], *[[p] for p in last], []]
    assert ids(svc, b"state=done&tag=monthly&limit=1&offset=1") == [d1]
    assert svc.call(b"queue:cancel:id:%d" % w2) == b"cancelled"
    assert ids(svc, b"state=cancelled&tag=weekly") == [w2]
    assert ids(svc, b"state=cancelled&tag=monthly") == []
    assert ids(svc, b"tag=weekly:cancelled") == [w2]  # (the state after the colon)


REFUSED = [
    (b"module=", "400: option module: empty (leave it out for the default)"),
    (b"module=echo&tag=a&tag=b", "400: option tag: given more than once"),
    (b"name=x&module=echo&name=x", "400: option name: given more than once"),
    (b"modul=echo", "400: queue:list: unknown option 'modul', did you mean module? "
                    "(options: limit, module, name, offset, state, tag)"),
    (b"module=e%3Acho", "400: option module: expected a module name (A-Z a-z 0-9 _ -), "
                        "not 'e:cho'"),
    (b"tag=a,b", "400: option tag: one tag, 1-64 of A-Z a-z 0-9 _ . : - ([queue] "
                 "max_tag_chars), not 'a,b'"),
    (b"tag=" + b"t" * 65, "400: option tag: one tag, 1-64 of A-Z a-z 0-9 _ . : - "
                          f"([queue] max_tag_chars), not '{'t' * 65}'"),
    (b"name=%20report", "400: option name: printable characters, no blanks around them"),
]  # fmt: skip


def test_a_filter_it_cannot_use_is_refused_saying_why(service):
    job = add(service, b"queue:add?delay=60&name=x&tags=a:echo:x")
    assert ids(service, b"module=echo&name=x&tag=a:waiting") == [job]  # each alone: fine
    for query, message in REFUSED:
        assert service.call(b"queue:list?" + query).decode() == message, query


def test_a_filtered_list_finds_matches_deep_in_the_line(make_service, queue_backend):
    """10,010 jobs in line (the one worker busy), two of them named: the second past the
    first 10,000. The embedded engine lists both, where they stand in line; Redis looks at
    the first 10,000 jobs of each state, and lists the first only."""
    svc = make_service("[queue]\nworkers = 1\n")
    busy = add(svc, b"queue:add:sleep:30000")  # holds the one worker: the rest wait
    wait_until(lambda: status(svc, busy)["state"] == "running")
    named = {1500, 10_005}
    with Client(f"{svc.tcp[0]}:{svc.tcp[1]}", timeout=60) as client:
        jobs = client.add_many([("echo", str(n), {"name": "needle"} if n in named else {})
                                for n in range(1, 10_011)])  # fmt: skip
    first, second = jobs[1499], jobs[10_004]
    found = [(first, 1499), (second, 10_004)] if queue_backend == "sqlite" else [(first, 1499)]
    assert listed(svc, b"state=waiting&name=needle")["waiting"] == found
    assert listed(svc, b"state=waiting&name=needle&offset=1")["waiting"] == found[1:]
    assert listed(svc, b"state=waiting&name=nowhere")["waiting"] == []


def _done_row(jid: int, finished: float, module: str, name: str | None, tags: str | None) -> tuple:
    values = dict.fromkeys(COLUMNS)
    values.update(id=jid, module=module, data=b"x", state="done", priority=0, run_at=finished - 1,
                  created=finished - 1, started=finished - 1, finished=finished, attempts=1,
                  max_retries=0, backoff=1.0, status=200, result=b"x", cancel_requested=0,
                  name=name, tags=tags)  # fmt: skip
    return tuple(values[c] for c in COLUMNS)


@pytest.mark.parametrize("queue_backend", ["sqlite"])  # (the embedded store's own reads)
def test_a_filtered_page_of_many_finished_jobs_is_read_in_chunks_in_order(make_service, tmp_path):
    """25,000 finished jobs stored before the start, many finished at the same moment: the
    embedded store reads a filtered page 10,000 rows at a time (sqlite_lists.py), and the
    matches come in the unfiltered order (newest finished, then highest id, first) across
    the chunks' edges, offset and limit counting them."""
    now = time.time()
    rows = []
    for jid in range(1, 25_001):
        finished = now - 100 + (jid // 7)  # seven at a time finish together
        module = "echo" if jid % 3 else "test"
        rows.append(_done_row(jid, finished, module, f"n{jid % 5}", "a,b" if jid % 4 else "c"))
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(SCHEMA)
        marks = ", ".join("?" * len(COLUMNS))
        conn.executemany(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({marks})", rows)
    svc = make_service()
    newest = sorted(rows, key=lambda r: (r[COLUMNS.index("finished")], r[0]), reverse=True)

    def expected(module: str | None, name: str, tag: str) -> list[int]:
        at = {c: COLUMNS.index(c) for c in ("module", "name", "tags")}
        return [r[0] for r in newest if module in (None, r[at["module"]])
                and r[at["name"]] == name and tag in r[at["tags"]].split(",")]  # fmt: skip

    matches = expected("test", "n2", "c")  # 1 in 60: about 400, spread over every chunk
    assert len(matches) > 300
    query = b"state=done&module=test&name=n2&tag=c"
    assert ids(svc, query + b"&limit=1000") == matches
    assert ids(svc, query + b"&offset=150&limit=7") == matches[150:157]
    many = expected(None, "n1", "b")  # 3 in 20: 3,750, most chunks holding a few hundred
    assert ids(svc, b"state=done&name=n1&tag=b&offset=3000&limit=1000") == many[3000:]
    assert ids(svc, b"state=done&name=n9") == []
