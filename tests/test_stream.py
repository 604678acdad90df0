"""TCP end to end: the original's one-shot format and the framed format, over real sockets."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from bgservice.protocol import PREFACE, framed_reply, framed_request
from tests.conftest import recv_all, sent_one_shot, wait_until, write_module

LEGACY_ERROR = re.compile(rb"^[45][0-9]{2}:")


# --- one-shot, as the original's clients speak it -------------------------------------


@pytest.mark.parametrize("half_close", [True, False])
def test_health_checks_and_test_module(service, half_close):
    assert service.call(b"helo", half_close) == b"oleh"
    assert service.call(b"hello", half_close) == b"olleh"
    assert service.call(b"test:anything", half_close) == b"Test"
    assert service.call(b"test", half_close) == b"Test"


def test_unknown_module_and_module_without_handlers(service):
    assert service.call(b"nosuchmodule:x") == b"400: Unknown request"
    assert service.call(b"$%^:x") == b"400: Unknown request"
    reply = service.call(b"fail:x")
    assert reply == b"501: Module fail has no TCP handler"
    assert LEGACY_ERROR.match(reply.lstrip())


def test_reserved_names_are_never_modules(service, modules_dir):
    write_module(modules_dir, "service", "def handle_tcp(r): return 'hijacked'")
    assert service.call(b"service:ping") == b"pong"
    assert service.call(b"service:nope").startswith(b"400:")


def test_echo_is_binary_safe(service):
    data = bytes(range(256)) * 4
    assert service.call(b"echo:" + data) == data


@pytest.mark.parametrize("half_close", [True, False])
def test_one_mebibyte_request_in_one_write(service, half_close):
    data = bytes(range(256)) * 4096
    assert service.call(b"echo:" + data, half_close=half_close, timeout=30) == data


def _without_half_close(address, payload, maxseg=None, timeout=30.0):
    """The original's PHP client: one write, then read until the service closes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if maxseg:  # segments as small as on Ethernet: what a network peer sends
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, maxseg)
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(payload)
        return recv_all(sock)


def test_a_short_request_without_half_close_is_answered_without_the_quiet_gap(make_service):
    # The gap is 5 s here: a reply within 3 s can only come from the segment rule.
    svc = make_service("[limits]\nquiet_ms = 5000\nquiet_large_ms = 5000\n")
    assert _without_half_close(svc.tcp, b"echo:hello", timeout=3) == b"hello"
    assert _without_half_close(svc.tcp, b"test", timeout=3) == b"Test"


@pytest.mark.parametrize("size", [1000, 1448, 5000, 200_000, 1 << 20])
def test_a_network_peers_write_arrives_whole_without_half_close(service, size):
    # Ethernet-sized segments: every write longer than one arrives in several pieces.
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert _without_half_close(service.tcp, b"echo:" + data, maxseg=1448) == data


def test_quiet_mode_serves_clients_that_write_a_request_in_pieces(make_service):
    svc = make_service('[limits]\none_shot_end = "quiet"\nquiet_ms = 300\n')
    with socket.create_connection(svc.tcp, timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"ec")
        time.sleep(0.05)
        sock.sendall(b"ho:two pieces")
        assert recv_all(sock) == b"two pieces"


def test_up_to_the_size_limit_with_half_close(make_service):
    svc = make_service("[limits]\nmax_request_bytes = 4194304\n")
    data = b"z" * (4 * 1024 * 1024 - 5)
    assert svc.call(b"echo:" + data, timeout=30) == data


