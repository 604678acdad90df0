"""Live views: ``bgservice top`` (running jobs with their progress, waiting counts and the
request rate), and ``queue get``'s progress bar (``follow``).

On a terminal it redraws in place every ``interval`` seconds (the alternate screen, as
top(1) uses, so the shell's screen comes back on Ctrl-C); on one that takes no escape
sequences (TERM=dumb or unset) it prints plain screens one after another; elsewhere, or
with ``once``, it prints one screen and exits. The rate needs two readings of
``service:stats``, so even one screen takes ``interval`` seconds.

A service lost while the live view runs (a restart, a deploy) is a screen of its own,
retried every interval until it answers again: the view is there when it comes back. One
down at the start is not retried (exit 3, as every command): a wrong -a would wait forever.
A reply longer than --max-reply-bytes is no outage: it ends top, at any screen, as it ends
every command (exit 5, naming the option to raise).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import click

from bgservice.cli_format import top_lines
from bgservice.client import Client, ClientTimeout, ReplyError, ReplyTooLarge, ServiceDown

INTERRUPTED = 130  # the exit code of a Ctrl-C, as a shell reports SIGINT (cli_client's too)
WAITING_LISTED = 500  # waiting jobs fetched to count per module; the total comes from stats
PLAIN_HEIGHT = 1000  # lines a printed screen is cut to: nothing is redrawn over it
ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"  # alternate screen, cursor
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
NOT_ANSWERING = (ServiceDown, ClientTimeout)  # what a service restarting or stuck raises
STOPPING = 503  # the reply to a request that came as the service began to stop
# The client's message is a line on its own; the screen says why in a word, from the
# socket's error (the client raises "from None", which hides it but keeps it).
WHY = (
    (ConnectionRefusedError, "refused"),
    (FileNotFoundError, "no socket"),
    (TimeoutError, "timeout"),
    (ConnectionError, "lost"),
)


@dataclass(frozen=True)
class Reading:
    """``service:stats`` at one moment, with how many requests top itself had sent."""

    at: float
    requests: int
    own: int


@dataclass(frozen=True)
class Lost:
    """A service that stopped answering the live view: since when, and why in a word."""

    since: float
    why: str


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
        try:
            stats, rate = self.read_stats()
            return {"address": self.address, "stats": stats, "rate": rate, **self._queue()}
        except Exception:  # a service back from a restart counts from 0 again: the next
            self._last = None  # reading has no rate, as the first has none
            raise

    def _queue(self) -> dict[str, Any]:
        """The queue's part of the screen; a queue that cannot answer (its Redis away: a
        503 of its own) is said on it, the rest of the screen still shown."""
        try:
            return {
                "queue_stats": self._call("queue_stats"),
                "running": self._call("list", "running").get("running", []),
                "waiting": self._call("list", "waiting", WAITING_LISTED).get("waiting", []),
            }
        except ReplyError as exc:
            if exc.code != STOPPING or _stopping(exc):
                raise
            return {"queue_stats": {"unavailable": str(exc)}, "running": [], "waiting": []}


def _stopping(exc: ReplyError) -> bool:  # the 503 of a service that began to stop
    return exc.code == STOPPING and str(exc).startswith("Shutting down")


def _why(exc: BaseException) -> str:
    if isinstance(exc, ClientTimeout):
        return "timeout"
    if isinstance(exc, ReplyError) or isinstance(exc.__cause__, ReplyError):
        return "stopping"  # (a 503 Shutting down comes as a ServiceDown caused by it)
    cause = exc.__context__
    return next((word for kind, word in WHY if isinstance(cause, kind)), "down")


def lost_lines(address: str, lost: Lost, interval: float, now: float) -> list[str]:
    """The screen of a service that stopped answering, until it answers again."""
    return [
        f"bgservice {address}   {time.strftime('%H:%M:%S', time.localtime(now))}",
        "",
        f"the service at {address} is not answering "
        f"(since {time.strftime('%H:%M:%S', time.localtime(lost.since))}, {lost.why})",
        f"retrying every {interval:g} s; Ctrl-C quits",
    ]


def once(watcher: Watcher, interval: float, out: TextIO) -> None:
    """One plain screen: for a pipe, a log, or a look without the live view."""
    watcher.read_stats()
    time.sleep(interval)
    size = shutil.get_terminal_size((100, PLAIN_HEIGHT))
    out.write("\n".join(top_lines(watcher.view(), time.time(), size.columns, PLAIN_HEIGHT)))
    out.write("\n")


class Screen:
    """Where the live view's screens go: redrawn in place, each line cleared to its end,
    then all below it, so a shorter screen leaves nothing of the last one. A terminal
    that takes no escape sequences (TERM=dumb or unset: an emacs shell buffer, some CI
    consoles) would show them as garbage: there the screens are printed one after
    another, a blank line between."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.plain = os.environ.get("TERM", "") in ("", "dumb")
        self.shown = 0

    def size(self) -> tuple[int, int]:
        size = shutil.get_terminal_size()
        # Redrawn: one line short of the terminal, as the newline after the last would
        # scroll it. Printed: nothing is drawn over, so as long as --once's.
        return size.columns, PLAIN_HEIGHT if self.plain else size.lines - 1

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def enter(self) -> None:
        if not self.plain:
            self._write(ENTER)

    def show(self, lines: list[str]) -> None:
        if self.plain:
            self._write("\n" * bool(self.shown) + "".join(f"{line}\n" for line in lines))
        else:
            self._write(HOME + "".join(f"{line}{CLEAR_LINE}\r\n" for line in lines) + CLEAR_BELOW)
        self.shown += 1

    def leave(self) -> None:
        if not self.plain:
            self._write(LEAVE)


View = dict[str, Any] | Lost  # what a screen shows: a reading, or why there is none


def _reading(watcher: Watcher, last: View) -> View:
    """The next reading, or the outage it is part of: dated from when its first failed
    reading was asked (the time a restart began), with the latest error (refused while it
    starts, say). A reply longer than --max-reply-bytes (the waiting list grown) is no
    outage: it ends top as it ends every command, saying the option to raise (exit 5),
    where the screen said "not answering (down)" of a service that answered, for ever."""
    asked = time.time()  # (a stopped service answers only at the timeout: since then)
    try:
        return watcher.view()
    except ReplyTooLarge:  # (a ServiceDown to the client: its connection is closed)
        raise
    except (*NOT_ANSWERING, ReplyError) as exc:
        if isinstance(exc, ReplyError) and not _stopping(exc):
            raise  # any other error reply: as every command, exit 1
        return Lost(last.since if isinstance(last, Lost) else asked, _why(exc))


def _lines(address: str, view: View, interval: float, size: tuple[int, int]) -> list[str]:
    width, height = size
    now = time.time()
    if isinstance(view, Lost):
        return [line[:width] for line in lost_lines(address, view, interval, now)][:height]
    return top_lines(view, now, width, height)


def live(watcher: Watcher, interval: float, out: TextIO) -> None:
    """The live view until Ctrl-C. The first reading fails as any command's would (exit 3
    for a service down at the start); a service lost after it is retried every interval."""
    screen = Screen(out)
    view: View = watcher.view()
    screen.enter()
    try:
        while True:
            screen.show(_lines(watcher.address, view, interval, screen.size()))
            time.sleep(interval)
            view = _reading(watcher, view)
    except KeyboardInterrupt:  # how top is quit: no message, but the 130 of every
        raise SystemExit(INTERRUPTED) from None  # command's Ctrl-C, which scripts check
    finally:
        screen.leave()


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
