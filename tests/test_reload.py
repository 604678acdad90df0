"""Hot reload end to end: files written, replaced and deleted under a running service."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgservice.declarations import ModuleLoadError
from bgservice.registry import PACKAGE, import_module_file
from tests.conftest import wait_until, write_module

VERSION = """
from pathlib import Path

def handle_tcp(request):
    return "{tag}"

def unload():
    with open(Path(__file__).with_name("unloaded.log"), "a") as f:
        f.write("{tag}\\n")
"""


def version(tag: str) -> str:
    return VERSION.replace("{tag}", tag)


def replies(svc, request: bytes, expected: bytes) -> bool:
    return svc.call(request) == expected


def test_a_new_module_file_is_served(service):
    assert service.call(b"fresh:x") == b"400: Unknown request"
    write_module(service.modules, "fresh", version("new"))
    wait_until(lambda: replies(service, b"fresh:x", b"new"))
    assert "module fresh loaded" in service.log()


def test_a_new_module_is_unknown_until_its_first_import_ends(service):
    # Its import takes a second: calls meanwhile get what they got before the file existed,
    # never a 502 for a load that has not finished.
    marker = service.modules / "importing.txt"
    write_module(service.modules, "slow", (
        "import time\nfrom pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('started')\ntime.sleep(1.0)\n"
        "def handle_tcp(request):\n    return 'slow ready'\n"
    ))  # fmt: skip
    wait_until(marker.exists)
    assert service.call(b"slow:x") == b"400: Unknown request"
    assert wait_until(lambda: service.call(b"slow:x") == b"slow ready")


def test_in_place_edit_serves_the_new_code_and_unloads_the_old(modules_dir, make_service):
    path = write_module(modules_dir, "hot", version("v1"))
    svc = make_service()
    assert svc.call(b"hot:x") == b"v1"
    with open(path, "w") as f:  # truncate and write, as a plain editor save does
        f.write(version("v2"))
    wait_until(lambda: replies(svc, b"hot:x", b"v2"))
    unloaded = modules_dir / "unloaded.log"
    wait_until(lambda: unloaded.exists() and unloaded.read_text() == "v1\n")


def test_atomic_save_by_rename_is_a_reload(modules_dir, make_service):
    path = write_module(modules_dir, "hot", version("v1"))
    svc = make_service()
    assert svc.call(b"hot:x") == b"v1"
    temp = modules_dir / ".hot.py.tmp1234"  # an editor's temp file: hidden, so ignored
    temp.write_text(version("v2"))
    os.replace(temp, path)
    wait_until(lambda: replies(svc, b"hot:x", b"v2"))
    assert "module hot reloaded" in svc.log()


def test_deleting_a_module_removes_it(modules_dir, make_service):
    path = write_module(modules_dir, "hot", version("v1"))
    svc = make_service()
    assert svc.call(b"hot:x") == b"v1"
    path.unlink()
    wait_until(lambda: replies(svc, b"hot:x", b"400: Unknown request"))
    wait_until(lambda: (modules_dir / "unloaded.log").exists())
    assert "module hot removed" in svc.log()


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("def handle_tcp(request:\n", "SyntaxError"),
        ("raise RuntimeError('no config')\n", "RuntimeError: no config"),
        ("import no_such_library_here\n", "ModuleNotFoundError"),
        ("", "defines no handler"),  # issue 18, item 6: an editor's truncate before a write
        ("TIMEOUT = 5\n", "defines no handler"),
        # nan passed the old check (nan <= 0 is false); each call then answered 500.
        ("TIMEOUT = float('nan')\ndef handle_tcp(request):\n    return 1\n", "finite"),
    ],
)
def test_a_broken_save_keeps_the_last_good_version(modules_dir, make_service, broken, expected):
    path = write_module(modules_dir, "hot", version("good"))
    svc = make_service()
    path.write_text(broken)
    svc.wait_for_log("module hot failed to load")
    line = next(li for li in svc.log().splitlines() if "module hot failed to load" in li)
    assert "hot.py" in line and expected in line
    assert "last good version keeps serving" in line
    assert svc.call(b"hot:x") == b"good"
    # Fixed again: the new version serves.
    path.write_text(version("fixed"))
    wait_until(lambda: replies(svc, b"hot:x", b"fixed"))


def test_the_line_of_a_syntax_error_is_logged(modules_dir, make_service):
    svc = make_service()
    write_module(modules_dir, "typo", "x = 1\ny = 2\ndef handle_tcp(request)\n    return 1\n")
    svc.wait_for_log("module typo failed to load")
    line = next(li for li in svc.log().splitlines() if "module typo failed to load" in li)
    assert "typo.py:3" in line


def test_a_module_that_never_loaded_answers_a_5xx_naming_the_failure(modules_dir, make_service):
    write_module(modules_dir, "never", "import no_such_library_here\n")
    svc = make_service()
    reply = svc.call(b"never:x")
    assert reply.startswith(b"502: Module never failed to load")
    assert b"no_such_library_here" in reply


def test_a_running_call_finishes_on_the_old_code(modules_dir, make_service, tmp_path):
    gate = tmp_path / "gate"
    slow = f"""
