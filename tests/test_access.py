"""The allow list."""

from __future__ import annotations

import ipaddress

from bgservice.access import AccessList

NETS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


def test_loopback_listeners_are_open():
    for host in ("127.0.0.1", "::1", "localhost", None):
        assert AccessList.for_host(host, NETS).networks is None


def test_other_listeners_enforce_the_list():
    access = AccessList.for_host("0.0.0.0", NETS)
    assert access.allows("10.1.2.3")
    assert access.allows("::ffff:10.1.2.3")  # IPv4-mapped
    assert access.allows("2001:db8::1")
    assert not access.allows("127.0.0.1")
    assert not access.allows("192.0.2.1")
    assert not access.allows(None)
    assert not access.allows("not-an-address")
