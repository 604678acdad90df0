"""The benchmark runs end to end on a tiny load (a smoke test: no timing is asserted).

Every row runs; a row whose peer this machine lacks (node, beanstalkd, redis-server) is
skipped by the benchmark with a note, and only then may its cells be empty here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO

HAS_REDIS = shutil.which("redis-server") is not None and importlib.util.find_spec("redis")


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