import time
from pathlib import Path

def handle_tcp(request):
    while not Path({str(gate)!r}).exists():
        time.sleep(0.01)
    return "old"
"""
    path = write_module(modules_dir, "slow", slow)
    svc = make_service()
    result: list[bytes] = []
    caller = threading.Thread(target=lambda: result.append(svc.call(b"slow:x")))
    caller.start()
    wait_until(lambda: svc.stats()["in_flight"].get("slow"))
    path.write_text(version("new"))
    svc.wait_for_log("module slow reloaded")  # (a call before that would wait on the gate)
    assert svc.call(b"slow:x") == b"new"
    gate.touch()
    caller.join(10)
    assert result == [b"old"]


def test_a_helper_change_reloads_the_modules_that_import_it(modules_dir, make_service):
    helper = write_module(modules_dir, "_words", "GREETING = 'hello'\n")
    write_module(
        modules_dir,
        "greet",
        "from . import _words\n\ndef handle_tcp(request):\n    return _words.GREETING\n",
    )
    svc = make_service()
    assert svc.call(b"greet:x") == b"hello"
    assert svc.call(b"_words:x") == b"400: Unknown request"  # a helper is not a module
    helper.write_text("GREETING = 'bonjour'\n")
    wait_until(lambda: replies(svc, b"greet:x", b"bonjour"))


@pytest.mark.parametrize("name", [".hidden.py", "notes.py~", ".#hot.py", "hot.py.swp", "x.txt"])
def test_temporary_and_hidden_files_are_ignored(modules_dir, make_service, name):
    svc = make_service()
    (modules_dir / name).write_text("def handle_tcp(request):\n    return 'should not load'\n")
    # A real module written afterwards is seen: the ignored file came first in the queue.
    write_module(modules_dir, "marker", "def handle_tcp(request):\n    return 'ok'\n")
    wait_until(lambda: replies(svc, b"marker:x", b"ok"))
    stem = name.lstrip(".#").split(".")[0]
    assert svc.call(stem.encode() + b":x") == b"400: Unknown request"
    assert "should not load" not in svc.log()
    assert "failed to load" not in svc.log()


def test_reload_latency(modules_dir, make_service, capsys):
    """File written -> first new reply, measured (the target is 200 ms; not asserted)."""
    path = write_module(modules_dir, "hot", version("0"))
    svc = make_service()
    times = []
    for i in range(1, 21):
        expected = str(i).encode()
        started = time.perf_counter()
        path.write_text(version(str(i)))
        wait_until(lambda e=expected: replies(svc, b"hot:x", e), interval=0.002)
        times.append((time.perf_counter() - started) * 1000)
    assert len(times) == 20
    with capsys.disabled():
        print(
            f"\nreload latency: median {statistics.median(times):.1f} ms, "
            f"max {max(times):.1f} ms over 20 edits"
        )


def test_a_non_atomic_save_never_serves_the_empty_file(modules_dir, make_service):
    # Issue 18, item 6: ": > hot.py; sleep 0.3; printf ... > hot.py". While the file is
    # empty it must not replace the working version (calls got "501: no TCP handler").
    path = write_module(modules_dir, "hot", version("v1"))
    svc = make_service()
    seen: list[bytes] = []
    done = threading.Event()

    def caller() -> None:
        while not done.is_set():
            seen.append(svc.call(b"hot:x"))

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        path.write_text("")
        svc.wait_for_log("module hot failed to load")
        time.sleep(0.3)
        path.write_text(version("v2"))
        wait_until(lambda: seen and seen[-1] == b"v2")
    finally:
        done.set()
        thread.join(20)
    assert set(seen) <= {b"v1", b"v2"}, sorted(set(seen))
    assert "hot.py: defines no handler" in svc.log()


def test_an_import_that_never_returns_stops_neither_reloads_nor_the_exit(
    modules_dir, make_service
):
    # Found by a review: an import that hung held the one loader thread (and the reload
    # lock) for ever: no later change was applied, and SIGTERM left the process running.
    other = write_module(modules_dir, "other", version("one"))
    svc = make_service("[reload]\nimport_timeout = 1\n")
    hang = write_module(modules_dir, "hang", "import time\nwhile True:\n    time.sleep(0.2)\n")
    svc.wait_for_log("module hang failed to load")
    assert "import did not finish within 1 s" in svc.log()
    other.write_text(version("two"))
    wait_until(lambda: replies(svc, b"other:x", b"two"))
    hang.write_text(version("fixed"))
    wait_until(lambda: replies(svc, b"hang:x", b"fixed"))
    assert svc.stop() == 0


def test_an_import_that_fails_late_does_not_undo_a_newer_one(tmp_path):
    # An import stuck past [reload] import_timeout, given up on, fails once a newer
    # import of the module has succeeded: sys.modules (where pickling and dataclasses
    # look the module up) keeps the newer module, not the one from before both.
    path = tmp_path / "late.py"
    path.write_text(
        "import pathlib, time\n"
        "go = pathlib.Path(__file__).with_name('go')\n"
        "while not go.exists():\n"
        "    time.sleep(0.01)\n"
        "raise RuntimeError('late')\n"
    )
    qualname = f"{PACKAGE}.late"
    older = types.ModuleType(qualname)
    sys.modules[qualname] = older
    failures: list[Exception] = []

    def stuck() -> None:
        try:
            import_module_file("late", path)
        except ModuleLoadError as exc:
            failures.append(exc)

    thread = threading.Thread(target=stuck)
    thread.start()
    try:
        newer = import_module_file("late", path, b"def handle_tcp(request):\n    return 'new'\n")
        (tmp_path / "go").touch()
        thread.join(10)
        assert failures and "late" in str(failures[0])
        assert sys.modules[qualname] is newer.module
    finally:
        (tmp_path / "go").touch()
        thread.join(10)
        sys.modules.pop(qualname, None)


def test_a_module_named_as_a_service_request_loads_but_is_never_called(service):
    # The warning said TCP calls were the service's and UDP and queued jobs still reached
    # it (modules.md too); none of them does (execution.RESERVED).
    write_module(service.modules, "helo", """
        def handle_tcp(request):
            return "module"

        def handle_udp(request):
            raise RuntimeError("the UDP handler ran")
        """)  # fmt: skip
    service.wait_for_log("module helo: never called (helo:... is the service's): rename it")
    assert service.call(b"queue:add:helo:x") == b"400: Unknown request"
    assert service.call(b"helo:x") != b"module"
    service.send_udp(b"helo:x")
    service.wait_for_log("for module 'helo' failed: 400 Unknown request")
    assert "the UDP handler ran" not in service.log()


CANARY_V1 = """
import time
import weakref
from pathlib import Path


