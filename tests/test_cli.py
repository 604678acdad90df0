"""``bgservice`` client subcommands against a real service, with their exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time

from bgservice.client import Client
from tests.conftest import HOG, REPO, wait_until, write_module

PROGRESS = """
import time

def handle_tcp(request):
    for step in range(1, 5):
        request.job.progress(step, 4, f"step {step}")
        time.sleep(0.15)
    return "all done"
"""

HOLD = """
import time
from pathlib import Path

def handle_tcp(request):
    here = Path(__file__).parent
    (here / (request.data.decode() + ".started")).touch()
    deadline = time.monotonic() + 60
    while not (here / (request.data.decode() + ".go")).exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # held until the test lets it go (a fixed sleep could end first)
    return "held"
"""
UNKNOWN_HINT = b"(no module named 'nosuch' is loaded: see 'bgservice modules')\n"


def bg(svc, *args: str, stdin: bytes = b"", address: str | None = None):
    host, port = svc.tcp if svc is not None else ("127.0.0.1", 1)
    env = {**os.environ, "BGSERVICE_ADDRESS": address or f"{host}:{port}"}
    return subprocess.run(
        [sys.executable, str(REPO / "service.py"), *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=60,
    )


def test_call_send_ping_modules_stats(modules_dir, make_service):
    write_module(
        modules_dir,
        "note",
        "from pathlib import Path\n\ndef handle_udp(request):\n"
        "    Path(__file__).with_name('note.txt').write_bytes(request.data)\n",
    )
    svc = make_service()
    assert bg(svc, "call", "test", "x").stdout == b"Test"
    assert bg(svc, "call", "echo", "-", stdin=b"from\x00stdin").stdout == b"from\x00stdin"
    assert bg(svc, "send", "note", "-", stdin=b"sent").returncode == 0
    note = modules_dir / "note.txt"
    wait_until(lambda: note.exists() and note.read_bytes() == b"sent")
    assert bg(svc, "ping").stdout == b"pong\n"
    modules = json.loads(bg(svc, "modules", "--json").stdout)
    assert {"test", "note"} <= {m["name"] for m in modules}
    table = bg(svc, "modules").stdout.decode()
    assert table.splitlines()[0].split()[:2] == ["module", "state"] and "note" in table
    stats = json.loads(bg(svc, "stats", "--json").stdout)
    assert stats["requests"] >= 3


def test_exit_codes(service):
    # The reply as on the wire (the original's clients read it), and a hint for a person.
    for args in (("call", "nosuch"), ("queue", "add", "nosuch", "x"), ("call", "nosuch", "-")):
        reply = bg(service, *args)
        assert (reply.returncode, reply.stdout) == (1, b""), args
        assert reply.stderr == b"400: Unknown request\n" + UNKNOWN_HINT, args
    other = bg(service, "call", "fail", "x")  # another error reply: no hint
    assert other.returncode == 1 and b"bgservice modules" not in other.stderr
    down = bg(None, "call", "test", address=f"127.0.0.1:{_free_port()}")
    assert down.returncode == 3 and b"service down" in down.stderr
    slow = bg(service, "call", "sleep", "3000", "--timeout", "0.3")
    assert slow.returncode == 4 and b"timeout" in slow.stderr
    usage = bg(service, "queue", "get", "not-a-number")
    assert usage.returncode == 2
    for bad in ("id:", "id:x", "0", "7.5", "id:-3"):
        usage = bg(service, "queue", "check", bad)
        assert usage.returncode == 2 and b"job id must be N or 'id:N'" in usage.stderr, bad
    # A bad address, given or from the environment, is a usage error too (it was a
    # traceback and exit 1): the port forgotten, not a number, out of range.
    for bad in ("10.0.0.5", "nonsense", "127.0.0.1:abc", "127.0.0.1:99999"):
        usage = bg(None, "ping", address=bad)
        assert usage.returncode == 2 and b"address must be host:port" in usage.stderr, bad
        assert b"Traceback" not in usage.stderr
    usage = bg(service, "--udp-address", "nonsense", "send", "test", "x")
    assert usage.returncode == 2 and b"'nonsense'" in usage.stderr
    # An empty one ("$REMOTE" unset) went to $BGSERVICE_ADDRESS: another service.
    for args in (["-a", "", "ping"], ["queue", "add", "-a", " ", "echo"], ["--udp-address", ""]):
        usage = bg(service, *args, *(["send", "echo", "x"] if len(args) == 2 else []))
        assert usage.returncode == 2 and b"empty (leave the option out" in usage.stderr, args
    # top -n nan / inf crashed in time.sleep (exit 1, a traceback): FloatRange let them by
    for bad in ("nan", "inf", "1e300", "0.05"):
        usage = bg(service, "top", "--once", "-n", bad)
        assert usage.returncode == 2 and b"is not seconds from 0.1" in usage.stderr, bad


def test_a_call_a_graceful_stop_cuts_exits_3_service_down(modules_dir, make_service):
    # "503: Shutting down" (the call still running when shutdown_grace ended) was an
    # error reply, exit 1: a script's "service down, fall back" (exit 3) did not run.
    from tests.test_client_failures import STARTED_THEN_SLEEPS

    write_module(modules_dir, "slow", STARTED_THEN_SLEEPS)
    svc = make_service("[limits]\nshutdown_grace = 1\n")
    host, port = svc.tcp
    call = subprocess.Popen(
        [sys.executable, str(REPO / "service.py"), "-a", f"{host}:{port}", "call", "slow", "cli"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until((modules_dir / "cli.started").exists)
        svc.signal(signal.SIGTERM)
        out, err = call.communicate(timeout=60)
    finally:
        call.kill()
        call.wait()
    assert (call.returncode, out) == (3, b""), err
    assert err.startswith(b"bgservice: service down: the service is shutting down"), err
    assert svc.wait() == 0


def test_queue_subcommands(service):
    added = bg(service, "queue", "add", "sleep", "300", "--priority", "4", "--unique", "u:1")
    assert added.returncode == 0
    job = int(added.stdout)
    assert bg(service, "queue", "check", str(job)).stdout.strip() in (b"0", b"1", b"2")
    status = json.loads(bg(service, "queue", "status", str(job), "--json").stdout)
    assert (status["priority"], status["unique"]) == (4, "u:1")
    assert bg(service, "queue", "get", str(job), "--no-progress").stdout == b"slept 300"
    later = int(bg(service, "queue", "add", "echo", "x", "--delay", "60", "--unique", "k").stdout)
    again = bg(service, "queue", "add", "echo", "y", "--unique", "k", "--json")
    assert json.loads(again.stdout) == {"id": later}  # the waiting job holds the key
    listed = json.loads(bg(service, "queue", "list", "waiting", "--json").stdout)
    assert [j["id"] for j in listed["waiting"]] == [later]
    assert later == int(bg(service, "queue", "list").stdout.split()[8])  # the table's first id
    assert bg(service, "queue", "cancel", str(later)).stdout == b"cancelled\n"
    failed = bg(service, "queue", "get", str(later), "--no-progress")
    assert (failed.returncode, failed.stderr) == (1, f"410: Job {later} cancelled\n".encode())
    assert bg(service, "queue", "retry", str(later)).stdout == f"{later}\n".encode()
    stats = json.loads(bg(service, "queue", "stats", "--window", "600", "--json").stdout)
    assert stats["counts"]["done"] >= 1
    gone = bg(service, "queue", "status", "999999")
    assert gone.returncode == 1 and gone.stderr.startswith(b"404:")


def test_queue_subcommands_take_the_originals_id_n(service):
    """A script ported from the original keeps the ``id:N`` that queue:add replied."""
    held = "id:" + bg(service, "queue", "add", "sleep", "200").stdout.decode().strip()
    assert bg(service, "queue", "check", held).stdout.strip() in (b"0", b"1", b"2")
    status = json.loads(bg(service, "queue", "status", held, "--json").stdout)
    assert status["id"] == int(held[3:])
    after = bg(service, "queue", "add", "echo", "next", "--after", held).stdout.decode().strip()
    assert bg(service, "queue", "get", f"id:{after}", "--no-progress").stdout == b"next"
    assert bg(service, "queue", "get", held, "--no-progress").stdout == b"slept 200"
    later = bg(service, "queue", "add", "echo", "y", "--delay", "60").stdout.decode().strip()
    later = f"id:{later}"
    assert bg(service, "queue", "cancel", later).stdout == b"cancelled\n"
    assert bg(service, "queue", "retry", later).stdout == f"{later[3:]}\n".encode()


def test_queue_get_shows_a_progress_bar(modules_dir, make_service):
    write_module(modules_dir, "steps", PROGRESS)
    svc = make_service()
    job = bg(svc, "queue", "add", "steps").stdout.decode().strip()
    done = bg(svc, "queue", "get", job, "--progress")
    assert done.stdout == b"all done"
    # Off a terminal click prints the bar's label as it changes: the job's messages.
    assert f"job {job}: step".encode() in done.stderr


def test_serve_is_still_the_default_command_and_help_lists_every_command(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "service.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "--config" in result.stdout  # serve's options
    listed = result.stdout.split("Commands:")[1].split("\n\n")[0]
    names = {line.split()[0] for line in listed.strip().splitlines()}
    assert names == {
        "call", "send", "queue", "schedule", "stats", "modules", "ping", "top", "serve"
    }  # fmt: skip


def test_the_address_is_taken_at_every_level(service):
    """-a before the command, after the group, after the subcommand; the innermost wins,
    and $BGSERVICE_ADDRESS is used when none is given."""
    good = "{}:{}".format(*service.tcp)
    bad = f"127.0.0.1:{_free_port()}"
    levels = [
        ["-a", good, "queue", "add", "echo", "x"],
        ["queue", "-a", good, "add", "echo"],
        ["queue", "add", "echo", "-a", good],
        [f"--address={good}", "queue", "add", "echo"],
        ["-a", bad, "queue", "-a", good, "add", "echo"],
    ]
    for args in levels:
        added = bg(None, *args, address=bad)
        assert added.returncode == 0 and int(added.stdout) > 0, (args, added.stderr)
    assert bg(None, "-a", good, "ping", address=bad).stdout == b"pong\n"
    assert bg(None, "-t", "5", "ping", address=good).stdout == b"pong\n"  # env, -t outside
    assert bg(None, "queue", "-a", bad, "check", "1", "-a", good, address=bad).returncode == 0
    down = bg(None, "-a", good, "queue", "add", "echo", "-a", bad, address=good)
    assert down.returncode == 3


def test_readable_output_by_default_json_for_scripts(service):
    job = bg(service, "queue", "add", "echo", "x").stdout.decode().strip()
    bg(service, "queue", "get", job, "--no-progress")
    later = bg(service, "queue", "add", "echo", "y", "--delay", "600").stdout.decode().strip()
    status = bg(service, "queue", "status", job).stdout.decode()
    assert "state:        done" in status and " ago)" in status
    assert not re.search(r"\d{10}\.\d", status)  # local date-times, not epoch floats
    listed = bg(service, "queue", "list", "waiting", "--limit", "5").stdout.decode().splitlines()
    assert listed[0].split()[:3] == ["id", "state", "module"] and "due in 9 min" in listed[1]
    raw = json.loads(bg(service, "queue", "list", "waiting", "--limit", "5", "--json").stdout)
    assert [j["id"] for j in raw["waiting"]] == [int(later)]
    stats = bg(service, "stats").stdout.decode()
    assert stats.startswith("uptime:") and "requests:" in stats
    queue = bg(service, "queue", "stats").stdout.decode()
    assert "oldest waiting:" in queue and "hour from" in queue
    assert json.loads(bg(service, "queue", "stats", "--json").stdout)["counts"]["done"] >= 1
    assert "loaded" in bg(service, "modules").stdout.decode()


def test_queue_add_wait_refuses_json_and_says_why_a_result_is_gone(make_service):
    # --wait --json printed the result as it came, the --json left unsaid.
    svc = make_service("[queue]\nkeep_results = 0\n")
    usage = bg(svc, "queue", "add", "echo", "x", "--wait", "--json")
    assert usage.returncode == 2 and b"--json prints the id; --wait prints the" in usage.stderr
    # keep_results = 0: a job that ended before the get (an add, then a get) had only a
    # bare "404: Job N not found (unknown or expired)" to show for it.
    outcomes = set()
    for _ in range(5):
        ran = bg(svc, "queue", "add", "echo", "x", "--wait")
        outcomes.add(ran.returncode)
        assert (ran.returncode, ran.stdout) == (0, b"x") or (
            ran.returncode == 1 and b"not found" in ran.stderr
            and b"ended before its result was asked for" in ran.stderr
        ), ran  # fmt: skip
    assert 1 in outcomes, outcomes  # (an echo job ends before the CLI's get reaches it)


def test_queue_list_says_how_many_more_a_page_left_out(service):
    # The list showed the first 100 of each state and no word of the others.
    with Client(f"{service.tcp[0]}:{service.tcp[1]}") as client:
        client.add_many([("echo", str(i), {"delay": 600}) for i in range(103)])
    listed = bg(service, "queue", "list").stdout.decode().splitlines()
    assert len(listed) == 1 + 100 + 1, listed[-3:]  # headers, the page, then the rest
    assert listed[-1] == "3 more waiting (bgservice queue list waiting --offset 100)"
    listed = bg(service, "queue", "list", "waiting", "--limit", "2", "--offset", "100")
    assert listed.stdout.decode().splitlines()[-1] == "1 more waiting (bgservice queue list " \
        "waiting --offset 102)"
    last = bg(service, "queue", "list", "waiting", "--offset", "101").stdout.decode()
    assert "more" not in last and len(last.splitlines()) == 1 + 2


def test_queue_list_filters_by_module_name_and_tag(service):
    with Client(f"{service.tcp[0]}:{service.tcp[1]}") as client:
        report = client.add("echo", "a", delay=600, name="report", tags=["monthly"])
        other = client.add("test", "b", delay=600, name="report", tags=["monthly"])
        client.add("echo", "c", delay=600, name="other", tags=["weekly"])
    listed = bg(service, "queue", "list", "waiting", "--module", "echo", "--tag", "monthly",
                "--json")  # fmt: skip
    assert [j["id"] for j in json.loads(listed.stdout)["waiting"]] == [report], listed
    table = bg(service, "queue", "list", "--name", "report", "--limit", "1").stdout.decode()
    rows = table.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [str(report)], table  # (no "N more" line:
    # the counts per state are of every job, not of those a filter matches)
    second = bg(service, "queue", "list", "--name", "report", "--limit", "1", "--offset", "1")
    assert [r.split()[0] for r in second.stdout.decode().splitlines()[1:]] == [str(other)]
    bad = bg(service, "queue", "list", "--tag", "a,b")
    assert bad.returncode == 1 and bad.stderr.startswith(b"400: option tag: one tag"), bad
    usage = bg(service, "queue", "list", "--help").stdout.decode()
    assert all(option in usage for option in ("--module", "--name", "--tag")), usage


# Reports its first step, then holds its worker until steps.go exists (60 s at most): a
# job running, with progress, for as long as the test looks at it.
STEPS_HELD = """
import time
from pathlib import Path

