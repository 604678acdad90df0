"""Who may talk to a listener: the ``allow`` list of networks, checked per peer."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """One entry of ``allow``. Host bits set are taken off, as a router's ACL takes them
    ("192.168.1.7/24": that host's /24; the start and ``--check`` show the list as
    read). ``::ffff:A.B.C.D`` is read as A.B.C.D, as peers are (AccessList): written as
    IPv6, it never matched anyone."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"holds an invalid network: {exc}") from None
    mapped = net.network_address.ipv4_mapped if net.version == 6 else None
    if mapped is not None and net.prefixlen >= 96:
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


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
