"""End-to-end harness: a real service process on ephemeral ports, talked to over sockets."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from bgservice.protocol import PREFACE, ReplyDecoder, framed_request

REPO = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


# A module whose call schedules an error outside every request: a loop callback that raises.
STRAY_ERROR = """
import asyncio

def _explode():
    raise ZeroDivisionError("stray callback")

async def handle_tcp(request):
    asyncio.get_running_loop().call_soon(_explode)
    return "scheduled"
"""


# A module that blocks the service's loop for the seconds it is sent (a busy service).
HOG = """
import time
from pathlib import Path

async def handle_tcp(request):
    Path(__file__).with_name("hog.started").touch()
    time.sleep(float(request.text))  # on the service's loop: nothing else is served
    return "done"
"""


def sent_one_shot(svc: Any, request: bytes, rcvbuf: int = 4096) -> socket.socket:
    """A one-shot client that sent ``request`` and half-closed, its reply not read yet;
    a small receive buffer, so that a large reply backs up in the service."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(20)
    sock.connect(svc.tcp)
    sock.sendall(request)
    sock.shutdown(socket.SHUT_WR)
    return sock


class Framed:
    """A framed-protocol connection (docs/protocol.md)."""

    def __init__(self, address: Any, family: int = socket.AF_INET, timeout: float = 10) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.sock.sendall(PREFACE)
        assert self._read_exact(len(PREFACE)) == PREFACE
        self.decoder = ReplyDecoder()
        self.ready: list[tuple[int, bytes]] = []

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def send(self, *payloads: bytes) -> None:
        self.sock.sendall(b"".join(framed_request(p) for p in payloads))

    def recv(self) -> tuple[int, bytes]:
        while not self.ready:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.ready.extend(self.decoder.feed(chunk))
        return self.ready.pop(0)

    def call(self, payload: bytes) -> tuple[int, bytes]:
        self.send(payload)
        return self.recv()

    def close(self) -> None:
        self.sock.close()


BASE_CONFIG = """
modules = "{modules}"
db = "{db}"
[[listen]]
name = "test"
host = "127.0.0.1"
port = 0
[limits]
shutdown_grace = 5.0
"""