def test_too_large_gets_413_and_close_with_memory_bounded(make_service):
    svc = make_service("[limits]\nmax_request_bytes = 100000\n")
    with socket.create_connection(svc.tcp, timeout=10) as sock:
        try:
            sock.sendall(b"echo:" + b"x" * 2_000_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = recv_all(sock)
    assert reply.startswith(b"413: Request too large")
    assert svc.call(b"test:x") == b"Test"


def test_silent_client_gets_408(make_service):
    svc = make_service("[limits]\nread_timeout = 0.5\n")
    with socket.create_connection(svc.tcp, timeout=10) as sock:
        start = time.monotonic()
        reply = recv_all(sock)
    # Cut at the configured timeout (the reply names it), never before it; one never cut
    # fails on the socket's own timeout.
    assert reply == b"408: Request not received within 0.5 s"
    assert time.monotonic() - start > 0.4
    assert svc.stats()["refused"]["read_timeout"] == 1


def test_trickling_one_shot_client_gets_408(make_service):
    # A byte every 2 ms never leaves a 50 ms gap, so the request never ends: the read
    # deadline must end it.
    svc = make_service('[limits]\nread_timeout = 0.5\nquiet_ms = 50\none_shot_end = "quiet"\n')
    with socket.create_connection(svc.tcp, timeout=10) as sock:
        sock.setblocking(False)
        reply = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                sock.send(b"e")
            except OSError:
                break
            try:
                reply += sock.recv(100)
                if reply:
                    break
            except BlockingIOError:
                pass
            time.sleep(0.002)
    assert reply.startswith(b"408:")


def test_handler_error_is_a_500_without_traceback(service, modules_dir):
    write_module(modules_dir, "boom", "def handle_tcp(r):\n    raise ValueError('bad input')\n")
    reply = wait_until(lambda: (r := service.call(b"boom:x")) != b"400: Unknown request" and r)
    assert reply == b"500: Module boom raised ValueError: bad input"
    assert "Traceback" in service.log() and "bad input" in service.log()


def test_reply_error_from_a_module_carries_its_code(service):
    assert service.call(b"sleep:abc") == b"400: sleep: expected milliseconds, got 'abc'"


def test_timeout_replies_504_at_the_deadline_and_others_are_served(modules_dir, make_service):
    # The handler outlives its timeout until the test has the 504: a reply that waited for
    # the handler's end would never come (the socket's 10 s timeout ends the test).
    write_module(
        modules_dir,
        "hang",
        """
        import time
        from pathlib import Path
        TIMEOUT = 0.5
        def handle_tcp(request):
            released = Path(__file__).with_name("hang.released")
            for _ in range(3000):  # 30 s at most
                if released.exists():
                    return "late"
                time.sleep(0.01)
            return "never released"
        """,
    )
    svc = make_service()
    try:
        with socket.create_connection(svc.tcp, timeout=10) as slow:
            slow.sendall(b"hang:x")
            slow.shutdown(socket.SHUT_WR)
            assert svc.call(b"test:x") == b"Test"  # served while hang is running
            reply = recv_all(slow)
    finally:
        (modules_dir / "hang.released").touch()
    assert reply == b"504: Module hang timed out after 0.5 s"


def test_sync_handler_runs_off_the_loop(modules_dir, make_service):
    # block returns once the test has had its reply to test:x: on the loop, it would have
    # held that reply until it gave up waiting (5 s), and replied "not released".
    write_module(
        modules_dir,
        "block",
        """
        import time
        from pathlib import Path
        def handle_tcp(request):
            released = Path(__file__).with_name("block.released")
            Path(__file__).with_name("block.started").touch()
            for _ in range(500):  # 5 s at most
                if released.exists():
                    return "ok"
                time.sleep(0.01)
            return "not released"
        """,
    )
    svc = make_service()
    with socket.create_connection(svc.tcp, timeout=10) as slow:
        slow.sendall(b"block:x")
        slow.shutdown(socket.SHUT_WR)
        wait_until(lambda: (modules_dir / "block.started").exists())
        assert svc.call(b"test:x") == b"Test"
        (modules_dir / "block.released").touch()
        assert recv_all(slow) == b"ok"


def test_streaming_reply(modules_dir, make_service):
    write_module(
        modules_dir,
        "stream",
        """
        def handle_tcp(request):
            for i in range(3):
                request.write(f"part{i} ")
            return "end"
        """,
    )
    svc = make_service()
    assert svc.call(b"stream:x") == b"part0 part1 part2 end"
    conn = svc.framed()
    assert conn.call(b"stream:x") == (200, b"part0 part1 part2 end")


def test_connection_limit(make_service):
    svc = make_service("[limits]\nmax_connections = 2\nread_timeout = 5\n")
    held = [socket.create_connection(svc.tcp) for _ in range(2)]

    def refused() -> bool:
        with socket.create_connection(svc.tcp, timeout=10) as extra:
            return recv_all(extra) == b"503: Too many connections"

    try:
        wait_until(refused)
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: svc.call(b"test:x") == b"Test")


