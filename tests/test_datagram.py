"""UDP and Unix datagrams end to end: one datagram one request, never a reply, floods."""

from __future__ import annotations

import signal
import socket
import threading

from tests.conftest import wait_until, write_module

RECORDER = """
from pathlib import Path

def handle_udp(request):
    with open(Path(__file__).with_name("got.bin"), "ab") as f:
        f.write(len(request.data).to_bytes(4, "big") + request.data)
"""

SLOW_UDP = """
import asyncio

async def handle_udp(request):
    await asyncio.sleep(0.001)

def handle_tcp(request):
    return "slowudp"
"""


def records(path) -> list[bytes]:
    if not path.exists():
        return []
    raw, out = path.read_bytes(), []
    while raw:
        n = int.from_bytes(raw[:4], "big")
        out.append(raw[4 : 4 + n])
        raw = raw[4 + n :]
    return out


def test_each_datagram_is_one_request_binary_safe_and_gets_no_reply(modules_dir, make_service):
    write_module(modules_dir, "rec", RECORDER)
    svc = make_service()
    payloads = [b"one", b"two:with:colons", bytes(range(256)), b""]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        for p in payloads:
            sock.sendto(b"rec:" + p, svc.udp)
        wait_until(lambda: len(records(modules_dir / "got.bin")) == 4)
        try:
            reply = sock.recv(100)
        except TimeoutError:
            reply = None
    assert reply is None  # nothing is ever sent back
    assert sorted(records(modules_dir / "got.bin")) == sorted(payloads)


def test_unknown_module_and_raising_handler_are_logged_with_module_and_peer(
    modules_dir, make_service
):
    write_module(modules_dir, "boom", "def handle_udp(request):\n    raise ValueError('bad')\n")
    svc = make_service()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        peer = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.sendto(b"nosuch:x", svc.udp)
        sock.sendto(b"boom:x", svc.udp)
        sock.sendto(b"fail:x", svc.udp)  # no handlers at all
    # Each line is written once its datagram is done with: boom's (a def handler, in the
    # thread pool) may come after fail's.
    for name in ("'nosuch'", "'boom'", "'fail'"):
        svc.wait_for_log(name)
    log = svc.log()
    unknown = next(li for li in log.splitlines() if "'nosuch'" in li)
    assert peer in unknown and "400" in unknown
    boom = next(li for li in log.splitlines() if "'boom'" in li)
    assert peer in boom and "ValueError" in boom
    assert "501" in next(li for li in log.splitlines() if "'fail'" in li)
    wait_until(lambda: svc.stats()["udp"]["received"] == 3)
    assert svc.call(b"test:x") == b"Test"  # still serving


def test_garbage_names_share_one_stats_entry_and_log_lines_stay_short(service):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(200):
            sock.sendto(b"garbage%d:x" % i, service.udp)
        sock.sendto(b"y" * 65000, service.udp)  # no colon: all of it is the module name
    wait_until(lambda: service.stats()["udp"]["received"] >= 201)
    service.wait_for_log("65000 chars")
    modules = service.stats()["modules"]
    assert not [name for name in modules if name.startswith(("garbage", "yyy"))]
    assert modules["(unknown)"]["udp"] == {"requests": 201, "errors": 201}
    long_line = next(li for li in service.log().splitlines() if "65000 chars" in li)
    assert len(long_line) < 400


def test_a_udp_flood_never_stops_tcp_calls(modules_dir, make_service):
    write_module(modules_dir, "slowudp", SLOW_UDP)
    svc = make_service("[limits]\nudp_queue = 200\nudp_workers = 2\n")
    sent = [0, 0]
    stop = threading.Event()

    def flood(slot: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            while not stop.is_set() and sent[slot] < 25_000:
                sock.sendto(b"slowudp:%d" % sent[slot], svc.udp)
                sent[slot] += 1

    floods = [threading.Thread(target=flood, args=(i,)) for i in range(2)]
    for t in floods:
        t.start()
    try:
        answers = [svc.call(b"test:%d" % i, timeout=5) for i in range(100)]
    finally:
        stop.set()
        for t in floods:
            t.join()
    assert answers == [b"Test"] * 100

    # Every datagram the service received is served or counted as dropped, none lost.
    def accounted():
        s = svc.stats()
        served = s["modules"]["slowudp"]["udp"]["requests"]
        return served + s["udp"]["dropped"] == s["udp"]["received"] and s

    udp = wait_until(accounted)["udp"]
    assert udp["dropped"] > 0  # the bounded queue did overflow, and said how much
    assert 0 < udp["received"] <= sum(sent)
    assert "datagram queue full" in svc.log()


def test_unix_datagram_listener(modules_dir, make_service, tmp_path):
    write_module(modules_dir, "rec", RECORDER)
    path = tmp_path / "bg.dgram"
    svc = make_service(
        '[[listen]]\nname = "tcp"\nhost = "127.0.0.1"\nport = 0\n'
        f'[[listen]]\nname = "local"\nunix_dgram = "{path}"\nmode = "0600"\n'
    )
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"rec:over unix", str(path))
    wait_until(lambda: records(modules_dir / "got.bin") == [b"over unix"])
    assert svc.stats()["modules"]["rec"]["unix_dgram"]["requests"] == 1


STUCK_UDP = """
import asyncio

async def handle_udp(request):
    await asyncio.sleep(3600)
"""


def test_shutdown_counts_the_datagrams_it_cuts_and_the_queued_ones_it_drops(
    modules_dir, make_service
):
    # The line counted only the queue: "0 datagrams not served" while it cancelled the
    # handlers still running.
    write_module(modules_dir, "stuck", STUCK_UDP)
    svc = make_service("[limits]\nudp_workers = 2\nshutdown_grace = 0.5\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for n in range(5):
            sock.sendto(b"stuck:%d" % n, svc.udp)
    wait_until(lambda: svc.stats()["udp"]["received"] == 5)
    svc.signal(signal.SIGTERM)
    assert svc.wait(timeout=10) == 0
    assert "5 datagrams not served before shutdown (3 queued, 2 cut while running)" in svc.log()
