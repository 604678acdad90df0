"""The registry against a real service: helper saves that change nothing, start-up's
imports run at once, files that failed imported once until they change, and files whose
name no request can reach said in the log."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.conftest import wait_until, write_module

# Counts its calls (module state) and notes each unload() in unloaded.log.
COUNTER = """
from pathlib import Path
from . import _words

CALLS = 0

def handle_tcp(request):
    global CALLS
    CALLS += 1
    return f"{_words.GREETING} {CALLS}"

def unload():
    with open(Path(__file__).with_name("unloaded.log"), "a") as f:
        f.write("counter\\n")
"""


def settled(svc, modules: Path, tag: str) -> None:
    """Wait until the service has handled every change made so far: a module written
    now loads after them (the watch hands changes over in order, helpers first)."""
    write_module(modules, "marker", f"def handle_tcp(request):\n    return {tag!r}\n")
    wait_until(lambda: svc.call(b"marker:x") == tag.encode())


def test_a_helper_saved_without_a_change_reloads_nothing(tmp_path, make_service):
    # Found by a black-box review: a touch of _env.py (or the same bytes saved again)
    # re-imported every module: unload hooks ran, module state was lost, the compilers'
    # node processes restarted. The rescan after start did the same at every start.
    modules = tmp_path / "modules"
    modules.mkdir()
    helper = write_module(modules, "_words", "GREETING = 'hello'\n")
    write_module(modules, "counter", COUNTER)
    svc = make_service()
    assert svc.call(b"counter:x") == b"hello 1"
    os.utime(helper)  # a touch
    helper.write_text(helper.read_text())  # an identical save
    settled(svc, modules, "after the touch")
    assert svc.call(b"counter:x") == b"hello 2"  # the same version, its state kept
    assert "helper _words changed" not in svc.log()
    assert not (modules / "unloaded.log").exists()
    # A real change still reloads every module, and so do a helper created and deleted.
    helper.write_text("GREETING = 'bonjour'\n")
    wait_until(lambda: svc.call(b"counter:x") == b"bonjour 1")
    assert (modules / "unloaded.log").read_text() == "counter\n"
    extra = write_module(modules, "_extra", "X = 1\n")
    svc.wait_for_log("helper _extra changed: reloading every module")
    extra.unlink()
    wait_until(lambda: svc.log().count("helper _extra changed") == 2)


# Imports once every one of the three has started its import (20 s at most): imported one
# at a time, each waits for the others until its import_timeout gives it up.
TOGETHER = """
import time
from pathlib import Path

here = Path(__file__).with_name
here("{name}.started").touch()
for _ in range(2000):
    if all(here(f"{{n}}.started").exists() for n in ("t0", "t1", "t2")):
        break
    time.sleep(0.01)
else:
    raise RuntimeError("imported alone")

def handle_tcp(request):
    return "{name} ready"
