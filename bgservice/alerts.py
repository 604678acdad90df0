"""Alerts: errors worth a human's attention, handed to a module of the user's choice.

Three things raise an alert (``[alerts] events``): ``error``, an error outside every
request, an internal error at the dispatch boundary, or a handler thread stuck past its
timeout; ``reload``, a module file that failed to load; ``job``, a queued job that ended
``failed``; ``restart``, a start after an unclean stop (crash, ``kill -9``); ``unknown``,
repeated requests for a module that does not exist (bgservice.unknown_names). ``call``, a
module that raised or timed out in a direct call, can be added for sites that want it.

Each alert is a JSON object passed to the TCP handler of ``[alerts] module`` (the shipped
``notify_email`` mails it; a few lines post it to a webhook instead), one at a time, off
the request path. At most ``max_per_minute`` alerts go out on their own in any minute;
beyond that they are held and, ``summary_seconds`` after the first held one, sent as one
summary with their counts per event and the first few titles, so a storm of a thousand
failures is one message, not a thousand. Beyond OUTBOX waiting for the module (stuck,
say), alerts are dropped: counted, and logged a line every DROP_LINES s with how many.
Alerts about the alert module itself are never raised (a broken mailer must not mail
about itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from bgservice.config import AlertSettings
from bgservice.dispatch import Dispatcher
from bgservice.events import (
    CALL_FAILED,
    INTERNAL_ERROR,
    JOB_FAILED,
    MODULE_FAILED,
    THREAD_STUCK,
    UNCLEAN_START,
    UNKNOWN_MODULE_BURST,
    Events,
)
from bgservice.logs import Sparse
from bgservice.origin import Origin
from bgservice.protocol import OK
from bgservice.request import JobAdder, Request

log = logging.getLogger(__name__)

WINDOW = 60.0  # seconds over which max_per_minute counts
OUTBOX = 1000  # alerts waiting for the module; beyond it they are counted as dropped
SUMMARY_TITLES = 10  # titles a summary quotes
MESSAGE_CHARS = 4000  # an alert's message is cut to this
TITLE_ERROR = 100  # characters of a load error a reload alert's title quotes
DROP_LINES = 5.0  # s: dropped alerts, a log line at most this often


@dataclass
class Alert:
    event: str
    title: str
    message: str = ""
    module: str | None = None
    job: int | None = None
    time: float = field(default_factory=time.time)
    host: str = field(default_factory=socket.gethostname)
    counts: dict[str, int] | None = None

    def payload(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}).encode()


class Alerts:
    """Rate-limits alerts and delivers them through the dispatcher, one at a time.

    It raises alerts itself from the service's events: ``internal_error`` and
    ``thread_stuck`` (error), ``module_failed`` (reload), ``job_failed`` (job) and
    ``call_failed`` (call).
    """

    def __init__(
        self, settings: AlertSettings, dispatcher: Dispatcher, jobs: JobAdder, events: Events
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.jobs = jobs  # what the alert module's add_job() adds to
        self.enabled = settings.module is not None
        self._sent: deque[float] = deque()
        self._held: list[Alert] = []
        self._held_counts: Counter[str] = Counter()
        self._summary_timer: asyncio.TimerHandle | None = None
        self._outbox: asyncio.Queue[Alert] = asyncio.Queue(OUTBOX)
        self._delivering = False  # an alert is with the module now
        self.counts: Counter[str] = Counter()  # raised, sent, summarised, failed, dropped
        self._drops = Sparse(DROP_LINES, self._more_dropped)
        self._first_dropped: str | None = None  # the title of the first not yet logged
        if self.enabled:
            events.subscribe(INTERNAL_ERROR, self._internal_error)
            events.subscribe(MODULE_FAILED, self._module_failed)
            events.subscribe(JOB_FAILED, self._job_failed)
            events.subscribe(CALL_FAILED, self._call_failed)
            events.subscribe(THREAD_STUCK, self._thread_stuck)
            events.subscribe(UNCLEAN_START, self._unclean_start)
            events.subscribe(UNKNOWN_MODULE_BURST, self._unknown_module)

    def _internal_error(self, title: str, detail: str) -> None:
        self.report("error", title, detail)

    def _module_failed(self, name: str, error: str) -> None:
        # The error's first line in the title, as a failed job's: it is a mail's subject,
        # and a summary lists titles only ("module x failed to load", twice, said nothing).
        first = error.strip().partition("\n")[0]
        first = first if len(first) <= TITLE_ERROR else first[: TITLE_ERROR - 3] + "..."
        title = f"module {name} failed to load"
        self.report("reload", f"{title}: {first}" if first else title, error)

    def _job_failed(self, title: str, detail: str, module: str, job: int) -> None:
        self.report("job", title, detail, module=module, job=job)

    def _call_failed(self, title: str, detail: str, module: str) -> None:
        self.report("call", title, detail, module=module)

    def _thread_stuck(self, title: str, module: str) -> None:
        # An error: each stuck thread is lost until its handler returns, and enough of them
        # refuse every def call (503).
        self.report("error", title, "", module=module)

    def _unclean_start(self, title: str, detail: str) -> None:
        self.report("restart", title, detail)

    def _unknown_module(self, title: str, name: str) -> None:
        # Counted (and limited to one event per name per minute) by the dispatcher.
        self.report("unknown", title, "", module=name)

    def report(
        self,
        event: str,
        title: str,
        message: str = "",
        module: str | None = None,
        job: int | None = None,
    ) -> None:
        """Raise an alert (event-loop thread; cheap: nothing waits for the delivery)."""
        if not self.enabled or event not in self.settings.events:
            return
        if module is not None and module == self.settings.module:
            return
        self.counts["raised"] += 1
        alert = Alert(event, title, message[:MESSAGE_CHARS], module, job)
        now = time.monotonic()
        while self._sent and self._sent[0] <= now - WINDOW:
            self._sent.popleft()
        if not self._held and len(self._sent) < self.settings.max_per_minute:
            self._sent.append(now)
            self._enqueue(alert)
            return
        if len(self._held) < SUMMARY_TITLES:
            self._held.append(alert)
        self._held_counts[event] += 1
        if self._summary_timer is None:
            loop = asyncio.get_running_loop()
            self._summary_timer = loop.call_later(self.settings.summary_seconds, self._summarise)

    def _summarise(self) -> None:
        self._summary_timer = None
        total = sum(self._held_counts.values())
        if not total:
            return
        if total == 1:  # a summary of one would only hide its message
            self._held_counts.clear()
            self._sent.append(time.monotonic())
            self._enqueue(self._held.pop())
            return
        per_event = ", ".join(f"{n} {event}" for event, n in self._held_counts.most_common())
        lines = [f"- {a.title}" for a in self._held]
        if total > len(self._held):
            lines.append(f"- ... and {total - len(self._held)} more")
        summary = Alert(
            "summary",
            f"{total} more alerts ({per_event})",
            "\n".join(lines),
            counts=dict(self._held_counts),
        )
        self._held.clear()
        self._held_counts.clear()
        self._sent.append(time.monotonic())
        self.counts["summarised"] += total
        self._enqueue(summary)

    def _enqueue(self, alert: Alert) -> None:
        try:
            self._outbox.put_nowait(alert)
        except asyncio.QueueFull:
            self._dropped(alert)

    def _dropped(self, alert: Alert) -> None:
        """Counted, and logged: of a flood (the module stuck, a thousand failing jobs), a
        line every DROP_LINES s, saying how many more and the first of them."""
        self.counts["dropped"] += 1
        self._first_dropped = self._first_dropped or alert.title
        if count := self._drops.tick(time.monotonic()):
            more = f" ({count - 1} more since the last line)" if count > 1 else ""
            log.warning("alert dropped (%d waiting): %s%s", OUTBOX, alert.title, more)
            self._first_dropped = None

    def _more_dropped(self, count: int) -> None:
        first, self._first_dropped = self._first_dropped, None
        log.warning("%d more alert%s dropped (%d waiting) since the last line, the first: %s",
                    count, "" if count == 1 else "s", OUTBOX, first)  # fmt: skip

    async def run(self) -> None:
        """Deliver alerts until cancelled; a failed delivery is logged, never re-alerted."""
        module = self.settings.module
        assert module is not None
        while True:
            alert = await self._outbox.get()
            loop = asyncio.get_running_loop()
            request = Request(module, alert.payload(), Origin.ALERT, loop=loop, jobs=self.jobs)
            self._delivering = True
            try:
                status, body = await self.dispatcher.call(request)
            finally:
                self._delivering = False
                self._outbox.task_done()
            if status == OK:
                self.counts["sent"] += 1
            else:
                self.counts["failed"] += 1
                log.warning(
                    "alert %r not delivered by module %s: %d %s",
                    alert.title, module, status, body[:300].decode("utf-8", "replace"),
                )  # fmt: skip

    async def flush(self, timeout: float) -> None:
        """Stopping: the held alerts' summary goes now, not when its timer would have
        fired, and what waits gets up to ``timeout`` seconds to be delivered (the alert
        saying why the service stops is often among them); what is left is logged."""
        if not self.enabled:
            return
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summarise()
        try:
            await asyncio.wait_for(self._outbox.join(), timeout)
        except TimeoutError:
            left = self._outbox.qsize() + self._delivering
            log.warning("%d alert%s not delivered: the service stopped first",
                        left, "" if left == 1 else "s")  # fmt: skip

    def stats(self) -> dict[str, Any]:
        return {
            "module": self.settings.module,
            **{k: self.counts.get(k, 0) for k in ("raised", "sent", "summarised", "failed")},
            "dropped": self.counts.get("dropped", 0),
            "held": sum(self._held_counts.values()),
        }
