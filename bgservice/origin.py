"""Where a request came from, and what that means for how it is served.

One name per idea: a request's ``Origin`` is the listener kind it arrived on (or the part of
the service that made it); ``Origin.handler`` says which of a module's handlers serves it and
``Origin.accepts`` which ``ACCEPTS`` entry lets it in. Modules see ``origin.value`` as
``request.transport``, the string the first release documented.
"""

from __future__ import annotations

import enum


class Origin(enum.Enum):
    TCP = "tcp"
    UNIX = "unix"  # a Unix stream socket: served exactly as TCP
    UDP = "udp"
    UNIX_DGRAM = "unix_dgram"  # a Unix datagram socket: served exactly as UDP
    QUEUE = "queue"  # a queued job's run
    ALERT = "alert"  # an alert handed to [alerts] module

    @property
    def is_datagram(self) -> bool:
        """Fire-and-forget: nothing is sent back, and the module's ``handle_udp`` runs."""
        return self is Origin.UDP or self is Origin.UNIX_DGRAM

    @property
    def handler(self) -> str:
        """Which handler of a module serves it: ``udp`` (handle_udp) or ``tcp`` (handle_tcp)."""
        return "udp" if self.is_datagram else "tcp"

    @property
    def accepts(self) -> str:
        """The ``ACCEPTS`` entry a module needs for it: ``tcp``, ``udp`` or ``queue``."""
        return "queue" if self is Origin.QUEUE else self.handler

    @property
    def alerted(self) -> bool:
        """A module failing it is worth a ``call`` alert at once (a queued job alerts once
        it has failed for good; an alert's own failure never raises another)."""
        return self is not Origin.QUEUE and self is not Origin.ALERT