def handle_tcp(request):
    request.job.progress(1, 4, "step 1")
    go = Path(__file__).with_name("steps.go")
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return "all done"
"""


def test_top_once_shows_running_jobs_with_progress_and_waiting_counts(modules_dir, make_service):
    # (Held, not timed: on a loaded machine the CLI starts below outlasted a 6 s job.)
    write_module(modules_dir, "steps", STEPS_HELD)
    svc = make_service()
    running = bg(svc, "queue", "add", "steps").stdout.decode().strip()
    for _ in range(3):
        bg(svc, "queue", "add", "echo", "later", "--delay", "600")
    wait_until(lambda: json.loads(bg(svc, "queue", "status", running, "--json").stdout)["progress"])
    for args in (("top", "--once", "-n", "0.2"), ("top", "-n", "0.2")):  # a pipe: one screen
        top = bg(svc, *args)
        assert top.returncode == 0, top.stderr
        screen = top.stdout.decode()
        assert "1 running on" in screen and "3 waiting" in screen, screen
        assert "requests 0.0/s" in screen  # its own four requests per screen are not counted
        assert f"{running}  steps" in screen and "] " in screen and "step " in screen
        assert any(line.split()[:4] == ["echo", "3", "0", "3"] for line in screen.splitlines())
        assert "\x1b" not in screen  # no terminal control off a terminal
    (modules_dir / "steps.go").touch()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_queue_add_waits_and_takes_several_after(service):
    first = bg(service, "queue", "add", "sleep", "200").stdout.decode().strip()
    second = bg(service, "queue", "add", "echo", "two").stdout.decode().strip()
    done = bg(
        service,
        "queue",
        "add",
        "echo",
        "last",
        "--after",
        first,
        "--after",
        f"id:{second}",
        "--wait",
    )
    assert (done.returncode, done.stdout) == (0, b"last")
    listed = json.loads(bg(service, "queue", "list", "done", "--json").stdout)
    last = next(job for job in listed["done"] if job["after"])
    assert last["after"] == [int(first), int(second)]
    failed = bg(service, "queue", "add", "fail", "x", "--wait")
    assert failed.returncode == 1 and failed.stderr


def test_bytes_that_are_not_utf8_go_as_given(service):
    # A shell argument is bytes: the old CLI's str.encode() raised on the surrogates
    # Python makes of them (a traceback, exit 1).
    reply = bg(service, "call", "echo", os.fsdecode(b"\xff\xfe:x"))
    assert (reply.returncode, reply.stdout) == (0, b"\xff\xfe:x")


def test_send_to_a_unix_stream_socket_is_a_usage_error(tmp_path):
    reply = bg(None, "send", "test", "x", address=str(tmp_path / "bg.sock"))
    assert reply.returncode == 2 and b"--udp-address" in reply.stderr


def test_queue_get_with_progress_keeps_to_the_timeout(service):
    job = bg(service, "queue", "add", "sleep", "30000").stdout.strip().decode()
    env = {**os.environ, "BGSERVICE_ADDRESS": "{}:{}".format(*service.tcp)}
    cli = [sys.executable, str(REPO / "service.py"), "-t", "4", "queue", "get", job]
    proc = subprocess.Popen([*cli, "--progress"], stderr=subprocess.PIPE, env=env)
    try:
        assert proc.wait(timeout=30) == 4  # a timeout (30 s: only a guard against a hang)
        assert proc.stderr is not None
        said = proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
    # The old CLI followed the bar for the whole timeout, then waited for it again: twice
    # -t. Not timed (a loaded machine): the get after the bar is given what was left of
    # -t (a floor of 10 ms), which its timeout says, never a second -t of 4 s.
    assert f"get() gave up waiting for job {job}" in said, said
    left = re.search(r"after get\(\)'s timeout of ([0-9.e-]+) s \(the job goes on\)", said)
    assert left and float(left[1]) < 4, said
    assert f"job {job} has not ended within 4 s" in said, said
    assert bg(service, "queue", "check", job).stdout == b"1\n"  # still running: it goes on


def _interrupted(svc, started, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``bgservice ARGS`` sent SIGINT (Ctrl-C) once ``started`` exists, its module running."""
    host, port = svc.tcp
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "service.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "BGSERVICE_ADDRESS": f"{host}:{port}"},
        # Python raises KeyboardInterrupt only if SIGINT was not ignored when it started,
        # as it is in a shell's background jobs, which may be running these tests.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_until(started.exists)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_ctrl_c_exits_130_and_a_waited_job_is_named(modules_dir, make_service):
    """Not click's "Aborted!" and exit 1, which scripts read as an error reply; and a job
    whose --wait was cut short is named, so that it can be waited for or cancelled."""
    write_module(modules_dir, "hold", HOLD)
    svc = make_service()
    called = _interrupted(svc, modules_dir / "call.started", "call", "hold", "call")
    assert (called.returncode, called.stdout) == (130, b"")
    assert called.stderr == b"bgservice: interrupted\n"
    (modules_dir / "call.go").touch()
    added = _interrupted(svc, modules_dir / "add.started", "queue", "add", "hold", "add", "--wait")
    assert (added.returncode, added.stdout) == (130, b"")
    job = re.search(rb"job (\d+) goes on", added.stderr)
    assert added.stderr.startswith(b"bgservice: interrupted\n") and job, added.stderr
    status = json.loads(bg(svc, "queue", "status", job[1].decode(), "--json").stdout)
    assert (status["module"], status["state"]) == ("hold", "running")
    (modules_dir / "add.go").touch()
    assert bg(svc, "queue", "get", job[1].decode(), "--no-progress").stdout == b"held"
    # A --wait that times out leaves the job queued too, and says which it is. (30 s: it
    # must still run after two CLI starts on a loaded machine, for the cancel.)
    slow = bg(svc, "queue", "add", "sleep", "30000", "--wait", "-t", "0.5")
    job = re.search(rb"job (\d+) goes on", slow.stderr)
    assert slow.returncode == 4 and slow.stdout == b"" and job, slow.stderr
    assert bg(svc, "queue", "cancel", job[1].decode()).stdout in (b"cancelled\n", b"cancelling\n")


