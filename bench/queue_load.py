"""The queue benchmark's clients: JOBS echo jobs from PRODUCERS processes, each adding its
share, then fetching every result (issue 17's shape). Run by bench/run.py:

    PYTHONPATH=. python3 bench/queue_load.py KIND PORT JOBS PRODUCERS [WORKERS]

(from the repository, so that the client measured is this checkout's).

KIND is how the producers talk to the server:
  framed      the shipped Python client (``bgservice.client.Client``, one framed
              connection per producer: ``add`` then ``get``); the service and the reference
  batch       the same client's ``add_many`` then ``get_many`` (pipelined batches)
  wait        the same client's ``run`` (add-and-wait: one round trip per job)
  oneshot     the original's clients: a connection per request, one write, no half-close,
              read until the server closes (``queue:add:echo:DATA``, ``queue:get:id:N``)
  beanstalkd  ``put`` on the tube ``jobs``; WORKERS worker processes (default 4) reserve a
              job, ``put`` its data back on the producer's tube ``result-P``, delete it;
              the producer reserves and deletes its results

Prints one JSON line: ops (jobs), seconds (from the moment every client is connected to
the last result), errors (jobs whose result did not come back intact), worker_cpu_s (the
beanstalkd workers' CPU; they are separate processes, the service runs its jobs itself),
producer_cpu_s (the producers' CPU: on a 2-core machine it shares the cores with the server).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Protocol

from beanstalk import Beanstalk

from bgservice.client import Client

HOST = "127.0.0.1"
JOBS_TUBE = "jobs"
STOP = b"stop"


@dataclass(frozen=True)
class Outcome:
    """What each producer or worker process reports back."""

    role: str  # "producer" or "worker"
    errors: int
    cpu_s: float


class Producer(Protocol):
    def add(self, data: bytes) -> object: ...

    def get_all(self, keys: list[object]) -> list[bytes]: ...


class FramedProducer:
    def __init__(self, port: int, index: int) -> None:
        self.client = Client(f"{HOST}:{port}")
        self.client.request(b"test:x")  # connect now, outside the timed part

    def add(self, data: bytes) -> object:
        return self.client.add("echo", data)

    def get_all(self, keys: list[object]) -> list[bytes]:
        return [self.client.get(key) for key in keys]  # type: ignore[arg-type]


class BatchProducer(FramedProducer):
    """The shipped client's batches: ``add_many``, then ``get_many`` (pipelined, 64
    requests per write), so that adds arriving together share a commit."""

    def add_all(self, data: list[bytes]) -> list[object]:
        return list(self.client.add_many([("echo", item) for item in data]))

    def get_all(self, keys: list[object]) -> list[bytes]:
        return self.client.get_many(keys)  # type: ignore[arg-type]


class WaitProducer(FramedProducer):
    """Add-and-wait (``Client.run``, ``queue:add?wait=1``): one round trip per job, the
    result in the reply; nothing is left to get."""

    def add(self, data: bytes) -> object:
        return self.client.run("echo", data)

    def get_all(self, keys: list[object]) -> list[bytes]:
        return keys  # type: ignore[return-value]


class OneShotProducer:
    def __init__(self, port: int, index: int) -> None:
        self.port = port

    def call(self, request: bytes) -> bytes:
        with socket.create_connection((HOST, self.port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)  # and no shutdown(SHUT_WR): the PHP clients never did
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        return reply

    def add(self, data: bytes) -> object:
        return self.call(b"queue:add:echo:" + data)

    def get_all(self, keys: list[object]) -> list[bytes]:
        return [self.call(b"queue:get:" + key) for key in keys]  # type: ignore[operator]


class BeanstalkProducer:
    def __init__(self, port: int, index: int) -> None:
        self.conn = Beanstalk(HOST, port)
        self.conn.use(JOBS_TUBE)
        self.conn.watch(result_tube(index))
        self.conn.ignore("default")

    def add(self, data: bytes) -> object:
        return self.conn.put(data)

    def get_all(self, keys: list[object]) -> list[bytes]:
        results = []
        for _ in keys:  # results come back in any order: one per job put
            job, body = self.conn.reserve()
            self.conn.delete(job)
            results.append(body)
        return results


PRODUCERS: dict[str, type[FramedProducer | OneShotProducer | BeanstalkProducer]] = {
    "framed": FramedProducer,
    "batch": BatchProducer,
    "wait": WaitProducer,
    "oneshot": OneShotProducer,
    "beanstalkd": BeanstalkProducer,
}


def result_tube(producer: int) -> str:
    return f"result-{producer}"


def job_data(producer: int, count: int) -> list[bytes]:
    """Eight bytes per job, unique within a run, naming its producer (for the workers)."""
    return [f"{producer}.{i:06d}".encode() for i in range(count)]


def produce(
    kind: str, port: int, index: int, count: int, start: Barrier, out: Queue[Outcome]
) -> None:
    data = job_data(index, count)
    errors, began = count, time.process_time()
    try:
        producer: Producer = PRODUCERS[kind](port, index)
        start.wait()
        began = time.process_time()  # the load's CPU, not the imports' and the connect's
        add_all = getattr(producer, "add_all", None)
        keys = add_all(data) if add_all else [producer.add(item) for item in data]
        errors = len(set(data) - set(producer.get_all(keys)))
    except Exception:
        traceback.print_exc()  # the run goes on; these jobs count as errors
    out.put(Outcome("producer", errors, time.process_time() - began))


def work(port: int, start: Barrier, out: Queue[Outcome]) -> None:
    """A beanstalkd worker: the echo job, its result put on the producer's tube."""
    conn = Beanstalk(HOST, port, timeout=None)
    conn.watch(JOBS_TUBE)
    conn.ignore("default")
    start.wait()
    began, using = time.process_time(), ""
    while True:
        job, body = conn.reserve()
        if body == STOP:
            conn.delete(job)
            break
        tube = result_tube(int(body.split(b".", 1)[0]))
        if tube != using:  # `use` only when the producer changes: a round trip saved
            conn.use(tube)
            using = tube
        conn.put(body)
        conn.delete(job)
    out.put(Outcome("worker", 0, time.process_time() - began))


