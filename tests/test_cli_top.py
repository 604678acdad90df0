"""``bgservice top``'s live view on a real pseudo-terminal, against a real service: a
service lost and back, a terminal that takes no escape sequences, a service down at the
start. (Its one screen, for a pipe or --once, is tested in test_cli.py.)"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest

from tests.conftest import HOG, REPO, wait_until, write_module
from tests.test_cli import _free_port, bg

LEAVE = b"\x1b[?25h\x1b[?1049l"  # the shell's screen back, the cursor shown
NOT_ANSWERING = rb"the service at [\d.]+:(\d+) is not answering \(since \d\d:\d\d:\d\d, (\w+)\)"


class Terminal:
    """``bgservice top ARGS`` on a pseudo-terminal of its own, what it writes read as it
    comes; ended with Ctrl-C (SIGINT) as a person ends it."""

    def __init__(self, address: str, *args: str, term: str | None = "xterm") -> None:
        main, side = pty.openpty()
        env = {**os.environ, "BGSERVICE_ADDRESS": address, "COLUMNS": "100", "LINES": "30"}
        env.pop("TERM", None)
        if term is not None:
            env["TERM"] = term
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "service.py"), "top", *args],
            stdin=side,
            stdout=side,
            stderr=subprocess.PIPE,
            env=env,
            # The tests may run with SIGINT ignored (a shell's background job), which the
            # child would inherit: Ctrl-C would not reach Python (see test_cli._interrupted).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        os.close(side)
        self.main = main
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):  # EIO once the terminal's last writer is gone
            while chunk := os.read(self.main, 65536):
                self.chunks.append(chunk)

    @property
    def output(self) -> bytes:
        return b"".join(self.chunks)

    def wait_for(self, pattern: bytes, after: int = 0, count: int = 1) -> int:
        """Wait until ``pattern`` was written ``count`` times past ``after``; where the
        last one begins."""

        def found() -> list[re.Match[bytes]]:
            matches = list(re.finditer(pattern, self.output[after:]))
            if len(matches) >= count:
                return matches
            if self.proc.poll() is not None:  # it will write nothing more: say why at once
                assert self.proc.stderr is not None
                err = self.proc.stderr.read()
                raise AssertionError(f"top exited {self.proc.returncode}: {err!r}")
            return []

        return after + wait_until(found, timeout=30)[count - 1].start()

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, interrupt: bool = True) -> tuple[int, bytes]:
        """Its exit code and stderr (after a Ctrl-C if ``interrupt``); all it wrote read."""
        if interrupt:
            self.proc.send_signal(signal.SIGINT)
        err = self.proc.communicate(timeout=30)[1]
        self.reader.join(timeout=10)
        return self.proc.returncode, err

    def close(self) -> None:
        if self.running():
            self.proc.kill()
        self.proc.wait()
        self.reader.join(timeout=10)
        os.close(self.main)


@contextlib.contextmanager
def top(address: str, *args: str, term: str | None = "xterm") -> Any:
    terminal = Terminal(address, *args, term=term)
    try:
        yield terminal
    finally:
        terminal.close()


def _on_port(port: int) -> str:
    """A listener on a fixed port, so that the service started again is where top looks."""
    return f'[[listen]]\nname = "test"\nhost = "127.0.0.1"\nport = {port}\n'


def test_top_waits_for_a_service_restarted_under_it(make_service):
    # It exited 3 ("service down") when the service went away under the live view (a
    # restart by systemd, a deploy): the view was gone when the operator wanted it.
    port = _free_port()
    svc = make_service(_on_port(port))
    with top(f"127.0.0.1:{port}", "-n", "0.2") as view:
        view.wait_for(rb"requests \d")  # a screen with a rate: two readings done
        assert svc.stop() == 0
        lost = view.wait_for(NOT_ANSWERING)
        assert view.running(), view.output[-400:]
        what = re.search(NOT_ANSWERING, view.output[lost:])
        assert what is not None and int(what[1]) == port, view.output[lost:]
        view.wait_for(NOT_ANSWERING, after=lost, count=2)  # retried, still there
        assert view.running()
        svc.start()
        last_lost = max(m.start() for m in re.finditer(NOT_ANSWERING, view.output))
        back = view.wait_for(rb"requests (\S+) ", after=last_lost, count=2)
        rates = re.findall(rb"requests (\S+) ", view.output[last_lost : back + 20])
        # The service's counters restarted: the first reading after has no rate ("-"),
        # as at the start, not one across the gap; the next has one again.
        assert rates[0] == b"-" and re.fullmatch(rb"\d+\.\d/s", rates[1]), rates
        returncode, err = view.finish()
    assert (returncode, err) == (130, b""), err
    assert view.output.endswith(LEAVE), view.output[-80:]


def test_top_waits_for_a_service_too_busy_to_answer(modules_dir, make_service):
    # A reply not within -t (a service whose loop is blocked) exited 4 the same way.
    write_module(modules_dir, "hog", HOG)
    svc = make_service()
    host, port = svc.tcp
    with top(f"{host}:{port}", "-n", "0.2", "-t", "2") as view:
        first = view.wait_for(rb"requests \d")
        hog = subprocess.Popen(
            [sys.executable, str(REPO / "service.py"), "-a", f"{host}:{port}", "call", "hog", "6"],
            stdout=subprocess.PIPE,
        )
        try:
            lost = view.wait_for(NOT_ANSWERING, after=first)
            what = re.search(NOT_ANSWERING, view.output[lost:])
            assert what is not None and what[2] == b"timeout", what
            assert view.running()
            assert hog.communicate(timeout=60)[0] == b"done"
        finally:
            hog.kill()
            hog.wait()
        view.wait_for(rb"requests \S+ ", after=lost, count=2)  # the normal screen back
        returncode, err = view.finish()
    assert (returncode, err) == (130, b""), err


@pytest.mark.parametrize("term", ["dumb", None])
def test_top_on_a_dumb_terminal_prints_plain_screens(service, term):
    # It drew with the alternate screen and cursor sequences, which a terminal without
    # them (an emacs shell buffer, TERM=dumb; or no TERM at all) shows as garbage.
    host, port = service.tcp
    with top(f"{host}:{port}", "-n", "0.2", term=term) as view:
        view.wait_for(rb"waiting: ", count=3)
        returncode, err = view.finish()
    assert (returncode, err) == (130, b""), err
    assert b"\x1b" not in view.output, view.output[:200]
    text = view.output.decode().replace("\r\n", "\n")  # (the terminal's own line ends)
    screens = text.split("\nbgservice ")
    assert text.startswith(f"bgservice {host}:{port}") and len(screens) >= 3, text
    for screen in screens[:-1]:  # each ends with a blank line before the next
        assert screen.endswith("waiting: none\n"), screen


def test_top_with_the_service_down_at_the_start_fails_at_once(tmp_path):
    # A wrong -a must not sit there retrying: only a service lost after the first
    # screen is waited for. The terminal is left as it was (no screen switched to).
    address = f"127.0.0.1:{_free_port()}"
    with top(address, "-n", "0.2") as view:
        returncode, err = view.finish(interrupt=False)
    assert returncode == 3 and err.startswith(b"bgservice: service down: "), err
    assert view.output == b"", view.output
    for args in (("top", "--once", "-n", "0.2"), ("top", "-n", "0.2")):  # --once, a pipe
        reply = bg(None, *args, address=address)
        assert reply.returncode == 3 and b"service down" in reply.stderr, (args, reply)


def test_top_says_a_queue_whose_redis_is_away_apart_from_a_service_down(tmp_path, own_redis):
    # Found by review: with the Redis engine and Redis stopped, queue:stats answers
    # "503: Queue unavailable", which top took for the service stopping: "not answering
    # (stopping)" for as long as Redis was away, while the service answered.
    from tests.conftest import ServiceProcess, redis_config

    redis = own_redis
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(redis.url, "top"))
    try:
        svc.start()
        host, port = svc.tcp
        with top(f"{host}:{port}", "-n", "0.2") as view:
            view.wait_for(rb"jobs: 0 running on \d+ workers")
            redis.stop()
            view.wait_for(rb"jobs: queue unavailable \(Queue unavailable")
            assert re.search(NOT_ANSWERING, view.output) is None
            assert view.running() and view.finish()[0] == 130
    finally:
        svc.stop()


def test_top_says_a_reply_too_large_and_the_option_to_raise(service):
    # Found by review: a reply over --max-reply-bytes after the first screen (the waiting
    # list grown) was taken for the service down: "not answering (..., down)", retried
    # for ever, while the service answered. Every other command says "reply too large".
    host, port = service.tcp
    with top(f"{host}:{port}", "-n", "0.2", "--max-reply-bytes", "4000") as view:
        view.wait_for(rb"requests \d")  # screens within the limit
        name = b"n" * 150  # (each waiting job's line in queue:list is about 600 bytes)
        for _ in range(10):
            assert service.call(b"queue:add?delay=3600&name=%s:echo:x" % name).startswith(b"id:")
        wait_until(lambda: not view.running() or re.search(NOT_ANSWERING, view.output))
        assert re.search(NOT_ANSWERING, view.output) is None, view.output[-400:]
        returncode, err = view.finish(interrupt=False)
    assert returncode == 5, err
    assert err.startswith(b"bgservice: reply too large: "), err
    assert b"more than --max-reply-bytes 4000" in err, err
    assert view.output.endswith(LEAVE), view.output[-80:]