class _Canary:
    pass


_canary = _Canary()  # reachable only through this module's globals
weakref.finalize(_canary, Path(__file__).with_name("canary.freed").touch)


def handle_tcp(request):
    if request.text == "together":  # held until four such calls run at once (10 s at most)
        together = Path(__file__).with_name("together.log")
        with together.open("a") as f:
            f.write("x")
        deadline = time.monotonic() + 10
        while len(together.read_text()) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    return "v1"
"""

CANARY_V2 = """
import gc
from pathlib import Path


def handle_tcp(request):
    gc.collect()
    return "freed" if Path(__file__).with_name("canary.freed").exists() else "kept"
"""


def test_a_version_loaded_at_start_is_freed_once_replaced(modules_dir, make_service):
    # The service freezes start-up's objects (gc.freeze) once ready, and a replaced
    # version is cyclic garbage (its functions hold its globals): frozen, the first
    # version of every module was never collected, nor anything it held.
    # Each handler thread kept the last call it ran (its handler: the old version) until
    # it ran another: four threads that ran v1 last kept it after v2's calls.
    path = write_module(modules_dir, "canary", CANARY_V1)
    svc = make_service()
    assert svc.call(b"canary:x") == b"v1"
    callers = [threading.Thread(target=svc.call, args=(b"canary:together",)) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    assert len((modules_dir / "together.log").read_text()) == 4
    path.write_text(CANARY_V2)
    wait_until(lambda: svc.call(b"canary:x") != b"v1", timeout=20)
    assert svc.call(b"canary:x") == b"freed"


def test_once_every_loader_thread_is_stuck_a_save_is_refused_not_fatal(tmp_path, make_service):
    # Found by a black-box test: after 9 imports that never returned (every one of the
    # loader's 9 threads), the next save of a loaded module raised ThreadsExhausted out of
    # the digest check, and the service stopped (exit 70).
    modules = tmp_path / "modules"  # no shipped modules: their imports would race 0.5 s
    modules.mkdir()
    ok = write_module(modules, "ok", version("v1"))
    svc = make_service("[reload]\nimport_timeout = 0.5\n")
    for i in range(9):  # the loader's 9 threads (docs/modules.md)
        write_module(modules, f"hang{i}", "import threading\nthreading.Event().wait()\n")
    wait_until(lambda: svc.log().count("import did not finish within") == 9, timeout=30)
    ok.write_text(version("v2"))
    svc.wait_for_log("module ok failed to load: refused: all 9 loader threads are stuck")
    line = next(li for li in svc.log().splitlines() if "module ok failed to load" in li)
    assert "restart the service" in line and "the last good version keeps serving" in line
    assert svc.call(b"ok:x") == b"v1"
    assert svc.stop() == 0


def test_an_unload_hook_that_blocks_holds_up_no_reload(modules_dir, make_service):
    # Found by a black-box test: a sync unload() that never returned held the loader's
    # thread, and no module was ever (re)loaded again, without a word in the log.
    blocking = "import time\ndef handle_tcp(request):\n    return 'v1'\ndef unload():\n"
    path = write_module(modules_dir, "stuck", blocking + "    time.sleep(3600)\n")
    other = write_module(modules_dir, "other", version("one"))
    svc = make_service("[reload]\nimport_timeout = 1\n")
    path.write_text("def handle_tcp(request):\n    return 'v2'\n")  # v1's hook starts, blocks
    wait_until(lambda: replies(svc, b"stuck:x", b"v2"))
    other.write_text(version("two"))
    wait_until(lambda: replies(svc, b"other:x", b"two"))
    write_module(modules_dir, "brandnew", version("new"))
    wait_until(lambda: replies(svc, b"brandnew:x", b"new"))
    svc.wait_for_log("unload hook of module stuck did not finish within 1 s")
    assert svc.stop() == 0


@pytest.mark.parametrize("kind", ["def", "async def"])
def test_an_unload_hook_calling_sys_exit_is_logged_not_the_services_end(
    modules_dir, make_service, kind
):
    # A black-box review: unload() calling sys.exit(0) stopped the service (exit 0).
    exits = f"import sys\ndef handle_tcp(request):\n    return 'v1'\n{kind} unload():\n"
    path = write_module(modules_dir, "quits", exits + "    sys.exit(0)\n")
    svc = make_service()
    path.write_text("def handle_tcp(request):\n    return 'v2'\n")
    wait_until(lambda: replies(svc, b"quits:x", b"v2"))
    svc.wait_for_log("unload hook of module quits raised")
    assert svc.call(b"service:ping") == b"pong" and svc.proc.poll() is None


@pytest.mark.parametrize("how", ["moved", "symlink"])
def test_a_replaced_modules_folder_is_reported(tmp_path, make_service, how):
    # Found by a black-box test: "mv modules.new modules" or a symlink swap (deploy tools)
    # left the service watching the folder it started with, and nothing said so.
    old, new = tmp_path / "release1", tmp_path / "release2"
    for folder, tag in ((old, "v1"), (new, "v2")):
        folder.mkdir()
        write_module(folder, "m", version(tag))
    modules = tmp_path / "modules"
    if how == "moved":
        old.rename(modules)
    else:
        modules.symlink_to(old)
    svc = make_service()
    assert svc.call(b"m:x") == b"v1"
    if how == "moved":
        modules.rename(tmp_path / "modules.old")
        new.rename(modules)
    else:
        (tmp_path / "link").symlink_to(new)
        os.replace(tmp_path / "link", modules)
    svc.wait_for_log(f"modules folder {modules} was moved, deleted or replaced: reloads stopped")
    assert "restart it to load the folder now there" in svc.log()
    assert svc.call(b"m:x") == b"v1"  # what it had keeps serving


def test_a_load_under_way_as_the_folder_is_swapped_reads_nothing_of_the_new_one(
    tmp_path, make_service
):
    # A CI flake: a load of the old folder's file begun before a "mv modules.new modules"
    # (the look at every file after the start) read the new folder's file under that name.
    # Here a helper's change reloads every module, one by one: "a" takes a second to import,
    # and the folder is swapped meanwhile; "m" comes next.
    slow = "import time\nfrom . import _h\ntime.sleep(1.5)\n" + version("a")
    old, new = tmp_path / "modules", tmp_path / "release2"
    for folder, tag in ((old, "v1"), (new, "v2")):
        folder.mkdir()
        write_module(folder, "_h", "X = 1\n")
        write_module(folder, "a", slow)
        write_module(folder, "m", "from . import _h\n" + version(tag))
    svc = make_service()
    assert svc.call(b"m:x") == b"v1"
    write_module(old, "_h", "X = 2\n")
    svc.wait_for_log("helper _h changed: reloading every module")
    old.rename(tmp_path / "modules.old")
    new.rename(old)
    svc.wait_for_log(f"modules folder {old} was moved, deleted or replaced")
    svc.wait_for_log("module a reloaded")  # read before the swap: the old folder's
    deadline = time.monotonic() + 1  # (m's load, which comes next, would be done by then)
    while time.monotonic() < deadline:
        assert svc.call(b"m:x") == b"v1"
    assert "module m reloaded" not in svc.log()



def test_a_modules_folder_moved_back_resumes_reloads_with_what_changed_away(
    tmp_path, make_service
):
    # Moved away and back (a deploy that failed halfway, an operator's mistake): reloads
    # stop while it is away, then resume, and a module changed while it was away is read.
    modules = tmp_path / "modules"
    modules.mkdir()
    write_module(modules, "m", version("v1"))
    svc = make_service()
    assert svc.call(b"m:x") == b"v1"
    away = tmp_path / "away"
    modules.rename(away)
    svc.wait_for_log(f"modules folder {modules} was moved, deleted or replaced")
    write_module(away, "m", version("v2"))
    away.rename(modules)
    svc.wait_for_log(f"modules folder {modules} is back: reloads resume")
    wait_until(lambda: replies(svc, b"m:x", b"v2"))
    write_module(modules, "m", version("v3"))  # and later saves reload as before
    wait_until(lambda: replies(svc, b"m:x", b"v3"))

def _inotify_instances_taken() -> list[int]:
    """Take every inotify instance this user may still make (fs.inotify.max_user_instances
    is per user): a service started now cannot make one. Their descriptors, to close."""
    import ctypes
    import resource

    limit = int(open("/proc/sys/fs/inotify/max_user_instances").read())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < limit + 64 <= hard or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit + 64, hard))
    libc = ctypes.CDLL(None, use_errno=True)
    taken: list[int] = []
    while len(taken) <= limit:
        fd = libc.inotify_init1(os.O_CLOEXEC)
        if fd < 0:
            break
        taken.append(fd)
    return taken


@contextlib.contextmanager
def _inotify_used_up() -> Iterator[None]:
    """No inotify instance left for this user while it lasts: one that another process frees
    meanwhile (test runs side by side, as the same user) is taken too, as it comes."""
    taken = _inotify_instances_taken()
    done = threading.Event()

    def keep_taking() -> None:
        while not done.wait(0.001):
            taken.extend(_inotify_instances_taken())

    thread = threading.Thread(target=keep_taking)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        for fd in taken:
            os.close(fd)


def test_without_inotify_the_folder_is_polled(modules_dir, make_service):
    # A host with 128 inotify instances in use (the default limit, per user): watchdog's
    # Observer raised "inotify instance limit reached" and the service never started.
    svc = make_service(start=False)
    with _inotify_used_up():
        svc.start()
    assert "polling it every" in svc.log()
    write_module(modules_dir, "polled", version("seen"))
    wait_until(lambda: replies(svc, b"polled:x", b"seen"), timeout=10)
    write_module(modules_dir, "polled", version("seen again"))
    wait_until(lambda: replies(svc, b"polled:x", b"seen again"), timeout=10)


def test_a_symlinked_modules_folder_reloads_through_the_link(tmp_path, make_service):
    # watchdog watches a link itself (IN_DONT_FOLLOW): edits through it were never seen.
    real = tmp_path / "release1"
    real.mkdir()
    write_module(real, "m", version("v1"))
    (tmp_path / "modules").symlink_to(real)
    svc = make_service()
    assert svc.call(b"m:x") == b"v1"
    write_module(tmp_path / "modules", "m", version("v2"))
    write_module(real, "n", version("new"))
    wait_until(lambda: replies(svc, b"m:x", b"v2") and replies(svc, b"n:x", b"new"))


SLOW_IMPORT = """
import time
from pathlib import Path

