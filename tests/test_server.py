"""The service's life: start-up report, requests, logging switches, errors outside any
request (-e / -E / -EE), and shutdown with calls in flight."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import pytest

from bgservice import __version__
from bgservice.protocol import framed_request
from tests.conftest import GATE, HOG, STRAY_ERROR, wait_until, write_module
from tests.queue_helpers import add, status

GATED = GATE + """
def unload():
    with open(Path(__file__).with_name("unloaded.log"), "a") as f:
        f.write("gated\\n")
"""


def test_start_up_reports_listeners_and_a_table_of_modules(make_service, tmp_path):
    svc = make_service(
        '[[listen]]\nname = "one"\nhost = "127.0.0.1"\nport = 0\n'
        '[[listen]]\nname = "two"\nhost = "127.0.0.1"\nport = 0\n'
    )
    log = svc.log()
    assert len(re.findall(r"listener one: tcp://127\.0\.0\.1:\d+ udp://127\.0\.0\.1:\d+", log)) == 1
    assert len(re.findall(r"listener two: tcp://127\.0\.0\.1:\d+ udp://127\.0\.0\.1:\d+", log)) == 1
    columns = ["module", "state", "accepts", "runs", "in", "timeout"]
    assert any(li.split() == columns for li in log.splitlines())
    row = next(li for li in log.splitlines() if li.split()[:2] == ["test", "loaded"])
    assert "tcp" in row and "udp" in row
    # Each module once, in the table: a line each before it said the same (a newcomer's
    # report). Only one loaded later gets a line of its own.
    assert "module test loaded" not in log


def test_a_second_service_on_the_same_job_database_is_refused(make_service, tmp_path):
    # Sharing it, the second would take the first's running job for one a crash
    # interrupted and run it again.
    first = make_service()
    jid = add(first, b"queue:add:sleep:1500")
    wait_until(lambda: status(first, jid)["state"] == "running")
    second = make_service(root=tmp_path, start=False).start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(timeout=20) == 1
    assert first.proc is not None
    assert f"is in use by another bgservice (pid {first.proc.pid})" in second.log()
    assert "runs again" not in first.log()
    wait_until(lambda: status(first, jid)["state"] == "done")
    assert status(first, jid)["attempts"] == 1
    assert first.stop() == 0
    assert make_service(root=tmp_path).call(b"echo:x") == b"x"  # free again


def test_a_module_named_as_a_built_in_request_is_warned_about(modules_dir, make_service):
    for name in ("queue", "helo", "hello", "service"):
        write_module(modules_dir, name, "def handle_tcp(request):\n    return 'mine'\n")
    write_module(modules_dir, "ok", "def handle_tcp(request):\n    return 'mine'\n")
    svc = make_service()
    assert svc.call(b"helo") == b"oleh"  # the service's, as the warning says
    for name in ("queue", "helo", "hello", "service"):
        assert f"module {name}: never called ({name}:... is the service's)" in svc.log()
    assert "module ok: never" not in svc.log()


def test_module_names_are_sanitised_and_no_colon_means_no_data(service):
    assert service.call(b"te$s t:x") == b"Test"
    assert service.call(b"t\xffest:x") == b"Test"
    assert service.call(b"echo") == b""  # the whole request is the module name
    assert service.call(b"echo:a:b") == b"a:b"  # only the first colon splits


def test_service_ping_modules_and_stats(service):
    assert service.call(b"service:ping") == b"pong"
    modules = {m["name"]: m for m in json.loads(service.call(b"service:modules"))}
    assert {"test", "echo", "sleep", "fail"} <= modules.keys()
    service.call(b"nosuch:x")
    stats = service.stats()
    assert stats["errors"] >= 1 and stats["requests"] >= 2
    assert stats["uptime"] > 0 and stats["loop_lag_ms"]["max"] >= stats["loop_lag_ms"]["last"]
    assert stats["connections"]["open"] >= 1 and stats["reloads"] == {"ok": 0, "failed": 0}
    assert "received" in stats["udp"] and "dropped" in stats["udp"]


def test_verbose_logs_a_line_per_request(make_service):
    svc = make_service("", "-v")
    svc.call(b"echo:hello")
    svc.wait_for_log("status=")
    line = next(li for li in svc.log().splitlines() if "DEBUG" in li and "status=" in li)
    assert "echo" in line
    assert "tcp" in line and "127.0.0.1:" in line
    assert "in=5B out=5B" in line and "status=200" in line
    assert re.search(r"\d+(\.\d+)?ms", line)


def test_the_lag_warning_names_a_module_that_blocked_the_loop(modules_dir, make_service):
    # It sampled the modules in flight before and after its wait: a call that blocked
    # and ended within it (a first step) was never named ("modules running: none").
    write_module(modules_dir, "hog", HOG)
    svc = make_service("", "-v")
    assert svc.call(b"hog:0.4") == b"done"  # blocks the loop: what the warning is for
    # The line of that lag names it (the first lag line may be another's: with -v, 100 ms
    # is enough, which a loaded machine's start can make; before the fix none named it).
    wait_until(lambda: any("event loop lagged" in li and "hog" in li
                           for li in svc.log().splitlines()))  # fmt: skip


def test_without_v_only_a_lag_of_a_second_or_more_is_warned_of(modules_dir, make_service):
    # A handler that blocked the loop 1.8 s stalled every client without a word unless the
    # service ran with -v (a newcomer's report); a short lag stays quiet without -v.
    write_module(modules_dir, "hog", HOG)
    svc = make_service()
    assert svc.call(b"hog:0.3") == b"done"
    assert svc.call(b"hog:1.5") == b"done"
    wait_until(lambda: "event loop lagged" in svc.log())
    lines = [li for li in svc.log().splitlines() if "event loop lagged" in li]
    assert len(lines) == 1 and "WARNING" in lines[0] and "hog" in lines[0], lines
    assert float(lines[0].split("lagged ")[1].split(" ms")[0]) >= 1000


def test_a_call_for_an_unknown_module_is_a_line_a_minute(make_service):
    # "ehco:hi" answered "400: Unknown request" and the log said nothing (newcomer review).
    svc = make_service()
    for payload in (b"ehco:hi", b"ehco:again", b"nosuch:x"):
        assert svc.call(payload) == b"400: Unknown request"
    svc.wait_for_log("unknown module 'ehco', a request over tcp: 400 Unknown request")
    assert svc.call(b"test:x") == b"Test"  # (after the calls above: their lines are in)
    assert svc.log().count("unknown module '") == 1  # a flood: one a minute



def test_a_job_for_an_unknown_module_is_named_in_the_log_too(make_service):
    # queue:add for a mistyped module was answered "400: Unknown request" with no line
    # (only calls were named; found moving the check onto Origin).
    svc = make_service()
    assert svc.call(b"queue:add:ehco:hi") == b"400: Unknown request"
    svc.wait_for_log("unknown module 'ehco', a job: 400 Unknown request")

def test_the_ready_line_names_the_version(make_service):
    # As redis-server's and Sidekiq's first lines do: which release wrote this log?
    svc = make_service()
    assert f"bgservice {__version__} ready (pid {svc.proc.pid})" in svc.log()


def test_log_file_gets_the_same_lines(make_service, tmp_path):
    path = tmp_path / "bg.log"
    svc = make_service("", "--log-file", str(path))
    wait_until(lambda: path.exists() and "ready" in path.read_text())
    assert "listener test:" in path.read_text()
    svc.stop()


def test_without_a_global_handler_a_stray_error_stops_the_service(modules_dir, make_service):
    write_module(modules_dir, "stray", STRAY_ERROR)
    svc = make_service()  # -e is the default
    assert svc.call(b"stray:x") == b"scheduled"
    assert svc.wait() == 70
    log = svc.log()
    assert "ZeroDivisionError: stray callback" in log and "Traceback" in log
    assert "start with -E to keep running" in log


def test_with_E_a_stray_error_is_logged_and_the_service_keeps_running(modules_dir, make_service):
    write_module(modules_dir, "stray", STRAY_ERROR)
    svc = make_service("", "-E")
    assert svc.call(b"stray:x") == b"scheduled"
    svc.wait_for_log("ZeroDivisionError: stray callback")
    assert svc.call(b"test:x") == b"Test"
    assert svc.proc.poll() is None
    assert svc.log().count("ZeroDivisionError: stray callback") == 1  # the log only


def test_with_EE_the_traceback_also_goes_to_stderr(modules_dir, make_service):
    write_module(modules_dir, "stray", STRAY_ERROR)
    svc = make_service("", "-EE")  # the harness sends stdout and stderr to one file
    assert svc.call(b"stray:x") == b"scheduled"
    wait_until(lambda: svc.log().count("ZeroDivisionError: stray callback") == 2)
    assert svc.call(b"test:x") == b"Test"


# SIGHUP as well: it killed the process at once (status 129), the call in flight got 0
# bytes, no log line; the ready file and the run marker were left behind.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_lets_the_call_in_flight_finish_runs_unload_and_exits_0(
    modules_dir, make_service, tmp_path, sig
):
    write_module(modules_dir, "gated", GATED)
    svc = make_service(start=False)
    svc.signals = {sig: signal.SIG_DFL}  # (however this test run was started)
    svc.start()
    gate = tmp_path / "gate"
    result: list[bytes] = []
    caller = threading.Thread(target=lambda: result.append(svc.call(b"gated:%s" % bytes(gate))))
    caller.start()
    wait_until(lambda: svc.stats()["in_flight"].get("gated"))
    svc.signal(sig)
    svc.wait_for_log(f"received {sig.name}: shutting down")
    gate.touch()
    caller.join(10)
    assert result == [b"open"]
    assert svc.wait() == 0
    assert (modules_dir / "unloaded.log").read_text() == "gated\n"
    assert "bgservice stopped" in svc.log()
    assert not svc.ready_file.exists() and not (tmp_path / "jobs.db.running").exists()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_a_signal_ignored_at_start_stays_ignored(make_service, sig):
    # `nohup bgservice &` stopped when its terminal closed: the service's SIGHUP handler
    # replaced the ignore nohup set (and a script's `bgservice &`, SIGINT's).
    svc = make_service(start=False)
    svc.signals = {sig: signal.SIG_IGN}
    svc.start()
    svc.signal(sig)
    assert svc.call(b"test:x") == b"Test"
    svc.signal(signal.SIGTERM)  # the stop signal of service managers stops it still
    assert svc.wait() == 0
    assert f"received {sig.name}" not in svc.log() and "received SIGTERM" in svc.log()


def test_shutdown_stops_accepting_and_closes_idle_connections(modules_dir, make_service, tmp_path):
    write_module(modules_dir, "gated", GATED)
    svc = make_service()
    gate = tmp_path / "gate"
    caller = threading.Thread(target=lambda: svc.call(b"gated:%s" % bytes(gate)))
    caller.start()
    wait_until(lambda: svc.stats()["in_flight"].get("gated"))
    idle = svc.framed()
    svc.signal(signal.SIGTERM)
    svc.wait_for_log("shutting down")
    with pytest.raises(ConnectionRefusedError):
        svc.call(b"test:x")
    with pytest.raises(ConnectionError):
        idle.call(b"test:x")
    gate.touch()
    caller.join(10)
    assert svc.wait() == 0


def test_a_second_signal_exits_at_once(modules_dir, make_service, tmp_path):
    write_module(modules_dir, "gated", GATED)
    svc = make_service("[limits]\nshutdown_grace = 30.0\n")
    never = tmp_path / "never"
    got: list[bytes] = []

    def call() -> None:
        try:
            got.append(svc.call(b"gated:%s" % bytes(never)))
        except ConnectionError:
            got.append(b"reset")

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: svc.stats()["in_flight"].get("gated"))
    svc.signal(signal.SIGTERM)
    svc.wait_for_log("shutting down")
    svc.signal(signal.SIGTERM)
    assert svc.wait(timeout=5) == 1
    assert "again: exiting now" in svc.log()
    caller.join(10)
    assert got in ([b""], [b"reset"])  # the process is gone: closed without a reply


# --- issue 18: stopping with something stuck or cut --------------------------------------

HUNG = """
import time

