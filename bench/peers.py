"""The servers the benchmark measures, each started on a free loopback port of its own.

The service (``python service.py``, durable SQLite queue, or the Redis engine), the
reference (bench/reference.py), the original's behaviour (bench/original.js on node),
beanstalkd with its binlog, and a redis-server for the Redis engine. A peer whose program
is not installed is not started: ``missing()`` says which, and why, for the printed note.
Each is started through ``Children`` (bench/children.py): registered the moment it exists,
so that an interrupted or failed start leaves nothing running.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from children import Children, stop_process

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")
# Seconds a server has to be ready, and a client (loadgen, the queue producers) to finish
# (run.py --timeout): only a hung step takes that long.
TIMEOUT = 120.0

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
        stop_process(self.proc)


def missing() -> dict[str, str]:
    """Optional peers this machine cannot run: name -> how to get it."""
    lacks = {}
    if shutil.which("node") is None:
        lacks["original"] = "node is not installed (the original-behaviour peer needs it)"
    if shutil.which("beanstalkd") is None:
        lacks["beanstalkd"] = "beanstalkd is not installed (apt-get install beanstalkd)"
    if shutil.which("redis-server") is None:
        lacks["service-redis"] = "redis-server is not installed (apt-get install redis-server)"
    # What the service's [queue] backend = "redis" itself requires (bgservice/config_checks.py),
    # in this Python, which is the service's too.
    elif absent := [p for p in ("redis", "hiredis") if importlib.util.find_spec(p) is None]:
        names = " and ".join(absent)
        lacks["service-redis"] = f"{names} not installed (pip install -e '.[redis]')"
    return lacks


def free_port() -> int:
    """A port nobody listens on now (for servers that cannot be told to take port 0; the
    race with another process taking it meanwhile is accepted: the start would fail)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Starter:
    """Starts the servers, each in a folder of its own under ``root``, registered with
    ``children``; one not ready within ``timeout`` seconds is stopped and the run ends."""

    children: Children
    root: Path
    timeout: float = TIMEOUT

    def _failed(self, proc: subprocess.Popen[bytes], why: str) -> SystemExit:
        stop_process(proc)
        return SystemExit(why)

    def _wait_listening(self, proc: subprocess.Popen[bytes], port: int, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{what} exited at start (code {proc.returncode})")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.01)
        raise self._failed(proc, f"{what} did not listen on port {port} within {self.timeout:g} s")

    def service(self, redis_url: str | None = None) -> tuple[Server, float]:
        """``python service.py`` on a free port with a copy of the shipped modules, a fresh
        durable queue database (or the Redis engine at ``redis_url``) and 4 queue workers;
        returns it and the seconds from exec to ready."""
        folder = Path(tempfile.mkdtemp(dir=self.root, prefix="service-"))
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
        ready, log = folder / "ready.json", folder / "service.log"
        command = [sys.executable, str(REPO / "service.py"), "-c", str(config)]
        started = time.perf_counter()
        with log.open("wb") as out:
            proc = self.children.spawn(
                [*command, "--ready-file", str(ready)], stdout=out, stderr=subprocess.STDOUT,
                cwd=folder,
            )  # fmt: skip
        deadline = time.monotonic() + self.timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"service exited: {log.read_text()}")
            if time.monotonic() > deadline:
                raise self._failed(proc, f"service not ready within {self.timeout:g} s: {log}")
            time.sleep(0.002)
        took = time.perf_counter() - started
        info = json.loads(ready.read_text())
        name = "service-redis" if redis_url else "service"
        return Server(name, proc, info["listeners"][0]["tcp"][1], folder), took

    def _printing_port(self, name: str, command: list[str]) -> tuple[Server, float]:
        """A peer that takes port 0 and prints the port it got (reference.py, original.js)."""
        folder = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{name}-"))
        started = time.perf_counter()
        proc = self.children.spawn(command, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        if not select.select([proc.stdout], [], [], self.timeout)[0]:
            raise self._failed(proc, f"{name} printed no port within {self.timeout:g} s")
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise self._failed(proc, f"{name} exited at start or printed {line[:80]!r}")
        return Server(name, proc, int(line), folder), time.perf_counter() - started

    def reference(self) -> tuple[Server, float]:
        command = [sys.executable, str(HERE / "reference.py"), "0"]
        return self._printing_port("reference", command)

    def original(self) -> Server:
        return self._printing_port("original", ["node", str(HERE / "original.js"), "0"])[0]

    def beanstalkd(self) -> Server:
        """beanstalkd with its binlog on (``-b``) and its default fsync policy (at most one
        fsync every 50 ms): what a user gets who asks for a durable beanstalkd."""
        folder = Path(tempfile.mkdtemp(dir=self.root, prefix="beanstalkd-"))
        port = free_port()
        command = ["beanstalkd", "-l", "127.0.0.1", "-p", str(port), "-b", str(folder)]
        devnull = subprocess.DEVNULL
        proc = self.children.spawn(command, stdout=devnull, stderr=devnull)
        self._wait_listening(proc, port, "beanstalkd")
        return Server("beanstalkd", proc, port, folder)

    def redis(self) -> Server:
        """redis-server for the Redis engine, durable as its users run it for a queue: the
        append-only file, fsync once a second (the default when AOF is on); no snapshots."""
        folder = Path(tempfile.mkdtemp(dir=self.root, prefix="redis-"))
        port = free_port()
        command = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--logfile", str(folder / "redis.log"),
        ]  # fmt: skip
        devnull = subprocess.DEVNULL
        proc = self.children.spawn(command, stdout=devnull, stderr=devnull)
        self._wait_listening(proc, port, "redis-server")
        return Server("redis-server", proc, port, folder)
