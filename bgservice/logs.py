"""Logging set-up, called once by the CLI (never at import time).

The console log goes to standard output, as the original's did: coloured by coloredlogs
on a terminal, plain lines otherwise (journald, pipes, files). ``log_file`` adds a file
written through ``WatchedFileHandler``, so logrotate can move it away at any time.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

import coloredlogs

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATE = "%Y-%m-%d %H:%M:%S"


def setup(verbose: bool = False, log_file: Path | None = None) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    if sys.stdout.isatty():
        coloredlogs.install(level=level, fmt=FORMAT, datefmt=DATE, stream=sys.stdout)
    else:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter(FORMAT, DATE))
        root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(FORMAT, DATE))
        root.addHandler(file_handler)
    # Third-party chatter stays out of -v: it is about their internals, not requests.
    for noisy in ("watchdog", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.INFO)


class Sparse:
    """One kind of event a flood of which must not flood the log (refused peers, dropped
    datagrams): counted, with a line due at most every ``every`` seconds, saying how many
    came since the last one."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last = float("-inf")  # when the last line was due (the caller's clock)
        self._count = 0

    def tick(self, now: float) -> int:
        """Count one; how many since the last line if a line is due now, else 0."""
        self._count += 1
        if now - self._last < self.every:
            return 0
        self._last, count, self._count = now, self._count, 0
        return count
