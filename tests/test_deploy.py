"""deploy/: the systemd unit as systemd reads it, and the service's side of it.

No systemd runs the service here (a container has none as PID 1), so each promise of the
unit is checked where it can be: ``systemd-analyze verify`` reads the unit as systemd
would, and the unit's own command line, started with a real ``NOTIFY_SOCKET``, must
tell systemd it is ready only once it serves (``Type=notify``: otherwise ``systemctl
start`` hangs until it times out and kills it), and that it is stopping at SIGTERM.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import REPO, ServiceProcess, wait_until

UNIT = REPO / "deploy" / "bgservice.service"
INSTALLED = "/opt/bgservice"  # where the unit's install steps put the checkout


def _unit_value(key: str) -> str:
    for line in UNIT.read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1]
    raise AssertionError(f"no {key}= in {UNIT}")


def _here(text: str) -> str:
    """The unit's paths into this checkout's: its .venv is where scripts/install.sh put
    the service (the tests run with its python)."""
    return text.replace(f"{INSTALLED}/.venv/bin", str(Path(sys.executable).parent))


def _verify(analyze: str, folder: Path, text: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of a unit file with ``text``, written into ``folder``."""
    unit = folder / "bgservice.service"
    unit.write_text(text)
    return subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=60,
    )


def test_systemd_reads_the_unit_without_a_complaint(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("BGSERVICE_TEST_STRICT"):
            pytest.fail("systemd-analyze is missing (scripts/install.sh --test installs it)")
        pytest.skip("needs systemd-analyze")
    done = _verify(analyze, tmp_path, _here(UNIT.read_text()))
    # verify exits 0 on an unknown key or a bad value too; its complaints are the test.
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr + done.stdout


def test_a_mistyped_key_is_a_complaint_the_check_above_sees(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze")
    done = _verify(
        analyze, tmp_path, _here(UNIT.read_text()).replace("NotifyAccess=", "NotifyAcess=")
    )
    assert "NotifyAcess" in done.stderr


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_the_units_command_tells_systemd_it_is_ready_once_it_serves_and_when_it_stops(
    tmp_path: Path, abstract: bool
) -> None:
    assert _unit_value("Type") == "notify"
    command = shlex.split(_here(_unit_value("ExecStart")))
    assert Path(command[0]).exists(), f"{command[0]}: the unit's ExecStart is not installed"
    config = ServiceProcess(tmp_path).config  # a config of the tests' own, port 0
    command = [config.as_posix() if a == "/etc/bgservice/service.config" else a for a in command]
    ready_file = tmp_path / "ready.json"

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:  # systemd's own NOTIFY_SOCKET may be in the abstract namespace
        name = f"@bgservice-test-{uuid.uuid4().hex}"
        notify.bind("\0" + name[1:])
    else:
        name = str(tmp_path / "notify")
        notify.bind(name)
    notify.settimeout(30)
    env = {
        **os.environ,
        "PATH": _here(_unit_value("Environment").removeprefix("PATH=")),
        "NOTIFY_SOCKET": name,
    }
    log = (tmp_path / "service.log").open("wb")
    proc = subprocess.Popen(
        [*command, "--ready-file", str(ready_file)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
    )
    try:
        assert notify.recv(4096) == b"READY=1"
        # Ready means serving: a call made the moment systemd hears it is answered.
        host, port = json.loads(ready_file.read_text())["listeners"][0]["tcp"]
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"echo:ready")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b"ready"
        proc.send_signal(signal.SIGTERM)  # systemctl stop
        assert notify.recv(4096) == b"STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        log.close()
    assert "could not notify" not in (tmp_path / "service.log").read_text()


def test_a_configuration_error_exits_2_which_the_unit_does_not_restart(tmp_path: Path) -> None:
    assert _unit_value("RestartPreventExitStatus") == "2"
    svc = ServiceProcess(tmp_path, "[limits]\nread_timeout = -1\n")
    svc.start(wait=False)
    assert svc.wait() == 2
    wait_until(lambda: "read_timeout" in svc.log())


def test_the_shipped_log_module_writes_into_the_units_logs_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under ProtectSystem=strict only the unit's own directories are writable: the log
    # module wrote beside the modules folder (/etc/bgservice/logs), read-only, and lost
    # every line ("Read-only file system"; a newcomer's review, with the folder mounted
    # read-only). The unit points it at LogsDirectory=, and the module must go there.
    environment = dict(
        line.split("=", 2)[1:] for line in UNIT.read_text().splitlines()
        if line.startswith("Environment=")
    )  # fmt: skip
    assert environment.get("BGSERVICE_LOG_DIR") == f"/var/log/{_unit_value('LogsDirectory')}"
    logs = tmp_path / "var-log-bgservice"
    logs.mkdir()
    monkeypatch.setenv("BGSERVICE_LOG_DIR", str(logs))
    svc = ServiceProcess(tmp_path).start()
    try:
        svc.send_udp(b"log:?channel=app&level=error:disk full")
        wait_until(lambda: "disk full" in (logs / "app.log").read_text()
                   if (logs / "app.log").exists() else False)  # fmt: skip
        assert not (svc.modules.parent / "logs").exists()
    finally:
        svc.stop()
