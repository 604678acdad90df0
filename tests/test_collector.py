"""Python's garbage collector in the service (bgservice/collector.py): how often it
collects young objects ([limits] gc_threshold), asked of the running service through a
module, as a handler would see it."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ServiceProcess, write_module

from bgservice.client import Client
from bgservice.config import Limits

GC_MODULE = """\
import gc

async def handle_tcp(request):
    if request.text == "collections":
        return str(gc.get_stats()[0]["collections"])
    return repr(gc.get_threshold())
"""


def threshold(svc: ServiceProcess) -> tuple[int, int, int]:
    value = ast.literal_eval(svc.call(b"gcinfo:threshold").decode())
    assert isinstance(value, tuple) and len(value) == 3
    return value


def pythons_own() -> tuple[int, int, int]:
    """What a fresh interpreter starts with (700, 10, 10 on 3.11 to 3.13)."""
    out = subprocess.run(
        [sys.executable, "-c", "import gc; print(gc.get_threshold())"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return ast.literal_eval(out.stdout.strip())  # type: ignore[no-any-return]


def test_gc_threshold_sets_the_young_generations_threshold(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    write_module(modules_dir, "gcinfo", GC_MODULE)
    svc = make_service("[limits]\ngc_threshold = 12345\n")
    assert threshold(svc) == (12345, *pythons_own()[1:])  # the older generations' as Python's


def test_the_default_collects_young_objects_less_often_than_python(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    write_module(modules_dir, "gcinfo", GC_MODULE)
    svc = make_service()
    assert threshold(svc)[0] == Limits.gc_threshold == 20_000
    assert pythons_own()[0] < Limits.gc_threshold


def test_zero_keeps_pythons_own_setting(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    write_module(modules_dir, "gcinfo", GC_MODULE)
    svc = make_service("[limits]\ngc_threshold = 0\n")
    assert threshold(svc) == pythons_own()


def test_a_burst_of_queued_jobs_makes_few_young_collections(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    """Jobs waiting for their commit hold their objects: with Python's 700, a burst of
    adds in batches made a young collection every 50 jobs (98 for these 5,000),
    each walking the objects of every add in flight; now a handful at most."""
    write_module(modules_dir, "gcinfo", GC_MODULE)
    svc = make_service()
    before = int(svc.call(b"gcinfo:collections"))
    with Client(f"{svc.tcp[0]}:{svc.tcp[1]}", timeout=60) as bg:
        for _ in range(5):
            ids = bg.add_many([("echo", b"x")] * 1000)
            assert bg.get_many(ids) == [b"x"] * 1000
    young = int(svc.call(b"gcinfo:collections")) - before
    assert young <= 15, young
