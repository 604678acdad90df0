"""The shipped ``log`` module: datagrams in, lines in per-channel files, rotation, drops
counted, the tail over TCP."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServiceProcess, wait_until


def log_stats(svc: ServiceProcess) -> dict[str, Any]:
    stats: dict[str, Any] = svc.stats()["module_stats"]["log"]
    return stats


def settled(svc: ServiceProcess) -> dict[str, Any]:
    """Stats once every datagram the service took in has been written, dropped or rejected."""

    last: list[dict[str, Any]] = []

    def done() -> dict[str, Any] | None:
        full = svc.stats()
        stats = full["module_stats"]["log"]
        udp = full["udp"]
        served = stats["received"] + udp["dropped"]
        accounted = stats["written"] + stats["dropped"] + stats["rejected"] + stats["write_errors"]
        now = {**stats, "udp_received": udp["received"], "udp_dropped": udp["dropped"]}
        # The same twice in a row: datagrams still in the kernel's buffer when the first
        # poll was answered have been read, and counted, by the second.
        if served >= udp["received"] and accounted == stats["received"] and last == [now]:
            return now
        last[:] = [now]
        return None

    result: dict[str, Any] = wait_until(done, timeout=20)
    return result


def lines_of(folder: Path, channel: str) -> list[str]:
    """Every line of a channel, oldest first, rotated files included."""
    files = sorted(folder.glob(f"{channel}.log.*"), key=lambda p: -int(p.suffix[1:]))
    out: list[str] = []
    for path in [*files, folder / f"{channel}.log"]:
        if path.exists():
            out.extend(path.read_text().splitlines())
    return out


@pytest.fixture
def log_service(
    make_service: Callable[..., ServiceProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., ServiceProcess]:
    def start(config: str = "", **env: str) -> ServiceProcess:
        monkeypatch.setenv("BGSERVICE_LOG_DIR", str(tmp_path / "logs"))
        for name, value in env.items():
            monkeypatch.setenv(f"BGSERVICE_LOG_{name.upper()}", value)
        return make_service(config)

    return start


def test_simple_and_structured_messages(log_service, tmp_path: Path) -> None:
    svc = log_service()
    svc.send_udp(b"log:user 7 logged in")
    svc.send_udp(b"log:?channel=payments&level=error:card declined\nsecond line")
    svc.send_udp(b"log:?level=warning:disk 91% full: soon")
    stats = settled(svc)
    assert stats["written"] == 3
    main = (tmp_path / "logs" / "main.log").read_text().splitlines()
    assert [line.split(" ", 2)[1] for line in main] == ["INFO", "WARNING"]
    assert main[0].endswith(" user 7 logged in")
    assert main[1].endswith(" disk 91% full: soon")
    (payment,) = (tmp_path / "logs" / "payments.log").read_text().splitlines()
    assert payment.endswith(" card declined\\nsecond line")
    assert " ERROR 127.0.0.1:" in payment


def test_control_characters_are_written_visibly(log_service, tmp_path: Path) -> None:
    # Only \r and \n were escaped: whoever can send a datagram could clear or recolour
    # the terminal of whoever tails the file (ESC sequences), or hide a line (VT, CR).
    dgram = tmp_path / "log.dgram"
    svc = log_service(f'[[listen]]\nhost = "127.0.0.1"\nport = 0\nunix_dgram = "{dgram}"\n')
    sent = "\x1b[2J\x1b[31mred\x0bvt\x00nul\x07bel\x7fdel\x85nel\x9bcsi\u2028ls\u2029ps"
    svc.send_udp(b"log:" + (sent + "\ttab\rcr\nnl \u00e9 ok\r\n").encode())
    # A Unix datagram sender's peer is its socket's path, which it chose.
    sender = tmp_path / "\x1b[31mevil"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sender))
        sock.sendto(b"log:from a unix socket", str(dgram))
    assert settled(svc)["written"] == 2
    text = (tmp_path / "logs" / "main.log").read_text()
    controls = [c for c in text if (c < " " and c not in "\t\n") or "\x7f" <= c < "\xa0"]
    assert not controls and "\u2028" not in text and "\u2029" not in text, controls
    first, second = text.split("\n")[:2]
    shown = r"\x1b[2J\x1b[31mred\x0bvt\x00nul\x07bel\x7fdel\x85nel\x9bcsi\u2028ls\u2029ps"
    assert first.endswith(" " + shown + "\ttab" + r"\rcr\nnl" + " \u00e9 ok"), first
    assert second.endswith(f" {tmp_path}/\\x1b[31mevil from a unix socket"), second


def test_bad_channels_are_rejected_and_counted(log_service, tmp_path: Path) -> None:
    svc = log_service()
    for bad in (b"../../etc/x", b"a/b", b"", b".hidden", b"x" * 65):
        svc.send_udp(b"log:?channel=" + bad + b":nope")
    svc.send_udp(b"log:?channel=ok&level=shouting:nope")
    svc.send_udp(b"log:?channel=ok:yes")
    stats = settled(svc)
    # An empty channel is "main"; every other bad name or level is refused.
    assert (stats["rejected"], stats["written"]) == (5, 2)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["main.log", "ok.log"]
    assert not list(tmp_path.glob("etc*"))
    assert "rejected" in svc.log()


def test_burst_of_10000_every_line_written(log_service, tmp_path: Path) -> None:
    svc = log_service()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for n in range(10_000):
            sock.sendto(b"log:?channel=burst:message %d" % n, svc.udp)
            # In bursts of 200: more would overflow the socket's kernel buffer (212 KB by
            # default), whose drops no one in the service can see; see the next test.
            if n % 200 == 199:
                wait_until(lambda n=n: svc.stats()["udp"]["received"] > n)
    stats = settled(svc)
    assert stats["udp_received"] == 10_000
    assert (stats["written"], stats["dropped"]) == (10_000, 0)
    got = [line.rsplit(" ", 1)[1] for line in lines_of(tmp_path / "logs", "burst")]
    assert got == [str(n) for n in range(10_000)]  # every line, in order


def test_flood_drops_are_counted_exactly(log_service, tmp_path: Path) -> None:
    svc = log_service(queue="50")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for n in range(10_000):
            sock.sendto(b"log:?channel=flood:message %d" % n, svc.udp)
    assert svc.call(b"test") == b"Test"  # the flood does not stop calls
    stats = settled(svc)
    lines = lines_of(tmp_path / "logs", "flood")
    assert len(lines) == stats["written"]
    assert stats["written"] + stats["dropped"] == stats["received"]
    assert stats["dropped"] > 0
    numbers = [int(line.rsplit(" ", 1)[1]) for line in lines]
    assert numbers == sorted(set(numbers))  # no line twice, none out of order


def test_rotation_by_size(log_service, tmp_path: Path) -> None:
    svc = log_service(max_bytes="2000", backups="3")
    message = b"log:?channel=rot:" + b"x" * 60 + b" %03d"
    for n in range(100):
        svc.send_udp(message % n)
    stats = settled(svc)
    folder = tmp_path / "logs"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["rot.log", "rot.log.1", "rot.log.2", "rot.log.3"]
    assert all(p.stat().st_size <= 2000 for p in folder.iterdir())
    assert stats["rotations"] >= 3
    kept = [int(line.rsplit(" ", 1)[1]) for line in lines_of(folder, "rot")]
    assert kept == list(range(100 - len(kept), 100))  # the newest lines, none missing
    assert len(kept) >= 3 * 2000 // 110


def test_tail_over_tcp(log_service) -> None:
    svc = log_service()
    for n in range(30):
        svc.send_udp(b"log:?channel=app:line %d" % n)
    settled(svc)
    tail = svc.call(b"log:tail?channel=app&lines=3").decode().splitlines()
    assert [line.rsplit(" ", 2)[1:] for line in tail] == [["line", "27"], ["line", "28"],
                                                          ["line", "29"]]  # fmt: skip
    assert svc.call(b"log:tail?channel=nothing").startswith(b"404: ")
    assert svc.call(b"log:tail?channel=../x").startswith(b"400: ")
    assert svc.call(b"log:tail?lines=0").startswith(b"400: ")
    assert svc.call(b"log:hello").startswith(b"400: log over TCP")


@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_a_deleted_or_moved_file_is_reopened(log_service, tmp_path: Path, how: str) -> None:
    svc = log_service()
    folder = tmp_path / "logs"
    svc.send_udp(b"log:before 1")
    settled(svc)
    if how == "deleted":
        (folder / "main.log").unlink()
    else:  # what a logrotate without copytruncate does
        (folder / "main.log").rename(folder / "main-old.txt")
    svc.send_udp(b"log:after 2")
    svc.send_udp(b"log:after 3")
    stats = settled(svc)
    assert [line.split(" ", 3)[3] for line in lines_of(folder, "main")] == ["after 2", "after 3"]
    assert (stats["written"], stats["reopened"]) == (3, 1)
    tail = svc.call(b"log:tail?lines=5").decode().splitlines()
    assert [line.split(" ", 3)[3] for line in tail] == ["after 2", "after 3"]
    if how == "moved":
        assert (folder / "main-old.txt").read_text().endswith(" before 1\n")
    assert "was deleted or moved away" in svc.log()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("queue", "0"), ("queue", "-5"), ("max_bytes", "0"), ("backups", "-1"), ("backups", "x")],
)
def test_a_bad_setting_fails_the_module_naming_its_variable(
    log_service, variable: str, value: str
) -> None:
    # BGSERVICE_LOG_QUEUE=0 made the queue unbounded (queue.Queue(0)): nothing was ever
    # dropped, as the docs promise; the others took any int. The module does not load.
    svc = log_service(**{variable: value})
    name = f"BGSERVICE_LOG_{variable.upper()}"
    (log,) = [m for m in json.loads(svc.call(b"service:modules")) if m["name"] == "log"]
    assert name in (log["error"] or ""), log
    assert f"{name}={value!r}: must be a whole number" in svc.log()
    reply = svc.call(b"log:tail")  # what every call to it answers, and why
    assert reply.startswith(b"502: Module log failed to load") and name.encode() in reply


def test_a_file_emptied_by_copytruncate_is_not_rotated_at_once(log_service, tmp_path: Path) -> None:
    # logrotate's copytruncate empties the file under the writer's O_APPEND handle, whose
    # offset stays the old size until its next write: the emptied file was rotated at
    # once, leaving an empty main.log.1 and pushing a real backup out.
    svc = log_service(max_bytes="2000")
    folder = tmp_path / "logs"
    for n in range(13):
        svc.send_udp(b"log:line %03d " % n + b"y" * 80)
    settled(svc)
    assert 1500 < (folder / "main.log").stat().st_size <= 2000
    shutil.copy(folder / "main.log", folder / "main.log.copied")  # what copytruncate does
    os.truncate(folder / "main.log", 0)
    svc.send_udp(b"log:after the truncate " + b"z" * 400)
    stats = settled(svc)
    assert (stats["written"], stats["rotations"]) == (14, 0)
    assert not (folder / "main.log.1").exists()
    (line,) = (folder / "main.log").read_text().splitlines()
    assert line.endswith(" after the truncate " + "z" * 400)


NOT_WRITTEN = (
    r"log: cannot write (\d+) lines to .*?(?: \((\d+) more lines not written since the last"
    r" line\))?$|log: (\d+) more lines not written"
)


def _not_written(log: str) -> tuple[int, int]:
    """(the log's lines about lines the writer could not write, the lines they count)."""
    said = re.findall(NOT_WRITTEN, log, re.M)
    return len(said), sum(int(n or 0) for found in said for n in found)


def test_write_errors_are_logged_at_most_once_per_interval_with_counts(
    log_service, tmp_path: Path
) -> None:
    # One ERROR line per write pass that failed (a channel on a full disk: a line per
    # datagram), where a rejected datagram got at most one line every 5 s.
    svc = log_service()
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "full.log").symlink_to("/dev/full")  # every write fails with ENOSPC
    started = time.monotonic()
    for n in range(20):
        svc.send_udp(b"log:?channel=full:message %d" % n)
        # (its own write pass each: the writer waits for the next datagram)
        wait_until(lambda n=n: log_stats(svc)["write_errors"] == n + 1)
    elapsed = time.monotonic() - started
    # The first failure at once, the rest counted and said when the next line is due.
    wait_until(lambda: _not_written(svc.log())[1] == 20, timeout=15)
    lines, _ = _not_written(svc.log())
    assert lines <= 2 + elapsed / 5, svc.log()  # (20 before: one per datagram)
    assert "No space left on device" in svc.log()
    assert settled(svc)["write_errors"] == 20


