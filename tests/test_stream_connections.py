"""What every connection is owed (bgservice/stream/base.py, sniffer.py, bgservice/eager.py,
datagram.py): a slow but steady reader gets its whole reply and a stuck one a reset, not a
cut reply; no request sees another's context variables; a connection that sends its
request during the shutdown gets an answer. Over real sockets."""

from __future__ import annotations

import asyncio
import collections.abc
import json
import signal
import socket
import time

import pytest

from bgservice import eager
from tests.conftest import recv_all, sent_one_shot, wait_until, write_module


def test_a_steady_reader_slower_than_the_write_timeout_gets_its_whole_reply(make_service):
    # The write timeout ran from the moment the reply backed up, not from the last byte
    # the client took: a client reading steadily was cut after write_timeout.
    svc = make_service("[limits]\nwrite_timeout = 1.0\n")
    data = b"s" * (8 << 20)  # more than the kernel's buffers on both sides hold
    with sent_one_shot(svc, b"echo:" + data, rcvbuf=65536) as sock:
        got = bytearray()
        started = time.monotonic()
        while chunk := sock.recv(65536):
            got += chunk
            time.sleep(0.02)  # 3.2 MB/s at most: about 2.5 s for the reply
    assert time.monotonic() - started > 1.2  # slower than the write timeout
    assert len(got) == len(data) and got == data
    assert "write timeout" not in svc.log()


def test_a_client_that_stops_reading_gets_a_reset_not_a_short_reply(make_service):
    # Dropped for taking nothing, the connection was closed with a FIN after what the
    # kernel still held: a one-shot client (no length in its reply) took the cut reply
    # for a whole one.
    svc = make_service("[limits]\nwrite_timeout = 1.0\n")
    data = b"r" * (8 << 20)
    with sent_one_shot(svc, b"echo:" + data, rcvbuf=65536) as sock:
        wait_until(lambda: "write timeout" in svc.log(), timeout=15)
        got = bytearray()
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                got += chunk
        assert len(got) < len(data)


CONTEXT = """
import contextvars

who = contextvars.ContextVar("who", default="unset")

async def handle_tcp(request):
    before = who.get()
    who.set(request.text)
    return f"before={before}"

def handle_udp(request):
    before = who.get()
    who.set(request.text)
    with open(request.text + ".seen", "w") as f:
        f.write(before)
"""


def test_no_request_sees_a_context_variable_another_set(make_service, modules_dir, tmp_path):
    # A handler's first step ran in the listener's own context: a context variable set
    # by one client's request (a tracing span, a user id) was there for the next one's.
    write_module(modules_dir, "ctx", CONTEXT)
    svc = make_service()
    assert [svc.call(b"ctx:%s" % w) for w in (b"one", b"two")] == [b"before=unset"] * 2
    conn = svc.framed()
    try:
        assert [conn.call(b"ctx:%s" % w) for w in (b"three", b"four")] == [
            (200, b"before=unset")
        ] * 2
    finally:
        conn.close()
    for name in ("five", "six"):
        target = tmp_path / f"{name}.seen"
        svc.send_udp(b"ctx:" + str(target.with_suffix("")).encode())
        wait_until(target.exists)
        assert target.read_text() == "unset"


def test_a_request_sent_after_the_shutdown_began_is_answered(make_service):
    # Connected before SIGTERM, its request sent just after: it read an empty reply.
    svc = make_service()
    with socket.create_connection(svc.tcp, timeout=10) as sock:
        wait_until(lambda: svc.stats()["connections"]["open"] >= 2)  # (and the stats call)
        svc.signal(signal.SIGTERM)
        svc.wait_for_log("calls in flight, up to")  # the stop has begun (was: a 0.1 s sleep)
        try:
            sock.sendall(b"echo:late")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert recv_all(sock) == b"503: Shutting down"
    assert svc.wait() == 0


def test_a_flood_of_refused_peers_is_a_line_a_minute_not_a_line_each(make_service):
    # Every connection from outside the allow list was a warning of its own: anyone who
    # can connect could fill the log.
    svc = make_service(start=False)
    text = svc.config.read_text().replace('host = "127.0.0.1"', 'host = "0.0.0.0"')
    svc.config.write_text('allow = ["10.0.0.0/8"]\n' + text)
    svc.start()
    address = ("127.0.0.1", svc.tcp[1])
    for _ in range(50):
        with socket.create_connection(address, timeout=10) as sock:
            assert recv_all(sock) == b"403: Forbidden"
    assert svc.log().count("not in allow list") == 1


