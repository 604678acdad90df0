"""The original's hook names (UExecute, TExecute, Unload): refused, naming the Python one."""

from __future__ import annotations

import time

from bgservice.porting import original_hooks_problem
from tests.conftest import REPO, wait_until, write_module

# A module as a porter's first try might leave it: the original's names, kept verbatim.
ORIGINAL_NAMES = """
def TExecute(parts, client):
    client.write(parts[1].upper())

def UExecute(parts):
    pass
"""

PORTED = """
def handle_tcp(request):
    return request.text.upper()

def handle_udp(request):
    pass
"""


def test_each_original_name_is_named_with_its_python_name() -> None:
    problem = original_hooks_problem({"UExecute": 1, "TExecute": 1, "Unload": 1})
    assert problem is not None
    for old, new in (("UExecute", "handle_udp"), ("TExecute", "handle_tcp"), ("Unload", "unload")):
        assert f"{old} is the original's hook name: define {new}(" in problem


def test_a_module_that_also_has_the_python_name_is_left_alone() -> None:
    assert original_hooks_problem({"handle_tcp": 1, "TExecute": 1}) is None
    assert original_hooks_problem({"handle_tcp": 1, "unload": 1}) is None


def test_a_service_refuses_the_original_names_and_says_what_to_rename(modules_dir, make_service):
    write_module(modules_dir, "shout", ORIGINAL_NAMES)
    write_module(modules_dir, "tidy", "def handle_tcp(request):\n    return 'ok'\n"
                 "def Unload():\n    pass\n")  # fmt: skip
    svc = make_service()
    reply = svc.call(b"shout:hello")
    assert reply.startswith(b"502: Module shout failed to load")
    assert b"TExecute is the original's hook name: define handle_tcp(request)" in reply
    lines = [li for li in svc.log().splitlines() if "failed to load" in li]
    shout = next(li for li in lines if "module shout" in li)
    assert "UExecute is the original's hook name: define handle_udp(request)" in shout
    tidy = next(li for li in lines if "module tidy" in li)
    assert "Unload is the original's hook name: define unload() instead" in tidy
    # Renamed as the line says, the module loads and serves.
    write_module(modules_dir, "shout", PORTED)
    wait_until(lambda: svc.call(b"shout:hello") == b"HELLO")


def test_the_port_in_docs_modules_md_runs(modules_dir, make_service):
    """The Python column of docs/modules.md's side-by-side port, taken from the page."""
    page = (REPO / "docs" / "modules.md").read_text()
    source = page.split("```python\n# modules/registersession.py\n")[1].split("```")[0]
    write_module(modules_dir, "registersession", source)
    svc = make_service()
    assert svc.call(b"registersession:abc123") == b"404: Unknown session"
    svc.send_udp(b"registersession:abc123")
    wait_until(lambda: svc.call(b"registersession:abc123").isdigit())
    assert abs(int(svc.call(b"registersession:abc123")) / 1000 - time.time()) < 30


def test_the_log_line_in_docs_modules_md_is_the_one_logged(modules_dir, make_service):
    # The page showed TExecute first; the service named UExecute first (its dict's order).
    page = (REPO / "docs" / "modules.md").read_text()
    shown = "module shout failed to load: " + page.split("module shout failed to load: ")[1]
    write_module(modules_dir, "shout", ORIGINAL_NAMES)
    svc = make_service()
    svc.wait_for_log("module shout failed to load")
    assert shown.splitlines()[0] in svc.log()
