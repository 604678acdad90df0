"""The servers the benchmark measures, each started on a free loopback port of its own.

The service (``python service.py``, durable SQLite queue, or the Redis engine), the
reference (bench/reference.py), the original's behaviour (bench/original.js on node),
beanstalkd with its binlog, and a redis-server for the Redis engine. A peer whose program
is not installed is not started: ``missing()`` says which, and why, for the printed note.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")

BURN = textwrap.dedent(
    """
    import time
    EXECUTION = "process"

    def handle_tcp(request):
        end = time.perf_counter() + float(request.text)
        n = 0
        while time.perf_counter() < end:
            n += 1
        return str(n)
    """
)

# What the reference does with a datagram: count it (the service counts every datagram in
# service:stats). The shipped ``test`` module also logs each one, the original's
# behaviour, which costs a log line per datagram; that is measured apart.
COUNT = "async def handle_udp(request):\n    pass\n"


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    folder: Path

    @property
    def cpu(self) -> float:
        """User + system seconds of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    @property
    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def missing() -> dict[str, str]:
    """Optional peers this machine cannot run: name -> how to get it."""
    lacks = {}
    if shutil.which("node") is None:
        lacks["original"] = "node is not installed (the original-behaviour peer needs it)"
    if shutil.which("beanstalkd") is None:
        lacks["beanstalkd"] = "beanstalkd is not installed (apt-get install beanstalkd)"
    if shutil.which("redis-server") is None:
        lacks["service-redis"] = "redis-server is not installed (apt-get install redis-server)"
    elif importlib.util.find_spec("redis") is None:
        lacks["service-redis"] = "the redis package is not installed (pip install redis)"
    return lacks


def free_port() -> int:
    """A port nobody listens on now (for servers that cannot be told to take port 0; the
    race with another process taking it meanwhile is accepted: the start would fail)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited at start (code {proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise SystemExit(f"{what} did not listen on port {port} within 30 s")


def start_service(root: Path, redis_url: str | None = None) -> tuple[Server, float]:
    """``python service.py`` on a free port with a copy of the shipped modules, a fresh
    durable queue database (or the Redis engine at ``redis_url``) and 4 queue workers;
    returns it and the seconds from exec to ready."""
    folder = Path(tempfile.mkdtemp(dir=root, prefix="service-"))
    modules = folder / "modules"
    shutil.copytree(REPO / "modules", modules, ignore=shutil.ignore_patterns("__pycache__"))
    (modules / "burn.py").write_text(BURN)
    (modules / "count.py").write_text(COUNT)
    queue = f'backend = "redis"\n[redis]\nurl = "{redis_url}"\n' if redis_url else ""
    config = folder / "service.config"
    config.write_text(
        f'modules = "{modules}"\ndb = "{folder / "jobs.db"}"\n'
        '[[listen]]\nname = "bench"\nhost = "127.0.0.1"\nport = 0\n'
        f"[limits]\nmax_connections = 4096\n[queue]\nworkers = 4\n{queue}"
    )
    ready = folder / "ready.json"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "service.py"), "-c", str(config), "--ready-file", str(ready)],
        stdout=(folder / "service.log").open("wb"),
        stderr=subprocess.STDOUT,
        cwd=folder,
    )
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"service exited: {(folder / 'service.log').read_text()}")
        time.sleep(0.002)
    took = time.perf_counter() - started
    info = json.loads(ready.read_text())
    name = "service-redis" if redis_url else "service"
    return Server(name, proc, info["listeners"][0]["tcp"][1], folder), took


def _start_printing_port(root: Path, name: str, command: list[str]) -> tuple[Server, float]:
    """A peer that takes port 0 and prints the port it got (reference.py, original.js)."""
    folder = Path(tempfile.mkdtemp(dir=root, prefix=f"{name}-"))
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return Server(name, proc, port, folder), time.perf_counter() - started


def start_reference(root: Path) -> tuple[Server, float]:
    command = [sys.executable, str(HERE / "reference.py"), "0"]
    return _start_printing_port(root, "reference", command)


def start_original(root: Path) -> Server:
    return _start_printing_port(root, "original", ["node", str(HERE / "original.js"), "0"])[0]


def start_beanstalkd(root: Path) -> Server:
    """beanstalkd with its binlog on (``-b``) and its default fsync policy (at most one
    fsync every 50 ms): what a user gets who asks for a durable beanstalkd."""
    folder = Path(tempfile.mkdtemp(dir=root, prefix="beanstalkd-"))
    port = free_port()
    command = ["beanstalkd", "-l", "127.0.0.1", "-p", str(port), "-b", str(folder)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(proc, port, "beanstalkd")
    return Server("beanstalkd", proc, port, folder)


def start_redis(root: Path) -> Server:
    """redis-server for the Redis engine, durable as its users run it for a queue: the
    append-only file, fsync once a second (the default when AOF is on); no snapshots."""
    folder = Path(tempfile.mkdtemp(dir=root, prefix="redis-"))
    port = free_port()
    command = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
        "--logfile", str(folder / "redis.log"),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(proc, port, "redis-server")
    return Server("redis-server", proc, port, folder)