here = Path(__file__).with_name
here("z_slow.started").touch()
for _ in range(2000):  # until the test lets it go (20 s at most)
    if here("z_slow.go").exists():
        break
    time.sleep(0.01)

def handle_tcp(request):
    return "slow"
"""


def test_changes_made_while_the_service_starts_are_loaded(modules_dir, make_service):
    # A deploy copying files while the service started: what changed after the start-up
    # read a file and before the watch began was never loaded, until saved again.
    write_module(modules_dir, "b", version("b1"))
    write_module(modules_dir, "z_slow", SLOW_IMPORT)  # (imported after b)
    svc = make_service(start=False)
    svc.start(wait=False)
    wait_until(lambda: (modules_dir / "z_slow.started").exists(), timeout=20)
    write_module(modules_dir, "b", version("b2"))
    write_module(modules_dir, "c", version("c1"))
    (modules_dir / "z_slow.go").touch()
    wait_until(lambda: svc.ready_file.exists(), timeout=20)
    svc.info = json.loads(svc.ready_file.read_text())
    wait_until(lambda: replies(svc, b"b:x", b"b2") and replies(svc, b"c:x", b"c1"))


def test_a_module_saved_just_before_the_helper_it_needs_loads(modules_dir, make_service):
    # One timer per file: the module, saved 10 ms before its helper, loaded first against
    # the old helper, failed (logged, alerted), then loaded again once the helper had.
    uses = "from ._h import {0}\n\ndef handle_tcp(request):\n    return {1}\n"
    write_module(modules_dir, "_h", "OLD = 1\n")
    write_module(modules_dir, "a", uses.format("OLD", "'a1'"))
    # A quiet window of 500 ms: the two saves fall in it however loaded the machine (one
    # timer per file still fired the module's first).
    svc = make_service("[reload]\ndebounce_ms = 500\n")
    assert svc.call(b"a:x") == b"a1"
    write_module(modules_dir, "a", uses.format("NEW", "NEW"))
    time.sleep(0.01)
    write_module(modules_dir, "_h", "NEW = 'a2'\n")
    wait_until(lambda: replies(svc, b"a:x", b"a2"))
    assert "failed to load" not in svc.log()


def test_a_file_saved_again_and_again_is_reloaded_while_it_is(modules_dir, make_service):
    # Saves every 5 ms, inside the 50 ms debounce: no reload until they stopped.
    path = write_module(modules_dir, "busy", version("v0"))
    svc = make_service()
    seen: list[bytes] = []
    stop = threading.Event()

    def writer() -> None:
        for k in range(1, 2000):  # 10 s at most
            if stop.is_set():
                return
            path.write_text(version(f"v{k}"))
            time.sleep(0.005)

    saving = threading.Thread(target=writer)
    saving.start()
    try:
        wait_until(lambda: seen.append(svc.call(b"busy:x")) or seen[-1] != b"v0", timeout=8)
        assert saving.is_alive()  # reloaded while the saves went on
    finally:
        stop.set()
        saving.join()


def _linked_module(tmp_path, target, name="m"):
    """A modules folder of its own whose ``NAME.py`` is a relative symlink to ``target``
    (``modules/m.py -> ../shared/m.py``, as people link a module shared between sites)."""
    modules = tmp_path / "modules"
    modules.mkdir(exist_ok=True)
    link = modules / f"{name}.py"
    link.symlink_to(os.path.relpath(target, modules))
    return link


def _relink(link, target):
    """``ln -sfn``, atomically: a new link under a hidden name, renamed onto the old."""
    temp = link.with_name(f".{link.name}.new")
    temp.symlink_to(target)
    os.replace(temp, link)


def _settled(svc):
    """Once this returns, the look at every file after start is done (else an edit made
    before it would be read by it, watched or not): a module written now is in its batch or
    a later one, and refreshed after every name it holds ("zz" sorts last)."""
    write_module(svc.modules, "zz_settled", version("settled"))
    wait_until(lambda: replies(svc, b"zz_settled:x", b"settled"))


def _watched_inodes(svc) -> set[int]:
    """The inodes the service's inotify instances watch (``inotify wd:N ino:HEX`` lines of
    /proc/PID/fdinfo)."""
    found: set[int] = set()
    for entry in Path(f"/proc/{svc.proc.pid}/fdinfo").iterdir():
        try:
            text = entry.read_text()
        except OSError:  # (a descriptor closed meanwhile)
            continue
        found.update(int(h, 16) for h in re.findall(r"^inotify wd:\S+ ino:([0-9a-f]+)", text, re.M))
    return found


@pytest.mark.parametrize("save", ["in place", "atomic"])
def test_a_symlinked_module_file_reloads_when_its_target_is_edited(tmp_path, make_service, save):
    # Found by a review: the watch was on the modules folder only, and an edit of the file
    # a module's symlink leads to (in another folder) was never seen.
    shared = tmp_path / "shared"
    shared.mkdir()
    target = write_module(shared, "m", version("v1"))
    _linked_module(tmp_path, target)
    svc = make_service()
    assert svc.call(b"m:x") == b"v1"
    _settled(svc)
    if save == "in place":
        target.write_text(version("v2"))
    else:  # an editor's save: a temp file renamed onto the name
        temp = shared / ".m.py.tmp1234"
        temp.write_text(version("v2"))
        os.replace(temp, target)
    wait_until(lambda: replies(svc, b"m:x", b"v2"))
    assert "module m reloaded" in svc.log()


def _two_releases(tmp_path, make_service, names, *args):
    """Two release folders with a module m each (replying ``NAME1``), m linked to the
    first's, a service started (``args``) and serving it: (svc, folders, files, link)."""
    folders = [tmp_path / name for name in names]
    files = []
    for folder in folders:
        folder.mkdir()
        files.append(write_module(folder, "m", version(f"{folder.name}1")))
    link = _linked_module(tmp_path, files[0])
    svc = make_service("", *args)
    assert svc.call(b"m:x") == f"{names[0]}1".encode()
    return svc, folders, files, link


