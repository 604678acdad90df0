"""Connection deadlines on shared timers: the connections due within the same slot of
``RESOLUTION`` seconds wait on one loop timer together.

A connection's read deadline is armed when it is made and, for the original's one-shot
clients, given up a moment later when its request came whole in its first read. A loop
timer of its own for that cost about a fifth of the Python work per such connection
(profiled: 4.3 of 20.5 us of a one-shot request, uvloop's timer handle made and
cancelled). In a slot, arming is a set insertion and giving up a set removal; the slot's
one timer fires even if all its connections left (it is never cancelled: at high
connection rates a slot empties and fills again many times before it is due).

A deadline fires at most ``RESOLUTION`` late, never early (docs/protocol.md, "Limits").
"""

from __future__ import annotations

import asyncio
from typing import Protocol

RESOLUTION = 0.01  # seconds


class Deadlined(Protocol):
    def deadline_passed(self) -> None: ...


class Deadlines:
    """The pending deadlines of every stream connection of one service."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, set[Deadlined]] = {}

    def arm(self, owner: Deadlined, due: float) -> int:
        """Call ``owner.deadline_passed()`` once loop time ``due`` has passed; returns
        the slot, for ``cancel``."""
        slot = self.slot(due)
        owners = self._slots.get(slot)
        if owners is None:
            owners = self._slots[slot] = set()
            self._loop.call_at(slot * RESOLUTION, self._fire, slot)
        owners.add(owner)
        return slot

    def cancel(self, owner: Deadlined, slot: int) -> None:
        owners = self._slots.get(slot)
        if owners is not None:
            owners.discard(owner)

    @staticmethod
    def slot(due: float) -> int:
        """The slot a deadline of ``due`` goes in: it fires at its end, never before
        ``due`` (later slots fire later)."""
        return int(due / RESOLUTION) + 1

    def _fire(self, slot: int) -> None:
        for owner in self._slots.pop(slot, ()):
            try:
                owner.deadline_passed()
            except Exception as exc:  # a bug of ours: the slot's other connections go on
                self._loop.call_exception_handler(
                    {"message": "error at a connection's deadline", "exception": exc}
                )
