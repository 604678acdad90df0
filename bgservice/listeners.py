"""Opening the sockets ``[[listen]]`` names: TCP and UDP on one port, Unix stream and
datagram sockets; closing them again.

Each stream listener gets a ``StreamContext`` of its own (its allow list and origin); all
datagram sockets feed the one ``DatagramQueue``. What was bound is kept in ``bound`` for
the start-up log and the ready file.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bgservice.access import AccessList
from bgservice.config import LOOPBACK, Listener, Settings
from bgservice.datagram import DatagramEndpoint, DatagramQueue
from bgservice.origin import Origin, peer_address
from bgservice.request import JobAdder
from bgservice.stats import Stats
from bgservice.stream.base import Caller, StreamContext, StreamProtocol
from bgservice.stream.sniffer import Sniffer

log = logging.getLogger(__name__)

_PORT_TRIES = 20


def in_use(exc: OSError, how: str) -> str:
    """What a listen error adds when the port is taken: how to choose another."""
    if exc.errno != errno.EADDRINUSE:
        return ""
    return f" - is another service running? (another port: {how})"


class ListenError(Exception):
    """A listener could not be opened (port in use, permission, bad address)."""


class Listeners:
    def __init__(
        self,
        settings: Settings,
        commands: Caller,
        datagrams: DatagramQueue,
        stats: Stats,
        jobs: JobAdder,
    ) -> None:
        self.settings = settings
        self.commands = commands
        self.datagrams = datagrams
        self.stats = stats
        self.jobs = jobs
        self.tasks: set[asyncio.Task[Any]] = set()  # requests being served, all listeners
        self.contexts: list[StreamContext] = []
        self.servers: list[asyncio.Server] = []
        self.endpoints: list[asyncio.BaseTransport] = []
        self.socket_files: list[Path] = []
        self.bound: list[dict[str, Any]] = []

    def connections(self) -> Iterator[StreamProtocol]:
        for ctx in self.contexts:
            yield from list(ctx.connections)

    async def open(self) -> None:
        """Open every listener, logging one line each; ListenError if one cannot be."""
        for listener in self.settings.listeners:
            bound: dict[str, Any] = {"name": listener.name}
            if listener.port is not None:
                await self._inet(listener, bound)
            if listener.unix:
                await self._unix(listener, bound)
            if listener.unix_dgram:
                await self._unix_dgram(listener, bound)
            self.bound.append(bound)
            shown = " ".join(
                f"{k}://{peer_address(*bound[k][:2])}" if k in ("tcp", "udp") else f"{k}:{bound[k]}"
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

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for endpoint in self.endpoints:
            endpoint.close()
        for path in self.socket_files:
            path.unlink(missing_ok=True)

    # --- each kind ----------------------------------------------------------------------

    def _stream_context(self, access: AccessList, origin: Origin) -> StreamContext:
        ctx = StreamContext(
            self.commands, self.settings.limits, self.stats, access, origin, self.jobs, self.tasks
        )
        self.contexts.append(ctx)
        return ctx

    async def _inet(self, listener: Listener, bound: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        access = AccessList.for_host(listener.host, self.settings.allow)
        ctx = self._stream_context(access, Origin.TCP)
        port = listener.port or 0
        for attempt in range(_PORT_TRIES if port == 0 else 1):
            server = None
            try:
                if listener.tcp:
                    server = await loop.create_server(
                        lambda: Sniffer(ctx), listener.host, port, backlog=1024
                    )
                    chosen = server.sockets[0].getsockname()[1]
                else:
                    chosen = port
                if listener.udp:
                    host = listener.host or LOOPBACK
                    sock = _ipv6_only(host, chosen)
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: DatagramEndpoint(self.datagrams, access, Origin.UDP),
                        **({"sock": sock} if sock else {"local_addr": (host, chosen)}),
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
                config = self.settings.source or "a config file (-c)"
                raise ListenError(
                    f"cannot listen on {listener.host}:{port} ({listener.name}): "
                    f"{exc.strerror or exc}"
                    + in_use(exc, f"-p N, or the listener's port in {config}")
                ) from None
        if server is not None:
            self.servers.append(server)
            bound["tcp"] = list(server.sockets[0].getsockname()[:2])

    async def _unix(self, listener: Listener, bound: dict[str, Any]) -> None:
        assert listener.unix is not None
        path = Path(listener.unix)
        _remove_stale_socket(path, socket.SOCK_STREAM)
        ctx = self._stream_context(AccessList(None), Origin.UNIX)
        try:
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: Sniffer(ctx), str(path), backlog=1024
            )
            _permit(path, listener)
        except OSError as exc:
            raise ListenError(f"cannot listen on unix:{path}: {_why(exc, path)}") from None
        self.servers.append(server)
        self.socket_files.append(path)
        bound["unix"] = str(path)

    async def _unix_dgram(self, listener: Listener, bound: dict[str, Any]) -> None:
        assert listener.unix_dgram is not None
        path = Path(listener.unix_dgram)
        _remove_stale_socket(path, socket.SOCK_DGRAM)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(path))
            _permit(path, listener)
        except OSError as exc:
            sock.close()
            raise ListenError(f"cannot listen on unix_dgram:{path}: {_why(exc, path)}") from None
        self.socket_files.append(path)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: DatagramEndpoint(self.datagrams, AccessList(None), Origin.UNIX_DGRAM),
            sock=sock,
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


def _ipv6_only(host: str, port: int) -> socket.socket | None:
    """An IPv6 address's UDP socket, bound IPv6 only as its TCP twin is (asyncio sets
    IPV6_V6ONLY there): on "::" UDP took IPv4 peers too, which TCP refused. None for any
    other host: asyncio binds it."""
    if ":" not in host:
        return None
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _permit(path: Path, listener: Listener) -> None:
    """The socket file's mode, and its group when one is set: a member of the file's group
    may connect under mode 660, and the file's group is the service's own unless given
    (a web server's group among the service's supplementary ones was not enough)."""
    if listener.group is not None:
        try:
            os.chown(path, -1, listener.group)
        except PermissionError:
            raise PermissionError(
                errno.EPERM, f"cannot give it group {listener.group}: the service is not a member"
            ) from None
    os.chmod(path, listener.mode)


def _why(exc: OSError, path: Path) -> str:
    """Why a Unix socket could not be opened, for a person: the system's reason, or for a
    path longer than a socket address holds (Python's own refusal, no errno: "AF_UNIX
    path too long", or None from ``strerror``) its length and the limit."""
    if exc.errno is None and "too long" in str(exc):
        size = len(os.fsencode(path))
        return (
            f"the path is {size} bytes, longer than a Unix socket address holds (at most "
            "107 bytes on Linux, 103 on macOS): use a shorter path"
        )
    return exc.strerror or str(exc)


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
        except (ConnectionRefusedError, FileNotFoundError):  # nobody listens; or gone
            path.unlink(missing_ok=True)
            return
        except OSError as exc:
            # A live socket of the other type answers EPROTOTYPE: never stale. Anything
            # else (no permission) says nothing of whether it is in use: leave it too.
            if exc.errno != errno.EPROTOTYPE:
                raise ListenError(f"cannot listen on {path}: {exc.strerror or exc}") from None
            other = "datagram" if kind == socket.SOCK_STREAM else "stream"
            raise ListenError(
                f"cannot listen on {path}: another service is using it (as a {other} socket)"
            ) from None
    raise ListenError(f"cannot listen on {path}: another service is using it")
