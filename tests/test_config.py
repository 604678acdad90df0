"""Configuration: bgservice.config on its own, then the command line over a real process."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgservice import __version__, config
from bgservice.config import Limits, Listener, QueueSettings, Settings, WorkerSettings
from bgservice.errors import ConfigError
from tests.conftest import REPO, Framed, recv_all, wait_until, write_module

RECORDER = """
from pathlib import Path

OUT = Path({out!r})


def handle_udp(request):
    with OUT.open("a") as f:
        f.write(request.text + "\\n")
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, name: str = "service.config") -> Settings:
    return config.load(write(tmp_path / name, text))


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


def run_cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "service.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def file_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder for Unix sockets (their paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="bgs-", dir="/tmp") as folder:
        yield Path(folder)


# --- loading the file ------------------------------------------------------------------


def test_empty_file_gives_the_defaults(tmp_path):
    settings = load_text(tmp_path, "")
    assert settings.listeners == (Listener(),)
    assert settings.listeners[0].host == "127.0.0.1"
    assert settings.listeners[0].port == 12341
    assert settings.limits == Limits()
    assert settings.queue == QueueSettings()
    assert settings.workers == WorkerSettings()
    assert settings.allow == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert settings.verbose is False
    assert settings.global_handler == 0
    assert settings.log_file is None


def test_toml_values_are_read(tmp_path):
    settings = load_text(
        tmp_path,
        textwrap.dedent("""
        allow = ["10.0.0.0/8", "192.168.1.7/24"]
        [[listen]]
        name = "alpha"
        host = "::1"
        port = 0
        udp = false
        [[listen]]
        unix = "/run/x.sock"
        mode = "600"
        [limits]
        threads = 3
        shutdown_grace = 0
        udp_queue = 5
        [queue]
        workers = 2
        module_limits = { less = 1 }
        [workers]
        processes = 1
        [log]
        verbose = true
        global_handler = "stderr"
        [reload]
        debounce_ms = 0
        """),
    )
    alpha, local = settings.listeners
    assert alpha == Listener(name="alpha", host="::1", port=0, udp=False)
    assert local.name == "listener2"
    assert (local.host, local.port, local.unix, local.mode) == (None, None, "/run/x.sock", 0o600)
    assert settings.limits.threads == 3
    assert settings.limits.shutdown_grace == 0.0
    assert settings.limits.udp_queue == 5
    assert settings.limits.read_timeout == Limits().read_timeout
    assert settings.queue.workers == 2
    assert settings.module_limits == {"less": 1}
    assert settings.workers.processes == 1
    assert settings.verbose is True
    assert settings.global_handler == 2
    assert settings.reload_debounce_ms == 0.0
    # strict=False: a host address with a prefix names its network
    assert settings.allow[1] == ipaddress.ip_network("192.168.1.0/24")


def test_relative_paths_are_taken_from_the_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc" / "bgservice"
    folder.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = config.load(
        write(
            folder / "service.config",
            'modules = "mods"\ndb = "../data/q.db"\n[log]\nfile = "log/bg.log"\n',
        )
    )
    assert settings.modules == folder.resolve() / "mods"
    assert settings.db == folder.resolve() / "../data/q.db"
    assert settings.log_file == folder.resolve() / "log/bg.log"
    absolute = config.load(write(folder / "abs.config", f'modules = "{tmp_path}/m"\n'))
    assert absolute.modules == tmp_path / "m"


