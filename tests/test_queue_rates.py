"""Rate limits per module against a real service, on both engines: jobs over the rate wait
(they do not fail), queue:status says until when, and the rate holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, wait_until, write_module
from tests.queue_helpers import add, both_engines, status  # noqa: F401 (a fixture)

STAMP = """
import time

async def handle_tcp(request):
    return repr(time.time())
"""


def test_a_throttled_module_runs_at_its_rate(make_service, modules_dir):
    write_module(modules_dir, "stamp", STAMP)
    svc = make_service('[queue]\nmodule_rates = { stamp = "2/s" }\n')
    ids = [add(svc, b"queue:add:stamp:") for _ in range(6)]
    other = add(svc, b"queue:add:echo:unthrottled")  # other modules are not held up
    assert svc.call(b"queue:get:id:%d" % other) == b"unthrottled"
    throttled = wait_until(
        lambda: next((s for s in map(lambda j: status(svc, j), ids) if s["throttled_until"]), None)
    )
    assert throttled["state"] == "waiting" and throttled["throttled_until"] > throttled["created"]
    started = sorted(float(svc.call(b"queue:get:id:%d" % jid, timeout=30)) for jid in ids)
    # 2 per second, sliding: any 3 consecutive starts span at least a second.
    for first, third in zip(started, started[2:], strict=False):
        assert third - first >= 0.99, started
    assert all(status(svc, jid)["state"] == "done" for jid in ids)  # waited, none failed
    assert started[-1] - started[0] >= 1.99


def test_a_bad_rate_in_the_config_stops_the_start(tmp_path):
    config = tmp_path / "service.config"
    config.write_text('[queue]\nmodule_rates = { mail = "10/fortnight" }\n')
    done = subprocess.run(
        [sys.executable, str(REPO / "service.py"), "-c", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "module_rates" in done.stderr and "a rate is N/UNIT" in done.stderr


@pytest.mark.parametrize("text", ["0/s", "ten/minute", "5"])
def test_rates_are_checked(text):
    from bgservice.queue.rates import parse_rate

    with pytest.raises(ValueError, match="a rate is N/UNIT"):
        parse_rate(text)


def test_rates_parse():
    from bgservice.queue.rates import parse_rate

    assert parse_rate("10/minute") == (10, 60.0)
    assert parse_rate("100 / 5min") == (100, 300.0)
    assert parse_rate("3/hours") == (3, 3600.0)
    assert json.loads(json.dumps(parse_rate("2/s"))) == [2, 1.0]