"""


def test_start_up_imports_run_at_once(tmp_path, make_service):
    # Found by a black-box review: start-up imported one module at a time, so three
    # imports that hung held up listening for three import_timeouts (90 s by default,
    # systemd's start timeout) rather than one.
    modules = tmp_path / "modules"
    modules.mkdir()
    for name in ("t0", "t1", "t2"):
        write_module(modules, name, TOGETHER.format(name=name))
    svc = make_service("[reload]\nimport_timeout = 5\n")
    for name in ("t0", "t1", "t2"):
        assert svc.call(f"{name}:x".encode()) == f"{name} ready".encode()
    assert "failed to load" not in svc.log()


def test_at_start_imports_past_every_loader_thread_are_refused(tmp_path, make_service):
    # Ten imports that never return: nine take the loader's threads and are given up at
    # the timeout, the tenth is refused at once; the service starts and stops as usual.
    modules = tmp_path / "modules"
    modules.mkdir()
    for i in range(10):
        write_module(modules, f"hang{i}", "import threading\nthreading.Event().wait()\n")
    write_module(modules, "a_ok", "def handle_tcp(request):\n    return 'ok'\n")  # (first)
    svc = make_service("[reload]\nimport_timeout = 1\n")
    assert svc.call(b"a_ok:x") == b"ok"
    log = svc.log()
    assert log.count("failed to load: import did not finish within 1 s") == 9
    assert log.count("failed to load: refused: all 9 loader threads are stuck") == 1
    assert svc.stop() == 0


def test_a_file_that_failed_to_load_is_imported_again_once_touched_or_changed(
    tmp_path, make_service
):
    # Found by a black-box review: a file that never loaded, or whose last save failed, was
    # imported again by the rescan after start, its bytes unchanged: two errors logged,
    # two failures counted, two alerts (two mails) for one broken file.
    modules = tmp_path / "modules"
    modules.mkdir()
    broken = write_module(modules, "broken", "def handle_tcp(request:\n")
    an_hour_ago = time.time() - 3600  # saved long before the start, as in the review
    os.utime(broken, (an_hour_ago, an_hour_ago))
    kept = write_module(modules, "kept", "def handle_tcp(request):\n    return 'good'\n")
    svc = make_service()
    kept.write_text("def handle_tcp(request:\n")  # a broken save of a loaded module
    svc.wait_for_log("module kept failed to load")
    settled(svc, modules, "after the rescan")  # (names before "marker")
    log = svc.log()
    for name in ("broken", "kept"):
        assert log.count(f"module {name} failed to load") == 1, log
    assert svc.stats()["reloads"]["failed"] == 2
    assert svc.call(b"kept:x") == b"good"
    # A touch asks for another try (a library installed since, say), its bytes the same.
    os.utime(broken)
    os.utime(kept)
    wait_until(lambda: svc.stats()["reloads"]["failed"] == 4)
    assert all(svc.log().count(f"module {n} failed to load") == 2 for n in ("broken", "kept"))
    # A real change is imported again, of a file that never loaded as of one that did.
    broken.write_text("def handle_tcp(request):\n    return 'fixed'\n")
    kept.write_text("def handle_tcp(request):\n    return 'fixed too'\n")
    wait_until(lambda: svc.call(b"broken:x") == b"fixed")
    wait_until(lambda: svc.call(b"kept:x") == b"fixed too")


MISNAMED = ["café.py", "My Mod.py", "a.b.py", "x.PY", "_h é.py"]
QUIET = [".hidden.py", ".#hot.py", "notes.py~", "hot.py.swp", "4913", "readme.txt"]


def test_a_misspelled_handler_is_warned_of_and_a_module_without_one_is_not(
    tmp_path, make_service
):
    # Found by a newcomer review: handle_tpc, handle_TCP or handle loaded as "loaded" with
    # no word; only a call's 501 told. The shipped fail (no functions at all) stays quiet.
    modules = tmp_path / "modules"
    modules.mkdir()
    for name, source in [("tpc", "async def handle_tpc(request):\n    return 'x'\n"),
                         ("caps", "def handle_TCP(request):\n    return 'x'\n"),
                         ("short", "def handle(request):\n    return 'x'\n"),
                         ("quiet", "import os\nfrom os.path import join\nX = 1\n"),
                         ("fine", "def handle_tcp(request):\n    return 'x'\n\n"
                                  "def handle_udp(request):\n    pass\n\n"
                                  "def handler(request):\n    pass\n")]:  # fmt: skip
        (modules / f"{name}.py").write_text(source)
    svc = make_service()
    settled(svc, modules, "after the start")
    warned = [line.partition("WARNING ")[2] for line in svc.log().splitlines()
              if "defines no handler" in line]  # fmt: skip
    assert sorted(warned) == [
        "bgservice.registry: module caps: defines no handler; handle_TCP looks like a "
        "misspelled handle_tcp (never called as it is)",
        "bgservice.registry: module short: defines no handler; handle looks like a "
        "misspelled handle_tcp (never called as it is)",
        "bgservice.registry: module tpc: defines no handler; handle_tpc looks like a "
        "misspelled handle_tcp (never called as it is)",
    ], warned
    (modules / "tpc.py").write_text("async def handle_tcp(request):\n    return 'mended'\n")
    wait_until(lambda: svc.call(b"tpc:x") == b"mended")


def ignoring(name: str) -> str:
    return f"ignoring {name}: not a module name (docs/modules.md)"


def test_a_file_whose_name_is_no_module_name_is_said_once(tmp_path, make_service):
    # Found by a black-box review: café.py, "My Mod.py", a.b.py and x.PY were skipped
    # without a word, so a module saved under such a name just answered 400.
    modules = tmp_path / "modules"
    modules.mkdir()
    for name in MISNAMED + QUIET:
        (modules / name).write_text("def handle_tcp(request):\n    return 'x'\n")
    svc = make_service()
    settled(svc, modules, "after the rescan")
    (modules / "x.PY").write_text("# saved again: said no more\n")
    (modules / "late.module.py").write_text("def handle_tcp(request):\n    return 'x'\n")
    svc.wait_for_log(ignoring("late.module.py"))
    settled(svc, modules, "after the saves")
    log = svc.log()
    for name in MISNAMED:
        assert log.count(ignoring(name)) == 1, name
    said = [line for line in log.splitlines() if "not a module name" in line]
    assert len(said) == len(MISNAMED) + 1, said  # editors' and other files: not a word
