"""``serve``'s listeners from the command line and the config: an empty ``--host`` is
refused as the file's empty host is, a Unix socket path too long for a socket address
says so, and another service's live socket is never taken for a dead one's."""

from __future__ import annotations

import grp
import os
import socket
import stat

import pytest

from tests.conftest import wait_until, write_module


def test_an_empty_host_option_is_a_usage_error(make_service):
    # It put TCP on every interface (0.0.0.0) and UDP on 127.0.0.1.
    for host in ("", " "):
        svc = make_service("", "--host", host, start=False)
        svc.start(wait=False)
        wait_until(svc._ready_or_dead, timeout=20)
        assert svc.proc is not None and svc.proc.poll() == 2, svc.log()
        out = svc.log()
        assert "Invalid value for '--host'" in out and "not empty" in out, out
        assert not svc.ready_file.exists()
        svc.stop()


@pytest.mark.parametrize("kind", ["unix", "unix_dgram"])
def test_a_unix_path_too_long_says_so(make_service, tmp_path, kind):
    # unix_dgram said "...sock: None" (exc.strerror of Python's own refusal), unix
    # "AF_UNIX path too long".
    path = tmp_path / ("x" * 120 + ".sock")
    svc = make_service(f'[[listen]]\nname = "long"\n{kind} = "{path}"\n', start=False)
    svc.start(wait=False)
    assert svc.wait() == 1
    out = svc.log()
    size = len(str(path).encode())
    assert f"cannot listen on {kind}:{path}: the path is {size} bytes, longer than" in out, out
    assert "use a shorter path" in out and ": None" not in out and "Traceback" not in out


@pytest.mark.parametrize(
    ("kind", "live"), [("unix_dgram", socket.SOCK_STREAM), ("unix", socket.SOCK_DGRAM)]
)
def test_a_live_socket_of_the_other_type_is_not_taken_for_stale(make_service, tmp_path, kind, live):
    # The probe's "Protocol wrong type for socket" was taken for a dead service's file:
    # the start deleted the other service's live socket and took its path.
    path = tmp_path / "bg.sock"
    with socket.socket(socket.AF_UNIX, live) as other:
        other.bind(str(path))
        if live == socket.SOCK_STREAM:
            other.listen()
        inode = path.stat().st_ino
        svc = make_service(f'[[listen]]\nname = "u"\n{kind} = "{path}"\n', start=False)
        svc.start(wait=False)
        assert svc.wait() == 1
        assert f"cannot listen on {path}: another service is using it" in svc.log(), svc.log()
        assert path.exists() and path.stat().st_ino == inode  # still the other service's


def test_unix_sockets_are_given_the_configured_group(make_service, tmp_path):
    # PHP-FPM as www-data could not connect under mode 660: the socket files were the
    # service's own group, and the unit's SupplementaryGroups= does not change that.
    other = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    stream, dgram = tmp_path / "bg.sock", tmp_path / "bg.dgram"
    svc = make_service(f'[[listen]]\nname = "local"\nunix = "{stream}"\nunix_dgram = "{dgram}"\n'
                       f'group = "{other.gr_name}"\n')  # fmt: skip
    for path in (stream, dgram):
        assert path.stat().st_gid == other.gr_gid, path
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert svc.proc is not None and svc.proc.poll() is None
    missing = make_service('[[listen]]\nunix = "x.sock"\ngroup = "no-such-group-here"\n',
                           start=False)  # fmt: skip
    missing.start(wait=False)
    assert missing.wait() == 2
    assert "no group named 'no-such-group-here' on this host" in missing.log()


def test_on_an_ipv6_address_udp_takes_ipv6_peers_only_as_tcp_does(make_service):
    # On "::" TCP was IPv6 only (asyncio sets IPV6_V6ONLY) and UDP took IPv4 peers too:
    # "a TCP socket and a UDP socket on the same address and port" served different peers.
    svc = make_service('[[listen]]\nname = "v6"\nhost = "::"\nport = 0\n')
    port = svc.udp[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4:
        v4.sendto(b"test:over ipv4", ("127.0.0.1", port))  # refused, as TCP's connect is
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as v6:
        v6.sendto(b"test:over ipv6", ("::1", port))
    wait_until(lambda: svc.stats()["udp"]["received"] >= 1)
    assert svc.stats()["udp"]["received"] == 1  # (in order: the IPv4 one came first)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", svc.tcp[1]), timeout=5).close()


WHOAMI = """
CALL_FROM = {RULE}

def handle_tcp(request):
    return f"{request.peer} {request.source}"

def handle_udp(request):
    seen.append(request.source)

seen = []

def stats():
    return seen
"""


def test_ipv6_peers_are_written_in_brackets_and_rules_take_both_forms(make_service, modules_dir):
    # '::1:56593': where the host ends and the port begins was for the reader to guess.
    # CALL_FROM rules written for that form ("tcp:::1") still admit.
    for name, rule in (("old", '{"tcp:::1"}'), ("new", '{"tcp:[::1]", "udp:[::1]"}'),
                       ("other", '{"tcp:[::2]"}'), ("kind", '{"tcp"}')):  # fmt: skip
        write_module(modules_dir, name, WHOAMI.replace("{RULE}", rule))
    svc = make_service('[[listen]]\nname = "v6"\nhost = "::1"\nport = 0\n')
    port = svc.tcp[1]
    assert f"listener v6: tcp://[::1]:{port} udp://[::1]:{port}" in svc.log()
    peer, source = svc.call(b"new:x").decode().split()
    assert peer.startswith("[::1]:") and source == f"tcp:{peer}"
    old_peer, old_source = svc.call(b"old:x").decode().split()  # admitted: "tcp:::1"
    assert old_peer.startswith("[::1]:") and old_source == f"tcp:{old_peer}"
    assert svc.call(b"kind:x").decode().split()[1].startswith("tcp:[::1]:")  # its kind
    refused = svc.call(b"other:x")
    assert refused.startswith(b"403: module other: call only from tcp:[::2] (source tcp:[::1]:")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as v6:
        v6.sendto(b"new:over ipv6", ("::1", port))
    wait_until(lambda: svc.stats()["module_stats"].get("new"))
    [seen] = svc.stats()["module_stats"]["new"]
    assert seen.startswith("udp:[::1]:")