def stop_workers(port: int, workers: int) -> None:
    conn = Beanstalk(HOST, port)
    conn.use(JOBS_TUBE)
    for _ in range(workers):
        conn.put(STOP, priority=2**31)  # behind any job still queued
    conn.close()


def run(kind: str, port: int, jobs: int, producers: int, workers: int) -> dict[str, float]:
    workers = workers if kind == "beanstalkd" else 0
    start = mp.Barrier(producers + workers + 1)
    out: Queue[Outcome] = mp.Queue()
    shares = [jobs // producers + (i < jobs % producers) for i in range(producers)]
    procs = [mp.Process(target=work, args=(port, start, out)) for _ in range(workers)]
    procs += [
        mp.Process(target=produce, args=(kind, port, i, n, start, out))
        for i, n in enumerate(shares)
    ]
    for proc in procs:
        proc.start()
    start.wait(timeout=60)
    began = time.perf_counter()
    outcomes = [out.get(timeout=600) for _ in range(producers)]
    took = time.perf_counter() - began
    if workers:
        stop_workers(port, workers)
        outcomes += [out.get(timeout=60) for _ in range(workers)]
    for proc in procs:
        proc.join(60)
    return {
        "ops": jobs,
        "seconds": took,
        "errors": sum(o.errors for o in outcomes),
        "worker_cpu_s": sum(o.cpu_s for o in outcomes if o.role == "worker"),
        "producer_cpu_s": sum(o.cpu_s for o in outcomes if o.role == "producer"),
    }


def main() -> None:
    kind, port, jobs, producers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    print(json.dumps(run(kind, port, jobs, producers, workers)))


if __name__ == "__main__":
    main()
