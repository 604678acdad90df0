"""One command for every benchmark figure: the service and its peers, side by side.

    python3 bench/run.py              # the full run (about 8 minutes)
    python3 bench/run.py --quick      # a tiny load, to check it works (the smoke test)
    python3 bench/run.py --json       # machine-readable
    python3 bench/run.py --timeout 60 # give up on a step (a start, a load) after 60 s

The peers run at once on this machine: the reference (bench/reference.py, the thinnest
uvloop server: the Python ceiling), the original's behaviour (bench/original.js on node:
it answers at the first read, as the 2014 service did), beanstalkd with its binlog, and a
redis-server for the service's Redis engine. A peer whose program is missing is skipped
with a printed note. Each figure is measured in rounds, the peers taking turns going
first, so that noise from the shared machine falls on all of them. The table gives the
median and min-max of the rounds, the ratio of the service to the figure's peer, issue
17's targets with the measured value, and each server's CPU microseconds per operation
(user + system time of the server process, from /proc, before and after the round). The
TCP and UDP load comes from bench/loadgen.c (compiled here with gcc: one process per
connection, so the clients are never the bottleneck), the queue jobs from Python
producers (bench/queue_load.py) through the shipped client. docs/benchmarks.md records
runs and what limits each figure.

Every process it starts is stopped however the run ends: finished, failed, or stopped by
SIGTERM, SIGINT (Ctrl-C) or SIGHUP, which exit 143, 130 and 129 without a traceback
(bench/children.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Siblings in bench/: this file runs as a script, so bench/ is first on sys.path.
from children import Children, Interrupted
from peers import HERE, REPO, TIMEOUT, Server, Starter, missing
from report import (
    Figure,
    cpu_at_most,
    loss_at_most,
    machine,
    p50_within,
    rate_at_least,
    ratio_to,
    table,
)

PREFACE = b"\x00:F1"
PRODUCERS = 8
# How each server's queue producers talk to it (bench/queue_load.py): the original and
# beanstalkd have their own protocols; the others take the shipped framed client.
QUEUE_CLIENT = {"original": "oneshot", "beanstalkd": "beanstalkd"}


@dataclass(frozen=True)
class Clients:
    """How a run starts its clients: through ``children`` (so that a stop takes them
    too), each allowed ``timeout`` seconds; ``binary`` is the compiled load generator."""

    children: Children
    binary: Path
    timeout: float

    @classmethod
    def compile(cls, children: Children, root: Path, timeout: float) -> Clients:
        binary = root / "loadgen"
        command = ["gcc", "-O2", "-o", str(binary), str(HERE / "loadgen.c")]
        children.output(command, timeout, stderr=subprocess.STDOUT)
        return cls(children, binary, timeout)

    def loadgen(self, *args: Any) -> dict[str, Any]:
        out = self.children.output([str(self.binary), *map(str, args)], self.timeout)
        return dict(json.loads(out))

    def queue_load(self, kind: str, port: int, jobs: int) -> dict[str, Any]:
        # PYTHONPATH: the producers import this checkout's bgservice.client, not an
        # installed one.
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        command = [sys.executable, str(HERE / "queue_load.py"), kind, str(port), str(jobs)]
        out = self.children.output([*command, str(PRODUCERS)], self.timeout, env=env)
        return dict(json.loads(out))


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


# --- measuring one round on one server ---------------------------------------------------

Measure = Callable[[Figure, str, Server], None]


@dataclass
class Row:
    """A figure and how one round of it is measured on a server. ``servers`` names the
    server of a column when it is not the column's own (the Redis engine's service)."""

    figure: Figure
    measure: Measure
    rounds: int | None = None  # fewer than the run's (the long queue rows)
    servers: dict[str, str] = field(default_factory=dict)


def load(clients: Clients, mode: str, *args: Any) -> Measure:
    """A loadgen TCP mode (oneshot, nohalfclose, framed, queue): requests/s, CPU, p50/p99."""

    def measure(fig: Figure, column: str, server: Server) -> None:
        cpu = server.cpu
        result = clients.loadgen(mode, "127.0.0.1", server.port, *args)
        used = server.cpu - cpu
        fig.add(column, result["ops"] / result["seconds"], used / max(result["ops"], 1) * 1e6)
        for key in ("p50_us", "p99_us"):
            fig.note(f"{column} {key}", result[key])
        if result["errors"]:
            fig.note(f"{column} errors", result["errors"])

    return measure


def udp(clients: Clients, rate: int, seconds: float, payload: str) -> Measure:
    """Datagrams at ``rate`` for ``seconds``: the percentage the server did not take in."""

    def measure(fig: Figure, column: str, server: Server) -> None:
        before, cpu = udp_count(server), server.cpu
        result = clients.loadgen("udp", "127.0.0.1", server.port, rate, seconds, payload)
        deadline = time.monotonic() + 5
        got = udp_count(server) - before
        while got < result["ops"] and time.monotonic() < deadline:  # let the queue drain
            time.sleep(0.05)
            got = udp_count(server) - before
        lost = 100.0 * (result["ops"] - got) / max(result["ops"], 1)
        fig.add(column, lost, (server.cpu - cpu) / max(got, 1) * 1e6)

    return measure


def queue_jobs(
    clients: Clients, jobs: int, helper: Server | None = None, client: str = "framed"
) -> Measure:
    """``jobs`` echo jobs from PRODUCERS processes (bench/queue_load.py), each ``client``
    (framed: add then get; batch: add_many then get_many; wait: run): jobs/s and the
    server's CPU per job; ``helper`` is a server it relies on (redis-server), whose CPU
    is noted apart."""

    def measure(fig: Figure, column: str, server: Server) -> None:
        cpu, helper_cpu = server.cpu, helper.cpu if helper else 0.0
        kind = QUEUE_CLIENT.get(server.name, client)
        result = clients.queue_load(kind, server.port, jobs)
        fig.add(column, jobs / result["seconds"], (server.cpu - cpu) / jobs * 1e6)
        if helper:
            fig.note(f"{helper.name} cpu_us", (helper.cpu - helper_cpu) / jobs * 1e6)
        fig.note(f"{server.name} producers cpu_us", result["producer_cpu_s"] / jobs * 1e6)
        if result["worker_cpu_s"]:
            fig.note(f"{server.name} workers cpu_us", result["worker_cpu_s"] / jobs * 1e6)
        if result["errors"]:
            fig.note(f"{column} errors", result["errors"])

    return measure


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
    # A daemon: a run stopped meanwhile does not wait for its call to end.
    burner = threading.Thread(target=framed_call, args=(service.port, b"burn:2"), daemon=True)
    burner.start()
    time.sleep(0.3)  # the burn has started in its worker process
    busy = p99()
    burner.join(30)
    return idle, busy


def reload_latency(service: Server, edits: int, timeout: float) -> list[float]:
    path = service.folder / "modules" / "hot.py"
    times = []
    for i in range(edits):
        started = time.perf_counter()
        path.write_text(f"def handle_tcp(request):\n    return '{i}'\n")
        while framed_call(service.port, b"hot:x") != str(i).encode():
            if time.perf_counter() - started > timeout:
                raise SystemExit(f"modules/hot.py was not reloaded within {timeout:g} s")
            time.sleep(0.001)
        times.append((time.perf_counter() - started) * 1000)
    return times


def memory_after(server: Server, clients: Clients, requests: int) -> float:
    """Resident MB after ``requests`` framed pipelined requests."""
    done = 0
    while done < requests:
        ops = clients.loadgen("framed", "127.0.0.1", server.port, 4, 1.0, "test:x", 64)["ops"]
        if not ops:  # a server that stopped answering would keep this loop going forever
            raise SystemExit(f"{server.name} answered no request in a second")
        done += ops
    return server.rss_mb


# --- the run ----------------------------------------------------------------------------


def tcp_rows(clients: Clients, seconds: float) -> list[Row]:
    def original_form(conns: int) -> Row:
        fig = Figure(
            f"original's clients (no half-close), {conns} conns", "req/s",
            peers=("service", "reference", "original"), versus="original",
            targets=(p50_within("original"), ratio_to("original", 1.5)),
        )  # fmt: skip
        return Row(fig, load(clients, "nohalfclose", conns, seconds, "test:x"))

    return [
        Row(Figure("tcp one-shot half-closed, 4 conns", "req/s"),
            load(clients, "oneshot", 4, seconds, "test:x")),
        Row(Figure("tcp one-shot half-closed, 50 conns", "req/s",
                   targets=(ratio_to("reference", 0.9),)),
            load(clients, "oneshot", 50, seconds, "test:x")),
        original_form(4),
        original_form(32),
        Row(Figure("framed lock-step, 4 conns", "req/s",
                   targets=(ratio_to("reference", 0.8),)),
            load(clients, "framed", 4, seconds, "test:x", 1)),
        Row(Figure("framed pipelined, depth 16", "req/s", targets=(ratio_to("reference", 0.5),)),
            load(clients, "framed", 4, seconds, "test:x", 16)),
        Row(Figure("queue add+get (loadgen), 4 conns", "jobs/s"),
            load(clients, "queue", 4, seconds)),
        Row(Figure("queue add+get (loadgen), 32 conns", "jobs/s"),
            load(clients, "queue", 32, seconds)),
    ]  # fmt: skip


def queue_rows(clients: Clients, jobs: int, rounds: int, redis: Server | None) -> list[Row]:
    shape = f"queue, {jobs:,} jobs, {PRODUCERS} producers"
    sqlite = Figure(
        f"{shape}: SQLite", "jobs/s",
        peers=("service", "reference", "original", "beanstalkd"), versus="beanstalkd",
        targets=(rate_at_least(10_000, "jobs/s"), ratio_to("beanstalkd", 1.2), cpu_at_most(80)),
    )  # fmt: skip
    engine = Figure(
        f"{shape}: Redis engine", "jobs/s",
        peers=("service",), targets=(rate_at_least(3_500, "jobs/s"),),
    )  # fmt: skip
    batched = Figure(
        f"{shape}: SQLite, add_many/get_many", "jobs/s",
        peers=("service", "reference", "beanstalkd"), versus="beanstalkd",
        targets=(rate_at_least(10_000, "jobs/s"), ratio_to("beanstalkd", 1.2), cpu_at_most(80)),
    )  # fmt: skip
    waited = Figure(f"{shape}: SQLite, add-and-wait (run)", "jobs/s", peers=("service",))
    return [
        Row(sqlite, queue_jobs(clients, jobs), rounds),
        Row(batched, queue_jobs(clients, jobs, client="batch"), rounds),
        Row(waited, queue_jobs(clients, jobs, client="wait"), rounds),
        Row(engine, queue_jobs(clients, jobs, redis), rounds, {"service": "service-redis"}),
        Row(
            Figure(f"{shape}: Redis engine, add_many/get_many", "jobs/s", peers=("service",)),
            queue_jobs(clients, jobs, redis, client="batch"),
            rounds,
            {"service": "service-redis"},
        ),
    ]


def udp_rows(clients: Clients, quick: bool, seconds: float) -> list[Row]:
    rates = (
        [(10_000, "count:x")]
        if quick
        else [(20_000, "count:x"), (50_000, "count:x"), (100_000, "count:x"), (20_000, "test:x")]
    )
    rows = []
    for rate, payload in rates:
        logs = ", test module (logs each)" if payload == "test:x" else ""
        name = f"UDP loss at {rate:,}/s{logs}"
        targets = (loss_at_most(0),) if rate == 100_000 and payload == "count:x" else ()
        fig = Figure(name, "% lost", targets=targets)
        rows.append(Row(fig, udp(clients, rate, min(seconds, 1.0), payload)))
    return rows


def start_optional(start: Starter, servers: dict[str, Server], notes: list[str]) -> None:
    """The peers that need a program this machine may lack; a note for each one missing."""
    lacks = missing()
    for name, why in lacks.items():
        notes.append(f"{name} skipped: {why}")
        print(f"note: {notes[-1]}", file=sys.stderr)
    if "original" not in lacks:
        servers["original"] = start.original()
    if "beanstalkd" not in lacks:
        servers["beanstalkd"] = start.beanstalkd()
    if "service-redis" not in lacks:
        redis = servers["redis-server"] = start.redis()
        url = f"redis://127.0.0.1:{redis.port}/0"
        servers["service-redis"] = start.service(redis_url=url)[0]


def measure_rounds(rows: list[Row], servers: dict[str, Server], rounds: int) -> None:
    for r in range(rounds):
        for row in rows:
            if row.rounds is not None and r >= row.rounds:
                continue
            peers = row.figure.peers
            for column in peers[r % len(peers) :] + peers[: r % len(peers)]:  # turns going first
                server = servers.get(row.servers.get(column, column))
                if server is not None:
                    row.measure(row.figure, column, server)


def service_only(service: Server, quick: bool, timeout: float) -> dict[str, float]:
    idle_p99, busy_p99 = latency_while_burning(service, 100 if quick else 500)
    reloads = reload_latency(service, 3 if quick else 20, timeout)
    return {
        "test p99 ms, idle": round(idle_p99, 2),
        "test p99 ms, while a process module burns CPU": round(busy_p99, 2),
        "reload latency ms, median": round(statistics.median(reloads), 1),
        "reload latency ms, max": round(max(reloads), 1),
    }


def run(children: Children, quick: bool, timeout: float) -> dict[str, Any]:
    """Every figure; the servers and the temporary folder are gone when it returns or raises."""
    root: Path | None = None
    try:
        with children.held():  # the folder is known to the clean-up before a stop can come
            root = Path(tempfile.mkdtemp(prefix="bgbench-"))
        return measure_all(children, root, quick, timeout)
    finally:
        with children.held():
            children.close()
            if root is not None:
                remove(root)


def remove(root: Path) -> None:
    """``root`` and everything in it; again for a few seconds while a file written by a
    server's last moments (a redis-server's AOF) makes a pass fail."""
    for _ in range(50):
        shutil.rmtree(root, ignore_errors=True)
        if not root.exists():
            return
        time.sleep(0.1)
    print(f"note: could not remove {root}", file=sys.stderr)


def measure_all(children: Children, root: Path, quick: bool, timeout: float) -> dict[str, Any]:
    rounds, seconds = (1, 0.3) if quick else (5, 2.0)
    jobs, queue_rounds = (200, 1) if quick else (10_000, 3)
    clients = Clients.compile(children, root, timeout)
    starter = Starter(children, root, timeout)
    start = Figure("start-up time (exec -> ready)", "ms")
    servers: dict[str, Server] = {}
    notes: list[str] = []
    service, took_s = starter.service()
    servers["service"] = service
    reference, took_r = starter.reference()
    servers["reference"] = reference
    start.add("service", took_s * 1000)
    start.add("reference", took_r * 1000)
    start_optional(starter, servers, notes)
    rows = [
        *tcp_rows(clients, seconds),
        *queue_rows(clients, jobs, queue_rounds, servers.get("redis-server")),
        *udp_rows(clients, quick, seconds),
    ]
    idle_rss = {s.name: s.rss_mb for s in (service, reference)}
    measure_rounds(rows, servers, rounds)
    requests = 20_000 if quick else 1_000_000
    # Twice: growth between the first and the second million would be a leak; growth
    # before the first is warm-up (caches, the kept results of the queue figures).
    after_rss = {s.name: memory_after(s, clients, requests) for s in (service, reference)}
    after_twice = {s.name: memory_after(s, clients, requests) for s in (service, reference)}
    only = service_only(service, quick, timeout)
    for _ in range(0 if quick else 2):
        for starter_of, name in ((starter.service, "service"), (starter.reference, "reference")):
            extra, took = starter_of()
            start.add(name, took * 1000)
            extra.stop()
    return {
        "machine": machine(),
        "quick": quick,
        "figures": [row.figure.as_dict() for row in rows] + [start.as_dict()],
        "memory_mb": {
            "idle": idle_rss,
            f"after {requests:,} requests": after_rss,
            f"after {2 * requests:,} requests": after_twice,
        },
        "service_only": only,
        "notes": notes,
    }


def seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny load (smoke test)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--timeout", type=seconds, default=TIMEOUT, metavar="SECONDS",
        help="the longest a server's start or one load step may take before the run gives "
        f"up (default {TIMEOUT:g})",
    )  # fmt: skip
    args = parser.parse_args()
    if shutil.which("gcc") is None:
        raise SystemExit("bench needs gcc for its load generator (apt-get install gcc)")
    children = Children()
    children.catch_signals()
    try:
        report = run(children, args.quick, args.timeout)
        print(json.dumps(report, indent=2) if args.json else table(report))
    except Interrupted as stop:
        print(f"bench: stopped by {stop}; every process it started is stopped", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    finally:
        children.release_signals()


if __name__ == "__main__":
    main()
