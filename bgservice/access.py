"""Who may talk to a listener: the ``allow`` list of networks, checked per peer."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from bgservice.config import Network


class AccessList:
    """Allows a peer when its address lies in one of ``networks``.

    A listener bound to loopback only ever sees local peers, so it gets an open list; a
    listener bound anywhere else enforces ``allow`` on every connection and datagram.
    IPv4-mapped IPv6 peers (``::ffff:10.0.0.1``) are checked as IPv4.
    """

    def __init__(self, networks: Sequence[Network] | None) -> None:
        self.networks = tuple(networks) if networks is not None else None
        self.allows = lru_cache(maxsize=4096)(self._allows)

    @classmethod
    def for_host(cls, host: str | None, allow: Sequence[Network]) -> AccessList:
        if host in (None, "localhost"):
            return cls(None)
        try:
            if ipaddress.ip_address(host).is_loopback:
                return cls(None)
        except ValueError:
            pass  # a host name that is not loopback: enforce the list
        return cls(allow)

    def _allows(self, address: str | None) -> bool:
        if self.networks is None:
            return True
        if address is None:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)
