"""``bgservice serve --check``: the configuration and every module's import checked by a
real process, which must start nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, write_module


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder with its modules folder, where the check runs."""
    (tmp_path / "modules").mkdir()
    return tmp_path


def check(
    folder: Path, config: str, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    (folder / "service.config").write_text(f'modules = "{folder / "modules"}"\n{config}')
    return subprocess.run(
        [sys.executable, str(REPO / "service.py"), "--check", "-c", "service.config", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_good_configuration_passes_and_nothing_is_started(site):
    with socket.socket() as taken:  # the service's own port, held: a check must not bind
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        write_module(site / "modules", "hello", "def handle_tcp(request):\n    return 'hi'\n")
        write_module(site / "modules", "_shared", "GREETING = 'hi'\n")
        write_module(site / "modules", "greet", "from . import _shared\n\n"
                     "def handle_tcp(request):\n    return _shared.GREETING\n")  # fmt: skip
        db, log = site / "state" / "jobs.db", site / "logs" / "bg.log"
        done = check(site, f'db = "{db}"\n[log]\nfile = "{log}"\n'
                     f'[[listen]]\nhost = "127.0.0.1"\nport = {port}\n')  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "configuration OK (service.config)" in done.stdout
    assert f"TCP+UDP 127.0.0.1:{port}" in done.stdout
    assert "  allow:     127.0.0.0/8, ::1/128 (off loopback)\n" in done.stdout  # (the default)
    assert ": greet, hello" in done.stdout  # modules, not the helper
    assert f"sqlite at {db}" in done.stdout
    assert not db.exists() and not log.exists() and not db.parent.exists()


def test_each_module_that_would_not_load_is_named_with_its_line(site):
    modules = site / "modules"
    write_module(modules, "good", "def handle_tcp(request):\n    return 'ok'\n")
    write_module(modules, "unclosed", "def handle_tcp(request):\n    return (\n")
    write_module(modules, "needs", "import bgservice_no_such_package\n")
    write_module(modules, "typo", 'EXECUTION = "proces"\n\ndef handle_tcp(request):\n    pass\n')
    write_module(modules, "quiet", "X = 1\n")  # no handler: it loads (calls answer 501)
    done = check(site, "")
    assert done.returncode == 2, done.stdout
    lines = done.stderr.splitlines()
    assert "bgservice: check: module unclosed: unclosed.py:2: SyntaxError" in lines[-2]
    assert lines[0].startswith("bgservice: check: module needs: needs.py:1: ModuleNotFound")
    assert any("module typo: typo.py" in line and "proces" in line for line in lines), lines
    assert lines[-1] == "bgservice: check failed: 3 problem(s)"
    assert "good" not in done.stderr and "quiet" not in done.stderr and done.stdout == ""


def test_a_module_hung_at_import_is_named_and_the_check_still_ends(site):
    write_module(site / "modules", "hangs", "import time\ntime.sleep(3600)\n")
    done = check(site, "[reload]\nimport_timeout = 0.5\n")
    assert done.returncode == 2
    assert "module hangs: hangs.py: still importing after 0.5 s" in done.stderr


def test_modules_hung_at_import_cost_one_import_timeout_together(site):
    # Found by review: imported one at a time, each hung module cost a whole import_timeout
    # (these four: 12 s) before the check answered. Together they cost about one (3 s): the
    # timeout below is the bound, its TimeoutExpired the failure.
    names = [f"hangs{n}" for n in range(4)]
    for name in names:
        write_module(site / "modules", name, "import time\ntime.sleep(3600)\n")
    done = check(site, "[reload]\nimport_timeout = 3\n", timeout=9)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [  # each named, in the folder's order
        *(f"bgservice: check: module {name}: {name}.py: still importing after 3 s "
          "([reload] import_timeout)" for name in names),
        "bgservice: check failed: 4 problem(s)",
    ]  # fmt: skip


def test_a_log_file_or_database_that_cannot_be_written_is_named(site):
    (site / "plain").write_text("a file, not a folder")
    (site / "db-folder").mkdir()
    done = check(site, f'db = "{site / "db-folder"}"\n'
                 f'[log]\nfile = "{site / "plain" / "bg.log"}"\n')  # fmt: skip
    assert done.returncode == 2
    assert f"[log] file {site / 'plain' / 'bg.log'}: cannot be made in" in done.stderr
    assert f"the queue database {site / 'db-folder'}: not a file" in done.stderr


def test_a_configuration_error_is_said_as_serve_says_it(site):
    done = check(site, "[queue]\nworkrs = 4\n")
    assert done.returncode == 2
    assert done.stderr.startswith("bgservice: configuration error: service.config: [queue] workrs")
    assert "did you mean" in done.stderr.lower()


def test_what_a_start_would_refuse_about_sockets_and_the_ready_file_is_named(site):
    # Found by review: each of these passed the check and then failed the start.
    long = site / ("s" * 120 + ".sock")
    done = check(site, f'[[listen]]\nname = "a"\nunix = "{long}"\n'
                 f'[[listen]]\nname = "b"\nunix_dgram = "{site / "no" / "b.dgram"}"\n')  # fmt: skip
    assert done.returncode == 2
    assert "bytes, longer than a Unix socket address holds" in done.stderr
    assert f"unix:{site / 'no' / 'b.dgram'}: its folder {site / 'no'} is not a writable" \
        in done.stderr  # fmt: skip
    ready = check(site, "", "--ready-file", str(site / "no" / "ready.json"))
    assert ready.returncode == 2 and "configuration error: --ready-file" in ready.stderr


def test_the_check_ends_whatever_a_module_leaves_running_and_keeps_stdout_its_own(site):
    # Found by review: a thread that is not a daemon (or an atexit hook) left by a module's
    # import held the check after its "configuration OK" until it ended; and what a module
    # printed at import went into the summary on stdout.
    stays = ("import threading, time\n"
             "threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()\n"
             "print('hello from stays')\n\ndef handle_tcp(request):\n    return 'x'\n")
    write_module(site / "modules", "stays", stays)
    done = check(site, '[[listen]]\nhost = "::1"\nport = 23999\n')
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("bgservice: configuration OK") and "hello" not in done.stdout
    assert "hello from stays" in done.stderr
    assert "TCP+UDP [::1]:23999" in done.stdout


def test_a_redis_password_is_not_shown(site):
    done = check(site, '[queue]\nbackend = "redis"\n[redis]\nurl = "redis://:s3cret@127.0.0.1:1/0"\n')
    assert done.returncode == 0, done.stderr
    assert "redis://:***@127.0.0.1:1/0" in done.stdout and "s3cret" not in done.stdout


def test_what_a_start_would_warn_of_is_said_and_the_check_passes(site):
    # Found by review: the start warns of these and runs; the check said nothing.
    modules = site / "modules"
    write_module(modules, "queue", "def handle_tcp(request):\n    return 'x'\n")
    write_module(modules, "echo", "def handle_tcp(request):\n    return 'x'\n")
    (modules / "a.b.py").write_text("")
    done = check(site, '[alerts]\nmodule = "nosuch"\n'
                 '[[schedule]]\nname = "nightly"\nmodule = "nomod"\nevery = 60\n')  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "bgservice: check: warning: ignoring a.b.py: not a module name (docs/modules.md)",
        "bgservice: check: warning: module queue: never called (queue:... is the service's):"
        " rename it",
        "bgservice: check: warning: [alerts] module 'nosuch' is not among the modules",
        "bgservice: check: warning: schedule nightly: module 'nomod' is not among the modules",
    ]


def test_the_check_warns_in_the_words_a_start_logs(site, make_service):
    # Found by review: the check worded these warnings in its own text, a copy of the
    # start's that drifted ("a.b.py: not a module name, ignored" against "ignoring a.b.py:
    # not a module name"): the check must say what the log will.
    modules = site / "modules"
    write_module(modules, "service", "def handle_tcp(request):\n    return 'x'\n")
    (modules / "a.b.py").write_text("def handle_tcp(request):\n    return 'x'\n")
    write_module(modules, "typo", "async def handle_tpc(request):\n    return 'x'\n")
    done = check(site, "")
    assert done.returncode == 0, done.stderr
    said = [line.removeprefix("bgservice: check: warning: ") for line in done.stderr.splitlines()]
    assert len(said) == 3 and "a.b.py" in said[0] and "module service" in said[1], said
    assert said[2] == "module typo: defines no handler; handle_tpc looks like a misspelled " \
        "handle_tcp (never called as it is)"
    svc = make_service("[reload]\nimport_timeout = 5\n", root=site)  # the same modules folder
    logged = svc.log().splitlines()  # (both logged before it is ready, as the check runs)
    for text in said:
        assert any(line.endswith(f": {text}") for line in logged), (text, logged)


def test_a_secret_shared_by_http_token_and_a_named_token_fails_the_check(site):
    # Found by a security review: --check said "configuration OK", and the start then
    # refused the config (exit 2, which the unit does not restart): the two were compared
    # only where the HTTP API was made.
    http = ('[http]\nenabled = true\nport = 0\ntoken = "dup-secret-1"\n'
            '[http.tokens]\nro = { token = "dup-secret-1", scope = "read" }\n')  # fmt: skip
    done = check(site, http)
    assert done.returncode == 2, done.stdout
    assert ("bgservice: check: [http] tokens: [http] token and ro have the same token: "
            "give each a secret of its own") in done.stderr  # fmt: skip
    assert "dup-secret-1" not in done.stderr + done.stdout


def test_the_allow_list_is_shown_as_read(site):
    # Found by a security review: "10.0.0.5/8" is read as 10.0.0.0/8 (host bits off, as
    # a router's ACL reads it) and an IPv4-mapped entry as IPv4; --check did not show the
    # list, so an operator who meant one host never saw that a /8 was let in.
    done = check(site, 'allow = ["10.0.0.5/8", "::ffff:192.0.2.1/128", "2001:db8::1/64"]\n')
    assert done.returncode == 0, done.stderr
    assert "  allow:     10.0.0.0/8, 192.0.2.1/32, 2001:db8::/64 (off loopback)\n" in done.stdout


def test_a_call_from_rule_that_jobs_get_around_is_warned_of(site):
    write_module(site / "modules", "reset", 'CALL_FROM = {"unix"}\n\n'
                 "def handle_tcp(request):\n    return 'done'\n")  # fmt: skip
    done = check(site, "")
    assert done.returncode == 0, done.stderr
    assert ("warning: module reset: CALL_FROM admits only unix, but any client may queue "
            "its jobs") in done.stderr  # fmt: skip


def test_a_config_every_user_may_read_with_a_secret_in_it_is_warned_of(site):
    # Found by a security review: the unit's install comment (install -m 644) left the
    # HTTP tokens and the Redis password readable by every user, without a word.
    http = '[http]\nenabled = true\nport = 0\ntoken = "s3cret-token-1"\n'
    (site / "service.config").touch(mode=0o644)
    done = check(site, http)
    assert done.returncode == 0, done.stderr
    assert ("warning: service.config holds [http] token, and every user may read it (mode "
            "644): let only the service's user or group read it") in done.stderr  # fmt: skip
    assert "s3cret-token-1" not in done.stderr + done.stdout
    (site / "service.config").chmod(0o640)
    assert "every user may read it" not in check(site, http).stderr
