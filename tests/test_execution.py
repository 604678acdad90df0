"""Where a handler runs and how its failures end (bgservice/execution.py, threads.py): what
a module lets out is its call's error, never the service's end."""

from __future__ import annotations

import json

import pytest

from tests.conftest import wait_until, write_module

# What modules let out that is no Exception (or that no asyncio future takes): each one
# stopped the service (exit 1, 3 or 70), and a queued job doing it stopped it at every start.
ESCAPES = """
import sys

class Abort(BaseException):
    pass

def _escape(how):
    if how == "exit":
        sys.exit(3)
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "base":
        raise Abort("given up")
    if how == "stop":
        next(iter(()))  # StopIteration
    return "fine"
"""
IN_THREAD = ESCAPES + "\ndef handle_tcp(request):\n    return _escape(request.text)\n"
ON_LOOP = (
    ESCAPES
    + """
import asyncio

async def handle_tcp(request):
    if request.text.startswith("later "):
        await asyncio.sleep(0.01)
        return _escape(request.text[6:])
    return _escape(request.text)

def handle_udp(request):
    _escape(request.text)
"""
)
RAISED = {
    "exit": b"500: Module {m} raised SystemExit: 3",
    "interrupt": b"500: Module {m} raised KeyboardInterrupt",
    "base": b"500: Module {m} raised Abort: given up",
}


@pytest.mark.parametrize("module", ["inthread", "onloop"])
def test_what_a_handler_lets_out_is_its_500_not_the_services_end(modules_dir, make_service, module):
    write_module(modules_dir, "inthread", IN_THREAD)
    write_module(modules_dir, "onloop", ON_LOOP)
    svc = make_service()
    later = ["later exit", "later base"] if module == "onloop" else []  # (after an await)
    hows = ["exit", "interrupt", "base", *later]
    for how in hows:
        reply = svc.call(f"{module}:{how}".encode())
        expected = RAISED[how.removeprefix("later ")].replace(b"{m}", module.encode())
        assert reply == expected, (how, reply)
    if module == "inthread":  # a def handler's StopIteration: no asyncio future takes it
        assert svc.call(b"inthread:stop") == b"500: Module inthread raised StopIteration"
    else:
        for how in ("exit", "base"):
            svc.send_udp(f"onloop:{how}".encode())
        wait_until(lambda: svc.stats()["modules"]["onloop"].get("udp", {}).get("errors") == 2)
    assert svc.call(b"service:ping") == b"pong" and svc.proc.poll() is None
    assert svc.call(f"{module}:ok".encode()) == b"fine"


def test_a_queued_job_that_calls_sys_exit_fails_and_the_service_goes_on(modules_dir, make_service):
    write_module(modules_dir, "inthread", IN_THREAD)
    svc = make_service()
    jid = svc.call(b"queue:add:inthread:exit")
    assert svc.call(b"queue:get:" + jid) == b"500: Module inthread raised SystemExit: 3"
    assert json.loads(svc.call(b"queue:status:" + jid))["state"] == "failed"
    assert svc.call(b"service:ping") == b"pong"


STATS = """
import sys

def stats():
    return {"seen": {1, 2}} if MODE == "set" else sys.exit(1)

MODE = "{mode}"

async def handle_tcp(request):
    return "x"
"""


def test_a_modules_stats_that_json_cannot_hold_spoils_only_its_own_entry(modules_dir, make_service):
    # A set failed service:stats for everyone (500: Internal error: TypeError); a stats()
    # calling sys.exit() stopped the service.
    write_module(modules_dir, "sets", STATS.replace("{mode}", "set"))
    write_module(modules_dir, "exits", STATS.replace("{mode}", "exit"))
    svc = make_service()
    stats = svc.stats()["module_stats"]
    assert stats["sets"]["error"].startswith("TypeError: Object of type set")
    assert stats["exits"] == {"error": "SystemExit: 1"}
    assert svc.call(b"service:ping") == b"pong"


