"""UDP and Unix datagrams end to end: one datagram one request, never a reply, floods."""

from __future__ import annotations

import os
import re
import signal
import socket
import tempfile
import threading
import time

import pytest

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
        # no colon: all of it is the module name (first: the lines after it are counted)
        sock.sendto(b"y" * 65000, service.udp)
        for i in range(200):
            sock.sendto(b"garbage%d:x" % i, service.udp)
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


# --- a module's backlog is its own (DatagramQueue) -----------------------------------

# Waits (in a task) until the test lets it go: its datagrams take every udp_workers slot
# and fill the queue for as long as the test likes.
HELD = """
import asyncio
from pathlib import Path

async def handle_udp(request):
    here = Path(__file__).parent
    while not (here / "release").exists():
        await asyncio.sleep(0.02)
    with open(here / "held.txt", "a") as f:
        f.write(request.text + "\\n")
"""
QUICK = """
from pathlib import Path

async def handle_udp(request):  # never waits: served in datagram_received
    with open(Path(__file__).with_name("quick.txt"), "a") as f:
        f.write(request.text + "\\n")
"""
NAPS = """
import asyncio
from pathlib import Path

async def handle_udp(request):  # waits a moment: needs a task
    await asyncio.sleep(0.01)
    with open(Path(__file__).with_name("naps.txt"), "a") as f:
        f.write(request.text + "\\n")
"""


def _lines(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_modules_backlog_delays_and_drops_only_its_own_datagrams(modules_dir, make_service):
    # The queue was one for all: a module that waited filled it, and every other module's
    # datagrams (logging!) queued behind its backlog, and were dropped with it.
    for name, source in (("held", HELD), ("quick", QUICK), ("naps", NAPS)):
        write_module(modules_dir, name, source)
    svc = make_service("[limits]\nudp_workers = 1\nudp_queue = 5\n")
    for n in range(10):  # 1 runs, 5 queue, 4 dropped
        svc.send_udp(b"held:%d" % n)
    wait_until(lambda: svc.stats()["udp"]["dropped"] == 4)
    for n in range(3):  # needs no wait: served at once, backlog or not
        svc.send_udp(b"quick:%d" % n)
    wait_until(lambda: _lines(modules_dir / "quick.txt") == ["0", "1", "2"])
    # Needs a task: the first, not known to, starts at once (a task past udp_workers);
    # the next queues in held's place (held's newest goes) and is served in turn.
    svc.send_udp(b"naps:0")
    wait_until(lambda: _lines(modules_dir / "naps.txt") == ["0"])
    svc.send_udp(b"naps:1")
    wait_until(lambda: svc.stats()["udp"]["dropped"] == 5)
    # While every slot is taken the backlog waits without a turn of the loop each
    # iteration (that kept a core busy for as long as it lasted).
    assert svc.proc is not None
    before = _cpu_seconds(svc.proc.pid)
    time.sleep(2)
    assert _cpu_seconds(svc.proc.pid) - before < 0.5
    (modules_dir / "release").touch()
    wait_until(lambda: len(_lines(modules_dir / "held.txt")) == 5)
    assert _lines(modules_dir / "held.txt") == ["0", "1", "2", "3", "4"]  # in order
    wait_until(lambda: _lines(modules_dir / "naps.txt") == ["0", "1"])
    # Every drop is told: the first at once, those after it when the next line is due
    # (they were told only with a drop 5 s later, so a flood's end never was).
    told = lambda: sum(map(int, re.findall(r"dropped (\d+) datagrams", svc.log())))  # noqa: E731
    wait_until(lambda: told() == 5, timeout=15)


PEER = """
from pathlib import Path

def handle_udp(request):
    Path(__file__).with_name("peer.txt").write_text(f"{request.peer!r} {request.source!r}")
"""


def test_unix_datagram_peers_are_strings_and_cut_datagrams_are_refused(modules_dir, make_service):
    # An abstract sender's address was the raw bytes, NUL-padded (a module's peer.startswith
    # raised); and a datagram longer than the loop reads (256,000 bytes) was served cut.
    write_module(modules_dir, "peer", PEER)
    with tempfile.TemporaryDirectory(prefix="bgs-", dir="/tmp") as folder:
        dgram = f"{folder}/bg.dgram"
        svc = make_service(f'[[listen]]\nhost = "127.0.0.1"\nport = 0\nunix_dgram = "{dgram}"\n')
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0bgtest-sender")
            sock.sendto(b"peer:x", dgram)
            wait_until((modules_dir / "peer.txt").exists)
            assert (modules_dir / "peer.txt").read_text() == (
                "'@bgtest-sender' 'unix_dgram:@bgtest-sender'"
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20)
            try:
                sock.sendto(b"peer:" + b"y" * 300_000, dgram)
            except OSError as exc:  # a kernel that will not send it: nothing to check
                pytest.skip(f"the kernel refused a 300 KB datagram: {exc}")
        wait_until(lambda: svc.stats()["refused"].get("datagram_too_large") == 1)
        svc.wait_for_log("refused a datagram from @bgtest-sender of 256000 bytes or more")
        assert "y" not in (modules_dir / "peer.txt").read_text()


def test_a_flood_of_failing_datagrams_is_a_few_log_lines_that_count_it(
    modules_dir, make_service
):
    # A line per datagram, each with a traceback for a handler that raises (two with -v):
    # 20,000 datagrams for a mistyped module were 20,000 warnings.
    write_module(modules_dir, "boom", "def handle_udp(request):\n    raise ValueError('no')\n")
    svc = make_service("", "-v")
    for _ in range(50):
        svc.send_udp(b"nosuch:x")
        svc.send_udp(b"boom:x")
    wait_until(lambda: svc.stats()["udp"]["received"] >= 100)
    told = {"nosuch": r"module 'nosuch' failed: 400", "boom": r"module 'boom' failed: 500"}
    counted = {
        "nosuch": r"(\d+) more datagrams for unknown modules failed with 400",
        "boom": r"(\d+) more datagrams for module 'boom' failed with 500",
    }

    def all_told() -> bool:
        log = svc.log()
        return all(
            len(re.findall(told[m], log))
            + sum(int(n) - 1 for n in re.findall(told[m] + r".*\((\d+) more like it", log))
            + sum(map(int, re.findall(counted[m], log)))
            == 50
            for m in told
        )

    wait_until(all_told, timeout=20)  # every one counted, in a few lines
    log = svc.log()
    assert len(re.findall(told["nosuch"], log)) <= 3 and len(re.findall(told["boom"], log)) <= 3
    assert log.count("ValueError: no") <= 3  # the traceback, not fifty (nor a hundred)