TIMEOUT = 1

def handle_tcp(request):
    while True:
        time.sleep(0.05)
"""


def test_sigterm_ends_the_process_with_a_hung_def_handler(modules_dir, make_service):
    # Item 1: the log said "bgservice stopped", then the interpreter waited for ever for
    # the hung thread; only SIGKILL ended it.
    write_module(modules_dir, "hung", HUNG)
    svc = make_service("[limits]\nshutdown_grace = 1.0\n")
    assert svc.call(b"hung:x") == b"504: Module hung timed out after 1 s"
    svc.signal(signal.SIGTERM)
    # It exits (it waited for ever for the hung thread), and says it left the thread.
    assert svc.wait() == 0
    assert "bgservice stopped" in svc.log()
    assert "1 handler thread still stuck" in svc.log()


POOL = """
import time
from concurrent.futures import ThreadPoolExecutor

POOL = ThreadPoolExecutor(1)  # its threads are joined at exit: not daemons
POOL.submit(time.sleep, 3600)

def handle_tcp(request):
    return "pooled"
"""


def test_a_stop_ends_the_process_with_a_modules_own_threads_still_busy(
    modules_dir, make_service
):
    # Found by review: after "bgservice stopped", the interpreter's exit waited for the
    # threads a module made itself (a ThreadPoolExecutor's, a thread not a daemon).
    write_module(modules_dir, "pool", POOL)
    svc = make_service()
    assert svc.call(b"pool:x") == b"pooled"
    assert svc.stop() == 0
    assert "bgservice stopped" in svc.log()


def test_calls_cut_at_the_end_of_the_grace_get_503(modules_dir, make_service):
    # Item 7: a sleep:15000 call and a queue:get of a waiting job were closed with 0 bytes.
    svc = make_service("[limits]\nshutdown_grace = 1.0\n[queue]\nworkers = 1\n")
    running = svc.call(b"queue:add:sleep:15000")
    waiting = svc.call(b"queue:add:sleep:10")
    assert running.startswith(b"id:") and waiting.startswith(b"id:")
    wait_until(lambda: svc.call(b"queue:check:" + running) == b"1")
    got: dict[str, bytes] = {}
    framed = svc.framed()
    # The queue:get rides in the same read as the two sleeps: when they are seen in flight,
    # it is waiting too. (As a one-shot call of its own, its bytes could still be on the
    # way when SIGTERM closed its idle connection.)
    framed.send(b"sleep:15000", b"sleep:15000", b"queue:get:" + waiting)
    callers = [
        threading.Thread(target=lambda: got.update(call=svc.call(b"sleep:15000"))),
        threading.Thread(target=lambda: got.update(half=svc.call(b"sleep:15000", False))),
    ]
    for caller in callers:
        caller.start()
    # The running job and four calls asleep, every client connected (+ this stats call).
    wait_until(lambda: (s := svc.stats())["in_flight"].get("sleep", 0) >= 5
               and s["connections"]["open"] >= 4)  # fmt: skip
    svc.signal(signal.SIGTERM)
    for caller in callers:
        caller.join(10)
    assert got == {"call": b"503: Shutting down", "half": b"503: Shutting down"}
    assert framed.recv() == (503, b"Shutting down")
    assert framed.recv() == (503, b"Shutting down")
    # The queue:get of a job that never started: told which job is still queued.
    assert framed.recv() == (503, b"Shutting down: job %s is still queued" % waiting[3:])
    assert svc.wait() == 0


def test_a_queue_get_of_a_job_that_cannot_start_any_more_gets_503_at_once(make_service):
    svc = make_service("[limits]\nshutdown_grace = 60.0\n[queue]\nworkers = 1\n")
    running = svc.call(b"queue:add:sleep:60000")
    waiting = svc.call(b"queue:add:sleep:10")
    wait_until(lambda: svc.call(b"queue:check:" + running) == b"1")
    framed = svc.framed()
    # The get rides in one read with a call that shows in flight: when the call is seen
    # there, the get was dispatched before it and waits. (A one-shot get's open connection
    # was not enough: on a loaded machine its bytes could still be unread at the SIGTERM,
    # and it got the plain "503: Shutting down" of a request that never started.)
    framed.send(b"queue:get:" + waiting, b"sleep:60000")
    wait_until(lambda: svc.stats()["in_flight"].get("sleep", 0) >= 2)  # the job and the call
    svc.signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert framed.recv() == (503, b"Shutting down: job %s is still queued" % waiting[3:])
    # Not at the end of the grace: that is 60 s away (the bound leaves a busy machine room).
    assert time.monotonic() - stopped < 20
    svc.signal(signal.SIGTERM)  # the sleep would hold the stop to the end of its grace
    assert svc.wait() == 1


def test_the_cut_answers_a_call_still_owed_before_a_408(make_service):
    # A framed client's unfinished frame timed out (its 408 waits behind the replies
    # owed) while a call of its still runs when the grace ends: that call gets its
    # "503 Shutting down" in its place, the connection closes, and the stop is clean.
    svc = make_service("[limits]\nshutdown_grace = 0.5\nread_timeout = 1.0\n")
    framed = svc.framed()
    framed.sock.sendall(framed_request(b"sleep:15000") + (100).to_bytes(4, "big") + b"part")
    time.sleep(1.5)  # past the read timeout: the 408 is due, behind the sleep
    svc.signal(signal.SIGTERM)
    assert framed.recv() == (503, b"Shutting down")
    assert framed.sock.recv(100) == b""
    assert svc.wait(timeout=10) == 0
    assert "bgservice stopped" in svc.log() and "Traceback" not in svc.log()


def test_a_log_file_that_cannot_be_written_is_a_configuration_error(make_service, tmp_path):
    # `[log] file = "."` was an IsADirectoryError traceback and exit 1, which the systemd
    # unit restarts on; a configuration error is exit 2, naming the key (or the option).
    svc = make_service('[log]\nfile = "."\n', start=False)
    svc.start(wait=False)
    assert svc.wait() == 2
    out = svc.log()
    assert f"configuration error: {svc.config}: [log] file " in out, out
    assert "Is a directory" in out and "Traceback" not in out
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cli = make_service("", "--log-file", str(blocker / "bg.log"), start=False, root=tmp_path / "b")
    cli.start(wait=False)
    assert cli.wait() == 2
    out = cli.log()
    assert f"configuration error: --log-file {blocker / 'bg.log'}: " in out, out
    assert "Traceback" not in out and not cli.ready_file.exists()


LOSES_ITS_CANCELLATION = """
import asyncio
from pathlib import Path