def test_a_get_that_times_out_says_the_job_goes_on_and_how_to_wait_longer(make_service):
    # "bgservice: timeout: no reply from 127.0.0.1:12341 in time" after 30 s read as a
    # service that hung, for a job still running (a newcomer's report).
    svc = make_service()
    # (30 s: it must still run after three CLI starts on a loaded machine, for the cancel)
    job = bg(svc, "queue", "add", "sleep", "30000").stdout.decode().strip()
    done = bg(svc, "queue", "get", job, "--no-progress", "-t", "0.5")
    assert done.returncode == 4 and done.stdout == b"", done.stderr
    assert f"job {job} has not ended within 0.5 s: wait longer with -t SECONDS " \
        f"(bgservice queue check {job}: its state)".encode() in done.stderr, done.stderr
    assert bg(svc, "queue", "cancel", job).stdout in (b"cancelled\n", b"cancelling\n")


def _help(*args: str) -> str:
    return subprocess.run(
        [sys.executable, str(REPO / "service.py"), *args, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


def test_no_command_summary_is_cut(service):
    # click cuts a summary past its width with "...": "send  Fire and forget MODULE with
    # DATA over UDP (nothing comes...", as a newcomer first read the commands.
    for group in ((), ("queue",), ("schedule",)):
        listed = _help(*group).partition("Commands:")[2].partition("\n\n")[0]
        assert listed.count("\n") >= 5 and "..." not in listed, (group, listed)


def test_help_shows_the_client_options_only_where_they_apply(service):
    top = _help()
    assert "--udp-address" in top and "--timeout" in top  # bgservice -t 5 --udp-address X send
    send = _help("send")
    assert "--udp-address" in send and "--timeout" not in send  # send reads no reply
    for args in (["call"], ["queue"], ["queue", "add"], ["schedule", "list"], ["top"], ["ping"]):
        shown = _help(*args)
        assert "--udp-address" not in shown and "--timeout" in shown, args
    # Still taken where hidden: "every level", as scripts have used them.
    assert bg(service, "send", "test", "x", "-t", "5").returncode == 0
    udp = "{}:{}".format(*service.tcp)
    assert bg(service, "call", "test", "x", "--udp-address", udp).stdout == b"Test"


def test_serve_help_names_every_other_command(tmp_path):
    listed = _help().split("Commands:")[1].split("\n\n")[0]
    commands = {line.split()[0] for line in listed.strip().splitlines()}
    epilog = _help("serve").split("Other commands talk to a running service:")[1]
    named = {name.strip() for name in epilog.split("(")[0].split(",")}
    assert named == commands - {"serve"} and "schedule" in named


def test_a_busy_service_is_a_timeout_not_down(modules_dir, make_service):
    """The service accepts a connection while its loop is blocked and greets it once the
    loop is free: that is a wait, as -t says, not "service down" (exit 3) after 5 s."""
    write_module(modules_dir, "hog", HOG)
    svc = make_service()
    env = {**os.environ, "BGSERVICE_ADDRESS": "{}:{}".format(*svc.tcp)}
    cli = [sys.executable, str(REPO / "service.py")]
    started = time.monotonic()
    hog = subprocess.Popen([*cli, "call", "hog", "8"], stdout=subprocess.PIPE, env=env)
    try:
        wait_until((modules_dir / "hog.started").exists)
        short = subprocess.run([*cli, "-t", "1", "ping"], capture_output=True, env=env)
        assert short.returncode == 4 and b"timeout" in short.stderr, short.stderr
        patient = subprocess.run([*cli, "-t", "30", "ping"], capture_output=True, env=env)
        assert (patient.returncode, patient.stdout) == (0, b"pong\n"), patient.stderr
        assert time.monotonic() - started > 7  # it did wait for the blocked loop, past 5 s
        assert hog.communicate(timeout=30)[0] == b"done"
    finally:
        hog.kill()
        hog.wait()


def test_a_timeout_must_be_seconds_above_zero(service):
    # -1 was a traceback (exit 1), 0 silently 30 s; nan and inf wait for ever.
    for bad in ("-1", "0", "nan", "inf", "-inf"):
        for args in (("-t", bad, "ping"), ("call", "test", "x", f"--timeout={bad}")):
            usage = bg(service, *args)
            assert usage.returncode == 2 and b"Traceback" not in usage.stderr, (args, usage)
            assert b"'-t' / '--timeout'" in usage.stderr, usage.stderr
    assert bg(service, "-t", "0.5", "call", "test", "x").stdout == b"Test"


SIZE = """
from pathlib import Path

def handle_udp(request):
    Path(__file__).with_name("size.txt").write_text(str(len(request.data)))
"""


def test_send_of_more_than_one_datagram_is_an_error(modules_dir, make_service, tmp_path):
    # It exited 0 with nothing sent: the kernel's "message too long" was swallowed.
    write_module(modules_dir, "size", SIZE)
    dgram = tmp_path / "bg.dgram"
    svc = make_service(f'[[listen]]\nhost = "127.0.0.1"\nport = 0\nunix_dgram = "{dgram}"\n')
    big = bg(svc, "send", "size", "-", stdin=b"x" * 100_000)
    assert big.returncode == 2 and b"Traceback" not in big.stderr, big.stderr
    assert b"is 100005 bytes" in big.stderr and b"message too long" in big.stderr, big.stderr
    size = modules_dir / "size.txt"
    assert bg(svc, "send", "size", "-", stdin=b"x" * 65_502).returncode == 0  # UDP's most
    wait_until(lambda: size.exists() and size.read_text() == "65502")
    # The kernel decides, not a fixed 65,507: a Unix datagram socket takes more (a
    # 100 KB one was refused), and refuses what its socket buffer cannot hold.
    unix = ("--udp-address", str(dgram), "send", "size", "-")
    assert bg(svc, *unix, stdin=b"x" * 100_002).returncode == 0
    wait_until(lambda: size.read_text() == "100002")
    huge = bg(svc, *unix, stdin=b"x" * 2**22)
    assert huge.returncode == 2 and b"is 4194309 bytes" in huge.stderr, huge.stderr


def test_a_module_name_that_is_not_utf8_is_a_usage_error(service):
    # It was a UnicodeEncodeError traceback, exit 1 ("the service replied an error").
    bad = os.fsdecode(b"rec\xfford")
    schedule = ("schedule", "add", "nightly", bad, "x", "--every", "60")
    for args in (("call", bad, "x"), ("send", bad, "x"), ("queue", "add", bad, "x"), schedule):
        reply = bg(service, *args)
        assert reply.returncode == 2 and b"Traceback" not in reply.stderr, (args, reply)
        assert b"module name b'rec\\xfford' is not UTF-8" in reply.stderr, reply.stderr



def test_a_module_name_the_service_would_read_as_another_is_a_usage_error(service):
    # "bgservice call echo:x hi" called echo with the data "x:hi" (the client review).
    for args in (("call", "echo:x", "hi"), ("send", "ec ho", "x"), ("queue", "add", "e/x", "y")):
        reply = bg(service, *args)
        assert reply.returncode == 2, (args, reply)
        assert b"is not one the service can take: a module name is" in reply.stderr, reply

def test_top_on_a_terminal_exits_130_on_ctrl_c(service):
    """Ctrl-C is how the live view is quit, and it exits 130 as every command does (it
    exited 0): a script can tell an interruption from a clean end."""
    main, side = pty.openpty()
    host, port = service.tcp
    env = {**os.environ, "BGSERVICE_ADDRESS": f"{host}:{port}", "COLUMNS": "100", "LINES": "30"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "service.py"), "top", "-n", "0.2"],
        stdin=side,
        stdout=side,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # see _interrupted
    )
    os.close(side)
    screen = b""
    try:
        deadline = time.monotonic() + 30
        while b"requests" not in screen and time.monotonic() < deadline:  # a screen drawn
            if select.select([main], [], [], 0.1)[0]:
                screen += os.read(main, 65536)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
        with contextlib.suppress(OSError):  # EIO once the terminal's last writer is gone
            while select.select([main], [], [], 0.5)[0] and (chunk := os.read(main, 65536)):
                screen += chunk
    finally:
        proc.kill()
        proc.wait()
        os.close(main)
    assert b"requests" in screen, screen
    assert (proc.returncode, err) == (130, b""), err
    assert screen.endswith(b"\x1b[?25h\x1b[?1049l"), screen[-80:]  # the shell's screen back