# --- framed ---------------------------------------------------------------------------


def test_framed_byte_exact_exchange(service):
    with socket.create_connection(service.tcp, timeout=10) as sock:
        sock.sendall(PREFACE + b"\x00\x00\x00\x06test:x")
        expected = PREFACE + b"200\x00\x00\x00\x04Test"
        got = b""
        while len(got) < len(expected):
            got += sock.recv(100)
    assert got == expected


def test_framed_pipelined_replies_come_in_order(service):
    conn = service.framed()
    conn.send(b"sleep:300", b"test:x", b"echo:\x00\x01:\xff", b"nope", b"helo")
    assert conn.recv() == (200, b"slept 300")
    assert conn.recv() == (200, b"Test")
    assert conn.recv() == (200, b"\x00\x01:\xff")
    assert conn.recv() == (400, b"Unknown request")
    assert conn.recv() == (200, b"oleh")


TOGETHER = """
import asyncio

ARRIVED = set()

async def handle_tcp(request):
    ARRIVED.add(request.text)
    for _ in range(300):  # 3 s at most
        if len(ARRIVED) >= 10:
            return "together"
        await asyncio.sleep(0.01)
    return "alone"
"""


def test_framed_requests_run_concurrently(modules_dir, make_service):
    # Each call returns once all ten have begun: one after another, the first would give
    # up waiting for the others (and the ten take 30 s: the connection's timeout ends it).
    write_module(modules_dir, "together", TOGETHER)
    svc = make_service()
    conn = svc.framed()
    conn.send(*[b"together:%d" % n for n in range(10)])
    assert [conn.recv() for _ in range(10)] == [(200, b"together")] * 10


def test_framed_oversized_frame_is_skipped_and_the_connection_goes_on(make_service):
    svc = make_service("[limits]\nmax_request_bytes = 1000\n")
    conn = svc.framed()
    conn.send(b"echo:" + b"x" * 5000, b"echo:small")
    status, body = conn.recv()
    assert status == 413 and b"5005 bytes" in body
    assert conn.recv() == (200, b"small")


def test_framed_trickle_hits_the_read_timeout(make_service):
    svc = make_service("[limits]\nread_timeout = 0.5\n")
    conn = svc.framed()
    assert conn.call(b"test:x") == (200, b"Test")
    frame = framed_request(b"echo:" + b"y" * 100)
    conn.sock.settimeout(0.05)
    reply, sent = None, 0
    for byte in frame:
        try:
            conn.sock.send(bytes([byte]))
        except OSError:
            break
        sent += 1
        try:
            reply = conn.recv()
            break
        except (TimeoutError, ConnectionError):
            pass
    # The 408 came while the frame was still trickling in (a byte every 50 ms: 5.5 s for
    # all of it), not at its end.
    assert reply is not None and reply[0] == 408
    assert sent < len(frame), f"all {sent} bytes sent"


def test_framed_half_close_flushes_pending_replies(service):
    conn = service.framed()
    conn.send(b"sleep:200", b"test:x")
    conn.sock.shutdown(socket.SHUT_WR)
    assert conn.recv() == (200, b"slept 200")
    assert conn.recv() == (200, b"Test")
    assert conn.sock.recv(10) == b""