def test_default_paths_are_taken_from_the_files_folder_too(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    settings = config.load(write(folder / "service.config", "[limits]\nthreads = 2\n"))
    assert settings.modules == folder.resolve() / "modules"
    assert settings.db == folder.resolve() / "bgservice.db"


def test_the_originals_json_list_loads_into_listeners(tmp_path):
    text = json.dumps(
        [
            {"server": "alpha", "address": "127.0.0.1", "port": 12341},
            {"server": "beta", "address": "0.0.0.0", "port": 12342},
            {"server": "gamma", "address": "127.0.0.1", "port": 12343},
        ],
        indent=2,
    )
    settings = load_text(tmp_path, text)
    assert settings.listeners == (
        Listener(name="alpha", host="127.0.0.1", port=12341),
        Listener(name="beta", host="0.0.0.0", port=12342),
        Listener(name="gamma", host="127.0.0.1", port=12343),
    )
    assert all(li.tcp and li.udp for li in settings.listeners)
    assert settings.modules == tmp_path.resolve() / "modules"
    assert settings.db == tmp_path.resolve() / "bgservice.db"
    assert settings.limits == Limits()


def test_json_list_with_defaults_and_errors(tmp_path):
    settings = load_text(tmp_path, '[{"port": 0}]')
    assert settings.listeners == (Listener(name="listener1", host="127.0.0.1", port=0),)
    assert "needs a port" in config_error(tmp_path, '[{"server": "alpha"}]')
    assert "port" in config_error(tmp_path, '[{"port": "12341"}]')
    assert "port" in config_error(tmp_path, '[{"port": 70000}]')
    assert "empty" in config_error(tmp_path, "[]")



def test_a_json_config_that_does_not_parse_is_a_json_error_with_its_line(tmp_path):
    # Read as TOML after JSON failed: "Invalid initial character for a key part (at line
    # 1, column 2)" for a trailing comma in the original's format.
    message = config_error(tmp_path, '[\n  {"server": "alpha", "port": 12341},\n]')
    assert "not valid JSON (the original's format)" in message and "line 3" in message
    message = config_error(tmp_path, '{"port": 12341}')
    assert "the original's list of servers" in message and "service.config is TOML" in message
    assert load_text(tmp_path, "[limits]\nthreads = 4\n").limits.threads == 4  # TOML still

def test_unknown_key_names_the_key_and_its_line(tmp_path):
    message = config_error(tmp_path, "[limits]\nthreads = 4\nthreadz = 8\n[log]\nverbose = true\n")
    assert "threadz" in message
    assert "line 3" in message
    assert "unknown key" in message
    assert "threads" in message  # the known keys are listed
    assert "unknown key, did you mean threads? (known keys: " in message  # the nearest first
    message = config_error(tmp_path, "[limitz]\nthreads = 4\n")  # a section too
    assert "limitz (line 1): unknown key, did you mean limits? (known keys: " in message
    message = config_error(tmp_path, "[queue]\nzzz = 4\n")  # nothing near: no guess
    assert "zzz (line 2): unknown key (known keys: " in message
    assert str(tmp_path / "service.config") in message


def test_unknown_top_level_key_and_section(tmp_path):
    message = config_error(tmp_path, 'modules = "m"\nport = 1234\n')
    assert "port" in message and "line 2" in message and "unknown key" in message
    assert "host and port go in a [[listen]] table" in message  # where it belongs
    message = config_error(tmp_path, "[limits]\nthreads = 4\n\n[limitz]\nthreads = 4\n")
    assert "limitz" in message and "unknown key" in message


def test_a_table_written_inline_dotted_or_as_a_value_is_named_with_its_line(tmp_path):
    # Only keys under a [table] header had a line: these said none.
    cases = {
        '# top\nqueue = 5\n': "[queue] (line 2) must be a table",
        '[[queue]]\nworkers = 1\n': "[queue] (line 1) must be a table",
        'modules = "m"\nqueue.workers = "x"\n': "[queue] workers (line 2): must be a whole",
        'queue = { workers = "x" }\n': "[queue] workers (line 1): must be a whole",
        'queue = {}\nhttp.enabled = true\nhttp.port = "no"\n': "[http] port (line 3): must",
        'listen = [{ host = "127.0.0.1", port = "x" }]\n': "#1 port (line 1): must be a port",
    }
    for text, said in cases.items():
        assert said in config_error(tmp_path, text), text


def test_quoted_subtable_and_array_of_inline_tables_keys_are_named_with_their_line(tmp_path):
    # Each of these named no line, or the array's first line (found by a review).
    cases = {
        "# top\n'queue'.'workers' = \"x\"\n": "[queue] workers (line 2): must be a whole",
        '# top\n[ "queue" ]\nworkers = "x"\n': "[queue] workers (line 3): must be a whole",
        "[queue]\nworkers = 2\n\n[queue.extra]\nx = 1\n": "[queue] extra (line 4): unknown",
        '[queue]\nworkers = 2\nextra.x = 1\n': "[queue] extra (line 3): unknown key",
        'listen = [\n  { host = "127.0.0.1", port = 1 },  # "{ a }"\n'
        '\n  { host = "127.0.0.1", port = "x" },\n]\n': "#2 port (line 4): must be a port",
        'listen = [{ host = "127.0.0.1", port = 1 },\n  { host = "{", portz = 2 }]\n':
            "#2 portz (line 2): unknown key",
    }
    for text, said in cases.items():
        assert said in config_error(tmp_path, text), text


def test_unknown_key_in_a_listener(tmp_path):
    message = config_error(tmp_path, '[[listen]]\nname = "a"\nadress = "127.0.0.1"\nport = 1\n')
    assert "[[listen]] #1" in message and "adress" in message and "line 3" in message


@pytest.mark.parametrize(
    ("text", "key", "line", "problem"),
    [
        ('[limits]\nthreads = "many"\n', "threads", 2, "whole number"),
        ("[limits]\nread_timeout = 0\n", "read_timeout", 2, "greater than 0"),
        # TOML's nan and inf: the old checks (v <= 0) let both through, and the first
        # connection then crashed the service (exit 70) converting inf to a deadline.
        ("[limits]\nread_timeout = inf\n", "read_timeout", 2, "greater than 0"),
        ("[limits]\nidle_timeout = nan\n", "idle_timeout", 2, "greater than 0"),
        ("[limits]\ncall_timeout = nan\n", "call_timeout", 2, "greater than 0"),
        ("[limits]\nshutdown_grace = inf\n", "shutdown_grace", 2, "at least 0"),
        ("[queue]\njob_timeout = inf\n", "job_timeout", 2, "number of seconds"),
        # 1e300: a retry "due in" a 300-digit span in queue:status and the CLI
        ("[queue]\nbackoff = 1e300\n", "backoff", 2, "at most 3155760000"),
        ("[queue]\njob_timeout = 4e9\n", "job_timeout", 2, "up to 3155760000"),
        ("[limits]\nudp_queue = true\n", "udp_queue", 2, "whole number"),
        ("[queue]\nretries = -1\n", "retries", 2, "at least 0"),
        ("[queue]\nbackoff_jitter = 1.5\n", "backoff_jitter", 2, "at most 1"),
        ("[log]\nverbose = 1\n", "verbose", 2, "true or false"),
        ('[log]\nglobal_handler = "loud"\n', "global_handler", 2, "-EE"),
        ('allow = "127.0.0.1"\n', "allow", 1, "list of networks"),
        ('allow = ["127.0.0.1", "not-an-ip"]\n', "allow", 1, "invalid network"),
        ("allow = [10]\n", "allow", 1, "list of networks"),  # (it was 0.0.0.10)
        ('modules = ""\n', "modules", 1, "non-empty"),
        ("[[listen]]\nport = 65536\n", "port", 2, "port number"),
        ('[[listen]]\nmode = "rw-rw----"\nunix = "/x"\n', "mode", 2, "file mode"),
        ('\n\n[[listen]]\nname = "x"\n', "port", None, "needs host/port"),
        ("listen = 3\n", "listen", 1, "array of tables"),
    ],
)
def test_wrong_value_names_the_key(tmp_path, text, key, line, problem):
    message = config_error(tmp_path, text)
    assert re.search(rf"\b{key}\b", message)
    assert problem in message
    if line is not None:
        assert f"(line {line})" in message


@pytest.mark.parametrize(
    "text",
    [
        '[http]\ntokens = { ops = { token = "s3cr3t", scope = "operate" }, r = { token = "x" } }\n',
        '[redis]\nurl = "redis:/:hunter2-password@host:6379"\n',  # one slash short
    ],
)
def test_a_bad_secret_is_named_but_never_shown(tmp_path, text):
    # An error once showed the whole tokens table, every token in it (found by a review).
    message = config_error(tmp_path, text)
    assert "(line 2)" in message
    assert "s3cr3t" not in message and "hunter2" not in message


def test_error_in_second_listener_names_its_own_line(tmp_path):
    message = config_error(
        tmp_path, '[[listen]]\nname = "a"\nport = 1\n[[listen]]\nname = "b"\nport = "x"\n'
    )
    assert "#2" in message and "port" in message
    assert "(line 6)" in message


def test_toml_syntax_error_gives_the_line(tmp_path):
    message = config_error(tmp_path, "[limits]\nthreads = 4\nread_timeout = = 2\n")
    assert str(tmp_path / "service.config") in message
    assert "line 3" in message


def test_a_table_or_key_written_twice_is_named_with_both_lines(tmp_path):
    # The README's [http] snippet pasted below the shipped file's read "Cannot declare
    # ('http',) twice (at line 180, column 6)": a Python tuple, and one of the two lines.
    cases = {
        "[http]\nport = 1\n[log]\n\n[http]\nenabled = true\n":
            "[http] (line 5) is declared twice, and at line 1 before it: write each table "
            "once, its keys together",
        'http.port = 1\n[ "http" ]\n': "[http] (line 2) is declared twice, and at line 1",
        "[queue.extra]\n[queue . 'extra']\n": "[queue.extra] (line 2) is declared twice, "
            "and at line 1",
        "[limits]\nthreads = 4\n\nthreads = 5\n": "threads (line 4) is given twice in its "
            "table: keep one",
    }
    for text, said in cases.items():
        message = config_error(tmp_path, text)
        assert said in message and "Cannot" not in message, (text, message)


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.config")
    path = tmp_path / "latin1.config"
    path.write_bytes(b'modules = "m\xe9"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        config.load(path)


def test_the_shipped_service_config_parses_with_documented_defaults():
    settings = config.load(REPO / "service.config")
    assert settings.listeners == (Listener(name="alpha", host="127.0.0.1", port=12341),)
    assert settings.modules == REPO / "modules"
    assert settings.db == REPO / "bgservice.db"
    # Its comment says "the values shown are the defaults".
    assert settings.limits == Limits()
    assert settings.queue == QueueSettings()
    assert settings.workers == WorkerSettings()
    assert settings.allow == Settings().allow
    assert settings.verbose is False and settings.global_handler == 0
    assert settings.reload_debounce_ms == Settings().reload_debounce_ms
    assert settings.lag_warn_ms == Settings().lag_warn_ms


# --- with_overrides --------------------------------------------------------------------


def test_overrides_host_and_port_replace_the_listeners_by_one(tmp_path):
    settings = load_text(
        tmp_path,
        '[[listen]]\nname = "alpha"\nhost = "127.0.0.1"\nport = 12341\n'
        '[[listen]]\nname = "beta"\nhost = "127.0.0.1"\nport = 12342\n'
        '[[listen]]\nunix = "/tmp/x.sock"\n',
    )
    assert config.with_overrides(settings) == settings
    by_port = config.with_overrides(settings, port=9000)
    assert by_port.listeners == (Listener(name="alpha", host="127.0.0.1", port=9000),)
    by_host = config.with_overrides(settings, host="::1")
    assert by_host.listeners == (Listener(name="alpha", host="::1", port=12341),)
    both = config.with_overrides(settings, host="::1", port=0)
    assert both.listeners == (Listener(name="alpha", host="::1", port=0),)
    # the file is not changed by the overrides
    assert len(settings.listeners) == 3


def test_overrides_port_with_only_unix_listeners(tmp_path):
    settings = load_text(tmp_path, '[[listen]]\nname = "local"\nunix = "/tmp/x.sock"\n')
    assert config.with_overrides(settings, port=5000).listeners == (
        Listener(name="default", host="127.0.0.1", port=5000),
    )


def test_overrides_modules_db_and_flags(tmp_path):
    settings = load_text(tmp_path, 'modules = "m"\ndb = "q.db"\n')
    changed = config.with_overrides(
        settings,
        modules=Path("/srv/mods"),
        db=Path("/var/lib/q.db"),
        verbose=True,
        global_handler=1,
    )
    assert changed.modules == Path("/srv/mods")
    assert changed.db == Path("/var/lib/q.db")
    assert changed.verbose is True and changed.global_handler == 1
    assert changed.listeners == settings.listeners
    untouched = config.with_overrides(settings, modules=None, db=None)
    assert untouched.modules == tmp_path.resolve() / "m"
    assert untouched.db == tmp_path.resolve() / "q.db"


# --- the command line, over a real process ---------------------------------------------


def test_bad_config_exits_2_with_one_message_and_binds_nothing(tmp_path):
    port = free_port()
    cfg = write(
        tmp_path / "bad.config",
        f'[[listen]]\nhost = "127.0.0.1"\nport = {port}\n[limits]\nthreads = 0\n',
    )
    ready = tmp_path / "ready.json"
    result = run_cli("-c", str(cfg), "--ready-file", str(ready), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bgservice: configuration error:")
    assert "threads" in lines[0] and "(line 5)" in lines[0] and "at least 1" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # no log at all: nothing was started
    assert not ready.exists()
    assert port_is_free(port)


def test_the_redis_engine_without_its_client_is_a_configuration_error(tmp_path):
    # As a machine without the [redis] extra: the service says what to install, at start.
    cfg = write(tmp_path / "r.config", '[queue]\nbackend = "redis"\n')
    hidden = "import runpy, sys; sys.modules['hiredis'] = None; sys.argv = sys.argv[1:]; "
    hidden += "runpy.run_path(sys.argv[0], run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", hidden, str(REPO / "service.py"), "-c", str(cfg)],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr and "backend" in result.stderr
    assert f"needs hiredis: {sys.executable} -m pip install -e '{REPO}[redis]'" in result.stderr
    assert "Traceback" not in result.stderr and ", got 'redis'" not in result.stderr


def test_a_modules_folder_that_does_not_exist_exits_2(tmp_path):
    # A typo in -m or modules = once started a service with no modules, which never
    # noticed the folder once it was there.
    result = run_cli("-m", str(tmp_path / "modlues"), "-p", "0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("bgservice: configuration error: modules folder")
    assert "modlues does not exist (-m)" in result.stderr and result.stdout == ""


def test_a_start_elsewhere_names_the_folder_it_looked_for_and_the_file_it_did_not_find(
    tmp_path,
):
    # Run from another folder: "modules folder modules does not exist (-m DIR, or modules
    # = in service.config)" named neither the folder looked for nor that no file was read.
    result = run_cli("-p", "0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"modules folder {tmp_path / 'modules'} does not exist (no service.config in " \
        f"{tmp_path} either: run bgservice where its modules/ and service.config are, or " \
        "give -m DIR)" in result.stderr, result.stderr
    (tmp_path / "service.config").write_text('modules = "mods"\n')
    result = run_cli("-p", "0", cwd=tmp_path)
    assert f"modules folder {tmp_path / 'mods'} does not exist (modules = in service.config" \
        in result.stderr, result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = run_cli("-c", str(tmp_path / "nope.config"), cwd=tmp_path)
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "cannot read" in result.stderr


def test_bad_option_is_a_usage_error(tmp_path):
    result = run_cli("-p", "70000", cwd=tmp_path)
    assert result.returncode == 2
    assert "70000" in result.stderr


def test_port_in_use_gives_a_clear_message_and_exit_1(make_service):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        svc = make_service(
            f'[[listen]]\nname = "busy"\nhost = "127.0.0.1"\nport = {port}\n', start=False
        )
        svc.start(wait=False)
        assert svc.wait() == 1
    out = svc.log()
    assert f"cannot listen on 127.0.0.1:{port} (busy)" in out
    assert "address already in use" in out.lower() and "another service running" in out
    assert f"another port: -p N, or the listener's port in {svc.config})" in out  # what to do
    assert "Traceback" not in out
    assert not svc.ready_file.exists()



def test_a_start_that_fails_says_why_on_stderr_too(tmp_path):
    # The console log is stdout: a wrapper reading stderr alone (as for the errors found
    # before the start, "bgservice: configuration error: ...") heard only the exit code.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = ["-p", str(port), "-m", str(REPO / "modules"), "--db", str(tmp_path / "q.db")]
        result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    said = f"cannot listen on 127.0.0.1:{port}"
    assert f"bgservice: {said}" in result.stderr and said in result.stdout  # (the log line)

def test_udp_port_in_use_gives_a_clear_message(make_service):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        svc = make_service(
            f'[[listen]]\nname = "busy"\nhost = "127.0.0.1"\nport = {port}\n', start=False
        )
        svc.start(wait=False)
        assert svc.wait() == 1
    assert f"cannot listen on 127.0.0.1:{port} (busy)" in svc.log()
    assert not svc.ready_file.exists()


def test_port_option_overrides_the_file(make_service):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        # The file names a port in use: only the -p override lets the service start.
        svc = make_service(
            f'[[listen]]\nname = "test"\nhost = "127.0.0.1"\nport = {held}\n', "-p", "0"
        )
        host, port = svc.tcp
        assert host == "127.0.0.1" and port != held
        assert svc.call(b"test:x") == b"Test"
        assert len(svc.info["listeners"]) == 1


def test_host_option_overrides_the_file(make_service):
    svc = make_service("", "--host", "::1")
    listener = svc.info["listeners"][0]
    assert listener["tcp"][0] == "::1" and listener["udp"][0] == "::1"
    with socket.create_connection(("::1", listener["tcp"][1]), timeout=10) as sock:
        sock.sendall(b"test:x")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"Test"
    assert "listener test: tcp://[::1]:" in svc.log()


def test_several_listeners_all_answer(make_service, modules_dir, tmp_path):
    out = tmp_path / "udp.txt"
    write_module(modules_dir, "rec", RECORDER.format(out=str(out)))
    listeners = "".join(
        f'[[listen]]\nname = "{name}"\nhost = "127.0.0.1"\nport = 0\n'
        for name in ("alpha", "beta", "gamma")
    )
    svc = make_service(listeners)
    bound = svc.info["listeners"]
    assert [b["name"] for b in bound] == ["alpha", "beta", "gamma"]
    assert len({tuple(b["tcp"]) for b in bound}) == 3
    for b in bound:
        with socket.create_connection(tuple(b["tcp"]), timeout=10) as sock:
            sock.sendall(b"test:x")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"Test"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(f"rec:{b['name']}".encode(), tuple(b["udp"]))
    wait_until(lambda: sorted(file_lines(out)) == ["alpha", "beta", "gamma"])
    for name in ("alpha", "beta", "gamma"):
        assert f"listener {name}: tcp://127.0.0.1:" in svc.log()


def test_the_originals_json_config_runs(make_service, tmp_path):
    (tmp_path / "service.config").write_text(
        json.dumps(
            [
                {"server": "alpha", "address": "127.0.0.1", "port": 0},
                {"server": "beta", "address": "127.0.0.1", "port": 0},
            ]
        )
    )
    svc = make_service()  # an existing config is used as it is
    assert [b["name"] for b in svc.info["listeners"]] == ["alpha", "beta"]
    assert svc.call(b"test:x") == b"Test"  # modules/ next to the config file


def test_unix_stream_listener_answers_with_its_mode(make_service, short_dir):
    path = short_dir / "s.sock"
    svc = make_service(
        '[[listen]]\nname = "test"\nhost = "127.0.0.1"\nport = 0\n'
        f'[[listen]]\nname = "local"\nunix = "{path}"\nmode = 0o660\n'
    )
    assert svc.info["listeners"][1] == {"name": "local", "unix": str(path)}
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"echo:over unix")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"over unix"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # no half-close
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"test:x")
        assert recv_all(sock) == b"Test"
    conn = Framed(str(path), family=socket.AF_UNIX)
    try:
        assert conn.call(b"test:x") == (200, b"Test")
        assert conn.call(b"helo") == (200, b"oleh")
        assert conn.call(b"nosuch:x") == (400, b"Unknown request")
    finally:
        conn.close()
    assert svc.stop() == 0
    assert not path.exists()  # removed at shutdown


def test_help_works(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--config", "--host", "--port", "--modules", "--db", "-E", "-e", "-v"):
        assert option in result.stdout


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(tmp_path, flag):
    result = run_cli(flag, cwd=tmp_path)
    assert result.returncode == 0
    # the program's name, whether started as service.py or as bgservice
    assert result.stdout.strip() == f"bgservice, version {__version__}"


# --- issue 18, item 8: a Unix socket's mode is octal, never a bare decimal integer -------


def test_a_bare_integer_mode_is_refused_naming_the_line(tmp_path, short_dir):
    # mode = 770 is TOML's decimal 770 (0o1402: sr------wT, anyone may connect): refused.
    path = short_dir / "s.sock"
    (tmp_path / "service.config").write_text(
        f'[[listen]]\nname = "local"\nunix = "{path}"\nmode = 770\n'
    )
    result = run_cli("-c", str(tmp_path / "service.config"), cwd=tmp_path, timeout=15)
    assert result.returncode == 2, result.stderr
    assert "mode (line 4)" in result.stderr
    assert '"770" or 0o770' in result.stderr
    assert not path.exists()


@pytest.mark.parametrize(
    ("literal", "mode"),
    [('"770"', 0o770), ('"0770"', 0o770), ('"0o770"', 0o770), ("0o770", 0o770), ('"600"', 0o600)],
)
def test_octal_modes_are_accepted(tmp_path, literal, mode):
    settings = load_text(tmp_path, f'[[listen]]\nunix = "/x.sock"\nmode = {literal}\n')
    assert settings.listeners[0].mode == mode


@pytest.mark.parametrize("literal", ["432", "0x1b0", "0b110110000", '"rwx"', '"0o99"', '"8"'])
def test_other_modes_are_refused(tmp_path, literal):
    message = config_error(tmp_path, f'[[listen]]\nunix = "/x.sock"\nmode = {literal}\n')
    assert "mode (line 3)" in message and "octal" in message


def test_the_total_buffer_bound_must_hold_one_whole_request(tmp_path):
    message = config_error(
        tmp_path, "[limits]\nmax_request_bytes = 2000\nmax_buffered_bytes = 1000\n"
    )
    assert "max_buffered_bytes (line 3)" in message and "max_request_bytes" in message


def test_a_backoff_cap_under_the_backoff_is_refused(tmp_path):
    # backoff = 600 under backoff_max = 300 was taken: every retry waited 300 s, and the
    # 600 the operator wrote said nothing.
    message = config_error(tmp_path, "[queue]\nbackoff = 600\nbackoff_max = 300\n")
    assert "[queue] backoff_max (line 3): must be at least backoff (600 s)" in message
    message = config_error(tmp_path, "[queue]\nbackoff_max = 0.5\n")  # under the default 1
    assert "backoff_max (line 2): must be at least backoff (1 s)" in message
    assert load_text(tmp_path, "[queue]\nbackoff = 0\nbackoff_max = 0\n").queue.backoff_max == 0
    message = config_error(tmp_path, "[queue]\nbackoff = 600\n")  # over the default 300
    assert "[queue] backoff (line 2): must be at most backoff_max (300 s, its default)" in message


def test_http_without_its_extra_says_how_to_install_it(tmp_path):
    # As a machine without the [http] extra: the command names this Python and checkout
    # (bgservice is not on PyPI, so "pip install bgservice[http]" would find nothing).
    cfg = write(tmp_path / "h.config", "[http]\nenabled = true\nport = 0\n")
    hidden = "import runpy, sys; sys.modules['aiohttp'] = None; sys.argv = sys.argv[1:]; "
    hidden += "runpy.run_path(sys.argv[0], run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", hidden, str(REPO / "service.py"), "-c", str(cfg), "-p", "0",
         "-m", str(REPO / "modules"), "--db", str(tmp_path / "jobs.db")],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    # Said before anything listens, as a configuration error: it was found only after the
    # listeners had opened, and the exit (1) said the service had failed (a newcomer's report).
    assert result.returncode == 2, result.stdout + result.stderr
    expected = f"needs aiohttp: {sys.executable} -m pip install -e '{REPO}[http]'"
    assert "[http] enabled (line 2)" in result.stdout + result.stderr
    assert expected in result.stdout + result.stderr
    assert "listener" not in result.stdout + result.stderr
    assert ", got True" not in result.stdout + result.stderr  # (true is right: aiohttp lacks)


def test_what_an_operator_review_found_is_refused_or_read_as_meant(tmp_path):
    """A blank host listened nowhere (exit 1, "Name or service not known"); a NUL in a
    path was a ValueError traceback; two listeners on one port were refused at the start
    as another service's (exit 1, which a service manager restarts for ever); unix and
    unix_dgram on one path deleted each other; relative socket paths were the working
    directory's; a JSON entry's misspelt key was ignored; a BOM was "Invalid statement"."""
    assert "host" in config_error(tmp_path, '[[listen]]\nhost = " "\nport = 1\n')
    assert "NUL" in config_error(tmp_path, '[log]\nfile = "a\\u0000b.log"\n')
    twice = '[[listen]]\nport = 7001\n[[listen]]\nname = "b"\nport = 7001\n'
    assert "[[listen]] #2 port (line 5): the same port as [[listen]] #1" in config_error(
        tmp_path, twice
    )
    same = '[[listen]]\nunix = "bg.sock"\nunix_dgram = "bg.sock"\n'
    assert "unix_dgram (line 3): the same path as [[listen]] #1's unix" in config_error(
        tmp_path, same
    )
    other = '[[listen]]\nunix = "bg.sock"\n[[listen]]\nunix_dgram = "bg.sock"\n'
    assert "the same path as [[listen]] #1's unix" in config_error(tmp_path, other)
    settings = load_text(tmp_path, '[[listen]]\nunix = "run/bg.sock"\n')
    assert settings.listeners[0].unix == str(tmp_path.resolve() / "run" / "bg.sock")
    assert "adress" in config_error(tmp_path, '[{"server": "a", "adress": "::1", "port": 1}]')
    bom = load_text(tmp_path, '\ufeff[limits]\nthreads = 4\n')
    assert bom.limits.threads == 4



def test_the_http_apis_port_may_not_be_a_listeners(tmp_path):
    # Refused at the start as "address already in use - is another service running?",
    # exit 1 (restarted for ever), though it was the service's own listener. Checked with
    # -p/--host applied (they replace the listeners).
    listen = '[[listen]]\nhost = "%s"\nport = 7001\n'
    http = '[http]\nenabled = true\nhost = "%s"\nport = %d\n'

    def clash(text: str, **overrides: object) -> str:
        with pytest.raises(ConfigError) as info:
            config.with_overrides(load_text(tmp_path, text), **overrides)
        return str(info.value)

    same = clash(listen % "127.0.0.1" + http % ("127.0.0.1", 7001))
    assert same == "[http] port 7001: [[listen]] #1 (or -p) has it"
    assert "[[listen]] #1" in clash(listen % "0.0.0.0" + http % ("::1", 7001))
    assert "[[listen]] #1" in clash("[http]\nenabled = true\nport = 12341\n")  # the default
    assert "(or -p)" in clash(http % ("127.0.0.1", 7002), port=7002)
    for text, overrides in (
        (listen % "127.0.0.1" + http % ("127.0.0.2", 7001), {}),  # other hosts
        (listen % "127.0.0.1" + http % ("127.0.0.1", 7002), {}),  # other ports
        (listen % "127.0.0.1" + "[http]\nport = 7001\n", {}),  # not enabled
        ("[[listen]]\nport = 0\n[http]\nenabled = true\nport = 0\n", {}),  # both free ones
        ("[http]\nenabled = true\nport = 12341\n", {"port": 9000}),  # -p moved it away
    ):
        settings = config.with_overrides(load_text(tmp_path, text), **overrides)
        assert settings.http.port in (0, 7001, 7002, 12341)


def test_a_service_config_here_that_is_no_file_is_refused_not_passed_over(tmp_path):
    # With no -c, a folder (or FIFO, or dangling link) named service.config was skipped:
    # the service ran on the built-in defaults and said nothing.
    (tmp_path / "service.config").mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "service.py")],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert "service.config: is a folder, not a config file" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("listen", "mode"),
    [
        ('listen = [{unix = "/x.sock", mode = 0o600}]', 0o600),
        ('listen = [\n  {unix = "/x.sock", "mode" = 0o6_6_0},\n]', 0o660),
        ('[[listen]]\nunix = "/x.sock"\nmode = 0o640  # owner and group', 0o640),
    ],
)
def test_octal_modes_in_inline_tables_are_accepted(tmp_path, listen, mode):
    # An inline table has no "mode =" line of its own under a [[listen]] header.
    assert load_text(tmp_path, listen + "\n").listeners[0].mode == mode