def test_stats_show_threads_workers_and_alerts(service):
    lines = bg(service, "stats").stdout.decode().splitlines()
    named = {line.split(":")[0]: line for line in lines if ":" in line}
    assert "stuck" in named["threads"] and named["alerts"].split() == ["alerts:", "off"]
    assert named["workers"].split() == ["workers:", "none"]


def test_a_timeout_past_a_week_is_a_usage_error(service):
    # -t 1e10 was a traceback (OverflowError: timestamp out of range), exit 1: "the
    # service replied an error". At most a week (604800 s), as Client takes.
    for args in (("-t", "1e10", "ping"), ("call", "test", "x", "--timeout=604801")):
        usage = bg(service, *args)
        assert usage.returncode == 2 and b"Traceback" not in usage.stderr, (args, usage)
        assert b"'-t' / '--timeout'" in usage.stderr and b"604800" in usage.stderr, usage.stderr
    assert bg(service, "-t", "604800", "call", "test", "x").stdout == b"Test"


def test_a_mistyped_command_is_named_as_such(tmp_path):
    # It was taken as serve's: "Usage: bgservice serve ... unexpected extra argument".
    reply = bg(None, "qeueu", "list")
    assert reply.returncode == 2, reply
    assert b"No such command 'qeueu' (commands: serve, call," in reply.stderr, reply.stderr
    assert b"bgservice serve" not in reply.stderr
    assert reply.stderr.rstrip().endswith(b"). Did you mean 'queue'?"), reply.stderr
    assert b"Did you mean" not in bg(None, "zzzz").stderr  # nothing near: no guess
    # after serve's own options too (it was "Got unexpected extra argument (qeueu)")
    reply = bg(None, "-v", "-c", str(tmp_path / "none.config"), "-EE", "qeueu")
    assert reply.returncode == 2 and b"Did you mean 'queue'?" in reply.stderr, reply.stderr


