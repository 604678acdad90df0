"""What the queue's test files share: both engines as a fixture, adding a job and reading
its status over a real socket."""

from __future__ import annotations

import json
from typing import Any

import pytest


@pytest.fixture(params=["sqlite", "redis"], name="queue_backend")
def both_engines(request: pytest.FixtureRequest) -> str:
    """Import it into a test file to run each of its tests on both engines."""
    return str(request.param)


def add(svc: Any, command: bytes) -> int:
    """``queue:add...`` -> the new job's id (the reply must be ``id:N``)."""
    reply = svc.call(command)
    assert reply.startswith(b"id:"), reply
    return int(reply[3:])


def status(svc: Any, jid: int) -> dict[str, Any]:
    return dict(json.loads(svc.call(b"queue:status:id:%d" % jid)))
