"""The allow list."""

from __future__ import annotations

import ipaddress
import socket

from bgservice.access import AccessList
from tests.conftest import recv_all

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


def test_an_ipv4_mapped_entry_admits_its_ipv4_peer_on_a_real_listener(make_service):
    # Found by a security review: peers are checked as IPv4, so an entry written as
    # ::ffff:127.0.0.1 never matched anyone; it is read as 127.0.0.1 now.
    svc = make_service('[[listen]]\nhost = "0.0.0.0"\nport = 0\n', start=False)
    svc.config.write_text('allow = ["::ffff:127.0.0.1/128"]\n' + svc.config.read_text())
    svc.start()
    assert svc.call(b"test:x") == b"Test"  # from 127.0.0.1
    with socket.socket() as outsider:
        outsider.settimeout(10)
        outsider.bind(("127.0.0.2", 0))
        outsider.connect(svc.tcp)
        outsider.sendall(b"test:x")
        outsider.shutdown(socket.SHUT_WR)
        assert recv_all(outsider).startswith(b"403")
    assert "(allow 127.0.0.1/32)" in svc.log()