def test_service_commands(service):
    import json

    assert service.call(b"service:ping") == b"pong"
    modules = {m["name"]: m for m in json.loads(service.call(b"service:modules"))}
    assert modules["test"]["state"] == "loaded"
    assert modules["fail"]["accepts"] == []
    service.call(b"test:x")
    stats = service.stats()
    assert stats["modules"]["test"]["tcp"]["requests"] >= 1
    assert {"uptime", "in_flight", "loop_lag_ms", "udp", "connections"} <= stats.keys()


@pytest.mark.parametrize(
    "source",
    [
        "async def handle_tcp(request):\n    return 42\n",  # on the loop
        "def handle_tcp(request):\n    return 42\n",  # in a thread
        'EXECUTION = "process"\n\ndef handle_tcp(request):\n    return 42\n',
    ],
    ids=["async", "thread", "process"],
)
def test_a_reply_of_the_wrong_type_is_the_modules_error(modules_dir, make_service, source):
    # The same reply in every execution mode (docs/modules.md); a process worker once
    # called it "raised TypeError" and logged it as the handler raising.
    write_module(modules_dir, "badreply", source)
    svc = make_service()
    reply = svc.call(b"badreply:x")
    assert reply == b"500: Module badreply returned a bad reply: " + (
        b"a reply must be str, bytes or None, not int"
    )
    assert "raised" not in svc.log()


def test_reloads_are_counted_in_stats(modules_dir, make_service):
    path = write_module(modules_dir, "counted", "def handle_tcp(request):\n    return 'v1'\n")
    svc = make_service()
    before = svc.stats()["reloads"]
    path.write_text("def handle_tcp(request):\n    return 'v2'\n")
    wait_until(lambda: svc.call(b"counted:x") == b"v2")
    path.write_text("def handle_tcp(request:\n")
    wait_until(lambda: svc.stats()["reloads"]["failed"] > before["failed"])
    after = svc.stats()["reloads"]
    assert after["ok"] == before["ok"] + 1


def test_framed_client_that_never_reads_stops_being_read(service):
    # Replies the client does not read stay in kernel buffers, and reading stops: the
    # service must not take in (and hold replies for) hundreds of megabytes. The pipeline
    # limit clearing once used to resume reading even while writing was paused.
    sock = socket.create_connection(service.tcp, timeout=10)
    sock.sendall(PREFACE)
    frame = framed_request(b"echo:" + b"x" * 100_000)
    sent = 0
    sock.settimeout(2.0)
    try:
        while sent < 300_000_000:
            sock.sendall(frame)
            sent += len(frame)
    except TimeoutError:
        pass
    assert sent < 100_000_000, f"the service kept reading: {sent} bytes taken in"
    sock.close()
    assert service.call(b"test:x") == b"Test"


# --- issue 18: what a client can hold ---------------------------------------------------


def test_a_client_that_never_reads_its_reply_is_dropped_after_the_write_timeout(make_service):
    # Item 3: clients that sent echo:+8 MiB and stopped reading held their connection slot
    # and the reply's memory for ever: every other call got "503: Too many connections".
    # (3 s: the first call must find both held before the first is dropped, however slowly
    # the two 8 MiB requests are sent on a loaded machine)
    svc = make_service("[limits]\nmax_connections = 2\nwrite_timeout = 3.0\n")
    held = [sent_one_shot(svc, b"echo:" + b"r" * (8 << 20)) for _ in range(2)]
    try:
        assert svc.call(b"test:x") == b"503: Too many connections"
        wait_until(lambda: svc.call(b"test:x") == b"Test", timeout=10)  # (held for ever, once)
        wait_until(lambda: svc.stats()["refused"].get("write_timeout") == 2)
        assert "write timeout" in svc.log()
    finally:
        for sock in held:
            sock.close()


