"""Live views: ``bgservice top`` (running jobs with their progress, waiting counts and the
request rate), and ``queue get``'s progress bar (``follow``).

On a terminal it redraws in place every ``interval`` seconds (the alternate screen, as
top(1) uses, so the shell's screen comes back on Ctrl-C); elsewhere, or with ``once``, it
prints one screen and exits. The rate needs two readings of ``service:stats``, so even one
screen takes ``interval`` seconds.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import click

from bgservice.cli_format import top_lines
from bgservice.client import Client

INTERRUPTED = 130  # the exit code of a Ctrl-C, as a shell reports SIGINT (cli_client's too)
WAITING_LISTED = 500  # waiting jobs fetched to count per module; the total comes from stats
ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"  # alternate screen, cursor
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


@dataclass(frozen=True)
class Reading:
    """``service:stats`` at one moment, with how many requests top itself had sent."""

    at: float
    requests: int
    own: int


class Watcher:
    """Reads what one screen shows, counting its own requests so they are not in the rate
    (each refresh sends four, which would read as 4/s on an idle service)."""

    def __init__(self, client: Client, address: str) -> None:
        self.client = client
        self.address = address
        self._sent = 0
        self._last: Reading | None = None

    def _call(self, method: str, *args: Any) -> Any:
        self._sent += 1
        return getattr(self.client, method)(*args)

    def read_stats(self) -> tuple[dict[str, Any], float | None]:
        """The stats and the requests per second since the previous reading."""
        stats = self._call("stats")
        now = Reading(time.monotonic(), int(stats.get("requests", 0)), self._sent)
        rate = None
        if self._last is not None and now.at > self._last.at:
            others = now.requests - self._last.requests - (now.own - self._last.own)
            rate = max(others, 0) / (now.at - self._last.at)
        self._last = now
        return stats, rate

    def view(self) -> dict[str, Any]:
        stats, rate = self.read_stats()
        return {
            "address": self.address,
            "stats": stats,
            "rate": rate,
            "queue_stats": self._call("queue_stats"),
            "running": self._call("list", "running").get("running", []),
            "waiting": self._call("list", "waiting", WAITING_LISTED).get("waiting", []),
        }


def _screen(watcher: Watcher) -> list[str]:
    size = shutil.get_terminal_size()
    # One line short of the terminal: the newline after the last would scroll it.
    return top_lines(watcher.view(), time.time(), size.columns, size.lines - 1)


def once(watcher: Watcher, interval: float, out: TextIO) -> None:
    """One plain screen: for a pipe, a log, or a look without the live view."""
    watcher.read_stats()
    time.sleep(interval)
    size = shutil.get_terminal_size((100, 1000))
    out.write("\n".join(top_lines(watcher.view(), time.time(), size.columns, 1000)) + "\n")


def live(watcher: Watcher, interval: float, out: TextIO) -> None:
    """Redraw in place until Ctrl-C; each line cleared to its end, then all below it, so
    a shorter screen leaves nothing of the last one."""
    out.write(ENTER)
    try:
        while True:
            lines = _screen(watcher)
            out.write(HOME + "".join(f"{line}{CLEAR_LINE}\r\n" for line in lines) + CLEAR_BELOW)
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:  # how top is quit: no message, but the 130 of every
        raise SystemExit(INTERRUPTED) from None  # command's Ctrl-C, which scripts check
    finally:
        out.write(LEAVE)
        out.flush()


def follow(client: Client, job: int, deadline: float) -> None:
    """A live progress bar from queue:status until the job has finished or ``deadline``
    (polled four times a second: a display, not a wait; the result itself comes from
    queue:get)."""
    status = client.status(job)  # first: a service down or a job unknown is said alone
    with click.progressbar(length=1000, label=f"job {job}", file=sys.stderr) as bar:
        shown = 0
        while time.monotonic() < deadline:
            progress = status.get("progress") or {}
            if progress.get("total"):
                done = int(1000 * min(progress["done"] / progress["total"], 1.0))
                bar.label = f"job {job}: {progress.get('message') or status['state']}"
                bar.update(done - shown)
                shown = done
            if status["state"] not in ("waiting", "running"):
                bar.update(1000 - shown)
                return
            time.sleep(0.25)
            status = client.status(job)