def test_the_groups_short_options_take_their_value_attached(service):
    # -t5 and -aHOST before the command: "No such option '-t'" (taken for serve's).
    host, port = service.tcp
    for args in (("-t5", f"-a{host}:{port}", "ping"), ("-t", "5", f"-a{host}:{port}", "ping")):
        reply = bg(None, *args)
        assert (reply.returncode, reply.stdout.strip()) == (0, b"pong"), (args, reply)


def test_queue_get_with_progress_from_a_service_down_says_only_that(tmp_path):
    # The progress bar's "job 7" came first, then the service's absence.
    reply = bg(None, "queue", "get", "7", "--progress")
    assert reply.returncode == 3, reply
    assert reply.stderr.startswith(b"bgservice: ") and b"job 7" not in reply.stderr, reply.stderr


def test_a_schedule_without_cron_or_every_is_a_usage_error(service):
    # It went to the service, whose 400 made exit 1: the usage line makes one required.
    for extra in ((), ("--cron", "0 3 * * *", "--every", "60")):
        reply = bg(service, "schedule", "add", "s2", "echo", "x", *extra)
        assert reply.returncode == 2, reply
        assert b"give either --cron or --every" in reply.stderr
    assert b"s2" not in bg(service, "schedule", "list").stdout


# Imported by Python's own start (site) at its end: says, in the file $SITE_DONE names,
# that the start is past it.
SITE_DONE = "import os\nopen(os.environ['SITE_DONE'], 'w').close()\n"