def test_a_bare_integer_mode_in_an_inline_table_is_refused(tmp_path):
    message = config_error(tmp_path, 'listen = [{unix = "/x.sock", mode = 600}]\n')
    assert "mode" in message and "0o770" in message


# --- [redis] url and lease (a review of the Redis engine, 2026-12-06) ------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:6379/0?socket_timeout=abc", "set by [redis] command_timeout"),
        ("redis://127.0.0.1:6379/0?socket_timeout=1", "not in the URL"),
        ("redis://127.0.0.1:6379/0?socket_connect_timeout=1", "set by [redis] connect_timeout"),
        ("redis://127.0.0.1:6379/zero", "must end in the database's number"),
        ("redis://127.0.0.1:6379/1O", "must end in the database's number"),
        ("redis://127.0.0.1:6379/0?db=x", "Invalid value for 'db'"),
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("redis://127.0.0.1:6379/0?PASSWORD=hunter2", "option 'PASSWORD' is not one redis-py"),
    ],
)
def test_a_redis_url_is_checked_whole_when_the_config_loads(tmp_path, url, problem):
    # A bad option value crashed the start with a traceback (exit 1: systemd restarts it);
    # "/zero" was db 0, silently; an option in the URL replaced the service's own timeout.
    message = config_error(tmp_path, f'[redis]\nurl = "{url}"\n')
    assert "[redis] url (line 2)" in message and problem in message, message
    assert "hunter2" not in message


