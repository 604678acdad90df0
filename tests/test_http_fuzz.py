"""Schemathesis against a real service, from the service's own OpenAPI document
(issue 18, "Done when"): no 5xx, every response as documented (status, content type,
headers, body schema), documented input served and undocumented input refused.

Bounded: a fixed seed, a few dozen cases per operation and one worker, under a minute on
two cores. ``BGSERVICE_FUZZ_EXAMPLES`` and ``BGSERVICE_FUZZ_SEED`` explore further, e.g.
``BGSERVICE_FUZZ_EXAMPLES=500 BGSERVICE_FUZZ_SEED=$RANDOM pytest tests/test_http_fuzz.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, ServiceProcess

pytest.importorskip("aiohttp")
if not os.environ.get("BGSERVICE_TEST_STRICT"):  # .ci/run sets it: missing means failing
    pytest.importorskip("schemathesis", reason="pip install -e '.[test]' installs it")

TOKEN = "fuzz-t0ken"
HTTP = f'[http]\nenabled = true\nport = 0\ntoken = "{TOKEN}"\n'
EXAMPLES = int(os.environ.get("BGSERVICE_FUZZ_EXAMPLES", "60"))
SEED = int(os.environ.get("BGSERVICE_FUZZ_SEED", "20"))

# 400s the document cannot foresee: adding a job for a module the service has not
# loaded (the socket protocol's "Unknown request"), a page_token the service never gave
# out (any string is a token to the document), a schedule whose cron expression or time
# zone does not exist (any string is one to the document), and running one whose module
# the service has not loaded. GET /jobs/{id}?wait= may hold a
# request for up to 300 s by design: the fuzzer waits 0.1 s.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "424"]

[[operations]]
include-operation-id = "addJob"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "424"]

[[operations]]
include-operation-id = "createSchedule"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "409"]
[[operations]]
include-operation-id = "runSchedule"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404"]
[[operations]]
include-operation-id = "listJobs"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400"]

[parameters]
"query.wait" = 0.1
"""


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> object:
    root = tmp_path_factory.mktemp("fuzz")
    # One quick module: jobs the fuzzer adds finish at once instead of compiling or mailing.
    (root / "modules").mkdir()
    shutil.copy(REPO / "modules" / "echo.py", root / "modules")
    service = ServiceProcess(root, HTTP).start()
    yield service
    service.stop()


@pytest.mark.timeout(180)
def test_the_api_keeps_to_its_openapi_document(svc: ServiceProcess, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        f"{svc.http_url}/api/v1/openapi.json", "--url", svc.http_url,
        "--header", f"Authorization: Bearer {TOKEN}",
        "--checks", "all", "--max-examples", str(EXAMPLES), "--seed", str(SEED),
        "--workers", "1", "--request-timeout", "20", "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path / "report"),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=170, cwd=tmp_path)
    output = run.stdout + run.stderr
    (tmp_path / "schemathesis.txt").write_text(output)  # kept with pytest's tmp files
    assert run.returncode == 0, output[-12000:]
    assert "Traceback" not in svc.log() and "internal error" not in svc.log(), svc.log()[-4000:]