def test_ctrl_c_while_the_service_starts_shows_no_traceback(tmp_path):
    # The imports alone take a few hundred ms on a busy host: a Ctrl-C among them, or
    # before the service's own signal handlers, showed a traceback or click's "Aborted!".
    # Signals spread over the start; Python's own start (site) is not ours to mend, so
    # they are timed from its end (from the process's start, a loaded machine's slow
    # start took the first of them in site: "Fatal Python error: init_import_site").
    args = ["-p", "0", "-m", str(REPO / "modules"), "--db", str(tmp_path / "q.db")]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE_DONE)
    done = tmp_path / "site.done"
    paths = [str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "SITE_DONE": str(done)}
    for delay in range(60, 660, 40):
        done.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "service.py"), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            # (SIGINT ignored, as in a script's background job, would be inherited, and
            # one before the service's own handler then ignored: see _interrupted)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        wait_until(lambda p=proc: done.exists() or p.poll() is not None, timeout=30, interval=0.002)
        time.sleep(delay / 1000)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert f"{REPO}/bgservice/" not in err and "Aborted!" not in err, (delay, err)
        assert proc.returncode in (0, 130), (delay, proc.returncode, err)


# A Ctrl-C while click reads the arguments, sent from inside its parsing: the window the
# test above hits by chance on a busy host (it showed "Aborted!" and exit 1 there).
CTRL_C_WHILE_PARSING = """
import os, signal, sys
import click
parse = click.Command.make_context
def interrupted(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return parse(self, *args, **kwargs)
click.Command.make_context = interrupted
from bgservice.__main__ import main
sys.argv[0] = "bgservice"
main()
"""