def test_the_rest_of_a_call_that_waits_is_a_coroutine_any_python_runs_as_a_task():
    # eager.start hands what is left of a call that waits to a task. It was a
    # generator-based coroutine (types.coroutine), which create_task refuses from Python
    # 3.12 on: there every call that waited (a queued job, a compile) stopped the service.
    # scripts/test.sh runs part of the suite on 3.12 and 3.13 where they are installed;
    # this holds on any Python.
    async def waits() -> str:
        await asyncio.sleep(0)
        return "done"

    async def main() -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        done, task = eager.start(waits(), loop.create_task, loop)
        # What create_task takes on 3.12+ (a generator-based coroutine is not one of these)
        assert isinstance(task.get_coro(), collections.abc.Coroutine), type(task.get_coro())
        return done, await task

    assert asyncio.run(main()) == (False, "done")


TIMEOUTS = """
import asyncio
import contextvars
import gc
import json

import anyio

VAR = contextvars.ContextVar("var")
UDP = {}  # what each datagram's case came to

async def handle_tcp(request):
    if request.text == "udp":
        return json.dumps(UDP)
    if request.text == "finished tasks":  # still in memory: the last calls' cycles
        return str(sum(1 for o in gc.get_objects() if isinstance(o, asyncio.Task) and o.done()))
    return await case(request.text)

async def handle_udp(request):
    try:
        UDP[request.text] = await case(request.text)
    except Exception as exc:
        UDP[request.text] = repr(exc)

async def case(text):
    if text == "timeout":  # asyncio.timeout before the first await
        async with asyncio.timeout(5):
            await asyncio.sleep(0.01)
        return "timeout ok"
    if text == "wait_for":  # on Python 3.12+ asyncio.timeout underneath
        return await asyncio.wait_for(asyncio.sleep(0.01, "wait_for ok"), 5)
    if text == "expires":  # a timeout begun at once that fires later
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(5)
        except TimeoutError:
            return "expired in time"
    if text == "at once":  # due as it begins (redis-py's pool on every command)
        try:
            async with asyncio.timeout(0):
                await asyncio.sleep(5)
        except TimeoutError:
            return "due at once"
    if text == "same task":  # one current task from the first line to the last
        first = asyncio.current_task()
        await asyncio.sleep(0)
        return "same task" if asyncio.current_task() is first else "another task"
    if text == "anyio":  # its cancel scopes check that (httpx's, so httpx)
        with anyio.fail_after(5):
            await asyncio.sleep(0.01)
        with anyio.move_on_after(0.01):
            await asyncio.sleep(5)
        return "anyio ok"
    if text == "anyio at once":  # a scope cancelled before the first await
        with anyio.move_on_after(0) as scope:
            await anyio.sleep(5)
        return "anyio at once" if scope.cancelled_caught else "not cancelled"
    if text == "context":  # a variable set, awaited, reset: one context throughout
        token = VAR.set("x")
        try:
            await asyncio.sleep(0.01)
        finally:
            VAR.reset(token)
        return "context ok"
    if text == "large":  # a reply held by nothing once sent
        await asyncio.sleep(0)
        return "x" * 100_000
    if text == "large at once":  # the same, after a cancellation thrown into it
        try:
            async with asyncio.timeout(0):
                await asyncio.sleep(5)
        except TimeoutError:
            return "x" * 100_000
    if text == "cancelled at once":  # a CancelledError of its own, not the call's
        raise asyncio.CancelledError()
    if text == "cancelled later":
        await asyncio.sleep(0)
        raise asyncio.CancelledError()
    if text == "group":
        async with asyncio.TaskGroup() as group:
            a = group.create_task(asyncio.sleep(0.01, "group"))
            group.create_task(asyncio.sleep(0.02))
        return a.result() + " ok"
    if text == "own":  # the handler's own TimeoutError: its error, not the call's
        return await asyncio.wait_for(asyncio.sleep(5), 0.05)
    return "?"
"""


