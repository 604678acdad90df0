"""The queue shared through Redis: several real service processes, one real redis-server.

The single-instance behaviour is covered by test_queue.py, which runs every test on both
engines; these tests are about what only several instances can show.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.conftest import (
    GATE,
    ServiceProcess,
    redis_command,
    redis_config,
    wait_until,
    write_module,
)

WHOAMI = """
import os

def handle_tcp(request):
    return f"{request.text} by {os.getpid()}"
"""

# Sleeps a little, then records "job pid" once it is done: the ledger of who finished what.
LEDGER = """
import os
import time
from pathlib import Path

def handle_tcp(request):
    time.sleep(0.05)
    with open(Path(__file__).with_name("ledger.txt"), "a") as f:
        f.write(f"{request.job.id} {os.getpid()}\\n")
    return request.text
"""


@pytest.fixture
def shared(tmp_path, redis_url):
    """Start instances sharing one queue (same Redis, same prefix), each in its own folder."""
    prefix = f"shared-{uuid.uuid4().hex[:8]}"
    started: list[ServiceProcess] = []
    modules = tmp_path / "modules"

    def start(name: str, queue: str = "workers = 2", url: str = redis_url) -> ServiceProcess:
        root = tmp_path / name
        root.mkdir()
        svc = ServiceProcess(root, f"[queue]\n{queue}\n", backend_config=redis_config(url, prefix))
        svc.modules = modules
        svc.config.write_text(svc.config.read_text().replace(str(root / "modules"), str(modules)))
        started.append(svc)
        return svc.start()

    modules.mkdir()
    for name, source in (("whoami", WHOAMI), ("ledger", LEDGER)):
        write_module(modules, name, source)
    (modules / "echo.py").write_text("def handle_tcp(request):\n    return request.data\n")
    (modules / "test.py").write_text("def handle_tcp(request):\n    return 'Test'\n")
    yield start
    for svc in started:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


def add(svc: ServiceProcess, command: bytes) -> int:
    reply = svc.call(command)
    assert reply.startswith(b"id:"), reply
    return int(reply[3:])


def test_added_on_a_run_on_b_waited_for_on_c(shared):
    a = shared("a", "workers = 0")
    b = shared("b")
    c = shared("c", "workers = 0")
    jid = add(a, b"queue:add:whoami:hello")
    assert c.call(b"queue:get:id:%d" % jid) == b"hello by %d" % b.proc.pid
    assert json.loads(a.call(b"queue:status:id:%d" % jid))["state"] == "done"


def test_an_add_and_wait_gets_a_result_run_on_another_instance_with_keep_results_0(shared):
    # keep_results = 0: the job ended expired, and the waiting add, which reads it once
    # "done" reaches it, got 404; with unique= hitting a job another add made, too.
    a = shared("a", "workers = 0\nkeep_results = 0")
    shared("b", "workers = 1\nkeep_results = 0")
    for n in range(5):
        assert a.call(b"queue:add?wait=1:echo:hi %d" % n) == b"hi %d" % n
    add(a, b"queue:add?unique=k&delay=0.5:echo:first")
    assert a.call(b"queue:add?unique=k&wait=1:echo:second") == b"first"


def test_a_get_waiting_when_its_job_ends_on_another_instance_gets_it_with_keep_results_0(
    shared,
):
    # keep_results = 0: the get, waiting on a, read the job once "done" reached it, found
    # it expired and answered 404 (the embedded engine hands a waiting get its result).
    a = shared("a", "workers = 0\nkeep_results = 0")
    shared("b", "workers = 1\nkeep_results = 0")
    for n in range(5):
        jid = add(a, b"queue:add?delay=0.2:echo:hi %d" % n)  # (the get waits before it runs)
        assert a.call(b"queue:get:id:%d" % jid) == b"hi %d" % n
    assert a.call(b"queue:get:id:%d" % jid) == b"404: Job %d not found (unknown or expired)" % jid


def test_ids_are_unique_across_instances(shared):
    instances = [shared(name, "workers = 1") for name in "abc"]
    ids: list[int] = []
    lock = threading.Lock()

    def adder(svc: ServiceProcess) -> None:
        for i in range(30):
            jid = add(svc, b"queue:add:echo:%d" % i)
            with lock:
                ids.append(jid)

    threads = [threading.Thread(target=adder, args=(svc,)) for svc in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 90 and len(set(ids)) == 90


def test_unique_key_and_dependency_across_instances(shared):
    a = shared("a", "workers = 0")
    b = shared("b", "workers = 1")
    first = add(a, b"queue:add?unique=report&delay=0.5:echo:one")
    assert add(b, b"queue:add?unique=report:echo:two") == first
    then = add(b, b"queue:add?after=%d:echo:after" % first)
    assert a.call(b"queue:get:id:%d" % then) == b"after"
    assert json.loads(b.call(b"queue:status:id:%d" % first))["state"] == "done"


def test_sigkill_during_load_every_job_completes_exactly_once(shared, tmp_path):
    instances = [shared(name) for name in "abc"]
    ids = [add(instances[i % 3], b"queue:add:ledger:%d" % i) for i in range(60)]
    ledger = tmp_path / "modules" / "ledger.txt"
    victim = instances[1]
    # Kill one while it runs jobs: some done, some running, most still waiting. (While it
    # runs one: an instance between two jobs holds no lease for the others to take over.)
    wait_until(
        lambda: (
            ledger.exists()
            and len(ledger.read_text().splitlines()) >= 10
            and victim.stats()["in_flight"].get("ledger", 0) >= 1
        )
    )
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    survivors = [instances[0], instances[2]]
    for n, jid in enumerate(ids):
        assert survivors[n % 2].call(b"queue:get:id:%d" % jid, timeout=30) == str(n).encode()
    finished_by: dict[int, list[int]] = collections.defaultdict(list)
    for line in ledger.read_text().splitlines():
        jid, pid = map(int, line.split())
        finished_by[jid].append(pid)
    survivor_pids = {svc.proc.pid for svc in survivors}
    for jid in ids:
        by_survivors = [p for p in finished_by[jid] if p in survivor_pids]
        # Exactly once among the survivors, or finished by the victim before it died.
        assert len(by_survivors) == 1 or finished_by[jid] == [victim.proc.pid], (
            jid,
            finished_by[jid],
        )
    assert any(victim.proc.pid in pids for pids in finished_by.values())
    # Logged once the reap's reply is in: another instance may have run those jobs already.
    wait_until(lambda: "stopped renewing their lease" in instances[0].log() + instances[2].log())


def test_stats_count_the_workers_of_every_live_instance(shared):
    # queue:stats' counts and run history are of every instance sharing the queue: its
    # cluster_workers sums their workers (the dashboard's busy chart divided a cluster's
    # busy time by the workers of the instance asked: two of 4 workers busy all hour
    # showed 200 %, drawn as 100 %). One that stops drops out at once, one killed a
    # lease later.
    a = shared("a", "workers = 2")
    b = shared("b", "workers = 3")

    def seen(svc: ServiceProcess) -> tuple[int, int]:
        stats = json.loads(svc.call(b"queue:stats"))
        return stats["workers"], stats["cluster_workers"]

    c = shared("c", "workers = 4")
    wait_until(lambda: seen(a) == (2, 9) and seen(b) == (3, 9) and seen(c) == (4, 9))
    b.stop()  # at once: a restart (under a new name) counted them twice for a lease
    assert seen(a) == (2, 6)
    c.proc.kill()  # a lease later (1.5 s)
    c.proc.wait()
    wait_until(lambda: seen(a) == (2, 2))


def test_redis_restart_is_survived(shared, own_redis):
    server = own_redis
    svc = shared("a", "workers = 1", url=server.url)
    before = add(svc, b"queue:add?delay=1.5:echo:kept")
    server.stop()
    # The queue is away: queue commands say so at once, everything else carries on.
    assert svc.call(b"queue:add:echo:x").startswith(b"503:")
    assert svc.call(b"test:x") == b"Test"
    server.start()
    wait_until(lambda: svc.call(b"queue:check:id:%d" % before) in (b"0", b"1", b"2"))
    assert svc.call(b"queue:get:id:%d" % before) == b"kept"
    after = add(svc, b"queue:add:echo:new")
    assert after > before
    assert svc.call(b"queue:get:id:%d" % after) == b"new"
    # Said once, and its end too (review 2026-12-07: a line a request, and no end).
    assert svc.log().count("queue commands reply 503 until it does") == 1, svc.log()
    svc.wait_for_log("Redis reachable again after")


def test_workers_zero_needs_the_redis_backend(tmp_path):
    root = tmp_path / "solo"
    root.mkdir()
    svc = ServiceProcess(root, "[queue]\nworkers = 0\n")
    svc.start(wait=False)
    assert svc.wait() == 2
    assert "workers" in svc.log() and "redis" in svc.log()
    assert not Path(svc.ready_file).exists()
    assert os.path.exists(svc.config)


def test_no_false_lease_lost_warnings_for_jobs_that_just_ended(tmp_path, redis_url):
    # Issue 18, item 9: one instance, a short lease, many short jobs: a renewal racing a
    # job's end logged "lease lost (taken over by another instance)" for jobs nothing
    # took over. (The shortest lease [redis] lease takes: renewed every 0.33 s.)
    prefix = f"lease-{uuid.uuid4().hex[:8]}"
    svc = ServiceProcess(
        tmp_path, "[queue]\nworkers = 16\n", backend_config=redis_config(redis_url, prefix, 1.0)
    )
    try:
        svc.start()
        ids = [add(svc, b"queue:add:sleep:%d" % (i % 5)) for i in range(1500)]
        for jid in ids:
            assert svc.call(b"queue:get:id:%d" % jid).startswith(b"slept ")
        assert "lease lost" not in svc.log(), [
            line for line in svc.log().splitlines() if "lease lost" in line
        ][:5]
        assert svc.stop() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


def test_a_quiet_channel_is_not_a_lost_connection(tmp_path, redis_url):
    # An idle instance used to log "Redis connection lost (Timeout reading ...)" every
    # 5 s and subscribe again: redis-py's read timeout on a channel that had nothing to say.
    prefix = f"quiet-{uuid.uuid4().hex[:8]}"
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(redis_url, prefix))
    try:
        svc.start()
        time.sleep(12)  # twice the ping interval: pinged, answered, pinged again
        assert "connection lost" not in svc.log()
        jid = add(svc, b"queue:add:echo:after the quiet")
        assert svc.call(b"queue:get:id:%d" % jid) == b"after the quiet"
    finally:
        svc.stop()


def test_a_frozen_redis_is_found_by_the_ping(tmp_path, own_redis):
    # A connection that stops answering without a word (here: Redis pausing every client)
    # is found when the ping after a quiet spell gets no answer; it subscribes again after.
    # (-v: the subscription lost is a DEBUG line; the outage's own line is the WARNING.)
    svc = ServiceProcess(tmp_path, "", ("-v",), redis_config(own_redis.url, "frozen"))
    try:
        svc.start()
        # Subscribed first (a pause that came sooner would hold the subscription up instead).
        subscribers = ("PUBSUB", "NUMSUB", "frozen:events")
        wait_until(lambda: redis_command(own_redis.url, *subscribers).endswith(b":1\r\n"))
        assert redis_command(own_redis.url, "CLIENT", "PAUSE", "13000", "ALL") == b"+OK\r\n"
        wait_until(lambda: "no answer to a ping" in svc.log(), timeout=20)
        svc.wait_for_log("Redis reachable again after", timeout=20)  # the pause ends
        jid = add(svc, b"queue:add:echo:thawed")
        assert svc.call(b"queue:get:id:%d" % jid) == b"thawed"
    finally:
        svc.stop()



def test_a_redis_frozen_past_a_lease_but_not_the_timeout_takes_no_live_job_over(
    shared, own_redis, tmp_path
):
    # Redis pausing every client for 3 s: twice the 1.5 s lease, under the 5 s command
    # timeout, so no error says "outage". The renewals it held up land with deadlines
    # already past; a reap sent after it must not take over the job that runs meanwhile
    # (its instance is alive: the job ran twice).
    write_module(tmp_path / "modules", "long", "import time\n\ndef handle_tcp(request):\n"
                 "    time.sleep(6)\n    return 'long'\n")  # fmt: skip
    a = shared("a", "workers = 1", url=own_redis.url)
    b = shared("b", "workers = 1", url=own_redis.url)
    jid = add(a, b"queue:add:long:x")  # a's worker is free: a claims it as it adds
    wait_until(lambda: a.stats()["in_flight"].get("long", 0) == 1)
    assert redis_command(own_redis.url, "CLIENT", "PAUSE", "3000", "ALL") == b"+OK\r\n"
    assert a.call(b"queue:get:id:%d" % jid, timeout=30) == b"long"
    assert json.loads(a.call(b"queue:status:id:%d" % jid))["attempts"] == 1
    for svc in (a, b):
        assert "stopped renewing" not in svc.log() and "lease lost" not in svc.log(), svc.log()


@pytest.mark.parametrize("away", ["pause", "restart"])
def test_redis_away_past_a_lease_lets_no_idle_instance_take_a_live_job_over(
    shared, own_redis, tmp_path, away
):
    # Found by review: with instances idle beside the one running a job, Redis paused
    # (CLIENT PAUSE) or down (restarted with its data) a little past the 1.5 s lease made
    # an idle one take the live job over, most runs: its reap, queued in the pause or its
    # first command after the restart, ran before the live instance's renewal. The job
    # ran twice, its attempt counted as an interruption.
    write_module(tmp_path / "modules", "long", "import time\n\ndef handle_tcp(request):\n"
                 "    time.sleep(6)\n    return 'long'\n")  # fmt: skip
    a = shared("a", "workers = 1", url=own_redis.url)
    idle = [shared(name, "workers = 1", url=own_redis.url) for name in "bcd"]
    jid = add(a, b"queue:add:long:x")  # a's worker is free: a claims it as it adds
    wait_until(lambda: a.stats()["in_flight"].get("long", 0) == 1)
    if away == "pause":
        assert redis_command(own_redis.url, "CLIENT", "PAUSE", "2500", "ALL") == b"+OK\r\n"
    else:
        own_redis.stop()
        time.sleep(2.2)  # (the outage itself: nothing to wait for)
        own_redis.start()
        # (503 at once until a's reconnection, at most a second after Redis is back)
        a.wait_for_log("Redis reachable again after")
    assert a.call(b"queue:get:id:%d" % jid, timeout=30) == b"long"
    status = json.loads(a.call(b"queue:status:id:%d" % jid))
    assert (status["attempts"], status["interruptions"]) == (1, 0), status
    for svc in (a, *idle):
        assert "stopped renewing" not in svc.log() and "lease lost" not in svc.log(), svc.log()


def test_a_cancel_recorded_before_its_attempt_hears_of_it_still_ends_the_job_cancelled(
    tmp_path, redis_url
):
    # cancel answered "cancelling", yet the job ended done with its result (Redis only):
    # the attempt ended before the cancel's message reached its instance, and its end
    # recorded what the attempt alone had decided. The embedded engine ends it cancelled.
    prefix = f"cut-{uuid.uuid4().hex[:8]}"
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(redis_url, prefix))
    write_module(svc.modules, "gate", "import time\nfrom pathlib import Path\n\n"
                 "def handle_tcp(request):\n"
                 "    while not Path(request.text).exists():\n        time.sleep(0.01)\n"
                 "    return 'done anyway'\n")  # fmt: skip
    try:
        svc.start()
        # A cancel whose message has not arrived yet: recorded in the job, not published.
        gate = tmp_path / "open"
        jid = add(svc, b"queue:add:gate:%s" % str(gate).encode())
        wait_until(lambda: svc.stats()["in_flight"].get("gate", 0) == 1)
        redis_command(redis_url, "HSET", f"{prefix}:job:{jid}", "cancel_requested", "1")
        gate.touch()
        assert svc.call(b"queue:get:id:%d" % jid) == b"410: Job %d cancelled" % jid
        status = json.loads(svc.call(b"queue:status:id:%d" % jid))
        assert (status["state"], status["status"]) == ("cancelled", 410)
        # The reviewer's form: add and cancel pipelined; every "cancelling" ends cancelled.
        conn = svc.framed()
        cancelling = 0
        for _ in range(10):
            conn.send(b"queue:add:sleep:1")
            jid = int(conn.recv()[1][3:])
            conn.send(b"queue:cancel:id:%d" % jid)
            if conn.recv()[1] == b"cancelling":
                cancelling += 1
                assert conn.call(b"queue:get:id:%d" % jid) == (410, b"Job %d cancelled" % jid)
        conn.close()
        assert cancelling  # (else the loop tested nothing)
    finally:
        svc.stop()

class Channel:
    """What is published on a Redis channel, heard by a raw connection of its own."""

    def __init__(self, url: str, channel: str) -> None:
        where = urlparse(url)
        self.sock = socket.create_connection((where.hostname, where.port), timeout=10)
        name = channel.encode()
        self.sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(name), name))
        self.heard = bytearray()
        while b"subscribe" not in self.heard:
            self.heard += self.sock.recv(4096)
        self.sock.settimeout(None)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.heard += chunk
        except OSError:
            pass  # closed under us: the test is over

    def count(self, word: bytes) -> int:
        return len(re.findall(rb"\r\n" + word + rb"(?::\d+)?\r\n", bytes(self.heard)))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.reader.join()
        self.sock.close()


def test_an_instance_with_a_free_worker_runs_what_it_adds_waking_no_one(
    shared, redis_url, tmp_path
):
    # An instance with a free worker claims in the script that adds (one round trip, no
    # wake published); a busy one leaves the job ready and wakes the others.
    write_module(tmp_path / "modules", "slow", "import time\n\ndef handle_tcp(request):\n"
                 "    time.sleep(2)\n    return 'slow'\n")  # fmt: skip
    a = shared("a", "workers = 1")
    b = shared("b", "workers = 1")
    prefix = re.search(r'prefix = "([^"]+)"', a.config.read_text())[1]
    channel = Channel(redis_url, f"{prefix}:events")
    try:
        for word in (b"one", b"two", b"three"):
            jid = add(a, b"queue:add:whoami:" + word)
            assert a.call(b"queue:get:id:%d" % jid) == word + b" by %d" % a.proc.pid
        wait_until(lambda: channel.count(b"done") == 3)
        assert channel.count(b"wake") == 0
        first = add(a, b"queue:add:slow:")  # a's one worker is busy with it for 2 s
        second = add(a, b"queue:add:whoami:for b")
        assert a.call(b"queue:get:id:%d" % second) == b"for b by %d" % b.proc.pid
        assert channel.count(b"wake") >= 1
        assert a.call(b"queue:get:id:%d" % first) == b"slow"
    finally:
        channel.close()


# --- defects found by a review of the Redis engine (2026-12-04) -------------------------

PROGRESS = """
import time
from pathlib import Path