def test_a_slow_reader_within_the_write_timeout_gets_its_whole_reply(make_service):
    svc = make_service("[limits]\nwrite_timeout = 1.0\n")
    data = b"s" * (4 << 20)
    with socket.create_connection(svc.tcp, timeout=10) as sock:
        sock.sendall(b"echo:" + data)
        sock.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := sock.recv(256 << 10):
            got += chunk
            time.sleep(0.02)  # slow, but never a second without taking something
    assert got == data


def _frame_start(svc, size: int, sent: int) -> socket.socket:
    """A framed client that announces a ``size``-byte frame, sends ``sent`` of it, holds."""
    sock = socket.create_connection(svc.tcp, timeout=10)
    sock.sendall(PREFACE + size.to_bytes(4, "big") + b"echo:" + b"h" * (sent - 5))
    assert sock.recv(4) == PREFACE
    return sock


def test_bytes_held_by_unfinished_requests_are_bounded_in_total(make_service):
    # Item 4: 60 connections each sending most of a 16 MiB frame held 1 GB until the 408s.
    svc = make_service(
        "[limits]\nmax_request_bytes = 1048576\nmax_buffered_bytes = 3000000\nread_timeout = 30\n"
    )
    held = [_frame_start(svc, 1_000_000, 900_000) for _ in range(3)]
    try:
        wait_until(lambda: svc.stats()["buffered_bytes"] == 3 * (4 + 900_000))  # + headers
        assert svc.call(b"test:x") == b"Test"  # small requests still fit
        with socket.create_connection(svc.tcp, timeout=10) as sock:  # past the bound: refused
            try:
                sock.sendall(b"echo:" + b"o" * 900_000)
            except (BrokenPipeError, ConnectionResetError):
                pass
            reply = recv_all(sock)
        assert reply == b"503: Too many bytes in unfinished requests (limit 3000000)"
        fourth = socket.create_connection(svc.tcp, timeout=10)
        fourth.sendall(PREFACE + (1_000_000).to_bytes(4, "big") + b"x" * 900_000)
        assert recv_all(fourth)[4:] == (
            b"503\x00\x00\x00\x35Too many bytes in unfinished requests (limit 3000000)"
        )
        fourth.close()
        assert svc.stats()["refused"]["buffer_full"] == 2
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: svc.stats()["buffered_bytes"] == 0)
    assert svc.call(b"echo:" + b"a" * 900_000) == b"a" * 900_000


def test_a_framed_408_comes_after_the_replies_still_owed(make_service):
    # Replies go in request order: the old service sent the 408 at once, ahead of the
    # sleep's reply, and dropped that reply; a client read the 408 as the sleep's answer.
    svc = make_service("[limits]\nread_timeout = 1.0\n")  # the partial frame: 408 at 1 s
    sock = socket.create_connection(svc.tcp, timeout=10)
    sock.sendall(PREFACE + framed_request(b"sleep:1500") + (100).to_bytes(4, "big") + b"part")
    reply = recv_all(sock)
    sleep = framed_reply(200, b"slept 1500")
    assert reply == PREFACE + sleep + framed_reply(408, b"Request not received within 1 s")
    sock.close()
    assert svc.call(b"test:x") == b"Test"
    assert svc.proc.poll() is None, svc.log()
    assert "unexpected error" not in svc.log(), svc.log()


def test_a_framed_503_for_too_many_bytes_comes_after_the_replies_still_owed(make_service):
    svc = make_service(
        "[limits]\nmax_request_bytes = 1048576\nmax_buffered_bytes = 3000000\nread_timeout = 30\n"
    )
    held = [_frame_start(svc, 1_000_000, 900_000) for _ in range(3)]
    wait_until(lambda: svc.stats()["buffered_bytes"] == 3 * (4 + 900_000))
    sock = socket.create_connection(svc.tcp, timeout=10)
    # A running call, then most of a frame that takes the total past the bound.
    partial = (1_000_000).to_bytes(4, "big") + b"x" * 900_000
    sock.sendall(PREFACE + framed_request(b"sleep:300") + partial)
    reply = recv_all(sock)
    message = b"Too many bytes in unfinished requests (limit 3000000)"
    assert reply == PREFACE + framed_reply(200, b"slept 300") + framed_reply(503, message)
    for conn in held:
        conn.close()
    wait_until(lambda: svc.stats()["buffered_bytes"] == 0)