class ServiceProcess:
    """``python service.py`` with a config of the test's own, stopped at teardown."""

    def __init__(
        self,
        root: Path,
        extra_config: str = "",
        args: tuple[str, ...] = (),
        backend_config: str = "",
    ) -> None:
        self.root = root
        self.modules = root / "modules"
        if not self.modules.exists():
            shutil.copytree(
                REPO / "modules", self.modules, ignore=shutil.ignore_patterns("__pycache__")
            )
        self.config = root / "service.config"
        if not self.config.exists() or extra_config:
            base = BASE_CONFIG.format(modules=self.modules, db=root / "jobs.db")
            text = _merge_config(base, extra_config)
            self.config.write_text(_with_backend(text, backend_config) if backend_config else text)
        self.ready_file = root / "ready.json"
        self.log_path = root / "service.log"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        # Unbuffered, so a test reads every line at once; a test of buffering drops it.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Signals a test sends as a terminal or systemd would: set to their default in the
        # child (the test run may have been started ignoring them: nohup, a background job).
        self.signals: dict[int, Any] = {}
        # A process group of its own, as a shell gives a command it runs: a test can then
        # send a signal to the group, as a terminal's Ctrl-C does (os.killpg).
        self.own_group = False
        # Resource limits the child starts with (resource.RLIMIT_NOFILE: (soft, hard)), as
        # a shell's ulimit or a systemd unit's LimitNOFILE= sets them.
        self.rlimits: dict[int, tuple[int, int]] = {}

    def _in_child(self) -> None:  # (in the child, before it runs Python)
        for signum, disposition in self.signals.items():
            signal.signal(signum, disposition)
        if self.own_group:
            os.setpgid(0, 0)
        for which, limits in self.rlimits.items():
            resource.setrlimit(which, limits)

    def start(self, wait: bool = True) -> ServiceProcess:
        self.ready_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "service.py"),
                "-c",
                str(self.config),
                "--ready-file",
                str(self.ready_file),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env=self.env,
            preexec_fn=self._in_child if self.signals or self.own_group or self.rlimits else None,
        )
        log.close()
        if wait:
            wait_until(self._ready_or_dead, timeout=20)
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited {self.proc.returncode}:\n{self.log()}")
            self.info = json.loads(self.ready_file.read_text())
        return self

    def _ready_or_dead(self) -> bool:
        assert self.proc is not None
        return self.ready_file.exists() or self.proc.poll() is not None

    # --- addresses --------------------------------------------------------------------

    @property
    def tcp(self) -> tuple[str, int]:
        host, port = self.info["listeners"][0]["tcp"]
        return host, port

    @property
    def udp(self) -> tuple[str, int]:
        host, port = self.info["listeners"][0]["udp"]
        return host, port

    @property
    def http_url(self) -> str:
        host, port = self.info["http"]
        return f"http://{host}:{port}"

    # --- talking ----------------------------------------------------------------------

    def call(self, payload: bytes, half_close: bool = True, timeout: float = 15) -> bytes:
        """One-shot request, as the original's clients make it."""
        with socket.create_connection(self.tcp, timeout=timeout) as sock:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)

    def http(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        """One HTTP request to the operator's API: (status, parsed JSON or text, headers)."""
        import urllib.error
        import urllib.request

        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http_url + path, data=data, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=15) as response:
                status, raw, headers = response.status, response.read(), response.headers
        except urllib.error.HTTPError as exc:
            status, raw, headers = exc.code, exc.read(), exc.headers
        text = raw.decode()
        is_json = headers.get("Content-Type", "").startswith("application/json")
        return status, json.loads(text) if is_json else text, dict(headers)

    def framed(self) -> Framed:
        return Framed(self.tcp)

    def send_udp(self, payload: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(payload, self.udp)

    def stats(self) -> dict[str, Any]:
        return json.loads(self.call(b"service:stats"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10) -> None:
        wait_until(lambda: text in self.log(), timeout=timeout)

    # --- stopping ---------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def _merge_config(base: str, extra: str) -> str:
    """Append ``extra`` TOML; a table it repeats replaces the base's table of that name."""
    import re

    for header in re.findall(r"^\[([a-z_]+)\]\s*$", extra, re.M):
        base = re.sub(rf"^\[{header}\]\n(?:[^\[\n].*\n?)*", "", base, flags=re.M)
    if re.search(r"^\[\[listen\]\]", extra, re.M):
        base = re.sub(r"^\[\[listen\]\]\n(?:[^\[\n].*\n?)*", "", base, flags=re.M)
    return base + "\n" + extra


def _with_backend(text: str, backend_config: str) -> str:
    """Put ``backend = "redis"`` into the config's [queue] table and add its [redis] one."""
    import re

    line = 'backend = "redis"\n'
    if re.search(r"^\[queue\]\s*$", text, re.M):
        text = re.sub(r"^\[queue\]\s*\n", lambda m: m.group(0) + line, text, count=1, flags=re.M)
    else:
        text += "\n[queue]\n" + line
    return text + "\n" + backend_config


class RedisServer:
    """A real ``redis-server`` on a free loopback port, in a folder of its own, AOF on."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.folder), "--appendonly", "yes", "--save", "",
             "--logfile", str(self.folder / "redis.log")],
        )  # fmt: skip
        wait_until(self.ping, timeout=10)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """A clean shutdown: Redis writes its append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for what would disturb the others' (a pause of
    every client, a stop, several databases, a wrong password); stopped at the end."""
    folder = tmp_path / "own-redis"
    folder.mkdir()
    server = RedisServer(folder).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """$BGSERVICE_TEST_REDIS (as .ci/run sets it), else a redis-server of the session's own."""
    if os.environ.get("BGSERVICE_TEST_REDIS"):
        yield os.environ["BGSERVICE_TEST_REDIS"]
        return
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


def redis_command(url: str, *words: str, timeout: float = 5) -> bytes:
    """One command to redis-server in its own protocol (RESP), its raw reply; in the
    URL's database (``redis://host:port/N``), as the service's client is."""
    where = urlparse(url)
    db = where.path.strip("/") or "0"
    commands = [words] if db == "0" else [("SELECT", db), words]
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as sock:
        parts = []
        for command in commands:
            parts.append(f"*{len(command)}\r\n".encode())
            for word in command:
                parts.append(f"${len(word.encode())}\r\n{word}\r\n".encode())
        sock.sendall(b"".join(parts))
        reply = sock.recv(65536)
        if db != "0":  # the SELECT's +OK first
            while len(reply) <= len(b"+OK\r\n"):
                reply += sock.recv(65536)
            assert reply.startswith(b"+OK\r\n"), reply
            reply = reply[len(b"+OK\r\n") :]
        return reply


@pytest.fixture
def queue_backend() -> str:
    """The queue engine services run on; test_queue.py runs its tests on both."""
    return "sqlite"


def redis_config(url: str, prefix: str, lease: float = 1.5) -> str:
    return f'[redis]\nurl = "{url}"\nprefix = "{prefix}"\nlease = {lease}\n'


@pytest.fixture
def make_service(
    tmp_path: Path, queue_backend: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []
    backend_config = ""
    if queue_backend == "redis":
        url = request.getfixturevalue("redis_url")
        backend_config = redis_config(url, f"test-{uuid.uuid4().hex[:12]}")

    def make(
        extra_config: str = "", *args: str, start: bool = True, root: Path | None = None
    ) -> ServiceProcess:
        svc = ServiceProcess(root or tmp_path, extra_config, args, backend_config)
        started.append(svc)
        return svc.start() if start else svc

    yield make
    for svc in started:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


@pytest.fixture
def service(make_service: Callable[..., ServiceProcess]) -> ServiceProcess:
    return make_service()


@pytest.fixture
def modules_dir(tmp_path: Path) -> Path:
    """The shipped modules, copied for this test; write extra modules here before starting."""
    target = tmp_path / "modules"
    if not target.exists():
        shutil.copytree(REPO / "modules", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


# A module that holds its worker until the file its data names exists, then replies
# "open" (60 s at most, "never opened": a test that failed must not hang).
GATE = """
import time
from pathlib import Path

def handle_tcp(request):
    for _ in range(6000):
        if Path(request.text).exists():
            return "open"
        time.sleep(0.01)
    return "never opened"
"""


def write_module(folder: Path, name: str, source: str) -> Path:
    import textwrap

    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path