def test_a_repointed_module_link_follows_its_new_target_only(tmp_path, make_service):
    svc, (old_dir, new_dir), (old, new), link = _two_releases(
        tmp_path, make_service, ("old", "new"))
    wait_until(lambda: old_dir.stat().st_ino in _watched_inodes(svc))
    _relink(link, new)
    wait_until(lambda: replies(svc, b"m:x", b"new1"))
    # The folder no link leads to any more is no longer watched; the new one is. (Both
    # waited for: the watches' thread removes the old watch, then makes the new one, and
    # a look between the two finds neither.)
    old_ino, new_ino = old_dir.stat().st_ino, new_dir.stat().st_ino
    wait_until(lambda: new_ino in (watched := _watched_inodes(svc)) and old_ino not in watched)
    old.write_text(version("old2"))
    write_module(link.parent, "marker", version("seen"))  # a change after the old target's
    wait_until(lambda: replies(svc, b"marker:x", b"seen"))
    assert svc.call(b"m:x") == b"new1"
    assert svc.log().count("module m reloaded") == 1  # (the repointing: no other)
    new.write_text(version("new2"))
    wait_until(lambda: replies(svc, b"m:x", b"new2"))


def test_a_dangling_module_link_loads_once_its_target_appears(tmp_path, make_service):
    # The file missing, then its whole folder: the service starts, and each loads once made.
    shared = tmp_path / "shared"
    shared.mkdir()
    _linked_module(tmp_path, shared / "m.py")
    _linked_module(tmp_path, tmp_path / "later" / "n.py", name="n")
    svc = make_service()
    assert svc.call(b"m:x") == b"400: Unknown request"
    assert svc.call(b"n:x") == b"400: Unknown request"
    write_module(shared, "m", version("m1"))
    (tmp_path / "later").mkdir()
    write_module(tmp_path / "later", "n", version("n1"))
    wait_until(lambda: replies(svc, b"m:x", b"m1") and replies(svc, b"n:x", b"n1"))
    write_module(tmp_path / "later", "n", version("n2"))  # and watched from then on
    wait_until(lambda: replies(svc, b"n:x", b"n2"))