def test_a_refused_request_no_longer_counts_against_the_total(make_service):
    svc = make_service("[limits]\nmax_request_bytes = 100000\nread_timeout = 5\n")
    with socket.create_connection(svc.tcp, timeout=10) as sock:
        sock.sendall(b"echo:" + b"x" * 60_000)
        wait_until(lambda: svc.stats()["buffered_bytes"] >= 60_000)
        sock.sendall(b"x" * 60_000)  # past max_request_bytes: 413, the connection lingers
        assert sock.recv(100).startswith(b"413: ")
        assert svc.stats()["buffered_bytes"] == 0


# --- the end of a one-shot request: defects a review found (2026-12-06) -----------------

BIG_REPLY = """
async def handle_tcp(request):
    return b"x" * int(request.text)
"""
SIZED = """
import time

async def handle_tcp(request):
    if request.text.startswith("block "):  # holds the loop: a slow handler elsewhere
        time.sleep(int(request.text[6:]) / 1000)
        return "held"
    return str(len(request.data))
"""


def test_bytes_after_the_request_do_not_cut_a_large_reply(modules_dir, make_service):
    # A PHP client's fputs("big:4000000"); fputs("\n"): the service closed with the
    # newline unread, the kernel reset the connection and dropped the reply's unsent part
    # (2.3 of 4 MB arrived, no error).
    write_module(modules_dir, "big", BIG_REPLY)
    svc = make_service()
    for _ in range(5):
        with socket.create_connection(svc.tcp, timeout=30) as sock:
            sock.sendall(b"big:4000000")
            # Answered (its reply on its way): the newline comes after the service's
            # decision. (A sleep of 50 ms stood here: where the kernel had taken the whole
            # reply, the service closed at once, and the newline, come after the close,
            # reset the connection: a flake found under load.)
            assert sock.recv(1, socket.MSG_PEEK)
            sock.sendall(b"\n")
            got = recv_all(sock)
        assert len(got) == 4_000_000
    # Which rule ended each request, and that bytes came after the end, is counted.
    assert svc.stats()["one_shot"] == {"short_write": 5 + 1, "after_end": 5}


def test_a_loop_held_up_past_the_gap_does_not_cut_requests(modules_dir, make_service):
    # The gap's timer ran before the read in the loop turn after a slow step, and ended
    # the request without the bytes that had arrived meanwhile.
    write_module(modules_dir, "sized", SIZED)
    # A 50 ms gap, the loop held 60 ms at a time: the client's 2 ms pause between its two
    # writes stays within the gap however late its thread runs (with the 5 ms default,
    # sleep(0.002) took 10.4 ms on a loaded machine, and the service rightly ended there).
    svc = make_service("[limits]\nquiet_ms = 50\n")
    stop = threading.Event()

    def hold() -> None:
        while not stop.is_set():
            svc.call(b"sized:block 60")  # holds the loop past the gap

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        sizes = []
        for _ in range(30):
            with socket.create_connection(svc.tcp, timeout=30) as sock:
                sock.sendall(b"sized:" + b"a" * 20_000)
                time.sleep(0.002)  # within quiet_ms: one request, in two writes
                sock.sendall(b"b" * 20_000)
                sizes.append(int(recv_all(sock)))
    finally:
        stop.set()
        holder.join()
    assert sizes == [40_000] * 30
    assert svc.stats()["one_shot"]["gap"] == 30  # what ended them, counted
