"""Repeated requests for a module that does not exist: a mistyped job or call name in a
deploy, worth an alert (issue 19, item 9), unlike a single stray datagram.

Counted per name in one-minute windows. Memory is bounded: at most ``NAMES`` names are
tracked, the least recently seen forgotten first, so a flood of random names (UDP
garbage) costs a fixed amount and still raises no alert for any one of them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from bgservice.events import UNKNOWN_MODULE_BURST, Events
from bgservice.logs import Sparse
from bgservice.origin import Origin

log = logging.getLogger(__name__)

WINDOW = 60.0  # seconds
BURST = 10  # requests for the same unknown name within WINDOW that raise the event
NAMES = 1000  # names tracked at once
NAME_CHARS = 100  # a name is kept (and reported) cut to this


class UnknownNames:
    def __init__(self, events: Events) -> None:
        self.events = events
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()  # window start, n
        # A call for a mistyped name answered "400: Unknown request" and the log said
        # nothing: now a line, at most one a WINDOW (a flood of names is counted in it).
        # (Datagrams' failures have their lines: dispatch.py.)
        self._said = Sparse(WINDOW)

    def seen(self, name: str, origin: Origin) -> None:
        """Count one request for ``name``; emit once per window when it reaches BURST.
        A request answered (not a datagram) is named in the log too."""
        name = name[:NAME_CHARS]
        now = time.monotonic()
        start, count = self._seen.pop(name, (now, 0))
        if now - start >= WINDOW:
            start, count = now, 0
        count += 1
        self._seen[name] = (start, count)
        if not origin.is_datagram and (lines := self._said.tick(now)):
            more = f" ({lines - 1} more since the last line)" if lines > 1 else ""
            # (Origin.QUEUE: a job refused at its add, from a client or the HTTP API.)
            how = "a job" if origin is Origin.QUEUE else f"a request over {origin.transport}"
            log.info("unknown module %r, %s: 400 Unknown request%s", name, how, more)
        while len(self._seen) > NAMES:
            self._seen.popitem(last=False)
        if count == BURST:
            self.events.emit(
                UNKNOWN_MODULE_BURST,
                title=f"{BURST} requests for unknown module {name!r} within "
                f"{WINDOW:g} s (last over {origin.transport})",
                name=name,
            )