# A handler that catches its cancellation and waits on, three times over, then ends
# (a clean-up that will not be hurried, or a cancellation lost by 3.11's wait_for).
STUBBORN = """
import asyncio
from pathlib import Path

TIMEOUT = 0.5

async def _hold_on(request):
    caught = 0
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            caught += 1
            if caught == 3:
                Path(__file__).with_name(request.text + ".ended").touch()
                raise

async def handle_tcp(request):
    await _hold_on(request)

async def handle_udp(request):
    await _hold_on(request)
"""
WAITS = """
import asyncio
from pathlib import Path

async def handle_udp(request):
    await asyncio.sleep(0.01)
    Path(__file__).with_name(request.text + ".served").touch()
"""


def test_a_handler_that_catches_its_cancellation_ends_its_call_at_the_deadline(
    modules_dir, make_service
):
    # It held its client past the deadline (no 504) for as long as it waited on.
    write_module(modules_dir, "stubborn", STUBBORN)
    svc = make_service()
    assert svc.call(b"stubborn:tcp") == b"504: Module stubborn timed out after 0.5 s"
    assert svc.stats()["in_flight"].get("stubborn") == 1  # gone on apart, still counted
    # cancelled again (once a second) until it ends
    wait_until(lambda: (modules_dir / "tcp.ended").exists(), timeout=15)
    wait_until(lambda: not svc.stats()["in_flight"].get("stubborn"))
    assert "caught its cancellation and went on" in svc.log()


def test_datagram_handlers_that_catch_their_cancellation_free_their_slots(
    modules_dir, make_service
):
    # With udp_workers such handlers, no datagram of any module was served again.
    write_module(modules_dir, "stubborn", STUBBORN)
    write_module(modules_dir, "waits", WAITS)
    svc = make_service("[limits]\nudp_workers = 2\n")
    svc.send_udp(b"stubborn:one")
    svc.send_udp(b"stubborn:two")
    wait_until(lambda: svc.stats()["in_flight"].get("stubborn") == 2)
    svc.send_udp(b"waits:after")
    wait_until(lambda: (modules_dir / "after.served").exists(), timeout=15)


# A handler that queues an echo job with the options its request gives as JSON (def:
# request.add_job; async def: add_job_async), and replies the job's id.
ADDS = """
import json

def handle_tcp(request):
    return str(request.add_job("echo", "x", **json.loads(request.text)))
"""
ADDS_ASYNC = """
import json

async def handle_tcp(request):
    return str(await request.add_job_async("echo", "x", **json.loads(request.text)))
"""


@pytest.mark.parametrize("module", ["adds", "adds_async"])
def test_add_job_refuses_empty_and_non_utf8_options_as_queue_add_does(
    modules_dir, make_service, module
):
    # unique="" was taken for no key (name="", tags="" for none) and the job stored, where
    # queue:add?unique= and HTTP's "unique": "" are a 400; a lone surrogate is no text.
    write_module(modules_dir, "adds", ADDS)
    write_module(modules_dir, "adds_async", ADDS_ASYNC)
    svc = make_service()
    for option in ("unique", "name", "tags"):
        assert svc.call(f"queue:add?{option}=:echo:x".encode()) == (
            f"400: option {option}: empty (leave it out for the default)".encode()
        )
        call = f'{module}:{{"{option}": ""}}'.encode()
        assert svc.call(call) == (
            f"400: option {option}: empty (leave it out for the default)".encode()
        ), option
        call = f'{module}:{{"{option}": "\\udcff"}}'.encode()  # (JSON's escape of one)
        assert svc.call(call) == f"400: option {option}: not valid UTF-8 text".encode()
    assert svc.call(f'{module}:{{"tags": [""]}}'.encode()) == (
        b"400: option tags: empty (leave it out for the default)"
    )
    counts = json.loads(svc.call(b"queue:stats"))["counts"]
    assert sum(counts.values()) == 0  # none of them was stored
    # None, and no ids or tags at all, are still the option left out.
    left_out = svc.call(f'{module}:{{"unique": null, "tags": [], "after": []}}'.encode())
    job = json.loads(svc.call(b"queue:status:" + left_out))
    assert (job["unique"], job["tags"], job["after"]) == (None, [], None)
    keyed = svc.call(f'{module}:{{"unique": "k", "name": "n", "tags": ["a"]}}'.encode())
    assert json.loads(svc.call(b"queue:status:" + keyed))["unique"] == "k"
