"""Logging set-up, called once by the CLI (never at import time).

The console log goes to standard output, as the original's did: coloured by coloredlogs
on a terminal, plain lines otherwise (journald, pipes, files), each line as it is written
(a module's ``print`` too). ``log_file`` adds a file written through
``WatchedFileHandler``, so logrotate can move it away at any time; a file that cannot
be reopened (its folder removed) or written (a full disk) never breaks the code that
logged, and is said once on stderr, not once per line.
"""

from __future__ import annotations

import asyncio
import io
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import coloredlogs

from bgservice.errors import ConfigError

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATE = "%Y-%m-%d %H:%M:%S"


def setup(verbose: bool = False, log_file: Path | None = None, named: str = "log file") -> None:
    """Log to standard output, and to ``log_file`` if given. A file that cannot be opened
    for appending (a folder, no permission) is a ``ConfigError`` naming it as ``named``
    (the option or key it came from), raised before any handler is changed."""
    file_handler = _file_handler(log_file, named) if log_file is not None else None
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    # A module's print() shares standard output with the log: each line goes out as it is
    # printed, not when 8 KB have gathered (journald, a pipe or a file is block-buffered).
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    if sys.stdout.isatty():
        coloredlogs.install(level=level, fmt=FORMAT, datefmt=DATE, stream=sys.stdout)
    else:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter(FORMAT, DATE))
        root.addHandler(console)
    if file_handler is not None:
        root.addHandler(file_handler)
    # Third-party chatter stays out of -v: it is about their internals, not requests.
    for noisy in ("watchdog", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.INFO)



def same_file(a: TextIO, b: TextIO) -> bool:
    """``a`` and ``b`` write to one file (one terminal, one pipe, or 2>&1): what is said
    on both would be read twice. True if either cannot tell (closed, no descriptor)."""
    try:
        one, two = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError):
        return True
    return (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)

def _file_handler(path: Path, named: str) -> logging.Handler:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{named} {path}: cannot create its folder: {exc.strerror or exc}"
        ) from None
    try:
        handler = _ReopenedFile(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{named} {path}: cannot write to it: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter(FORMAT, DATE))
    return handler


class _ReopenedFile(logging.handlers.WatchedFileHandler):
    """A ``WatchedFileHandler`` whose failures never reach the code that logged, nor
    flood stderr. Python's reopens outside ``handleError``, so a removed folder made every
    log call raise (requests answered with nothing, the stop a traceback); and a write
    that fails (a full disk) went to ``handleError``, a 50-line traceback on stderr per
    line logged. Here the first failure is one line on stderr (the console still gets
    every line), the lines that cannot be written are counted, and each later line tries
    again, as the folder may come back or the disk be freed: the first that gets written
    says how many were lost."""

    lost = 0  # lines dropped since the file last failed

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
        except Exception:  # a record that cannot be formatted: Python's report, as ever
            self.handleError(record)
            return
        try:
            self._reopen()
        except OSError as exc:
            self._lose("cannot reopen", exc)
            return
        stream = self.stream
        assert stream is not None
        try:
            stream.write(text)
            stream.flush()
        except OSError as exc:
            self._drop(stream)
            self._lose("cannot write to", exc)
            return
        if self.lost:
            self._say(f"log file {self.baseFilename} reopened: {self._lost()} while it could "
                      "not be written")  # fmt: skip

    def _reopen(self) -> None:
        self.reopenIfNeeded()
        if self.stream is None:  # the last reopen or write failed: try again
            self.stream = self._open()
            self._statstream()

    def _drop(self, stream: io.TextIOWrapper) -> None:
        """Close the stream a write failed on, its buffered rest thrown away (a line
        counted as lost must not be written later), so the next line opens it again."""
        self.stream = None  # (as Python's own reopen does)
        try:
            stream.close()  # (its flush fails again; the file is closed all the same)
        except OSError:
            pass

    def _lose(self, doing: str, exc: OSError) -> None:
        self.lost += 1
        if self.lost == 1:
            self._say(f"{doing} the log file {self.baseFilename}: {exc.strerror or exc}; "
                      "its lines are dropped, and counted, until one can be written")  # fmt: skip

    def close(self) -> None:
        super().close()
        if self.lost:  # a stop while it was failing: still said
            self._say(f"log file {self.baseFilename}: {self._lost()}: it could not be written")

    def _lost(self) -> str:
        """How many lines were lost, said once: the count starts again."""
        count, self.lost = self.lost, 0
        return f"{count} line{'' if count == 1 else 's'} lost"

    @staticmethod
    def _say(text: str) -> None:
        try:
            print(f"bgservice: {text}", file=sys.stderr)
        except (OSError, ValueError):  # no stderr left to say it on
            pass


class Sparse:
    """One kind of event a flood of which must not flood the log (refused peers, dropped
    datagrams): counted, with a line due at most every ``every`` seconds, saying how many
    came since the last one. With ``later``, what came after a line is said
    (``later(count)``) when the next line falls due, so a flood's end is never unsaid (it
    was, until another event came, maybe never)."""

    def __init__(self, every: float, later: Callable[[int], None] | None = None) -> None:
        self.every = every
        self._last = float("-inf")  # when the last line was due (the caller's clock)
        self._count = 0
        self._later = later
        self._pending: asyncio.TimerHandle | None = None  # later's call, when one is due

    def tick(self, now: float) -> int:
        """Count one; how many since the last line if a line is due now, else 0."""
        self._count += 1
        if now - self._last < self.every:
            if self._later is not None and self._pending is None:
                wait = self._last + self.every - now
                self._pending = asyncio.get_running_loop().call_later(wait, self._say_later)
            return 0
        self._last, count, self._count = now, self._count, 0
        return count

    def _say_later(self) -> None:
        # (time.monotonic: the callers' clock, or the loop's, which counts from the same)
        self._pending = None
        if self._count and self._later is not None:
            self._last, count, self._count = time.monotonic(), self._count, 0
            self._later(count)