def test_a_module_link_through_a_repointed_folder_link_follows_it(tmp_path, make_service):
    # A deploy tool's layout: modules/m.py -> ../releases/current/m.py, and current is
    # repointed to the next release: nothing changes in the folders watched until then.
    releases = tmp_path / "releases"
    for tag in ("r1", "r2"):
        (releases / tag).mkdir(parents=True)
        write_module(releases / tag, "m", version(tag))
    (releases / "current").symlink_to("r1")
    _linked_module(tmp_path, releases / "current" / "m.py")
    svc = make_service()
    assert svc.call(b"m:x") == b"r1"
    _relink(releases / "current", "r2")
    wait_until(lambda: replies(svc, b"m:x", b"r2"))
    write_module(releases / "r2", "m", version("r2 edited"))
    wait_until(lambda: replies(svc, b"m:x", b"r2 edited"))


def test_a_symlinked_module_file_reloads_when_the_folder_is_polled(tmp_path, make_service):
    # Without inotify at start the folder is polled, and the poll's stat follows the link.
    shared = tmp_path / "shared"
    shared.mkdir()
    target = write_module(shared, "m", version("v1"))
    _linked_module(tmp_path, target)
    svc = make_service(start=False)
    with _inotify_used_up():
        svc.start()
    assert "polling it every" in svc.log()
    _settled(svc)
    target.write_text(version("v2"))
    wait_until(lambda: replies(svc, b"m:x", b"v2"), timeout=10)