def handle_tcp(request):
    go = Path(request.text)
    while not go.exists():
        if request.job.cancelled:
            return "stopped early"
        time.sleep(0.01)
    return "finished"
"""


def test_every_get_sharing_a_failed_read_hears_the_failure(tmp_path, own_redis):
    # The first get of a job made the waiter the later ones share; when its read failed
    # (Redis frozen), it dropped the waiter and the others waited for ever.
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(own_redis.url, "orphan"))
    try:
        svc.start()
        jid = add(svc, b"queue:add:sleep:20000")
        wait_until(lambda: json.loads(svc.call(b"queue:status:id:%d" % jid))["state"] == "running")
        assert redis_command(own_redis.url, "CLIENT", "PAUSE", "7000", "ALL") == b"+OK\r\n"
        replies: list[bytes] = []

        def get() -> None:
            try:
                replies.append(svc.call(b"queue:get:id:%d" % jid, timeout=25))
            except OSError as exc:
                replies.append(repr(exc).encode())

        threads = [threading.Thread(target=get) for _ in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(0.3)  # the second shares the first one's waiter
        for thread in threads:
            thread.join()
        assert replies == [b"503: Queue unavailable: Redis does not answer"] * 2, replies
    finally:
        svc.stop()


def test_a_cancel_in_one_database_does_not_reach_a_job_in_another(tmp_path, own_redis):
    # Pub/sub is one namespace for the whole server: two services with one prefix on db 1
    # and db 2 both run a job 1, and a cancel of staging's reached production's.
    services = []
    try:
        for db in (1, 2):
            root = tmp_path / f"db{db}"
            root.mkdir()
            url = own_redis.url.rsplit("/", 1)[0] + f"/{db}"
            svc = ServiceProcess(root, "", backend_config=redis_config(url, "bgservice"))
            write_module(svc.modules, "progress", PROGRESS)
            services.append(svc.start())
        staging, production = services
        go = tmp_path / "go"
        for svc in services:
            assert add(svc, b"queue:add:progress:" + str(go).encode()) == 1
            wait_until(lambda s=svc: json.loads(s.call(b"queue:status:id:1"))["state"] == "running")
        assert staging.call(b"queue:cancel:id:1") == b"cancelling"
        assert staging.call(b"queue:get:id:1") == b"410: Job 1 cancelled"
        time.sleep(0.5)  # the cancel was published long ago
        assert json.loads(production.call(b"queue:status:id:1"))["state"] == "running"
        go.touch()
        assert production.call(b"queue:get:id:1") == b"finished"
    finally:
        for svc in services:
            svc.stop()


def test_a_password_in_the_redis_url_never_reaches_the_log(tmp_path, own_redis):
    url = own_redis.url + "?password=TOPSECRET"  # none set: AUTH fails, and is logged
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(url, "pw"))
    svc.start(wait=False)
    try:
        assert svc.wait() == 2  # a configuration error (next test)
    finally:
        svc.stop()
    assert "password=***" in svc.log()
    assert "TOPSECRET" not in svc.log()


def test_the_redis_url_from_the_environment_is_the_one_used(tmp_path, own_redis, monkeypatch):
    # The file names a port where no Redis listens; $BGSERVICE_REDIS_URL the real one.
    monkeypatch.setenv("BGSERVICE_REDIS_URL", own_redis.url)
    nowhere = "redis://127.0.0.1:1/0"
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(nowhere, "env"))
    svc.start()
    try:
        job = svc.call(b"queue:add:test:x")
        assert job.startswith(b"id:"), job
        wait_until(lambda: svc.call(b"queue:get:" + job) == b"Test")
    finally:
        svc.stop()


def test_a_redis_url_from_the_environment_that_redis_refuses_is_named_so(
    tmp_path, own_redis, monkeypatch
):
    # The file's [redis] url was named, though the variable's URL was the one refused.
    monkeypatch.setenv("BGSERVICE_REDIS_URL", own_redis.url + "?password=wrong")
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(own_redis.url, "envbad"))
    svc.start(wait=False)
    try:
        assert svc.wait() == 2, svc.log()
    finally:
        svc.stop()
    assert "configuration error: $BGSERVICE_REDIS_URL redis://" in svc.log(), svc.log()
    assert "Redis refuses it" in svc.log() and "wrong" not in svc.log()


@pytest.mark.parametrize(
    ("tail", "why"),
    [("?password=wrong", "AUTH"), ("/99", "DB index is out of range")],
    ids=["password", "db"],
)
def test_a_redis_url_redis_refuses_is_a_configuration_error(tmp_path, own_redis, tail, why):
    # Logged as an outage ("queue commands reply 503 until it does"), it never would: the
    # service ran on, every queue command 503, and systemd saw nothing wrong. Exit 2, as
    # for any configuration error, which the unit does not restart.
    url = own_redis.url.rsplit("/", 1)[0] + tail if tail == "/99" else own_redis.url + tail
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(url, "refused"))
    svc.start(wait=False)
    try:
        assert svc.wait() == 2, svc.log()
    finally:
        svc.stop()  # (one that starts anyway is not left running)
    assert "configuration error: [redis] url" in svc.log() and why in svc.log(), svc.log()
    assert "does not answer" not in svc.log()


STOPS = """
import os
import time
from pathlib import Path