async def lose_a_cancellation(name):
    Path(__file__).with_name(name).touch()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:  # lost, as asyncio.wait_for on Python 3.11 can lose one
        pass
    await asyncio.sleep(3600)

async def handle_tcp(request):
    await lose_a_cancellation(request.text)

async def handle_udp(request):
    await lose_a_cancellation(request.text)
"""


@pytest.mark.parametrize(
    ("form", "queue_backend"),
    [("call", "sqlite"), ("job", "sqlite"), ("job", "redis"), ("datagram", "sqlite")],
)
def test_a_handler_that_loses_its_cancellation_does_not_hold_the_stop_for_ever(
    modules_dir, make_service, form
):
    # Cancelled at the end of the grace, a call, a job or a datagram whose handler caught
    # the CancelledError and went on waiting held the stop for ever: it was cancelled once
    # and awaited. (The Redis engine's listener did the same, through redis-py's use of
    # asyncio.wait_for on 3.11.) What does not end is cancelled again.
    write_module(modules_dir, "loses", LOSES_ITS_CANCELLATION)
    svc = make_service("[limits]\nshutdown_grace = 0.5\n")
    if form == "call":
        caller = threading.Thread(target=lambda: svc.call(b"loses:call"), daemon=True)
        caller.start()
    elif form == "job":
        add(svc, b"queue:add:loses:job")
    else:
        svc.send_udp(b"loses:datagram")
    wait_until(lambda: (modules_dir / form).exists())
    svc.signal(signal.SIGTERM)
    assert svc.wait(timeout=30) == 0
    assert "bgservice stopped" in svc.log()


IGNORES_EVERY_CANCELLATION = """
import asyncio
from pathlib import Path

