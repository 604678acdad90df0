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

    # What follows from the origin, computed once per member: read on every request, and
    # an enum property costs a descriptor call each time.
    is_datagram: bool  # fire-and-forget: nothing is sent back, handle_udp runs
    handler: str  # which handler of a module serves it: "udp" or "tcp"
    accepts: str  # the ACCEPTS entry a module needs for it: "tcp", "udp" or "queue"
    alerted: bool  # a module failing it is worth a "call" alert at once
    transport: str  # the name modules see as request.transport (the value)
    direct: bool  # a caller's own request (a listener's), governed by a module's CALL_FROM

    def __init__(self, value: str) -> None:
        self.is_datagram = value in ("udp", "unix_dgram")
        self.handler = "udp" if self.is_datagram else "tcp"
        self.accepts = "queue" if value == "queue" else self.handler
        # A queued job alerts once it has failed for good; an alert's own failure never
        # raises another.
        self.alerted = value not in ("queue", "alert")
        self.transport = value
        self.direct = value in ("tcp", "unix", "udp", "unix_dgram")


def peer_address(host: str, port: int) -> str:
    """A network peer as ``request.peer`` and sources show it: ``host:port``, an IPv6 host
    in brackets as URLs write it (``[::1]:50312``; ``::1:50312`` read either way)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
