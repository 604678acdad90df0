"""Python's garbage collector, set for a long-running service: young objects collected
less often than Python's default, and start-up's objects left out of full collections.

Python (3.11 to 3.13) collects its youngest generation every 700 (net) allocations of
objects that can hold others, walking every such object still alive; survivors move to
older generations, walked again less often, and a full collection walks them all. A
request the service answers at once frees its objects by reference counting and leaves
none to collect, but a queued job waiting for its commit holds some forty (its request,
task, coroutines, futures, row), so a burst of adds fills the young generations with
objects that are about to be freed anyway: in the bench's batch row (8 producers, 64
adds in flight each) Python spent 9-16 us of every job's 110-120 in the collector, and
made a full collection (7-9 ms, the loop stopped) every 3,000 jobs. Collected every
``[limits] gc_threshold`` allocations (20,000) instead, most of those objects are gone
before a collection comes: over 40,000 jobs of the bench's queue rows, 227 ms of
collections became 18, and the longest pause stayed as long (a collection of 20,000
young objects, 5-9 ms, against the full ones it replaces). Cyclic garbage, which the
request paths do not make, waits about 28 times as many allocations for its collection
(each older generation's threshold counts collections of the one before). Worker
processes (``EXECUTION = "process"``) keep Python's setting.
"""

from __future__ import annotations

import gc


def tune(threshold: int) -> None:
    """Collect young objects every ``threshold`` allocations (0: Python's own setting);
    the older generations keep Python's ratios."""
    if threshold:
        gc.set_threshold(threshold, *gc.get_threshold()[1:])


def settle() -> None:
    """Start-up is over: what it made (modules, a recovered backlog) lives as long as the
    service, and no full collection walks it again (100,000 jobs recovered: pauses of
    54 -> 14 ms). A module replaced later unfreezes them all (registry.py): the next full
    collection frees its old version, and walks the rest again."""
    gc.collect()
    gc.freeze()
