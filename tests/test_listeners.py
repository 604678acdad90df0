"""``serve``'s listeners from the command line and the config: an empty ``--host`` is
refused as the file's empty host is, and a Unix socket path too long for a socket address
says so."""

from __future__ import annotations

import pytest

from tests.conftest import wait_until


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