def test_a_link_target_inotify_cannot_watch_is_polled_for(tmp_path, make_service):
    # The folder watched with inotify, but none left for the folder a new link leads to.
    shared = tmp_path / "shared"
    shared.mkdir()
    target = write_module(shared, "m", version("v1"))
    (tmp_path / "modules").mkdir()
    svc = make_service()
    with _inotify_used_up():
        _linked_module(tmp_path, target)
        svc.wait_for_log("cannot watch the folders module symlinks lead to with inotify")
    assert f"polling {tmp_path / 'modules'} every 0.5 s as well" in svc.log()
    wait_until(lambda: replies(svc, b"m:x", b"v1"))
    target.write_text(version("v2"))
    wait_until(lambda: replies(svc, b"m:x", b"v2"), timeout=10)


def test_a_module_links_target_folder_deleted_and_made_again_is_watched_again(
    tmp_path, make_service
):
    # The watch goes with the folder (rm -rf, a release rebuilt): the new one is watched.
    shared = tmp_path / "shared"
    shared.mkdir()
    _linked_module(tmp_path, write_module(shared, "m", version("v1")))
    svc = make_service()
    assert svc.call(b"m:x") == b"v1"
    shutil.rmtree(shared)
    wait_until(lambda: replies(svc, b"m:x", b"400: Unknown request"))
    shared.mkdir()
    target = write_module(shared, "m", version("v2"))
    wait_until(lambda: replies(svc, b"m:x", b"v2"))
    wait_until(lambda: shared.stat().st_ino in _watched_inodes(svc))
    target.write_text(version("v3"))
    wait_until(lambda: replies(svc, b"m:x", b"v3"))