def test_the_redis_url_may_come_from_the_environment(tmp_path, monkeypatch):
    # So that a Redis password need not sit in the config file (a security review).
    monkeypatch.setenv("BGSERVICE_REDIS_URL", "redis://:pw@10.0.0.5:6380/2")
    text = '[redis]\nurl = "redis://127.0.0.1:6379/0"\n'
    assert load_text(tmp_path, text).redis.url == "redis://:pw@10.0.0.5:6380/2"
    assert load_text(tmp_path, "").redis.url == "redis://:pw@10.0.0.5:6380/2"
    monkeypatch.setenv("BGSERVICE_REDIS_URL", "redis://:hunter2@h:6379/zero")
    message = config_error(tmp_path, text)
    assert message.startswith("$BGSERVICE_REDIS_URL (it replaces [redis] url): must end in")
    assert "hunter2" not in message
    monkeypatch.setenv("BGSERVICE_REDIS_URL", "")  # empty: the file's
    assert load_text(tmp_path, text).redis.url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379",
        "redis://h:1/",
        "redis://u:p@h:1/15",
        "redis://at:top@secret@h:6379/7",
        "rediss://h/0?ssl_cert_reqs=required",
        "unix:///run/redis.sock?db=2",
        "redis://h/0?max_connections=20",
    ],
)
def test_redis_urls_redis_py_takes_load(tmp_path, url):
    assert load_text(tmp_path, f'[redis]\nurl = "{url}"\n').redis.url == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://at:top@secret@127.0.0.1:6391/7", "redis://at:***@127.0.0.1:6391/7"),
        ("redis://127.0.0.1:6391/0?PASSWORD=pw&x=1", "redis://127.0.0.1:6391/0?PASSWORD=***&x=1"),
        ("rediss://h/0?ssl_password=pw", "rediss://h/0?ssl_password=***"),
        ("redis://:pw@h:1/0?password=pw", "redis://:***@h:1/0?password=***"),
        ("redis://user@h/0?client_name=a@b", "redis://user@h/0?client_name=a@b"),
        ("unix:///run/r.sock?db=1&password=pw", "unix:///run/r.sock?db=1&password=***"),
    ],
)
def test_redact_url_hides_the_whole_password(url, shown):
    # 'at:top@secret@host' was logged as 'at:***@secret@host' (the user part ends at the
    # last '@', as urllib and redis-py read it); '?PASSWORD=' was not redacted at all.
    from bgservice.config_checks import redact_url

    assert redact_url(url) == shown