def test_a_handler_may_begin_with_a_timeout_a_wait_for_or_a_task_group(make_service, modules_dir):
    # A handler's first step runs at once, outside a task: asyncio.timeout there raised
    # "Timeout should be used inside a task" (a 500), and so did wait_for on Python 3.12+
    # (every compile of the shipped compilers failed there). Over both forms and queued.
    write_module(modules_dir, "timeouts", TIMEOUTS)
    svc = make_service()
    cases = {b"timeout": b"timeout ok", b"wait_for": b"wait_for ok",
             b"expires": b"expired in time", b"group": b"group ok",
             b"at once": b"due at once", b"same task": b"same task",
             b"anyio": b"anyio ok", b"anyio at once": b"anyio at once",
             b"context": b"context ok"}  # fmt: skip
    for data, expected in cases.items():
        assert svc.call(b"timeouts:" + data) == expected, data
    # As datagrams: their handlers had no current task at all before the first await.
    for data in cases:
        svc.send_udp(b"timeouts:" + data)
    wait_until(lambda: len(json.loads(svc.call(b"timeouts:udp"))) == len(cases))
    udp = {k.encode(): v.encode() for k, v in json.loads(svc.call(b"timeouts:udp")).items()}
    assert udp == cases
    conn = svc.framed()
    conn.send(*[b"timeouts:" + data for data in cases])
    assert [conn.recv() for _ in cases] == [(200, reply) for reply in cases.values()]
    conn.close()
    for data, expected in cases.items():
        jid = svc.call(b"queue:add:timeouts:" + data)
        assert svc.call(b"queue:get:" + jid) == expected, data


TASK_INFO = """
import asyncio
import json

import anyio

UDP = []

async def handle_tcp(request):
    if request.text == "udp":
        return json.dumps(UDP)
    # What loggers and anyio's get_current_task() ask of the current task, at once:
    info = anyio.get_current_task()
    task = asyncio.current_task()
    named = task.get_name()
    task.set_name(named + " renamed")
    at_once = [task.get_name(), task.get_loop() is asyncio.get_running_loop(),
               task.cancelled(), task.done()]
    await asyncio.sleep(0)
    after = anyio.get_current_task()
    return json.dumps([at_once, info.id == after.id, after.name, named])

async def handle_udp(request):
    task = asyncio.current_task()
    task.set_name("datagram")
    before = [task.get_name(), task.get_loop() is asyncio.get_running_loop(), task.cancelled(),
              task.get_coro().__qualname__]
    await asyncio.sleep(0)
    UDP.append(before + [asyncio.current_task().get_name()])
"""


def test_a_handler_may_ask_its_task_for_its_name_loop_and_coroutine_at_once(
    make_service, modules_dir
):
    # Before its first await a handler's current task answered only cancel() and its
    # kin: get_name(), get_loop() (loggers) and get_coro() (anyio.get_current_task())
    # raised RuntimeError, a 500. They are answered now, the same before and after.
    write_module(modules_dir, "taskinfo", TASK_INFO)
    svc = make_service()

    def check(reply: bytes) -> None:
        at_once, same_id, name_after, named = json.loads(reply)
        assert at_once == [named + " renamed", True, False, False]
        assert same_id and name_after == named + " renamed"

    check(svc.call(b"taskinfo:x"))
    conn = svc.framed()
    conn.send(b"taskinfo:x", b"taskinfo:y")
    for _ in range(2):
        status, reply = conn.recv()
        assert status == 200, reply
        check(reply)
    conn.close()
    check(svc.call(b"queue:get:" + svc.call(b"queue:add:taskinfo:x")))
    svc.send_udp(b"taskinfo:x")
    wait_until(lambda: json.loads(svc.call(b"taskinfo:udp")))
    assert json.loads(svc.call(b"taskinfo:udp")) == [
        ["datagram", True, False, "handle_udp", "datagram"]
    ]


def test_a_cancellation_before_the_rest_first_runs_reaches_the_coroutine():
    # A timeout due as it begins cancels the task made for the rest before that task has
    # run at all. Its coroutine was an ``async def`` around the rest, not started yet: the
    # cancellation ended it there, unseen by the timeout that was to turn it into a
    # TimeoutError, and the call's task ended cancelled: its client waited for ever (any
    # handler using redis.asyncio, from its second command on).
    async def due_at_once() -> str:
        try:
            async with asyncio.timeout(0):
                await asyncio.sleep(5)
        except TimeoutError:
            return "timed out"
        return "slept"

    async def main() -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        done, task = eager.start(due_at_once(), loop.create_task, loop)
        return done, await task

    assert asyncio.run(main()) == (False, "timed out")


REDIS_MODULE = """
import redis.asyncio

client = None

async def handle_tcp(request):
    global client
    if client is None:
        client = redis.asyncio.from_url(request.text)
    return str(await client.incr("bgservice-test-handler-calls"))
"""