async def handle_tcp(request):
    Path(__file__).with_name("started").touch()
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
"""


def test_a_handler_that_ignores_every_cancellation_is_left_behind_and_the_process_exits(
    modules_dir, make_service
):
    # Cancelled again and again, it never ends: the stop leaves it behind, and the
    # process exits without it (asyncio.run's own last cancellation waited for ever).
    write_module(modules_dir, "stubborn", IGNORES_EVERY_CANCELLATION)
    svc = make_service("[limits]\nshutdown_grace = 0.5\n")
    threading.Thread(target=lambda: svc.call(b"stubborn:x"), daemon=True).start()
    wait_until(lambda: (modules_dir / "started").exists())
    svc.signal(signal.SIGTERM)
    assert svc.wait(timeout=30) == 0
    log = svc.log()
    assert "1 calls did not end when cancelled: left behind" in log
    assert "bgservice stopped" in log


def test_a_ready_file_in_a_missing_folder_is_a_configuration_error(make_service, tmp_path):
    # The service listened and said "ready", then failed to write the file: a
    # FileNotFoundError traceback, exit 1, and its run marker left behind.
    ready = tmp_path / "no-such-folder" / "ready.json"
    svc = make_service("", "--ready-file", str(ready), start=False)  # the last one counts
    svc.start(wait=False)
    assert svc.wait() == 2
    out = svc.log()
    assert f"configuration error: --ready-file {ready}: cannot write to it: " in out, out
    assert "Traceback" not in out and "bgservice ready" not in out
    assert not (tmp_path / "jobs.db.running").exists()