@pytest.mark.parametrize("lease", ["0.05", "0.99", "86401", "1e9", "nan"])
def test_the_redis_lease_is_bounded(tmp_path, lease):
    message = config_error(tmp_path, f"[redis]\nlease = {lease}\n")
    assert "[redis] lease (line 2)" in message and "from 1 to 86400" in message, message
    for fine in (1, 86400):
        assert load_text(tmp_path, f"[redis]\nlease = {fine}\n").redis.lease == fine


@pytest.mark.parametrize("key", ["quiet_ms", "quiet_large_ms"])
def test_a_one_shot_gap_must_be_shorter_than_the_read_timeout(tmp_path, key):
    # quiet_ms = 20000 with read_timeout = 10 started, then answered every one-shot request
    # ended by the gap with a 408 (a review of the one-shot end).
    message = config_error(tmp_path, f"[limits]\nread_timeout = 10.0\n{key} = 20000.0\n")
    assert f"{key} (line 3)" in message and "read_timeout" in message
    assert load_text(tmp_path, f"[limits]\nread_timeout = 30.0\n{key} = 20000.0\n")


def test_a_start_warns_of_a_config_every_user_may_read_with_a_secret_in_it(make_service):
    svc = make_service('[http]\nenabled = true\nport = 0\ntoken = "s3cret-token-1"\n',
                       start=False)  # fmt: skip
    svc.config.chmod(0o644)
    svc.start()
    svc.wait_for_log(f"{svc.config} holds [http] token, and every user may read it (mode 644)")
    assert "s3cret-token-1" not in svc.log()


def test_a_password_in_the_files_redis_url_is_warned_of_with_the_variable_set(make_service):
    # Found by review: with $BGSERVICE_REDIS_URL set, the check looked at the variable's
    # URL only, and a password still written in a file every user may read went unsaid.
    svc = make_service('[redis]\nurl = "redis://:s3cret-pw@127.0.0.1:6379/0"\n', start=False)
    svc.config.chmod(0o644)
    svc.env["BGSERVICE_REDIS_URL"] = "redis://127.0.0.1:6379/1"  # (sqlite: Redis unused)
    svc.start()
    svc.wait_for_log(f"{svc.config} holds a password in [redis] url, and every user may "
                     "read it (mode 644)")  # fmt: skip
    assert "s3cret-pw" not in svc.log()
