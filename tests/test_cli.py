"""``bgservice`` client subcommands against a real service, with their exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.conftest import REPO, wait_until, write_module

PROGRESS = """
import time

def handle_tcp(request):
    for step in range(1, 5):
        request.job.progress(step, 4, f"step {step}")
        time.sleep(0.15)
    return "all done"
"""


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
    reply = bg(service, "call", "nosuch")
    assert (reply.returncode, reply.stderr) == (1, b"400: Unknown request\n")
    down = bg(None, "call", "test", address=f"127.0.0.1:{_free_port()}")
    assert down.returncode == 3 and b"service down" in down.stderr
    slow = bg(service, "call", "sleep", "3000", "--timeout", "0.3")
    assert slow.returncode == 4 and b"timeout" in slow.stderr
    usage = bg(service, "queue", "get", "not-a-number")
    assert usage.returncode == 2
    for bad in ("id:", "id:x", "0", "7.5", "id:-3"):
        usage = bg(service, "queue", "check", bad)
        assert usage.returncode == 2 and b"job id must be N or 'id:N'" in usage.stderr, bad


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
    assert later == int(bg(service, "queue", "list").stdout.split()[6])  # the table's first id
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


def test_serve_is_still_the_default_command(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "service.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "--config" in result.stdout
    assert "call, send, queue" in result.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