def handle_tcp(request):
    # Runs until cancelled; then says which process was told to stop.
    while not request.job.cancelled:
        time.sleep(0.01)
    with open(Path(__file__).with_name("stopped.txt"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    return "stopped"
"""


def _claimed_again(svc: ServiceProcess, jid: int) -> bool:
    """Whether job ``jid`` runs again after a reap (its cut attempt given back)."""
    job = json.loads(svc.call(b"queue:status:id:%d" % jid))
    return (job["state"], job["interruptions"]) == ("running", 1)


def _taken_over(shared, name: str, source: str) -> tuple[ServiceProcess, ServiceProcess, int]:
    """Instance a runs a job of module ``name``; frozen past its lease, b takes it over."""
    a = shared("a", "workers = 1")
    write_module(a.modules, name, source)
    wait_until(lambda: a.call(b"service:modules").count(b'"%s"' % name.encode()) > 0)
    jid = add(a, b"queue:add:%s:x" % name.encode())
    wait_until(lambda: json.loads(a.call(b"queue:status:id:%d" % jid))["state"] == "running")
    b = shared("b", "workers = 1")  # (the same modules folder)
    a.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: _claimed_again(b, jid), timeout=20)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    return a, b, jid


def test_an_attempt_whose_lease_was_taken_over_is_told_to_stop(shared, tmp_path):
    # Frozen past its lease, the instance came back to a job another instance runs now:
    # it only logged "lease lost" and its handler ran on, writing into the new attempt.
    a, b, _ = _taken_over(shared, "stops", STOPS)
    stopped = a.modules / "stopped.txt"
    wait_until(lambda: stopped.exists() and str(a.proc.pid) in stopped.read_text(), timeout=10)
    assert str(b.proc.pid) not in stopped.read_text()  # the new attempt runs on


DEAF = """
import asyncio
from pathlib import Path

async def handle_tcp(request):
    # Runs until the test says, deaf to request.job.cancelled (as a handler may be).
    here = Path(__file__).parent
    while not (here / "go").exists():
        await asyncio.sleep(0.02)
    return "deaf"
"""


def test_a_lost_lease_is_logged_once_while_its_handler_runs_on(shared, tmp_path):
    # A handler that ran on after its lease was taken over logged "lease lost" at every
    # renewal (every third of a lease) until it returned: its lost claim was asked about
    # again each time.
    a, _, jid = _taken_over(shared, "deaf", DEAF)
    lost = f"job {jid}: lease lost"
    wait_until(lambda: lost in a.log(), timeout=10)
    time.sleep(2.0)  # four renewals (a 1.5 s lease is renewed every 0.5 s) while it runs on
    assert a.log().count(lost) == 1, [line for line in a.log().splitlines() if lost in line]
    (a.modules / "go").touch()
    assert a.call(b"queue:get:id:%d" % jid, timeout=30) == b"deaf"


TWO_ATTEMPTS = """
import asyncio
import itertools
from pathlib import Path

attempts = itertools.count(1)  # this process's attempts of the job

async def handle_tcp(request):
    mine = next(attempts)
    here = Path(__file__).parent
    (here / f"attempt{mine}.started").touch()
    while not (here / f"attempt{mine}.go").exists():  # the test says when each one ends
        await asyncio.sleep(0.02)
    try:
        await request.job.save_checkpoint(f"from attempt {mine}")
    except RuntimeError:  # AttemptOver: it no longer holds the job
        pass
    request.job.progress(mine, 2, f"attempt {mine}")
    return f"attempt {mine}"
"""


def test_an_instance_that_claims_a_job_again_tells_its_two_attempts_apart(tmp_path, redis_url):
    # Claims were fenced per instance: an instance that claimed a job again after its
    # lease was reaped (an outage longer than the lease), while its first attempt still
    # ran, recorded that first attempt's end, result and checkpoint as the job's, and the
    # second attempt's then counted as lost.
    import redis

    from bgservice.queue import redis_scripts

    prefix = f"fence-{uuid.uuid4().hex[:8]}"
    svc = ServiceProcess(tmp_path, "[queue]\nworkers = 4\n",
                         backend_config=redis_config(redis_url, prefix))  # fmt: skip
    try:
        svc.start()
        write_module(svc.modules, "twice", TWO_ATTEMPTS)
        wait_until(lambda: b'"twice"' in svc.call(b"service:modules"))
        jid = add(svc, b"queue:add:twice:x")
        wait_until(lambda: json.loads(svc.call(b"queue:status:id:%d" % jid))["state"] == "running")
        # The lease runs out and a reap puts the job back in line, in one transaction (a
        # renewal between the two would extend the lease again).
        client = redis.Redis.from_url(redis_url)
        with client.pipeline(transaction=True) as pipe:
            pipe.zadd(f"{prefix}:running", {str(jid): 0})
            now = time.time()
            pipe.eval(redis_scripts.REAP, 0, prefix, repr(now), "1.5", repr(now + 3600))
            assert pipe.execute()[1] == [[str(jid).encode()], [], []]
        # Claimed again while the first still runs (the line comes before the new attempt
        # starts); then the first ends, then the second: in that order, whatever the timing.
        wait_until(lambda: (svc.modules / "attempt2.started").exists(), timeout=20)
        assert f"job {jid}: claimed again while an earlier attempt of it runs here" in svc.log()
        (svc.modules / "attempt1.go").touch()
        svc.wait_for_log(f"job {jid} (twice): lease lost while it ran")  # the first's end
        (svc.modules / "attempt2.go").touch()
        assert svc.call(b"queue:get:id:%d" % jid) == b"attempt 2"
        job = json.loads(svc.call(b"queue:status:id:%d" % jid))
        assert (job["attempts"], job["interruptions"]) == (1, 1)  # (the reaped one given back)
        assert job["checkpoint"] == "from attempt 2"
        assert job["progress"]["message"] == "attempt 2"
        assert svc.stop() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


def test_finished_jobs_past_their_expiry_are_all_deleted_at_the_next_sweep(tmp_path, redis_url):
    # The sweep deleted at most 1,000 finished jobs a tick (every keep_results / 4, at most
    # a minute): a queue finishing more than 17 jobs a second kept every job's hash, data
    # and result, in Redis for good. It now goes on in batches until none is left.
    import redis

    prefix = f"expire-{uuid.uuid4().hex[:8]}"
    jobs, past = 10_000, time.time() - 10
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for jid in range(1, jobs + 1):
        pipe.hset(f"{prefix}:job:{jid}", mapping={"id": jid, "module": "echo", "state": "done"})
        pipe.zadd(f"{prefix}:state:done", {jid: past})
        pipe.zadd(f"{prefix}:finished", {jid: past})
    pipe.set(f"{prefix}:id", jobs + 1)
    pipe.execute()
    svc = ServiceProcess(tmp_path, "[queue]\nkeep_results = 4\n",
                         backend_config=redis_config(redis_url, prefix))  # fmt: skip
    try:
        svc.start()
        # One sweep logs what it deleted, once its last batch is done: the whole count in
        # one line, not a line of 1,000 a tick (a clock cannot tell them apart on a busy CI).
        svc.wait_for_log("job queue: 10000 finished jobs expired", timeout=30)
        assert svc.log().count("finished jobs expired") == 1
        assert client.zcard(f"{prefix}:finished") == 0
        assert client.zcard(f"{prefix}:state:done") == 0
        assert not client.exists(f"{prefix}:job:1", f"{prefix}:job:{jobs}")
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()
        client.delete(*client.keys(f"{prefix}:*") or [f"{prefix}:none"])


# --- defects found by a review of the Redis engine (2026-12-06) -------------------------

ONLY1 = "import os\n\ndef handle_tcp(request):\n    return f'only1 by {os.getpid()}'\n"


def instance(tmp_path, name: str, url: str, prefix: str, config: str = "", lease: float = 1.5):
    """A service of its own folder (and modules) on the queue ``prefix``."""
    root = tmp_path / name
    root.mkdir()
    svc = ServiceProcess(root, "[queue]\nworkers = 1\n" + config,
                         backend_config=redis_config(url, prefix, lease))  # fmt: skip
    write_module(svc.modules, "gate", GATE)
    return svc


def test_a_job_waits_for_an_instance_that_has_its_module(tmp_path, redis_url):
    # N has module only1, M (same queue) has not (a rolling deploy). With N's one worker
    # busy, M claimed N's only1 job and failed it for good: 400 Unknown request. It now
    # waits for an instance that can run it: M too, once only1 is in its modules folder.
    prefix = f"modules-{uuid.uuid4().hex[:8]}"
    n = instance(tmp_path, "n", redis_url, prefix)
    m = instance(tmp_path, "m", redis_url, prefix)
    write_module(n.modules, "only1", ONLY1)
    try:
        n.start()
        m.start()
        gate = tmp_path / "open"
        busy = add(n, b"queue:add:gate:" + str(gate).encode())  # n's worker takes it
        wait_until(lambda: n.stats()["in_flight"].get("gate", 0) == 1)
        jid = add(n, b"queue:add:only1:x")  # wakes m, whose worker is free
        time.sleep(1.5)  # (m took it at once, before)
        status = json.loads(m.call(b"queue:status:id:%d" % jid))
        assert (status["state"], status["attempts"]) == ("waiting", 0), status
        write_module(m.modules, "only1", ONLY1)  # a first load: m looks within a second
        assert m.call(b"queue:get:id:%d" % jid) == b"only1 by %d" % m.proc.pid
        gate.touch()
        assert n.call(b"queue:get:id:%d" % busy) == b"open"
    finally:
        n.stop()
        m.stop()


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_a_handler_past_its_jobs_timeout_holds_its_module_slot_on_every_instance(
    tmp_path, redis_url, end
):
    # Freed in Redis at the timeout, the slot let another instance start the module's next
    # job beside the handler still running: module_limits = { gate = 1 } ran two at once.
    # Held until the handler returns, its instance stops, or it dies (then the hold's
    # lease runs out, and another instance's reap gives the slot back).
    prefix = f"held-{uuid.uuid4().hex[:8]}"
    a, b = (instance(tmp_path, name, redis_url, prefix, "module_limits = { gate = 1 }\n")
            for name in ("a", "b"))  # fmt: skip
    (tmp_path / "open").touch()
    try:
        a.start()
        first = add(a, b"queue:add?timeout=0.3:gate:" + bytes(tmp_path / "never"))
        assert a.call(b"queue:get:id:%d" % first) == b"504: Module gate timed out after 0.3 s"
        b.start()
        second = add(b, b"queue:add:gate:" + bytes(tmp_path / "open"))
        time.sleep(1.5)  # (b's free worker took it at once, before)
        status = json.loads(b.call(b"queue:status:id:%d" % second))
        assert (status["state"], status["attempts"]) == ("waiting", 0), status
        if end == "stop":
            a.stop()  # (its handler's thread ends with the process)
        else:
            a.proc.kill()
            a.proc.wait()
        assert b.call(b"queue:get:id:%d" % second) == b"open"
        if end == "kill":  # said, as a dead instance's jobs taken over are
            b.wait_for_log("renewing them are free again: gate|")
    finally:
        for svc in (a, b):
            if svc.proc is not None and svc.proc.poll() is None:
                svc.stop()


def test_a_config_schedule_stays_while_a_live_instance_config_has_it(tmp_path, redis_url):
    # s2's config lacks s1's [[schedule]]: s2's start removed it from Redis while s1 went
    # on firing it, and s2 listed nothing. It is removed only once no live instance's
    # config has it: after s1 stopped, or died (its pid gone; a lease of 60 s: not by
    # its declaration running out).
    prefix = f"declared-{uuid.uuid4().hex[:8]}"
    schedule = '[[schedule]]\nname = "cfg"\nmodule = "echo"\ndata = "tick"\nevery = 3600\n'
    s1 = instance(tmp_path, "s1", redis_url, prefix, schedule, lease=60)
    s2 = instance(tmp_path, "s2", redis_url, prefix, lease=60)

    def names(svc: ServiceProcess) -> list[str] | None:  # None: not loaded yet
        reply = svc.call(b"queue:schedules")
        return None if reply.startswith(b"503") else [s["name"] for s in json.loads(reply)]

    kept = "schedule cfg: kept: the service.config of instance"
    try:
        for n, stop in enumerate(("clean", "crash"), 1):
            s1.start()
            wait_until(lambda: names(s1) == ["cfg"])
            s2.start()
            wait_until(lambda n=n: s2.log().count(kept) == n)
            wait_until(lambda: names(s2) == ["cfg"])  # (503 until its scheduler has loaded)
            assert s2.stop() == 0
            if stop == "clean":
                assert s1.stop() == 0
            else:
                s1.proc.kill()
                s1.proc.wait()
            s2.start()
            wait_until(lambda: names(s2) is not None)
            assert names(s2) == [], stop
            assert s2.log().count(kept) == n
            assert s2.stop() == 0
    finally:
        s1.stop()
        s2.stop()


@pytest.mark.parametrize("back", [True, False], ids=["redis-back-within-grace", "never"])
def test_an_end_held_up_by_an_outage_at_a_stop_is_retried_for_the_grace(tmp_path, own_redis, back):
    # SIGTERM with Redis away: a job that finished within the grace was dropped without a
    # word (its end not recorded), and the instance stopped at once. It retries for the
    # grace now; when the grace runs out first, it says which job runs again.
    grace = 30 if back else 1
    svc = instance(tmp_path, "a", own_redis.url, "grace", f"[limits]\nshutdown_grace = {grace}\n")
    try:
        svc.start()
        gate = tmp_path / "open"
        jid = add(svc, b"queue:add:gate:" + str(gate).encode())
        wait_until(lambda: svc.stats()["in_flight"].get("gate", 0) == 1)
        own_redis.stop()
        svc.signal(signal.SIGTERM)
        gate.touch()
        svc.wait_for_log(f"job {jid}: cannot record its end")
        if back:
            own_redis.start()
            assert svc.wait(30) == 0
            state = redis_command(own_redis.url, "HGET", f"grace:job:{jid}", "state")
            assert state == b"$4\r\ndone\r\n", svc.log()
        else:
            svc.wait(30)
            line = f"job {jid} (gate): its end not recorded before the shutdown grace ran out"
            assert line in svc.log()
    finally:
        svc.stop()


@pytest.mark.parametrize(
    ("acl", "missing"),
    [
        (["~*", "resetchannels", "+@all"], "may not publish on channel acl:events (ACL &acl:"),
        (["~*", "&*", "+@all", "-evalsha"], "may not run Lua scripts (EVALSHA)"),
        (["~other:*", "&*", "+@all"], "may not read and write the keys acl:* (ACL ~acl:*)"),
        (["~*", "&*", "+@all", "-script"], "may not load Lua scripts (SCRIPT LOAD)"),
        (["~*", "&acl:events", "+@all", "-subscribe"], "may not subscribe to channel"),
    ],
    ids=["channel", "evalsha", "keys", "script-load", "subscribe"],
)
def test_a_redis_user_without_a_permission_the_queue_needs_stops_the_start(
    tmp_path, own_redis, acl, missing
):
    # The start only pinged Redis: such a user started, then every queue command replied
    # "503: Redis does not answer" for ever (or ends were lost: "lease lost" lines).
    assert redis_command(own_redis.url, "ACL", "SETUSER", "bg", "on", ">pw", *acl) == b"+OK\r\n"
    url = own_redis.url.replace("redis://", "redis://bg:pw@")
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(url, "acl"))
    svc.start(wait=False)
    try:
        assert svc.wait() == 2, svc.log()
    finally:
        svc.stop()
    assert "configuration error: [redis] url redis://bg:***@127.0.0.1" in svc.log()
    assert missing in svc.log(), svc.log()


def test_a_command_redis_refuses_is_answered_with_what_redis_said(tmp_path, own_redis):
    # Every error reply (a permission, out of memory) was "503: Queue unavailable: Redis
    # does not answer"; redis-py's pipelines also replaced the error with "{exception.args}".
    acl = ("ACL", "SETUSER", "bg", "on", ">pw", "~*", "&*", "+@all")
    assert redis_command(own_redis.url, *acl, "-zcard") == b"+OK\r\n"
    url = own_redis.url.replace("redis://", "redis://bg:pw@")
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(url, "refused"))
    try:
        svc.start()
        said = svc.call(b"queue:stats")
        assert said.startswith(b"503: Queue unavailable: Redis refused: "), said
        assert b"no permissions to run the 'zcard' command" in said, said
        assert redis_command(own_redis.url, *acl, "+zcard") == b"+OK\r\n"
        assert redis_command(own_redis.url, "CONFIG", "SET", "maxmemory", "1") == b"+OK\r\n"
        reply = svc.call(b"queue:add:echo:x")
        assert reply.startswith(b"503: Queue unavailable: Redis refused: OOM command not allowed")
        assert redis_command(own_redis.url, "CONFIG", "SET", "maxmemory", "0") == b"+OK\r\n"
        assert svc.call(b"queue:add?wait=1:echo:x") == b"x"
    finally:
        svc.stop()


def test_a_reaper_whose_clock_runs_ahead_takes_no_live_job_over(tmp_path, redis_url):
    # Lease deadlines were written with the renewing instance's clock and compared with
    # the reaper's: an instance 25 s ahead took a healthy instance's job over, and it ran
    # twice. Deadlines are on Redis's clock now, whatever the instances' clocks say.
    import redis

    from bgservice.queue import redis_scripts

    prefix = f"skew-{uuid.uuid4().hex[:8]}"
    svc = instance(tmp_path, "a", redis_url, prefix)
    try:
        svc.start()
        gate = tmp_path / "open"
        jid = add(svc, b"queue:add:gate:" + str(gate).encode())
        wait_until(lambda: svc.stats()["in_flight"].get("gate", 0) == 1)
        ahead = time.time() + 25  # what another instance's clock says
        reap = (redis_scripts.REAP, 0, prefix, repr(ahead), "1.5", repr(ahead + 3600))
        assert redis.Redis.from_url(redis_url).eval(*reap) == [[], [], []]
        gate.touch()
        assert svc.call(b"queue:get:id:%d" % jid) == b"open"
        assert json.loads(svc.call(b"queue:status:id:%d" % jid))["attempts"] == 1
    finally:
        svc.stop()


# --- defects found by a review of several instances on one Redis (2026-12-07) ----------

# docs/modules.md's checkpoint example: a checkpoint every 0.25 s until the test says.
CHECKPOINTS = """
import asyncio
import json
from pathlib import Path

async def handle_tcp(request):
    saved = json.loads(request.job.checkpoint or "0")
    while not Path(request.text).exists():
        saved += 1
        await request.job.save_checkpoint(json.dumps(saved))
        await asyncio.sleep(0.25)
    return f"saved {saved}"
"""


def test_a_job_saving_checkpoints_rides_out_a_redis_restart(tmp_path, own_redis):
    # redis-cli shutdown, 2 s, a restart with its append-only file: the job failed with
    # "503: Queue unavailable: Redis does not answer", raised by save_checkpoint inside
    # the handler at once. It waits for Redis now, and saves when Redis is back.
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(own_redis.url, "ckpt"))
    write_module(svc.modules, "checkpoints", CHECKPOINTS)
    try:
        svc.start()
        go = tmp_path / "go"
        jid = add(svc, b"queue:add:checkpoints:" + bytes(go))

        def saved() -> int:  # (-1: the queue not answering yet, 503)
            reply = svc.call(b"queue:status:id:%d" % jid)
            return -1 if reply.startswith(b"503:") else int(json.loads(reply)["checkpoint"] or 0)

        wait_until(lambda: saved() >= 2)
        own_redis.stop()
        time.sleep(2)  # (the outage itself: nothing to wait for)
        own_redis.start()
        before = wait_until(lambda: saved() + 1) - 1  # (+ 1: 0 saved is an answer too)
        wait_until(lambda: saved() >= before + 2)  # saved again, by the same attempt
        go.touch()
        assert svc.call(b"queue:get:id:%d" % jid).startswith(b"saved "), svc.log()
        status = json.loads(svc.call(b"queue:status:id:%d" % jid))
        assert (status["state"], status["attempts"]) == ("done", 1), status
    finally:
        svc.stop()
