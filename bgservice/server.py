"""Lifecycle: the parts made and wired once, then start, serve, and a graceful shutdown.

``Service`` builds every part with its collaborators (nothing is wired in afterwards),
starts them in order (modules, listeners, HTTP, queue, reloader), waits for a signal, and
stops them in the reverse order within ``[limits] shutdown_grace``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bgservice import __version__, collector, logs
from bgservice.alerts import Alerts
from bgservice.cancelling import cancel_all
from bgservice.commands import Commands
from bgservice.config import Settings
from bgservice.config_checks import install, redact_url
from bgservice.datagram import DatagramQueue
from bgservice.dispatch import Dispatcher
from bgservice.errors import ConfigError
from bgservice.events import (
    INTERNAL_ERROR,
    MODULE_FAILED,
    MODULE_RELOADED,
    MODULE_REMOVED,
    UNCLEAN_START,
    Events,
)
from bgservice.execution import Execution, describe_execution
from bgservice.listeners import ListenError, Listeners, in_use
from bgservice.processes import ProcessPools
from bgservice.queue.engine import JobQueue, JobRunner
from bgservice.queue.local import LocalQueue
from bgservice.queue.rates import Windows
from bgservice.queue.sqlite import SqliteStore
from bgservice.readiness import sd_notify, write_ready_file
from bgservice.registry import Registry
from bgservice.reloader import Reloader
from bgservice.run_marker import RunMarker
from bgservice.stats import LagMonitor, Stats, lag_warning_ms
from bgservice.threads import CallThreads

log = logging.getLogger(__name__)

EXIT_UNEXPECTED = 70  # EX_SOFTWARE: an error outside any request, without -E
ALERT_FLUSH = 2.0  # seconds alerts still get at a stop once the shutdown grace is spent
# SIGHUP too: a closing terminal sends it, and there is no configuration reload to do.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Left ignored when ignored at start, as Unix programs do (and Python for its Ctrl-C):
# `nohup bgservice &` must outlive its terminal, a script's `bgservice &` its Ctrl-C.
IGNORABLE = (signal.SIGINT, signal.SIGHUP)


def make_queue(settings: Settings, runner: JobRunner, stats: Stats, events: Events) -> JobQueue:
    """The queue engine ``[queue] backend`` names: embedded SQLite, or Redis (shared)."""
    limits = dict(settings.module_limits)
    if settings.queue.backend == "redis":
        # Imported here: redis-py is needed only by sites that choose the shared queue.
        from bgservice.queue.redis import RedisQueue

        queue: JobQueue = RedisQueue(settings.queue, limits, settings.redis, runner, stats, events)
    else:
        store = SqliteStore(settings.db, settings.queue.commit_ms / 1000)
        queue = LocalQueue(settings.queue, limits, store, runner, stats, events)
    queue.rates = Windows(dict(settings.module_rates))
    return queue


class Service:
    def __init__(
        self,
        settings: Settings,
        ready_file: Path | None = None,
        notify_socket: str | None = None,
    ) -> None:
        self.settings = settings
        self.ready_file = ready_file
        self.notify_socket = notify_socket
        limits = settings.limits
        self.events = events = Events()
        self.stats = stats = Stats()
        self.threads = CallThreads(limits.threads, limits.stuck_threads)
        self.registry = Registry(
            settings.modules, events, settings.reload_import_timeout, Commands.NAMES
        )
        self.processes = ProcessPools(
            settings.modules, settings.workers, limits.shutdown_grace,
            settings.reload_import_timeout,
        )
        self.execution = Execution(
            settings, self.registry, stats, self.threads, self.processes, events
        )
        self.dispatcher = Dispatcher(settings, self.registry, stats, self.execution, events)
        self.jobs = make_queue(settings, self.dispatcher, stats, events)
        self.alerts = Alerts(settings.alerts, self.dispatcher, self.jobs, events)
        extra_stats: dict[str, Any] = {
            "workers": self.processes.stats,
            "threads": self.threads.stats,
        }
        if self.alerts.enabled:
            extra_stats["alerts"] = self.alerts.stats
        self.commands = Commands(
            self.dispatcher, self.jobs, self.registry, self.execution, stats, extra_stats
        )
        self.datagrams = DatagramQueue(
            self.dispatcher, stats, self.jobs, limits.udp_queue, limits.udp_workers
        )
        self.listeners = Listeners(settings, self.commands, self.datagrams, stats, self.jobs)
        self._scheduling: asyncio.Task[None] | None = None
        self.reloader = Reloader(settings.modules, self.registry, settings.reload_debounce_ms)
        self.http: Any = None  # bgservice.http.api.HttpApi when [http] enabled
        self.http_address: list[Any] | None = None
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self.marker = RunMarker(settings.db)
        events.subscribe(MODULE_RELOADED, self._reloaded)
        events.subscribe(MODULE_FAILED, self._reload_failed)
        events.subscribe(MODULE_REMOVED, self._module_removed)

    # --- run ------------------------------------------------------------------------

    async def run(self) -> int:
        collector.tune(self.settings.limits.gc_threshold)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._unexpected)
        for sig in STOP_SIGNALS:
            if sig in IGNORABLE and signal.getsignal(sig) is signal.SIG_IGN:
                log.debug("%s ignored, as when the service was started", sig.name)
                continue
            loop.add_signal_handler(sig, self._on_signal, sig)
        await self.registry.load_all()
        self._log_modules()
        try:
            await self.listeners.open()
            await self._listen_http()
        except ListenError as exc:
            return await self._give_up(1, str(exc))
        except ConfigError as exc:  # e.g. [http] token's secret also a named token's
            return await self._give_up(2, f"configuration error: {exc}")
        try:
            await self.jobs.start()
        except ConfigError as exc:  # e.g. Redis refuses the url's password: no restart mends it
            return await self._give_up(2, f"configuration error: {exc}")
        except Exception as exc:  # e.g. sqlite3.Error: unreadable or locked database
            where = self._queue_where()
            return await self._give_up(1, f"cannot open the job queue ({where}): {exc}")
        log.info("job queue: %s, %d workers", self._queue_where(), self.settings.queue.workers)
        self._scheduling = asyncio.get_running_loop().create_task(self._start_schedules())
        self.reloader.start()
        self.datagrams.start()
        lag = LagMonitor(
            self.stats,
            warn_ms=lag_warning_ms(self.settings.lag_warn_ms, self.settings.verbose),
            running=lambda: [m for m, n in self.stats.in_flight.items() if n],
        )
        self._background.append(loop.create_task(lag.run()))
        if self.alerts.enabled:
            self._background.append(loop.create_task(self.alerts.run()))
            self._check_alert_module()
        self._claim_marker()
        collector.settle()  # start-up's objects: out of the full collections
        self._announce_ready()
        await self._stop.wait()
        await self._shutdown()
        if self.exit_code == 0:  # stopped by a signal, as asked: a clean stop
            self.marker.release()
        if await cancel_all(asyncio.all_tasks() - {asyncio.current_task()}, "tasks"):
            logging.shutdown()  # asyncio.run would wait for them for ever: exit without
            os._exit(self.exit_code)
        return self.exit_code

    async def _give_up(self, code: int, why: str) -> int:
        """A start that cannot go on: said, what it opened closed; ``code``, to exit with.
        Said on stderr too, as the errors found before the start are, unless the log
        already goes there (the console log is stdout: a wrapper reading stderr alone
        heard nothing but the exit code)."""
        log.error("%s", why)
        if not logs.same_file(sys.stdout, sys.stderr):
            print(f"bgservice: {why}", file=sys.stderr)
        await self._close_listeners()
        self.threads.shutdown(wait=False, cancel_futures=True)
        return code

    def _claim_marker(self) -> None:
        """Raised once the alerts run, so the alert about the last run goes out."""
        previous = self.marker.claim()
        if previous is None:
            return
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(previous.started or 0))
        title = "started after an unclean stop (crash, kill -9 or power loss)"
        detail = f"the last run (pid {previous.pid}, started {when}) did not stop cleanly"
        log.warning("%s: %s", title, detail)
        self.events.emit(UNCLEAN_START, title=f"bgservice {title}", detail=detail)

    def stop(self, code: int = 0) -> None:
        self.exit_code = self.exit_code or code
        self._stop.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        loop = asyncio.get_running_loop()
        log.info("received %s: shutting down (send it again to exit at once)", sig.name)
        for s in STOP_SIGNALS:
            loop.add_signal_handler(s, self._exit_now, s)
        self.stop(0)

    def _exit_now(self, sig: signal.Signals) -> None:
        log.warning("received %s again: exiting now", sig.name)
        logging.shutdown()
        os._exit(1)

    def _unexpected(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The global error handler (-E): an error outside every request's boundary."""
        exc = context.get("exception")
        message = context.get("message", "unexpected error")
        log.error("unexpected error: %s", message, exc_info=exc)
        if self.settings.global_handler >= 2 and exc is not None:
            traceback.print_exception(exc, file=sys.stderr)
        trace = "".join(traceback.format_exception(exc)) if exc is not None else ""
        self.events.emit(INTERNAL_ERROR, title=f"unexpected error: {message}", detail=trace)
        if self.settings.global_handler == 0:
            log.critical("stopping after an unexpected error (start with -E to keep running)")
            self.stop(EXIT_UNEXPECTED)

    # --- what the registry reports ------------------------------------------------------

    def _reloaded(self, name: str) -> None:
        self.stats.reloads += 1
        entry = self.registry.get(name)
        if entry is not None and entry.version is not None:
            self.processes.reloaded(entry.version)  # out of process mode: retire the pool

    def _reload_failed(self, name: str, error: str) -> None:
        self.stats.reload_failures += 1

    def _module_removed(self, name: str) -> None:
        self.processes.retire(name)  # its running calls finish, then its workers stop

    def _check_alert_module(self) -> None:
        name = self.settings.alerts.module
        entry = self.registry.get(name) if name else None
        if entry is None or entry.version is None or entry.version.tcp is None:
            log.warning(
                "[alerts] module %r is not loaded or has no TCP handler: alerts will fail "
                "until it is", name,
            )  # fmt: skip

    def _stop_schedules(self) -> None:
        if self._scheduling is not None:
            self._scheduling.cancel()
        if self.jobs.scheduler is not None:
            self.jobs.scheduler.stop()

    async def _start_schedules(self) -> None:
        """Load the schedules and start firing them; while the store does not answer
        (Redis away), try again every few seconds."""
        delay = 1.0
        while True:
            try:
                await self.jobs.start_scheduler(self.settings.schedules)
            except Exception as exc:
                log.error("schedules not loaded (%s): retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            return

    def _queue_where(self) -> str:
        if self.settings.queue.backend == "redis":
            redis = self.settings.redis
            return f"redis {redact_url(redis.url)}, prefix {redis.prefix!r}"
        return f"database {self.settings.db.absolute()}"

    # --- HTTP ---------------------------------------------------------------------------

    async def _listen_http(self) -> None:
        """The operator's API, metrics and dashboard ([http]), on the same event loop."""
        http = self.settings.http
        if not http.enabled:
            return
        try:
            # Imported here: aiohttp and prometheus-client are needed only when it is on.
            from bgservice.http.api import HttpApi
            from bgservice.http.metrics import Metrics
            from bgservice.http.site import listening_line
        except ImportError as exc:
            raise ListenError(
                f"[http] is enabled but {exc.name} is not installed: {install('http')}"
            ) from None
        metrics = Metrics(
            self.stats,
            self.commands.modules,
            self.jobs.stats,
            self.alerts.stats if self.alerts.enabled else None,
        )
        self.http = HttpApi(
            self.settings, self.commands, self.jobs, metrics, self.events, self.stats
        )
        try:
            host, port = await self.http.start()
        except OSError as exc:
            raise ListenError(
                f"cannot listen for HTTP on {http.host}:{http.port}: {exc.strerror or exc}"
                + in_use(exc, f"[http] port in {self.settings.source or 'the config'}")
            ) from None
        self.http_address = [host, port]
        log.log(*listening_line(host, port, self.http.access, self.http.tokens.configured))

    async def _close_listeners(self) -> None:
        if self.http is not None:
            await self.http.stop()
            self.http = None
        self.listeners.close()

    # --- readiness --------------------------------------------------------------------

    def _log_modules(self) -> None:
        rows = [("module", "state", "accepts", "runs in", "timeout")]
        for entry in self.registry:
            v = entry.version
            rows.append(
                (
                    entry.name,
                    entry.state if not entry.error else f"failed: {entry.error}",
                    ",".join(sorted(v.accepts)) if v else "-",
                    describe_execution(v) if v else "-",
                    f"{self.execution.timeout_of(v):g}s" if v else "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4]
            for r in rows
        ]
        log.info("%d modules from %s:\n  %s", len(rows) - 1, self.registry.folder,
                 "\n  ".join(lines))  # fmt: skip

    def _announce_ready(self) -> None:
        log.info("bgservice %s ready (pid %d)", __version__, os.getpid())
        if self.ready_file is not None:
            ready: dict[str, Any] = {"pid": os.getpid(), "listeners": self.listeners.bound}
            if self.http_address is not None:
                ready["http"] = self.http_address
            write_ready_file(self.ready_file, ready)
        sd_notify(self.notify_socket, b"READY=1")

    # --- shutdown ---------------------------------------------------------------------

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        grace = self.settings.limits.shutdown_grace
        deadline = loop.time() + grace
        sd_notify(self.notify_socket, b"STOPPING=1")
        tasks = self.listeners.tasks
        log.info("shutting down: %d calls in flight, up to %g s to finish", len(tasks), grace)
        self.jobs.close(grace)  # before the dispatcher: a job it refused would fail (503)
        self.dispatcher.close()
        await self._close_listeners()
        for conn in self.listeners.connections():
            conn.shutdown()
        await self.datagrams.drain(max(deadline - loop.time(), 0))
        self._stop_schedules()
        await self.jobs.stop(max(deadline - loop.time(), 0))
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=max(deadline - loop.time(), 0))
            if pending:
                log.warning("%d calls still running after %g s: cancelled", len(pending), grace)
                for conn in self.listeners.connections():
                    conn.cut()  # 503 Shutting down to each, not 0 bytes
                await cancel_all(pending, "calls")  # (again, if one loses its cancellation)
        for conn in self.listeners.connections():
            conn.close()
        # Alerts held or waiting (why we stop among them): the rest of the grace, or a moment
        await self.alerts.flush(max(deadline - loop.time(), ALERT_FLUSH))
        await self.reloader.stop()
        await self.processes.close(max(deadline - loop.time(), 1.0))
        await self.registry.close(max(deadline - loop.time(), 1.0))
        await cancel_all(self._background, "background tasks")
        self.threads.shutdown(wait=False, cancel_futures=True)
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        if self.threads.stuck:
            # Daemon threads: the interpreter exits without waiting for them (threads.py).
            log.warning(
                "%d handler thread%s still stuck: exiting without %s",
                self.threads.stuck, "" if self.threads.stuck == 1 else "s",
                "it" if self.threads.stuck == 1 else "them",
            )  # fmt: skip
        log.info("bgservice stopped")
