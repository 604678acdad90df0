"""The service's console output (bgservice/logs.py, and a worker's in process_main.py),
as an operator's journal gets it: standard output is not a terminal there and nothing
sets PYTHONUNBUFFERED."""

from __future__ import annotations

import pytest
from conftest import write_module

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