def test_ctrl_c_while_the_arguments_are_read_ends_the_command_quietly(tmp_path):
    serve = ["-p", "0", "-m", str(REPO / "modules"), "--db", str(tmp_path / "q.db")]
    for args in (serve, ["-a", "127.0.0.1:9", "ping"], ["queue", "list", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-c", CTRL_C_WHILE_PARSING, *args],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert "Aborted!" not in proc.stderr and "Traceback" not in proc.stderr, (args, proc)
        assert proc.returncode == 130 and not proc.stdout, (args, proc)


SAVES = """
def handle_tcp(request):
    request.job.save_checkpoint('{"row": 3}')
    return "saved"
"""


def _fields(text: str) -> dict[str, str]:
    """``label: value`` lines (values aligned) as a dict."""
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def test_queue_status_shows_every_field_the_service_sends(modules_dir, make_service):
    # name, tags, source, interruptions, throttled_until and checkpoint were in --json
    # only: the text left them out.
    write_module(modules_dir, "saves", SAVES)
    svc = make_service('[queue]\nmodule_rates = { echo = "1/minute" }\n')
    first = bg(svc, "queue", "add", "echo", "x").stdout.decode().strip()
    assert bg(svc, "queue", "get", first, "--no-progress").stdout == b"x"
    add = ("queue", "add", "echo", "y", "--name", "nightly report", "--tag", "a", "--tag", "b")
    held = bg(svc, *add, "--unique", "k").stdout.decode().strip()  # by the rate: 1 a minute
    saved = bg(svc, "queue", "add", "saves", "--retries", "2").stdout.decode().strip()
    assert bg(svc, "queue", "get", saved, "--no-progress").stdout == b"saved"
    for job in (held, saved):
        raw = json.loads(bg(svc, "queue", "status", job, "--json").stdout)
        text = bg(svc, "queue", "status", job).stdout.decode()
        shown = _fields(text)
        assert shown["source"] == raw["source"] and raw["source"].startswith("tcp:127.0.0.1:")
        assert shown["interrupted"] == "-"  # (0: none, as an unset field)
        assert all(value in text for value in raw.values() if isinstance(value, str))
    held_lines = _fields(bg(svc, "queue", "status", held).stdout.decode())
    assert (held_lines["name"], held_lines["tags"], held_lines["unique"]) == (
        "nightly report", "a, b", "k"
    )  # fmt: skip
    assert re.fullmatch(r"until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(in .+\)", held_lines["throttled"])
    assert held_lines["state"] == "waiting" and held_lines["checkpoint"] == "-"
    saved_lines = _fields(bg(svc, "queue", "status", saved).stdout.decode())
    assert (saved_lines["checkpoint"], saved_lines["attempts"]) == ('{"row": 3}', "1 of 3")
    assert (saved_lines["name"], saved_lines["tags"], saved_lines["throttled"]) == ("-", "-", "-")


LARGE = """
def handle_tcp(request):
    return b"x" * int(request.text)
"""


def test_max_reply_bytes_is_an_option_and_a_longer_reply_exits_5(modules_dir, make_service):
    # The CLI had no way to change the client's max_reply_bytes (64 MiB), and a longer
    # reply said "bgservice: service down: ... more than max_reply_bytes=67108864", exit 3,
    # for a service that was up: a script's fallback for a service down, a keyword no
    # command takes.
    write_module(modules_dir, "large", LARGE)
    svc = make_service()
    where = "{}:{}".format(*svc.tcp)
    said = "bgservice: reply too large: {} sent a reply of {} bytes, more than " \
        "--max-reply-bytes {} (the request may have run)\n"
    longest = bg(svc, "call", "large", str((64 << 20) + 1))  # the default
    assert (longest.returncode, longest.stdout) == (5, b""), longest.stderr[:300]
    assert longest.stderr == said.format(where, (64 << 20) + 1, 64 << 20).encode()
    short = bg(svc, "call", "large", "101", "--max-reply-bytes", "100")
    assert (short.returncode, short.stderr) == (5, said.format(where, 101, 100).encode())
    for args in (("--max-reply-bytes", "100", "call", "large", "100"),  # at every level
                 ("queue", "--max-reply-bytes=100", "add", "large", "100", "--wait")):
        assert bg(svc, *args).stdout == b"x" * 100, args
    # A --wait whose result is too long: the job has ended, and its result is still there.
    waited = bg(svc, "queue", "add", "large", "500", "--wait", "--max-reply-bytes", "400")
    ended = rb"job (\d+) has ended: bgservice queue get \1 --max-reply-bytes BYTES reads its result"
    job = re.search(ended, waited.stderr)
    assert waited.returncode == 5 and job and b"goes on" not in waited.stderr, waited.stderr
    again = bg(svc, "queue", "get", job[1].decode(), "--no-progress", "--max-reply-bytes", "500")
    assert again.stdout == b"x" * 500, again.stderr
    for bad in ("0", "-1", "1e3", "lots"):
        usage = bg(svc, "call", "large", "1", "--max-reply-bytes", bad)
        assert usage.returncode == 2 and b"Traceback" not in usage.stderr, (bad, usage)
        assert b"'--max-reply-bytes'" in usage.stderr, usage.stderr
    assert "--max-reply-bytes" in _help("queue", "get") and "--max-reply-bytes" not in _help("send")


def test_an_option_that_is_not_utf8_or_a_tag_with_a_comma_is_a_usage_error():
    # The request's encoding crashed with a traceback and exit 1 (an error reply, to a
    # script), before anything was sent; a --tag "x,y" was sent as two tags, silently.
    latin1 = os.fsdecode(b"caf\xe9")  # as a Latin-1 shell hands it over
    for args in [
        ("queue", "add", "echo", "x", "--name", latin1),
        ("queue", "add", "echo", "x", "--unique", latin1),
        ("queue", "add", "echo", "x", "--tag", latin1),
        ("queue", "list", "--module", latin1),
        ("queue", "list", "--tag", latin1),
        ("schedule", "add", latin1, "echo", "x", "--every", "60"),
        ("schedule", "add", "n", "echo", "x", "--cron", f"* * * * {latin1}"),
        ("schedule", "add", "n", "echo", "x", "--cron", "* * * * *", "--tz", latin1),
        ("schedule", "pause", latin1),
        ("schedule", "run", latin1),
    ]:
        done = bg(None, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert b"not UTF-8: b'" in done.stderr and b"caf\\xe9'" in done.stderr, args
        assert b"Traceback" not in done.stderr
    for tag in ("x,y", ""):
        done = bg(None, "queue", "add", "echo", "x", "--tag", "ok", "--tag", tag)
        assert done.returncode == 2 and b"without a comma" in done.stderr, done.stderr


def test_bounds_the_service_checks_are_usage_errors_before_anything_is_sent():
    # They went to the service and came back as its 400: exit 1, an error reply to a
    # script, where the PHP client refuses the same values before sending.
    for args in (("queue", "list", "--limit", "0"), ("queue", "list", "--offset", "-1"),
                 ("queue", "stats", "--window", "0"), ("queue", "stats", "--window", "nan")):
        done = bg(None, *args)  # (no service: 127.0.0.1:1, which would be exit 3)
        assert done.returncode == 2, (args, done.stderr)


def test_an_address_the_php_client_refuses_is_a_usage_error_not_service_down():
    # "::1:12341", a blank before it, port 0, another script's digits: taken, then
    # "cannot reach" (exit 3), which a fallback reads as an outage.
    for address in ("::1:23417", " 127.0.0.1:23417", "127.0.0.1:0", "a b:23417",
                    "[::1]]:23417", "127.0.0.1:\u0662\u0663\u0664"):  # fmt: skip
        done = bg(None, "ping", address=address)
        assert done.returncode == 2, (address, done.stderr)
        assert b"address" in done.stderr, done.stderr
    assert b"takes brackets, as in [::1]:12341" in bg(None, "ping", address="::1:5").stderr


def test_output_that_cannot_be_written_is_exit_6_and_says_the_request_was_served(service):
    # A traceback and exit 1 (an error reply, to a script), though the job was queued.
    env = {**os.environ, "BGSERVICE_ADDRESS": "{}:{}".format(*service.tcp)}
    cli = [sys.executable, str(REPO / "service.py")]
    with open("/dev/full", "wb") as full:
        added = subprocess.run([*cli, "queue", "add", "echo", "kept", "--name", "full"],
                               stdout=full, stderr=subprocess.PIPE, env=env, timeout=60)
    assert added.returncode == 6, added.stderr
    assert added.stderr.startswith(b"bgservice: cannot write the output (No space left on "
                                   b"device): the request was served\n"), added.stderr  # fmt: skip
    assert b"Traceback" not in added.stderr
    listed = wait_until(lambda: json.loads(bg(service, "queue", "list", "done", "--name",
                                               "full", "--json").stdout)["done"])  # fmt: skip
    assert len(listed) == 1  # it was queued, and ran
    with open("/dev/full", "wb") as full:  # (top writes to stdout itself)
        top = subprocess.run([*cli, "top", "--once", "-n", "0.1"], stdout=full,
                             stderr=subprocess.PIPE, env=env, timeout=60)  # fmt: skip
    assert top.returncode == 6 and b"cannot write the output" in top.stderr, top.stderr
    for args in (("call", "echo", "hi"), ("stats",), ("queue", "check", "1"), ("top", "--once")):
        closed = subprocess.run([*cli, *args], stderr=subprocess.PIPE, env=env, timeout=60,
                                preexec_fn=lambda: os.close(1))  # fmt: skip
        assert closed.returncode == 6, (args, closed.stderr)
        assert b"standard output is closed" in closed.stderr, closed.stderr


def test_data_read_from_stdin_is_not_counted_against_the_timeout(service):
    # The --wait's deadline was taken before stdin was read: a pipe slower than -t left
    # the get a floor of 10 ms, and a job of 300 ms "timed out" (exit 4).
    env = {**os.environ, "BGSERVICE_ADDRESS": "{}:{}".format(*service.tcp)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "service.py"), "-t", "5", "queue", "add", "sleep", "-",
         "--wait"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        time.sleep(6)  # (the data comes after -t: not a timing of the service)
        out, err = proc.communicate(b"300", timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out == b"slept 300", out
