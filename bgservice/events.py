"""Named events and the observers subscribed to them (huey's signals are the model).

The parts that notice something (the registry, the dispatcher, the queue) emit an event by
name; the parts that care (counters, alerts, worker pools) subscribe when they are made.
Nobody assigns callbacks into another object, and an observer that raises costs a log line,
never the emitter's work.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# The events, and the keyword arguments each is emitted with.
MODULE_RELOADED = "module_reloaded"  # name
MODULE_FAILED = "module_failed"  # name, error: a file that did not load
MODULE_REMOVED = "module_removed"  # name
CALL_FAILED = "call_failed"  # title, detail, module: a direct call raised or timed out
INTERNAL_ERROR = "internal_error"  # title, detail: a bug of ours, caught at a boundary
JOB_FAILED = "job_failed"  # title, detail, module, job: a job failed for good
THREAD_STUCK = "thread_stuck"  # title, module: a def handler kept its thread past its timeout
UNCLEAN_START = "unclean_start"  # title, detail: the last run did not stop cleanly
UNKNOWN_MODULE_BURST = "unknown_module_burst"  # title, name: many requests for no module

Observer = Callable[..., None]


class Events:
    """Observers by event name, called in the order they subscribed, on the loop thread."""

    def __init__(self) -> None:
        self._observers: defaultdict[str, list[Observer]] = defaultdict(list)

    def subscribe(self, event: str, observer: Observer) -> None:
        self._observers[event].append(observer)

    def emit(self, event: str, **data: Any) -> None:
        for observer in self._observers.get(event, ()):
            try:
                observer(**data)
            except Exception:  # an observer's bug must not fail what emitted the event
                log.exception("observer of %s failed", event)
