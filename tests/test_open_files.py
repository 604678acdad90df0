"""The limit on open files (bgservice.open_files), against a real service started as a
shell or systemd would start it, with a low soft limit: raised to the hard one, so the
connections [limits] max_connections allows are taken, and a hard limit too low for them
said at the start."""

from __future__ import annotations

import resource
import socket
from pathlib import Path

from tests.conftest import ServiceProcess


def open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files line")


def test_a_low_soft_limit_is_raised_so_connections_past_it_are_served(tmp_path):
    # Found by a security review: with ulimit -Sn 256 (the hard limit 20000), 300 idle
    # connections made every new one reset by the failed accept (EMFILE), with no 503
    # and no line, long before max_connections (1024).
    svc = ServiceProcess(tmp_path, "")
    svc.rlimits[resource.RLIMIT_NOFILE] = (256, 4096)
    svc.start()
    held: list[socket.socket] = []
    try:
        assert open_files(svc.proc.pid) == (4096, 4096)
        for _ in range(300):
            held.append(socket.create_connection(svc.tcp, timeout=5))
        assert svc.call(b"test:x") == b"Test"
        assert "open files: at most" not in svc.log()
    finally:
        for sock in held:
            sock.close()
        svc.stop()


def test_a_hard_limit_below_what_the_listeners_may_hold_is_a_warning(tmp_path):
    svc = ServiceProcess(tmp_path, "[limits]\nmax_connections = 500\n")
    svc.rlimits[resource.RLIMIT_NOFILE] = (300, 400)
    svc.start()
    try:
        assert open_files(svc.proc.pid) == (400, 400)
        # One TCP listener (its UDP twin takes no connections): 500 + 256 spare.
        svc.wait_for_log("open files: at most 400 (ulimit -n), but [limits] max_connections "
                         "500 on every listener may need 756")  # fmt: skip
        assert svc.call(b"test:x") == b"Test"
    finally:
        svc.stop()