def test_level_aliases_and_unknown_options(log_service, tmp_path: Path) -> None:
    svc = log_service()
    for level in (b"warn", b"err", b"CRIT", b"emerg", b"warning"):
        svc.send_udp(b"log:?level=" + level + b":as " + level)
    # A mistyped option was ignored: the message went to main, unnoticed.
    svc.send_udp(b"log:?chanel=payments:misrouted")
    stats = settled(svc)
    assert (stats["written"], stats["rejected"]) == (5, 1)
    levels = [line.split(" ", 2)[1] for line in lines_of(tmp_path / "logs", "main")]
    assert levels == ["WARNING", "ERROR", "CRITICAL", "EMERGENCY", "WARNING"]
    assert "misrouted" not in (tmp_path / "logs" / "main.log").read_text()
    assert "rejected: unknown option 'chanel' (options: channel, level)" in svc.log()
    # Over TCP, the reply says what was wrong and what is taken.
    assert svc.call(b"log:tail?chanel=payments") == (
        b"400: log:tail: unknown option 'chanel' (options: channel, lines)"
    )
    for bad in (b"abc", b"0", b"10001", b"-1", b"1.5"):
        reply = svc.call(b"log:tail?lines=" + bad)
        assert reply == b"400: log:tail: lines must be a whole number, 1-10000: got '%s'" % bad
    assert len(svc.call(b"log:tail?lines=2").splitlines()) == 2


def test_new_channels_past_the_limit_are_rejected_and_counted(log_service, tmp_path: Path) -> None:
    # Found by a security review: any sender made a file per datagram (3,000 datagrams,
    # 3,000 files), each allowed MAX_BYTES x (1 + BACKUPS) of disk.
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "old.log").write_text("from before\n")  # a channel of an earlier run: counted
    svc = log_service(channels="3")
    for n in range(6):
        svc.send_udp(b"log:?channel=c%d:x" % n)
    svc.send_udp(b"log:?channel=old:kept")
    stats = settled(svc)
    assert (stats["written"], stats["rejected"]) == (3, 4)
    assert sorted(p.name for p in folder.iterdir()) == ["c0.log", "c1.log", "old.log"]
    assert lines_of(folder, "old")[-1].endswith(" kept")
    svc.wait_for_log("a new channel 'c2', but there are 3 ($BGSERVICE_LOG_CHANNELS)")
