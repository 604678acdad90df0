"""The service's console output (bgservice/logs.py, and a worker's in process_main.py),
as an operator's journal gets it: standard output is not a terminal there and nothing
sets PYTHONUNBUFFERED."""

from __future__ import annotations

import shutil

import pytest
from conftest import wait_until, write_module

PRINTS = """
{execution}

def handle_tcp(request):
    print("printed by " + request.text)
    return "ok"
"""


@pytest.mark.parametrize("execution", ["", 'EXECUTION = "process"'], ids=["service", "worker"])
def test_a_modules_print_reaches_the_log_as_it_is_made(modules_dir, make_service, execution):
    # Block-buffered, it waited for 8 KB of output: in the service, or its next log line,
    # so a quiet service showed it minutes late; in a worker process, the worker's exit,
    # and a worker killed at a timeout lost it.
    write_module(modules_dir, "printer", PRINTS.format(execution=execution))
    svc = make_service(start=False)
    svc.env.pop("PYTHONUNBUFFERED", None)
    svc.start()
    assert svc.call(b"printer:a request") == b"ok"
    svc.wait_for_log("printed by a request")


def test_a_log_file_that_cannot_be_reopened_breaks_nothing(make_service, tmp_path):
    # Its folder removed, the reopen raised into whatever logged: with -v every request
    # was answered with 0 bytes, and SIGTERM ended in tracebacks and exit 1.
    folder = tmp_path / "logs"
    svc = make_service('[log]\nfile = "logs/bg.log"\n', "-v")
    shutil.rmtree(folder)
    assert svc.call(b"test:x") == b"Test"
    assert svc.call(b"nosuch:x") == b"400: Unknown request"  # a warning logged
    assert svc.log().count("cannot reopen the log file") == 1  # once, on stderr
    folder.mkdir()  # back: the next line reopens it
    assert svc.call(b"test:y") == b"Test"
    wait_until(lambda: "'test'" in (folder / "bg.log").read_text())  # -v's request line
    assert svc.stop() == 0
    assert "Traceback" not in svc.log() and "reopened" in svc.log()


def test_a_log_file_that_cannot_be_written_says_so_once_then_what_was_lost(make_service, tmp_path):
    # On a full disk each line logged went to logging's handleError: a 54-line
    # "--- Logging error ---" traceback on stderr per line (912 lines for two calls with
    # -v), which under systemd floods the journal.
    link = tmp_path / "bg.log"
    link.symlink_to("/dev/full")  # every write fails with ENOSPC
    svc = make_service("", "-v", "--log-file", str(link))
    for n in range(5):
        assert svc.call(b"test:%d" % n) == b"Test"
    assert svc.log().count("cannot write to the log file") == 1
    assert "No space left on device" in svc.log()
    # The disk freed: the link now names a file that can be written; the next line is.
    real = tmp_path / "real.log"
    (tmp_path / "new-link").symlink_to(real)
    (tmp_path / "new-link").replace(link)
    assert svc.call(b"test:after") == b"Test"
    svc.wait_for_log("lines lost while it could not be written")
    lost = int(svc.log().split(" reopened: ")[1].split()[0])
    assert lost >= 10  # a -v line per call at least, and the start's lines
    wait_until(lambda: "'test'" in real.read_text())
    assert svc.stop() == 0
    assert "Logging error" not in svc.log() and "Traceback" not in svc.log()
    assert svc.log().count("cannot write to the log file") == 1
