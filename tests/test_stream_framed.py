"""The framed form's bounds (bgservice/stream/framed.py): requests in progress per
connection, the memory of a refused frame, the idle deadline after a long call, and the
replies owed when the shutdown grace runs out. Over real sockets."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from bgservice.protocol import PREFACE, framed_reply, framed_request
from tests.conftest import recv_all, wait_until, write_module

COUNTING = """
import asyncio

running = 0
most = 0

async def handle_tcp(request):
    global running, most
    if request.text == "most":
        return str(most)
    running += 1
    most = max(most, running)
    await asyncio.sleep(0.05)
    running -= 1
    return request.text
"""


def test_a_client_writing_many_frames_at_once_has_max_pipeline_in_progress(
    make_service, modules_dir
):
    # Every frame of a read was started at once and the limit checked after: one
    # connection had 9,140 calls in progress with max_pipeline = 64, and 400,000 frames
    # in one go held the loop for seconds.
    write_module(modules_dir, "counting", COUNTING)
    svc = make_service("[limits]\nmax_pipeline = 16\n")
    conn = svc.framed()
    try:
        conn.send(*[b"counting:%d" % n for n in range(2000)])
        replies = [conn.recv() for _ in range(2000)]
        assert replies == [(200, b"%d" % n) for n in range(2000)]
        assert conn.call(b"counting:most") == (200, b"16")
    finally:
        conn.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_frame_refused_behind_a_running_call_lets_its_bytes_go(make_service):
    # A 408 (or a 503 for too many bytes) kept behind a running call uncounted the
    # refused frame's bytes but kept them, for as long as the call ran: 100 connections
    # grew the service by 78 MB with max_buffered_bytes at 2 MB.
    svc = make_service("[limits]\nmax_request_bytes = 1048576\nread_timeout = 1.0\n")
    before = _rss_kib(svc.proc.pid)
    conns = []
    try:
        for _ in range(30):
            sock = socket.create_connection(svc.tcp, timeout=10)
            sock.sendall(PREFACE + framed_request(b"sleep:15000"))
            sock.sendall((1_000_000).to_bytes(4, "big") + b"x" * 900_000)
            conns.append(sock)
        wait_until(lambda: svc.stats()["refused"].get("read_timeout", 0) == 30)
        assert svc.stats()["buffered_bytes"] == 0
        time.sleep(0.5)
        grown_mib = (_rss_kib(svc.proc.pid) - before) / 1024
        assert grown_mib < 10, f"the service holds {grown_mib:.0f} MiB more"  # was 26
    finally:
        for sock in conns:
            sock.close()


def test_the_idle_deadline_counts_from_the_last_reply(make_service):
    # It counted from the last request's bytes: a call longer than idle_timeout left the
    # connection closing a moment after its reply, and the client's next request was lost.
    # (Wide margins: counted from the request, it closes 0.5 s after the reply; counted
    # from the reply, 3 s after it. The next request goes at 1 s.)
    svc = make_service("[limits]\nidle_timeout = 3.0\n")
    conn = svc.framed()
    try:
        assert conn.call(b"sleep:2500") == (200, b"slept 2500")
        time.sleep(1.0)  # 3.5 s after the request's bytes, 1 s after the reply
        assert conn.call(b"echo:still open") == (200, b"still open")
        conn.sock.settimeout(30)  # idle past the deadline: closed
        assert conn.sock.recv(10) == b""
    finally:
        conn.close()


def test_at_the_end_of_the_grace_finished_replies_are_sent_not_503(make_service):
    # Every reply still owed became "503: Shutting down", those of calls that had
    # finished too: a client retried a queue:add that was stored, and the job ran twice.
    svc = make_service()  # shutdown_grace = 5 s in the tests
    sock = socket.create_connection(svc.tcp, timeout=30)
    sock.sendall(PREFACE + b"".join(
        framed_request(p) for p in (b"sleep:20000", b"queue:add:echo:x", b"echo:y")
    ))  # fmt: skip
    assert sock.recv(4) == PREFACE
    time.sleep(0.5)  # the add is stored, the echo answered (behind the sleep)
    svc.signal(signal.SIGTERM)
    replies = recv_all(sock)
    sock.close()
    assert svc.wait() == 0
    shutting = framed_reply(503, b"Shutting down")
    assert replies.startswith(shutting)
    rest = replies[len(shutting) :]
    assert rest[:3] == b"200" and b"id:1" in rest and rest.endswith(framed_reply(200, b"y"))


def test_replies_larger_than_the_socket_takes_arrive_whole_and_in_order(service):
    # Replies go straight to the socket while the transport has nothing queued, the rest
    # through the transport: a reader slower than the writer must still get every byte,
    # each reply whole and in order, small ones behind big ones included.
    write_module(service.modules, "big", """
        def handle_tcp(request):
            letter, size = request.text.split()
            return letter * int(size)
        """)  # fmt: skip
    wait_until(lambda: service.call(b"big:a 1") == b"a")
    conn = service.framed()
    try:  # 16 MiB of replies: more than the two sockets' buffers hold unread
        sizes = [(b"A", 6 << 20), (b"b", 5), (b"C", 4 << 20), (b"d", 1), (b"E", 6 << 20)]
        conn.send(*(b"big:%s %d" % (letter, size) for letter, size in sizes))
        time.sleep(0.5)  # the service writes while nobody reads
        for letter, size in sizes:
            assert conn.recv() == (200, letter * size)
        assert conn.call(b"echo:after") == (200, b"after")
    finally:
        conn.close()
