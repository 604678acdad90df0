"""Settings that once got past the checks: numbers too large for where they go, a
listener that serves nothing, a short token, a config "file" that is a FIFO, and what
the shipped service.config says of them. Each ends the start with exit 2 (the unit
restarts on anything else) and one message naming the key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bgservice import config
from bgservice.config import HttpSettings, QueueSettings
from bgservice.config_checks import HTTP_CHECKS, QUEUE_CHECKS
from bgservice.errors import ConfigError
from tests.conftest import REPO

TOO_BIG = 2**63  # one past SQLite's INTEGER (TOML's own bound, which tomllib does not keep)


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30):
    return subprocess.run(
        [sys.executable, str(REPO / "service.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )  # fmt: skip


def start(tmp_path: Path, text: str, env: dict[str, str] | None = None):
    """The service started on ``text`` (modules and db of the checkout's, any free port),
    stopped again at once if it got as far as listening."""
    cfg = tmp_path / "service.config"
    cfg.write_text(f'modules = "{REPO / "modules"}"\ndb = "{tmp_path / "jobs.db"}"\n' + text)
    ready = tmp_path / "ready.json"
    return run_cli("-c", str(cfg), "-p", "0", "--ready-file", str(ready), cwd=tmp_path, env=env)


def load_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "service.config"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return str(info.value)


def assert_config_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("bgservice: configuration error:"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in result.stderr, result.stderr


# --- 1. numbers beyond what the system calls and the store take ------------------------


def test_a_receive_buffer_past_a_c_int_is_a_configuration_error(tmp_path):
    # It crashed the start with a TypeError from setsockopt, exit 1: systemd restarted it.
    result = start(tmp_path, "[limits]\nudp_receive_buffer = 2147483648\n")
    assert_config_error(result, "udp_receive_buffer (line 4)", "at most 2147483647")


def test_a_gc_threshold_past_a_c_int_is_a_configuration_error(tmp_path):
    # gc.set_threshold takes a C int: one past it would stop the start with OverflowError.
    message = load_error(tmp_path, "[limits]\ngc_threshold = 2147483648\n")
    assert "[limits] gc_threshold (line 2)" in message and "at most 2147483647" in message


def test_the_largest_receive_buffer_starts(make_service):
    svc = make_service("[limits]\nshutdown_grace = 5.0\nudp_receive_buffer = 2147483647\n")
    assert svc.call(b"echo:hi") == b"hi"


WHOLE_KEYS = [
    *(("limits", k) for k in ("max_request_bytes", "max_connections", "max_buffered_bytes")),
    *(("limits", k) for k in ("large_bytes", "max_pipeline", "threads", "stuck_threads")),
    *(("limits", k) for k in ("udp_queue", "udp_workers", "udp_receive_buffer", "gc_threshold")),
    *(("queue", k) for k in ("workers", "retries", "max_waiting", "max_name_chars")),
    *(("queue", k) for k in ("max_tags", "metrics_names", "max_checkpoint_bytes")),
    ("workers", "processes"),
    ("workers", "max_calls"),
    ("alerts", "max_per_minute"),
]


@pytest.mark.parametrize(("section", "key"), WHOLE_KEYS)
def test_every_whole_number_has_an_upper_bound(tmp_path, section, key):
    message = load_error(tmp_path, f"[{section}]\n{key} = {TOO_BIG}\n")
    assert f"[{section}] {key} (line 2): must be a whole number" in message
    assert "at most" in message


def test_retries_past_the_stores_integer_stop_the_start_not_every_add(tmp_path):
    # [queue] retries = 2^63 started, then every queue:add got "503: Job store unavailable".
    assert_config_error(start(tmp_path, f"[queue]\nretries = {TOO_BIG}\n"), "retries (line 4)")


def test_a_commit_wait_too_long_for_a_thread_is_refused(tmp_path):
    # commit_ms = 1e300 started, then the writer thread died (OverflowError) and the
    # service hung, answering no add.
    assert_config_error(start(tmp_path, "[queue]\ncommit_ms = 1e300\n"), "commit_ms (line 4)")
    assert "at most 60000" in load_error(tmp_path, "[queue]\ncommit_ms = 60001\n")


# --- 2. a listener that serves nothing ---------------------------------------------------


def test_a_listener_with_neither_tcp_nor_udp_nor_unix_is_refused(tmp_path):
    text = '[[listen]]\nname = "mute"\nhost = "127.0.0.1"\nport = 0\ntcp = false\nudp = false\n'
    cfg = tmp_path / "service.config"
    cfg.write_text(f'modules = "{REPO / "modules"}"\n' + text)
    result = run_cli("-c", str(cfg), cwd=tmp_path)
    assert_config_error(result, "[[listen]] #1 tcp (line 6)", "'mute' would serve nothing")


def test_a_listener_with_only_unix_sockets_may_turn_tcp_and_udp_off(tmp_path):
    text = '[[listen]]\nunix = "/tmp/x.sock"\ntcp = false\nudp = false\n'
    assert config.load(_write(tmp_path, text)).listeners[0].unix == "/tmp/x.sock"
    udp_only = config.load(_write(tmp_path, "[[listen]]\nport = 1\ntcp = false\n"))
    assert (udp_only.listeners[0].tcp, udp_only.listeners[0].udp) == (False, True)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.config"
    path.write_text(text)
    return path


# --- 3. a short [http] token ----------------------------------------------------------------


def test_a_short_token_is_refused_as_a_short_named_token_is(tmp_path):
    single = load_error(tmp_path, '[http]\nenabled = true\ntoken = "s3Cr5"\n')
    named = load_error(tmp_path, '[http]\ntokens = { ops = { token = "s3Cr5" } }\n')
    assert "[http] token (line 3): must be a string of at least 8 characters" in single
    assert "at least 8 characters" in named
    assert "s3Cr5" not in single and "s3Cr5" not in named  # a secret: named, never shown
    assert config.load(_write(tmp_path, '[http]\ntoken = "12345678"\n')).http.token == "12345678"


def test_a_short_token_in_the_environment_stops_the_start(tmp_path):
    http = "[http]\nenabled = true\nport = 0\n"
    result = start(tmp_path, http, env={"BGSERVICE_HTTP_TOKEN": "s3Cr5"})
    assert_config_error(result, "$BGSERVICE_HTTP_TOKEN", "at least 8 characters")
    assert "s3Cr5" not in result.stderr


def test_a_short_token_in_the_environment_matters_only_while_the_api_is_on(tmp_path, monkeypatch):
    monkeypatch.setenv("BGSERVICE_HTTP_TOKEN", "s3Cr5")
    assert config.load(_write(tmp_path, "[http]\nenabled = false\n")).http.enabled is False
    with pytest.raises(ConfigError, match=r"\$BGSERVICE_HTTP_TOKEN .*at least 8"):
        config.load(_write(tmp_path, "[http]\nenabled = true\n"))


# --- 5. the shipped file's word on max_waiting ------------------------------------------------


def test_the_shipped_file_says_running_jobs_count_toward_max_waiting():
    line = next(
        line for line in (REPO / "service.config").read_text().splitlines()
        if line.startswith("max_waiting")
    )  # fmt: skip
    comment = line.partition("#")[2]
    assert "waiting or running" in comment and "503" in comment, line


def test_the_shipped_file_shows_the_new_keys_at_their_defaults():
    settings = config.load(REPO / "service.config")
    assert settings.queue == QueueSettings() and settings.http == HttpSettings()
    text = (REPO / "service.config").read_text()
    for key in ("max_dependencies", "max_tag_chars", "max_page", "max_schedules", "max_wait"):
        assert re.search(rf"^{key} = \S+ +# ", text, re.M), key
    assert set(QUEUE_CHECKS) >= {"max_dependencies", "max_tag_chars", "max_page"}
    assert "max_wait" in HTTP_CHECKS


# --- 6. a config "file" that is not a regular file ---------------------------------------------


def test_a_fifo_as_the_config_is_refused_at_once(tmp_path):
    fifo = tmp_path / "service.fifo"
    os.mkfifo(fifo)
    result = run_cli("-c", str(fifo), cwd=tmp_path, timeout=20)  # it once waited for ever
    assert_config_error(result, f"{fifo}: is a FIFO (named pipe), not a config file")


def test_a_device_as_the_config_is_refused():
    # (/dev/null read as an empty file, the defaults; /dev/zero would never end.)
    with pytest.raises(ConfigError, match="/dev/null: is a character device, not a config"):
        config.load(Path("/dev/null"))
