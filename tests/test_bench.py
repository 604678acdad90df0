"""The benchmark runs end to end on a tiny load (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the load generator needs gcc")
@pytest.mark.timeout(180)
def test_benchmark_runs_end_to_end():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    names = [f["name"] for f in report["figures"]]
    assert any(n.startswith("tcp one-shot") for n in names)
    assert any(n.startswith("UDP loss") for n in names)
    for figure in report["figures"]:
        for server in ("service", "reference"):
            assert figure["rounds"][server], (figure["name"], server)
    loads = [f for f in report["figures"] if f["unit"] in ("req/s", "jobs/s")]
    assert all(f["rounds"]["service"][0] > 0 and f["rounds"]["reference"][0] > 0 for f in loads)
    assert not any("errors" in key for f in loads for key in f["extra"])
    assert report["service_only"]["reload latency ms, median"] > 0
    assert report["memory_mb"]["idle"]["service"] > 0
