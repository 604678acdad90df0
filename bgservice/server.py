"""Lifecycle: modules, listeners, reloader, workers, signals and a graceful shutdown."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import signal
import socket
import stat
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bgservice.access import AccessList
from bgservice.alerts import Alerts
from bgservice.config import LOOPBACK, Listener, Settings
from bgservice.dispatch import Dispatcher, describe_execution
from bgservice.jobs import JobQueue
from bgservice.jobs_local import LocalQueue
from bgservice.registry import Registry
from bgservice.reloader import Reloader
from bgservice.stats import LagMonitor, Stats
from bgservice.store_sqlite import SqliteStore
from bgservice.tcp import Connection, StreamContext
from bgservice.udp import DatagramEndpoint, DatagramWorkers
from bgservice.workers import ProcessRunner

log = logging.getLogger(__name__)

EXIT_UNEXPECTED = 70  # EX_SOFTWARE: an error outside any request, without -E
_PORT_TRIES = 20


class ListenError(Exception):
    """A listener could not be opened (port in use, permission, bad address)."""


def make_queue(settings: Settings, dispatcher: Dispatcher) -> JobQueue:
    """The queue engine ``[queue] backend`` names: embedded SQLite, or Redis (shared)."""
    if settings.queue.backend == "redis":
        # Imported here: redis-py is needed only by sites that choose the shared queue.
        from bgservice.jobs_redis import RedisQueue

        limits = dict(settings.module_limits)
        return RedisQueue(settings.queue, limits, settings.redis, dispatcher)
    store = SqliteStore(settings.db, settings.queue.commit_ms / 1000)
    return LocalQueue(settings.queue, dict(settings.module_limits), store, dispatcher)


def redact_url(url: str) -> str:
    """A URL fit for a log line: any password replaced."""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


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
        self.stats = Stats()
        self.executor = ThreadPoolExecutor(
            settings.limits.threads, thread_name_prefix="bgservice-call"
        )
        self.registry = Registry(settings.modules, self.executor)
        self.registry.on_failure = self._reload_failed
        self.registry.on_reloaded = self._reloaded
        self.dispatcher = Dispatcher(settings, self.registry, self.stats, self.executor)
        self.jobs = make_queue(settings, self.dispatcher)
        self.dispatcher.queue = self.jobs
        self.processes = ProcessRunner(settings.modules, settings.workers)
        self.dispatcher.process_runner = self.processes
        self.dispatcher.extra_stats["workers"] = self.processes.stats
        self.registry.on_removed = self._module_removed
        self.alerts = Alerts(settings.alerts, self.dispatcher)
        if self.alerts.enabled:
            self.dispatcher.alert = self.alerts.report
            self.dispatcher.extra_stats["alerts"] = self.alerts.stats
        self.http: Any = None  # bgservice.http.api.HttpApi when [http] enabled
        self.http_address: list[Any] | None = None
        self.udp = DatagramWorkers(
            self.dispatcher, self.stats, settings.limits.udp_queue, settings.limits.udp_workers
        )
        self.reloader = Reloader(
            settings.modules, self.registry.refresh, settings.reload_debounce_ms
        )
        self.tasks: set[asyncio.Task[Any]] = set()
        self.contexts: list[StreamContext] = []
        self.servers: list[asyncio.Server] = []
        self.endpoints: list[asyncio.BaseTransport] = []
        self.socket_files: list[Path] = []
        self.bound: list[dict[str, Any]] = []
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []

    # --- run ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = self.dispatcher.loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._unexpected)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        await self.registry.load_all()
        self._log_modules()
        try:
            await self._listen()
            await self._listen_http()
        except ListenError as exc:
            log.error("%s", exc)
            await self._close_listeners()
            self.executor.shutdown(wait=False, cancel_futures=True)
            return 1
        try:
            await self.jobs.start()
        except Exception as exc:  # e.g. sqlite3.Error: unreadable or locked database
            log.error("cannot open the job queue (%s): %s", self._queue_where(), exc)
            await self._close_listeners()
            self.executor.shutdown(wait=False, cancel_futures=True)
            return 1
        log.info("job queue: %s, %d workers", self._queue_where(), self.settings.queue.workers)
        self.reloader.start()
        self.udp.start()
        lag = LagMonitor(
            self.stats,
            warn_ms=self.settings.lag_warn_ms if self.settings.verbose else None,
            running=lambda: [m for m, n in self.stats.in_flight.items() if n],
        )
        self._background.append(loop.create_task(lag.run()))
        if self.alerts.enabled:
            self._background.append(loop.create_task(self.alerts.run()))
            self._check_alert_module()
        self._announce_ready()
        await self._stop.wait()
        await self._shutdown()
        return self.exit_code

    def stop(self, code: int = 0) -> None:
        self.exit_code = self.exit_code or code
        self._stop.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        loop = asyncio.get_running_loop()
        log.info("received %s: shutting down (send it again to exit at once)", sig.name)
        for s in (signal.SIGTERM, signal.SIGINT):
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
        self.alerts.report("error", f"unexpected error: {message}", trace)
        if self.settings.global_handler == 0:
            log.critical("stopping after an unexpected error (start with -E to keep running)")
            self.stop(EXIT_UNEXPECTED)

    def _reloaded(self, name: str) -> None:
        self.stats.reloads += 1

    def _reload_failed(self, name: str, error: str) -> None:
        self.stats.reload_failures += 1
        self.alerts.report("reload", f"module {name} failed to load", error)

    def _check_alert_module(self) -> None:
        name = self.settings.alerts.module
        entry = self.registry.get(name) if name else None
        if entry is None or entry.version is None or entry.version.tcp is None:
            log.warning(
                "[alerts] module %r is not loaded or has no TCP handler: alerts will fail "
                "until it is", name,
            )  # fmt: skip

    def _module_removed(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self.processes.drop(name))
        self._background.append(task)

    def _queue_where(self) -> str:
        if self.settings.queue.backend == "redis":
            redis = self.settings.redis
            return f"redis {redact_url(redis.url)}, prefix {redis.prefix!r}"
        return f"database {self.settings.db}"

    # --- listeners ------------------------------------------------------------------

    async def _listen(self) -> None:
        for listener in self.settings.listeners:
            bound: dict[str, Any] = {"name": listener.name}
            if listener.port is not None:
                await self._listen_inet(listener, bound)
            if listener.unix:
                await self._listen_unix(listener, bound)
            if listener.unix_dgram:
                await self._listen_unix_dgram(listener, bound)
            self.bound.append(bound)
            shown = " ".join(
                f"{k}://{bound[k][0]}:{bound[k][1]}" if k in ("tcp", "udp") else f"{k}:{bound[k]}"
                for k in ("tcp", "udp", "unix", "unix_dgram")
                if k in bound
            )
            access = AccessList.for_host(listener.host, self.settings.allow)
            rule = (
                "local peers only"
                if access.networks is None
                else "allow " + ", ".join(map(str, access.networks))
            )
            log.info("listener %s: %s (%s)", listener.name, shown, rule)

    async def _listen_http(self) -> None:
        """The operator's API, metrics and dashboard ([http]), on the same event loop."""
        http = self.settings.http
        if not http.enabled:
            return
        try:
            # Imported here: aiohttp and prometheus-client are needed only when it is on.
            from bgservice.http.api import HttpApi
            from bgservice.http.metrics import Metrics
        except ImportError as exc:
            raise ListenError(
                f"[http] is enabled but {exc.name} is not installed: pip install 'bgservice[http]'"
            ) from None
        metrics = Metrics(
            self.stats,
            self.dispatcher.modules,
            self.jobs.stats,
            self.alerts.stats if self.alerts.enabled else None,
        )
        self.http = HttpApi(self.settings, self.dispatcher, self.jobs, metrics)
        try:
            host, port = await self.http.start()
        except OSError as exc:
            raise ListenError(
                f"cannot listen for HTTP on {http.host}:{http.port}: {exc.strerror or exc}"
            ) from None
        self.http_address = [host, port]
        access = AccessList.for_host(http.host, self.settings.allow)
        guard = "local peers only" if access.networks is None else "allow list enforced"
        token = "bearer token required" if self.http.token else "no token"
        log.info("HTTP API and dashboard: http://%s:%d/ (%s, %s)", host, port, guard, token)

    def _stream_context(self, access: AccessList, transport_name: str) -> StreamContext:
        ctx = StreamContext(
            self.dispatcher, self.settings.limits, self.stats, access, transport_name, self.tasks
        )
        self.contexts.append(ctx)
        return ctx

    async def _listen_inet(self, listener: Listener, bound: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        access = AccessList.for_host(listener.host, self.settings.allow)
        ctx = self._stream_context(access, "tcp")
        port = listener.port or 0
        for attempt in range(_PORT_TRIES if port == 0 else 1):
            server = None
            try:
                if listener.tcp:
                    server = await loop.create_server(
                        lambda: Connection(ctx), listener.host, port, backlog=1024
                    )
                    chosen = server.sockets[0].getsockname()[1]
                else:
                    chosen = port
                if listener.udp:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: DatagramEndpoint(self.udp, access, "udp"),
                        local_addr=(listener.host or LOOPBACK, chosen),
                    )
                    self._enlarge_receive_buffer(transport)
                    self.endpoints.append(transport)
                    bound["udp"] = list(transport.get_extra_info("sockname")[:2])
                break
            except OSError as exc:
                if server is not None:
                    server.close()
                # With port 0 the UDP twin of a free TCP port may be taken: try another.
                if port == 0 and exc.errno == errno.EADDRINUSE and attempt < _PORT_TRIES - 1:
                    continue
                raise ListenError(
                    f"cannot listen on {listener.host}:{port} ({listener.name}): "
                    f"{exc.strerror or exc}"
                    + (" - is another service running?" if exc.errno == errno.EADDRINUSE else "")
                ) from None
        if server is not None:
            self.servers.append(server)
            bound["tcp"] = list(server.sockets[0].getsockname()[:2])

    async def _listen_unix(self, listener: Listener, bound: dict[str, Any]) -> None:
        assert listener.unix is not None
        path = Path(listener.unix)
        _remove_stale_socket(path, socket.SOCK_STREAM)
        ctx = self._stream_context(AccessList(None), "unix")
        try:
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: Connection(ctx), str(path), backlog=1024
            )
            os.chmod(path, listener.mode)
        except OSError as exc:
            raise ListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
        self.servers.append(server)
        self.socket_files.append(path)
        bound["unix"] = str(path)

    async def _listen_unix_dgram(self, listener: Listener, bound: dict[str, Any]) -> None:
        assert listener.unix_dgram is not None
        path = Path(listener.unix_dgram)
        _remove_stale_socket(path, socket.SOCK_DGRAM)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(path))
            os.chmod(path, listener.mode)
        except OSError as exc:
            sock.close()
            raise ListenError(f"cannot listen on unix_dgram:{path}: {exc.strerror}") from None
        self.socket_files.append(path)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: DatagramEndpoint(self.udp, AccessList(None), "unix_dgram"), sock=sock
        )
        self._enlarge_receive_buffer(transport)
        self.endpoints.append(transport)
        bound["unix_dgram"] = str(path)

    def _enlarge_receive_buffer(self, transport: asyncio.BaseTransport) -> None:
        """A burst of datagrams waits in the kernel's buffer while the loop is busy; the
        default (~200 KB) drops a burst of a few thousand before the service sees them."""
        sock = transport.get_extra_info("socket")
        size = self.settings.limits.udp_receive_buffer
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError as exc:
            log.warning("cannot set the UDP receive buffer to %d bytes: %s", size, exc)
            return
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux doubles it
        if got < size:
            log.info(
                "UDP receive buffer: %d bytes (the kernel caps it: raise net.core.rmem_max "
                "for %d)", got, size,
            )  # fmt: skip

    async def _close_listeners(self) -> None:
        if self.http is not None:
            await self.http.stop()
            self.http = None
        for server in self.servers:
            server.close()
        for endpoint in self.endpoints:
            endpoint.close()
        for path in self.socket_files:
            path.unlink(missing_ok=True)

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
                    f"{self.dispatcher.timeout_of(v):g}s" if v else "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4]
            for r in rows
        ]
        log.info(
            "%d modules from %s:\n  %s",
            len(rows) - 1,
            self.registry.folder,
            "\n  ".join(lines),
        )

    def _announce_ready(self) -> None:
        log.info("bgservice ready (pid %d)", os.getpid())
        if self.ready_file is not None:
            tmp = self.ready_file.with_name(self.ready_file.name + ".tmp")
            ready: dict[str, Any] = {"pid": os.getpid(), "listeners": self.bound}
            if self.http_address is not None:
                ready["http"] = self.http_address
            tmp.write_text(json.dumps(ready))
            tmp.replace(self.ready_file)
        self._sd_notify(b"READY=1")

    def _sd_notify(self, message: bytes) -> None:
        """systemd's readiness protocol (Type=notify): one datagram to NOTIFY_SOCKET."""
        if not self.notify_socket:
            return
        address = self.notify_socket
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, address)
        except OSError as exc:
            log.warning("could not notify systemd: %s", exc)

    # --- shutdown ---------------------------------------------------------------------

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        grace = self.settings.limits.shutdown_grace
        deadline = loop.time() + grace
        self._sd_notify(b"STOPPING=1")
        self.dispatcher.shutting_down = True
        await self._close_listeners()
        for ctx in self.contexts:
            for conn in list(ctx.connections):
                conn.close_if_idle()
        log.info("shutting down: %d calls in flight, up to %g s to finish", len(self.tasks), grace)
        await self.udp.drain(max(deadline - loop.time(), 0))
        await self.jobs.stop(max(deadline - loop.time(), 0))
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=max(deadline - loop.time(), 0))
            if pending:
                log.warning("%d calls still running after %g s: cancelled", len(pending), grace)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        for ctx in self.contexts:
            for conn in list(ctx.connections):
                conn._close()
        await self.reloader.stop()
        await self.processes.close()
        await self.registry.close(max(deadline - loop.time(), 1.0))
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        log.info("bgservice stopped")


def _remove_stale_socket(path: Path, kind: socket.SocketKind) -> None:
    """Remove a socket file left by a service that died; refuse to touch a live one."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ListenError(f"cannot listen on {path}: exists and is not a socket")
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, kind) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()
            return
        except OSError:
            path.unlink(missing_ok=True)
            return
    raise ListenError(f"cannot listen on {path}: another service is using it")
