"""A module's declarations, against a real service: CALL_FROM admits direct calls from the
listed sources only (403 naming the rule over TCP, a log line for a dropped datagram),
leaves queued runs to QUEUE_FROM, and a malformed rule fails the load; EXECUTION and
PROCESSES."""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import recv_all, wait_until, write_module

LOCAL_ONLY = """
CALL_FROM = {"unix", "udp:127.0.0.1"}
seen = []

async def handle_tcp(request):
    return "reset " + request.text

def handle_udp(request):
    seen.append(request.text)

def stats():
    return len(seen)
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder for a Unix socket (its path is limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="bgs-", dir="/tmp") as folder:
        yield Path(folder)


def unix_call(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_call_from_admits_the_listed_sources_only(make_service, modules_dir, short_dir):
    write_module(modules_dir, "cache_reset", LOCAL_ONLY)
    sock = short_dir / "bg.sock"
    svc = make_service(f'[[listen]]\nhost = "127.0.0.1"\nport = 0\nunix = "{sock}"\n')
    refused = svc.call(b"cache_reset:all")
    assert refused.startswith(b"403: module cache_reset: call only from udp:127.0.0.1, unix")
    assert b"(source tcp:127.0.0.1:" in refused
    assert unix_call(sock, b"cache_reset:all") == b"reset all"
    svc.send_udp(b"cache_reset:x")  # udp:127.0.0.1 names this host: admitted
    wait_until(lambda: svc.stats()["module_stats"].get("cache_reset") == 1)
    # Queued runs are QUEUE_FROM's business: a TCP caller may queue what it may not call.
    job = svc.call(b"queue:add:cache_reset:later")
    assert job.startswith(b"id:")
    assert wait_until(lambda: (r := svc.call(b"queue:get:" + job)) == b"reset later" and r)
    assert svc.stats()["modules"]["cache_reset"]["tcp"]["errors"] == 1  # the refusal counted
    listed = {m["name"]: m for m in json.loads(svc.call(b"service:modules"))}
    assert listed["cache_reset"]["call_from"] == ["udp:127.0.0.1", "unix"]
    assert listed["cache_reset"]["queue_from"] is None and listed["echo"]["call_from"] is None


def test_a_refused_datagram_is_logged(make_service, modules_dir):
    write_module(modules_dir, "tcp_only", 'CALL_FROM = {"tcp"}\ndef handle_udp(r):\n    pass\n')
    svc = make_service()
    svc.send_udp(b"tcp_only:x")
    svc.wait_for_log("403 module tcp_only: call only from tcp (source udp:127.0.0.1:")


@pytest.mark.parametrize("rule", ['"unix"', "5", "set()", '(s for s in ["unix"])'])
def test_a_malformed_rule_fails_the_load(make_service, modules_dir, rule):
    # A number failed with "TypeError: 'int' object is not iterable"; an empty set and a
    # generator (used up by the check) loaded, and refused every caller.
    module = f"CALL_FROM = {rule}\ndef handle_tcp(request):\n    return 1\n"
    write_module(modules_dir, "bad", module)
    svc = make_service()
    reply = svc.call(b"bad:x")
    assert reply.startswith(b"502") and b"CALL_FROM must be a set of sources" in reply, reply


def test_execution_values_and_processes_without_process_mode(make_service, modules_dir):
    # PROCESSES without EXECUTION = "process" was silently ignored (it stays loadable: a
    # save that drops EXECUTION to leave process mode may keep it), and "default" loaded
    # though the error for any other value named "process" alone.
    handler = 'def handle_tcp(request):\n    return "ran"\n'
    write_module(modules_dir, "pcount", "PROCESSES = 3\n" + handler)
    write_module(modules_dir, "pdefault", 'EXECUTION = "default"\n' + handler)
    write_module(modules_dir, "pthread", 'EXECUTION = "thread"\n' + handler)
    svc = make_service()
    assert svc.call(b"pcount:x") == b"ran"
    svc.wait_for_log('module pcount: PROCESSES = 3 has no effect without EXECUTION = "process"')
    assert svc.call(b"pdefault:x") == b"ran"
    assert svc.call(b"pthread:x") == (
        b'502: Module pthread failed to load: pthread.py: EXECUTION must be "process", '
        b'or "default" (as when left out)'
    )
