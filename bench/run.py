"""One command for every benchmark figure: the service and the reference, side by side.

    python3 bench/run.py              # the full run (a few minutes)
    python3 bench/run.py --quick      # a tiny load, to check it works (the smoke test)
    python3 bench/run.py --json       # machine-readable

Both servers run at once on this machine; each figure is measured in alternating rounds
(service, reference, reference, service, ...) so that noise from the shared machine falls
on both. The table gives the median and min-max of the rounds, the ratio
service/reference, and the server's CPU microseconds per operation (user + system time
of the server process, from /proc, before and after the round). The load generator is
bench/loadgen.c, compiled here with gcc: one process per connection, so the clients are
never the bottleneck. docs/benchmarks.md records a run and what limits each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")
PREFACE = b"\x00:F1"

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


def start_service(root: Path) -> tuple[Server, float]:
    """``python service.py`` on a free port with a copy of the shipped modules and a fresh
    durable queue database; returns it and the seconds from exec to ready."""
    folder = Path(tempfile.mkdtemp(dir=root, prefix="service-"))
    modules = folder / "modules"
    shutil.copytree(REPO / "modules", modules, ignore=shutil.ignore_patterns("__pycache__"))
    (modules / "burn.py").write_text(BURN)
    (modules / "count.py").write_text(COUNT)
    config = folder / "service.config"
    config.write_text(
        f'modules = "{modules}"\ndb = "{folder / "jobs.db"}"\n'
        '[[listen]]\nname = "bench"\nhost = "127.0.0.1"\nport = 0\n'
        "[limits]\nmax_connections = 4096\n[queue]\nworkers = 8\n"
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
    return Server("service", proc, info["listeners"][0]["tcp"][1], folder), took


def start_reference(root: Path) -> tuple[Server, float]:
    folder = Path(tempfile.mkdtemp(dir=root, prefix="reference-"))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "reference.py"), "0"], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return Server("reference", proc, port, folder), time.perf_counter() - started


def compile_loadgen(root: Path) -> Path:
    binary = root / "loadgen"
    subprocess.run(
        ["gcc", "-O2", "-o", str(binary), str(HERE / "loadgen.c")], check=True, capture_output=True
    )
    return binary


# --- talking to the servers from here (low rates only) -----------------------------------


def framed_call(port: int, payload: bytes, sock: socket.socket | None = None) -> bytes:
    own = sock is None
    if sock is None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(PREFACE)
        _exact(sock, 4)
    sock.sendall(struct.pack(">I", len(payload)) + payload)
    head = _exact(sock, 7)
    body = _exact(sock, struct.unpack(">I", head[3:])[0])
    if own:
        sock.close()
    return body


def _exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def udp_count(server: Server) -> int:
    """Datagrams the server took in: for the service, received minus those its full
    datagram queue dropped (both are lost to the sender)."""
    if server.name == "service":
        udp = json.loads(framed_call(server.port, b"service:stats"))["udp"]
        return int(udp["received"]) - int(udp["dropped"])
    return int(json.loads(framed_call(server.port, b"stats"))["udp"])


# --- figures ----------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    unit: str
    target: float | None = None  # the minimum ratio service/reference the issue asks for
    higher_is_better: bool = True
    rounds: dict[str, list[float]] = field(default_factory=lambda: {"service": [], "reference": []})
    cpu_us: dict[str, list[float]] = field(default_factory=lambda: {"service": [], "reference": []})
    extra: dict[str, list[float]] = field(default_factory=dict)


def loadgen(binary: Path, *args: Any) -> dict[str, Any]:
    out = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def measure_load(fig: Figure, server: Server, binary: Path, args: list[Any]) -> None:
    cpu = server.cpu
    result = loadgen(binary, args[0], "127.0.0.1", server.port, *args[1:])
    used = server.cpu - cpu
    ops = max(result["ops"], 1)
    fig.rounds[server.name].append(result["ops"] / result["seconds"])
    fig.cpu_us[server.name].append(used / ops * 1e6)
    for key in ("p50_us", "p99_us"):
        fig.extra.setdefault(f"{server.name} {key}", []).append(result[key])
    if result["errors"]:
        fig.extra.setdefault(f"{server.name} errors", []).append(result["errors"])


def measure_udp(
    fig: Figure, server: Server, binary: Path, rate: int, seconds: float, payload: str
) -> None:
    before, cpu = udp_count(server), server.cpu
    result = loadgen(binary, "udp", "127.0.0.1", server.port, rate, seconds, payload)
    deadline = time.monotonic() + 5
    got = udp_count(server) - before
    while got < result["ops"] and time.monotonic() < deadline:  # let the queue drain
        time.sleep(0.05)
        got = udp_count(server) - before
    fig.rounds[server.name].append(100.0 * (result["ops"] - got) / max(result["ops"], 1))
    fig.cpu_us[server.name].append((server.cpu - cpu) / max(got, 1) * 1e6)


def latency_while_burning(service: Server, calls: int) -> tuple[float, float]:
    """p99 of sequential framed ``test`` calls: idle, then while a process module burns."""

    def p99() -> float:
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=30)
        sock.sendall(PREFACE)
        _exact(sock, 4)
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            framed_call(service.port, b"test:x", sock)
            times.append((time.perf_counter() - t) * 1000)
        sock.close()
        return sorted(times)[int(len(times) * 0.99) - 1]

    idle = p99()
    burner = threading.Thread(target=framed_call, args=(service.port, b"burn:2"))
    burner.start()
    time.sleep(0.3)  # the burn has started in its worker process
    busy = p99()
    burner.join(30)
    return idle, busy


def reload_latency(service: Server, edits: int) -> list[float]:
    path = service.folder / "modules" / "hot.py"
    times = []
    for i in range(edits):
        started = time.perf_counter()
        path.write_text(f"def handle_tcp(request):\n    return '{i}'\n")
        while framed_call(service.port, b"hot:x") != str(i).encode():
            time.sleep(0.001)
        times.append((time.perf_counter() - started) * 1000)
    return times


def memory_after(server: Server, binary: Path, requests: int) -> float:
    """Resident MB after ``requests`` framed pipelined requests."""
    done = 0
    while done < requests:
        done += loadgen(binary, "framed", "127.0.0.1", server.port, 4, 1.0, "test:x", 64)["ops"]
    return server.rss_mb


# --- the run ----------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    rounds, seconds = (1, 0.3) if quick else (5, 2.0)
    conns = 4
    root = Path(tempfile.mkdtemp(prefix="bgbench-"))
    binary = compile_loadgen(root)
    figures = [
        Figure("tcp one-shot (test)", "req/s", 0.8),
        Figure("framed lock-step, 4 connections", "req/s", 0.7),
        Figure("framed pipelined, depth 16", "req/s", 0.7),
        Figure("queue add+get (echo; service: durable SQLite)", "jobs/s", 0.5),
        Figure("queue add+get, 32 connections (group commit)", "jobs/s", 0.5),
    ]
    loads = [
        ["oneshot", conns, seconds, "test:x"],
        ["framed", conns, seconds, "test:x", 1],
        ["framed", conns, seconds, "test:x", 16],
        ["queue", conns, seconds],
        ["queue", 32, seconds],
    ]
    rates = (
        [(10_000, "count:x")]
        if quick
        else [(20_000, "count:x"), (50_000, "count:x"), (100_000, "count:x"), (20_000, "test:x")]
    )
    udp = [
        Figure(f"UDP loss at {r:,}/s" + (", test module (logs each)" if p == "test:x" else ""),
               "% lost", None, False)
        for r, p in rates
    ]  # fmt: skip
    start = Figure("start-up time (exec -> ready)", "ms", None, False)
    servers = []
    try:
        service, took_s = start_service(root)
        reference, took_r = start_reference(root)
        servers = [service, reference]
        start.rounds["service"].append(took_s * 1000)
        start.rounds["reference"].append(took_r * 1000)
        idle_rss = {s.name: s.rss_mb for s in servers}
        for r in range(rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for fig, args in zip(figures, loads, strict=True):
                for server in order:
                    measure_load(fig, server, binary, args)
            for fig, (rate, payload) in zip(udp, rates, strict=True):
                for server in order:
                    measure_udp(fig, server, binary, rate, min(seconds, 1.0), payload)
        requests = 20_000 if quick else 1_000_000
        # Twice: growth between the first and the second million would be a leak; growth
        # before the first is warm-up (caches, the kept results of the queue figures).
        after_rss = {s.name: memory_after(s, binary, requests) for s in servers}
        after_twice = {s.name: memory_after(s, binary, requests) for s in servers}
        idle_p99, busy_p99 = latency_while_burning(service, 100 if quick else 500)
        reloads = reload_latency(service, 3 if quick else 20)
        for _ in range(0 if quick else 2):
            for starter, name in ((start_service, "service"), (start_reference, "reference")):
                extra, took = starter(root)
                start.rounds[name].append(took * 1000)
                extra.stop()
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "machine": machine(),
        "quick": quick,
        "figures": [f.__dict__ for f in [*figures, *udp, start]],
        "memory_mb": {
            "idle": idle_rss,
            f"after {requests:,} requests": after_rss,
            f"after {2 * requests:,} requests": after_twice,
        },
        "service_only": {
            "test p99 ms, idle": round(idle_p99, 2),
            "test p99 ms, while a process module burns CPU": round(busy_p99, 2),
            "reload latency ms, median": round(statistics.median(reloads), 1),
            "reload latency ms, max": round(max(reloads), 1),
        },
    }


def machine() -> dict[str, Any]:
    import uvloop

    cpu = next(
        (li.split(":", 1)[1].strip() for li in Path("/proc/cpuinfo").read_text().splitlines()
         if li.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,
        "kernel": platform.release(),
    }


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:,.0f} ({min(values):,.0f}-{max(values):,.0f})" if med >= 100 else (
        f"{med:.2f} ({min(values):.2f}-{max(values):.2f})")  # fmt: skip


def table(report: dict[str, Any]) -> str:
    rows = [
        ["figure", "unit", "service median (min-max)", "reference median (min-max)", "ratio",
         "target", "CPU us/op svc", "ref"],
    ]  # fmt: skip
    for f in report["figures"]:
        svc, ref = f["rounds"]["service"], f["rounds"]["reference"]
        ratio = "-"
        if svc and ref and statistics.median(ref) > 0:
            value = statistics.median(svc) / statistics.median(ref)
            ratio = f"{value:.2f}"
            if f["target"] is not None and value < f["target"]:
                ratio += f" (missed by {f['target'] - value:.2f})"
        elif f["unit"] == "% lost":
            ratio = "-"
        cpu = [statistics.median(f["cpu_us"][k]) if f["cpu_us"][k] else None
               for k in ("service", "reference")]  # fmt: skip
        rows.append([
            f["name"], f["unit"], _cell(svc), _cell(ref), ratio,
            f">= {f['target']}" if f["target"] else "",
            *(f"{c:.1f}" if c is not None else "-" for c in cpu),
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for f in report["figures"]:
        lat = {k: statistics.median(v) for k, v in f["extra"].items() if "p" in k and "_us" in k}
        if lat:
            lines.append(f"  {f['name']}: " + ", ".join(f"{k} {v:,.0f}" for k, v in lat.items()))
    lines.append("memory (resident MB): " + json.dumps(report["memory_mb"]))
    lines.append("service only: " + json.dumps(report["service_only"]))
    lines.append("machine: " + json.dumps(report["machine"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny load (smoke test)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if shutil.which("gcc") is None:
        raise SystemExit("bench needs gcc for its load generator (apt-get install gcc)")
    report = run(args.quick)
    print(json.dumps(report, indent=2) if args.json else table(report))


if __name__ == "__main__":
    main()