def test_a_handler_may_use_redis_asyncio(make_service, modules_dir, redis_url):
    # The reason the test above was found: redis-py's pool enters asyncio.timeout(0) on
    # every command it sends on a connection made before. The second call never came back.
    write_module(modules_dir, "counter", REDIS_MODULE)
    svc = make_service()
    first = int(svc.call(b"counter:" + redis_url.encode()))
    for n in range(1, 4):
        assert svc.call(b"counter:" + redis_url.encode(), timeout=5) == b"%d" % (first + n)


def test_a_call_that_waited_leaves_nothing_for_the_garbage_collector(make_service, modules_dir):
    # Task -> its coroutine -> the stand-in current task -> the task: a cycle per call
    # that waited, freed only by a full collection, which the loop's small objects seldom
    # bring about; until then each held its reply (a review: 527 MB after 120 calls of
    # 4 MB replies). Now a finished call's task is freed when its last reference goes.
    write_module(modules_dir, "timeouts", TIMEOUTS)
    svc = make_service()
    for _ in range(50):
        assert len(svc.call(b"timeouts:large")) == 100_000
    assert int(svc.call(b"timeouts:finished tasks")) < 10
    # A cancellation thrown in left the task in a cycle through the frames that threw it,
    # on Python 3.12+ (a second review).
    for _ in range(50):
        assert len(svc.call(b"timeouts:large at once")) == 100_000
    assert int(svc.call(b"timeouts:finished tasks")) < 10


def test_a_cancelled_error_a_handler_raises_is_its_error(make_service, modules_dir):
    # Nothing cancelled the call: a 500 naming it. Before, raised in the first step it
    # escaped to the transport (no reply; from a datagram's handler it stopped the
    # service), and raised later it ended the call's task as cancelled: no reply ever,
    # the client waited on a half-closed connection.
    write_module(modules_dir, "timeouts", TIMEOUTS)
    svc = make_service()
    for data in (b"cancelled at once", b"cancelled later"):
        reply = svc.call(b"timeouts:" + data, timeout=5)
        assert reply.startswith(b"500: Module timeouts raised CancelledError"), reply
        svc.send_udp(b"timeouts:" + data)
    wait_until(lambda: svc.stats()["modules"]["timeouts"].get("udp", {}).get("errors") == 2)
    assert "failed: 500 Module timeouts raised CancelledError" in svc.log()
    assert svc.proc is not None and svc.proc.poll() is None
    assert svc.call(b"timeouts:timeout") == b"timeout ok"
    jid = svc.call(b"queue:add:timeouts:cancelled later")
    assert svc.call(b"queue:get:" + jid).startswith(b"500: Module timeouts raised Cancelled")


def test_a_handlers_own_timeout_error_is_its_error_not_the_calls(make_service, modules_dir):
    # A TimeoutError the handler raised (its wait_for expired) was reported as the call's
    # timeout: "504: Module timeouts timed out after 30 s", 50 ms into a 30 s limit.
    write_module(modules_dir, "timeouts", TIMEOUTS)
    svc = make_service()
    assert svc.call(b"timeouts:own").startswith(b"500: Module timeouts raised TimeoutError")


LEAK = """
import contextvars

VAR = contextvars.ContextVar("leak", default="unset")

async def handle_tcp(request):
    if request.text == "add":  # a handler that sets a variable, then adds a job
        VAR.set("the handler's")
        return str(await request.add_job_async("leak", "read"))
    seen = VAR.get()
    VAR.set("a job's")  # for the job its end starts next
    return seen
"""


def test_a_job_sees_no_context_variable_of_the_handler_or_job_before_it(make_service,
                                                                         modules_dir):  # fmt: skip
    # A job started at once inside add() ran in a copy of the adding handler's context (a
    # second review): a call's variables are seen by no other call (docs/modules.md). Nor
    # does a job started as another ends see that one's (it did not before either).
    write_module(modules_dir, "leak", LEAK)
    svc = make_service("[queue]\nworkers = 1\n")
    jid = svc.call(b"leak:add")
    assert svc.call(b"queue:get:id:" + jid) == b"unset"
    svc.call(b"queue:add:sleep:300")  # the one worker busy: the next start as it ends
    jids = [svc.call(b"queue:add:leak:read") for _ in range(5)]
    assert [svc.call(b"queue:get:" + j) for j in jids] == [b"unset"] * 5
