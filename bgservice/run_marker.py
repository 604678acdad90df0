"""A file that says "this service is running", removed by a clean stop: found at start,
it means the last run ended by a crash, ``kill -9`` or a power cut (issue 19, item 9).

It lives next to the job database (``DB.running``), so it is found by the next start of
the same service. It holds the process id and start time; a marker whose process is
still alive belongs to another instance sharing the folder (Redis engine), not to a
crashed one.
"""

from __future__ import annotations

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

    def claim(self) -> UncleanStop | None:
        """Write our marker; return what a previous run left, if it did not stop cleanly."""
        previous = self._read()
        try:
            self.path.write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))
        except OSError as exc:  # a read-only folder must not stop the service
            log.warning("cannot write %s (%s): unclean stops go unnoticed", self.path, exc)
        return previous

    def release(self) -> None:
        """A clean stop: the next start finds no marker. Not one that another instance
        sharing the folder (Redis engine) has written since: its crash must show."""
        try:
            if json.loads(self.path.read_text()).get("pid") not in (os.getpid(), None):
                return
        except (OSError, ValueError, AttributeError):
            pass
        self.path.unlink(missing_ok=True)

    def _read(self) -> UncleanStop | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read %s: %s", self.path, exc)
            return None
        try:
            data = json.loads(text)
            pid, started = int(data["pid"]), float(data["started"])
        except (ValueError, KeyError, TypeError):
            return UncleanStop(None, None)  # cut short by the crash itself
        if pid != os.getpid() and _alive(pid):
            return None  # another instance's, running now
        return UncleanStop(pid, started)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
