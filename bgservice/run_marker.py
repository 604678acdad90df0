"""A file that says "this service is running", removed by a clean stop (emptied, where its
folder was made read-only meanwhile): found at start with what a run writes in it, it means
the last run ended by a crash, ``kill -9`` or a power cut (issue 19, item 9).

It lives next to the job database (``DB.running``), so it is found by the next start of
the same service. It holds the process id and start time, and the running service holds
it locked (``flock``) for as long as it runs: the kernel lets go of the lock when the
process ends, however it ends, so a marker nobody holds is a run that did not stop
cleanly. (Its process id proved nothing: after a reboot, or once the crashed process was
reaped, the number belongs to some other process.) A marker another live instance holds
(several sharing a folder, Redis engine) is left to it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UncleanStop:
    """What the marker left by the last run says."""

    pid: int | None
    started: float | None


class RunMarker:
    def __init__(self, db: Path) -> None:
        self.path = db.with_name(db.name + ".running")
        self._fd: int | None = None  # the marker, open and locked while we run

    def claim(self) -> UncleanStop | None:
        """Lock and write our marker; return what a previous run left, if it did not
        stop cleanly. Another live instance's marker is left alone (None)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # (as the db: its user's)
        except OSError as exc:  # a read-only folder must not stop the service
            log.warning("cannot write %s (%s): unclean stops go unnoticed", self.path, exc)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.info("%s belongs to another instance running from this folder: this one's "
                     "unclean stops go unnoticed", self.path)  # fmt: skip
            return None
        self._fd = fd
        previous = _parse(os.read(fd, 65536))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode(), 0)
        return previous

    def release(self) -> None:
        """A clean stop: the next start finds no marker, or an empty one (which says the
        same) where its folder no longer lets it be removed (made read-only meanwhile)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            self._empty(exc)
        finally:
            os.close(self._fd)  # (unlocks)
            self._fd = None

    def _empty(self, exc: OSError) -> None:
        assert self._fd is not None
        try:  # (the file is open for writing still, whatever its folder allows now)
            os.ftruncate(self._fd, 0)
        except OSError as again:
            log.warning("cannot remove %s (%s) nor empty it (%s): the next start will report "
                        "an unclean stop, though this one was clean", self.path, exc,
                        again)  # fmt: skip
            return
        log.warning("cannot remove %s (%s): emptied instead, which the next start takes "
                    "for a clean stop, as this one was", self.path, exc)  # fmt: skip


def _parse(raw: bytes) -> UncleanStop | None:
    if not raw:
        return None  # none, or made by a start that died before writing it
    try:
        data = json.loads(raw)
        return UncleanStop(int(data["pid"]), float(data["started"]))
    except (ValueError, KeyError, TypeError):
        return UncleanStop(None, None)  # cut short by the crash itself