def test_a_module_linked_to_another_file_of_the_folder_reloads_with_it(tmp_path, make_service):
    # One module under two names (alias.py -> real.py): the watch saw real.py change, and
    # only real reloaded; alias kept the old code.
    modules = tmp_path / "modules"
    modules.mkdir()
    real = write_module(modules, "real", version("v1"))
    (modules / "alias.py").symlink_to("real.py")
    svc = make_service()
    assert svc.call(b"alias:x") == b"v1"
    _settled(svc)
    real.write_text(version("v2"))
    wait_until(lambda: replies(svc, b"real:x", b"v2") and replies(svc, b"alias:x", b"v2"))


def _watch_threads(svc) -> list[str]:
    """The threads the watches of link targets were made and removed in (``-v`` lines)."""
    return re.findall(r"watching \S+?(?:, where module symlinks lead)? \(in thread ([^)]+)\)$",
                      svc.log(), re.M)  # fmt: skip


def test_a_link_targets_watch_is_removed_off_the_event_loop(tmp_path, make_service):
    # watchdog's unschedule joins the watch's thread: it ran on the event loop, which served
    # nothing for those ~8 ms. Every watch change now runs in one thread of its own.
    svc, (old_dir, new_dir), (_, new), link = _two_releases(
        tmp_path, make_service, ("old", "new"), "-v")
    svc.wait_for_log(f"watching {os.path.realpath(old_dir)}, where module symlinks lead")
    _relink(link, new)
    svc.wait_for_log(f"no longer watching {os.path.realpath(old_dir)} (in thread")
    svc.wait_for_log(f"watching {os.path.realpath(new_dir)}, where module symlinks lead")
    threads = _watch_threads(svc)
    assert len(threads) == 3, svc.log()
    assert "MainThread" not in threads  # (the event loop's)
    assert len(set(threads)) == 1  # one thread: the changes of a folder land in their order
    assert svc.stop() == 0
    assert "Traceback" not in svc.log()


def test_a_module_link_repointed_and_straight_back_watches_its_target(tmp_path, make_service):
    # A -> B -> A in quick succession: A's watch removed, B's made, B's removed and A's made
    # again, each after the one before (B's removal run before B's watch was made, or A's
    # watch before A's removal, would leave B watched or A unwatched: A's edits unseen).
    svc, (a_dir, b_dir), (a, b), link = _two_releases(tmp_path, make_service, ("a", "b"))
    wait_until(lambda: a_dir.stat().st_ino in _watched_inodes(svc))
    _relink(link, b)
    wait_until(lambda: replies(svc, b"m:x", b"b1"))  # decided; the watches may be under way
    _relink(link, a)
    wait_until(lambda: replies(svc, b"m:x", b"a1"))
    a_ino, b_ino = a_dir.stat().st_ino, b_dir.stat().st_ino
    wait_until(lambda: a_ino in (watched := _watched_inodes(svc)) and b_ino not in watched)
    a.write_text(version("a2"))
    wait_until(lambda: replies(svc, b"m:x", b"a2"))
    b.write_text(version("b2"))  # no longer followed
    write_module(link.parent, "marker", version("seen"))  # a change after b's
    wait_until(lambda: replies(svc, b"marker:x", b"seen"))
    assert svc.call(b"m:x") == b"a2"
