"""What the Python clients send: request bytes in the service's syntax, module names and
job ids checked; where a client talks to, and what both clients set on a socket (its
timeout, a poll). The errors a caller sees, and the reading of replies, are
client_errors.py's (importable from here too, where they were)."""

from __future__ import annotations

import datetime
import errno
import re
import select
import socket
import struct
import sys
import urllib.parse
from collections.abc import Iterable
from typing import Any

# (Moved to client_errors.py: imported here for code that imported them from here.)
from bgservice.client_errors import (  # noqa: F401
    REFUSAL,
    REFUSAL_BYTES,
    STOPPING,
    BatchError,
    ClientTimeout,
    CutShort,
    DatagramTooLarge,
    ReplyReader,
    ServiceDown,
    batch,
    batch_of,
    cut_short,
    refusal,
)
from bgservice.protocol import MODULE_NAME

DEFAULT_ADDRESS = "127.0.0.1:12341"
MAX_JOB_ID = 2**63 - 1  # the service's ids are SQLite INTEGERs: none is larger
Data = str | bytes
JobRef = int | str
"""A job id as the service hands it out (``"id:7"``, the original's form) or as a number."""
JobSpec = tuple[str, Data] | tuple[str, Data, dict[str, Any]]
"""One job of ``add_many``: (module, data) or (module, data, options)."""
Reply = tuple[int, bytes]  # (status, body)
# The clients have a method named ``list``: their annotations after it use these names.
Replies = list[Reply]
Payloads = list[bytes]
Rows = list[dict[str, Any]]
RUN = "run(module, data, **options) queues a job and waits for its result"  # (add's errors)


# The longest timeout a client takes, the client's or a call's: a week on every platform
# (1e10 s overflowed the socket's nanosecond clock: OverflowError, the socket left open).
MAX_TIMEOUT = 7 * 24 * 3600.0


def check_timeout(seconds: float | None) -> None:
    """``ValueError`` for a timeout that is not None (for ever) nor above 0 and at most
    MAX_TIMEOUT (nan); 0 meant one thing to ``Client``, another to ``AsyncClient``."""
    if seconds is not None and not 0 < seconds <= MAX_TIMEOUT:
        most = f"at most {MAX_TIMEOUT:.0f} seconds (a week)"
        raise ValueError(f"timeout must be None or above 0 and {most}, not {seconds!r}")


# Where the kernel can time out a blocking socket (SO_RCVTIMEO / SO_SNDTIMEO take a
# struct timeval), the connection stays blocking and the kernel keeps the timeout: with
# Python's own socket timeout every send and every recv polls first: two more system calls
# per request (strace; docs/benchmarks.md). Windows takes milliseconds there instead: it
# keeps Python's timeout. (For Client.)
KERNEL_TIMEOUTS = sys.platform != "win32"


def timeval(seconds: float | None) -> bytes:
    """``seconds`` as a struct timeval for SO_RCVTIMEO; zero is "never" to the kernel, so
    None is zero and any other time at least a microsecond."""
    if seconds is None:
        return struct.pack("ll", 0, 0)
    micros = max(1, round(seconds * 1_000_000))
    return struct.pack("ll", micros // 1_000_000, micros % 1_000_000)


def poller(sock: Any) -> select.poll | None:
    """A poll of ``sock`` for reading, to see without waiting that a kept connection has
    nothing to read before a request is written on it (``Client._kept``, ``AsyncClient``'s
    ``unheard``); None on Windows, which has no poll()."""
    if not hasattr(select, "poll"):
        return None
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return poll


# The longest reply a client reads by default (``max_reply_bytes``): far beyond what a
# call should return (16 MiB is the service's own max_request_bytes), and a bound on what
# a peer that is no bgservice (a wrong port) makes it read and hold.
MAX_REPLY_BYTES = 64 << 20


class Where:
    """Where a client talks to: ``address`` for calls, ``udp_address`` for ``send``
    (default: the same host:port over UDP; none for a Unix ``address``: ``send``), as
    ``parse_address`` takes them (any other form raises ``ValueError`` here), and
    ``timeout`` seconds a reply may take (None: forever); ``max_reply_bytes``, the longest
    reply it reads (a longer one is ``ReplyTooLarge``, its connection closed)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float | None = 30.0,
        udp_address: str | None = None,
        *,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        self.address = address
        unix = parse_address(address)[0] == socket.AF_UNIX
        # (as PHP's: a tcp://host:port address sends to that host:port over UDP)
        self.udp_address = udp_address or (None if unix else address.partition("://")[2] or address)
        if self.udp_address is not None:  # a bad one refused now, not lost at each send
            parse_address(self.udp_address, datagram=True)
        self.timeout = timeout
        if isinstance(max_reply_bytes, bool) or not isinstance(max_reply_bytes, int):
            raise ValueError(f"max_reply_bytes must be an int, not {max_reply_bytes!r}")
        if max_reply_bytes < 1:
            raise ValueError(f"max_reply_bytes must be 1 or more, not {max_reply_bytes}")
        self.max_reply_bytes = max_reply_bytes
        self._start()

    def _start(self) -> None:
        """Set up the connection state (none is open until the first call)."""

    def _reader(self) -> ReplyReader:
        """A new connection's reply decoder, bounded by ``max_reply_bytes``."""
        return ReplyReader(self.max_reply_bytes, self.address)

    def send(self, module: str, data: Data = b"") -> None:
        """Fire and forget over UDP (or a Unix datagram socket): no reply, never raises
        because the service is down (the datagram is simply lost). One ``sendto``, for both
        clients. ``ValueError`` for what could never be sent, up or down: without a
        datagram address (a Unix stream socket has no datagram twin at a known path: the
        listener's ``unix_dgram``), or more than one datagram carries (DatagramTooLarge)."""
        if self.udp_address is None:
            raise ValueError(
                f"send() needs udp_address: {self.address} is a Unix stream socket "
                "(pass the listener's unix_dgram path, or a host:port for UDP)"
            )
        family, target = parse_address(self.udp_address, datagram=True)
        message = request(module, data)
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            # Never waits: a Unix datagram socket takes 10 datagrams the service has not read
            # (net.unix.max_dgram_qlen), then a blocking send waits as long as it is busy,
            # for ever if it hangs. One that would wait is dropped, as UDP drops it.
            sock.setblocking(False)
            try:
                sock.sendto(message, target)
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:  # lost whatever the service's state
                    raise DatagramTooLarge(module, len(message), self.udp_address) from None
                # else fire-and-forget: a service that is down must not fail the caller


# --- requests: pure -------------------------------------------------------------------


# The PHP client's forms too, so that one $BGSERVICE_ADDRESS serves both ("udg:///x",
# taken for a path, went nowhere, silently): unix:///path, tcp:// (udp://) host:port.
_UNIX_SCHEMES = {False: ("unix",), True: ("udg", "unix")}  # by datagram; unix: as before
_INET_SCHEME = {False: "tcp", True: "udp"}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
# host:port as the PHP client takes it (Connection::hostPort), so that one address serves
# both: a name (a final dot too: db.example.com.) or an IPv4 address, or an IPv6 one in
# brackets (a zone after %), and a port of 1 to 65535 in ASCII digits; no host is
# loopback (here only). "::1:12341" (ambiguous), a blank, a port 0 or in other digits
# were taken and failed at the connect as "service down".
_HOST_PORT = re.compile(
    r"(\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9._-]+)?\]"
    r"|[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?\.?)?:([0-9]{1,5})"
)


def parse_address(address: str, datagram: bool = False) -> tuple[int, Any]:
    """``host:port`` / ``[v6]:port`` / ``tcp://host:port`` (``udp://`` for a ``datagram``
    address) -> (AF_INET*, (host, port)); a path, ``unix:PATH`` or ``unix://PATH`` (and,
    for a ``datagram`` address, ``udg://PATH``) -> (AF_UNIX, path). Anything else,
    another ``scheme://`` included, raises ``ValueError``."""
    url, host_port = _SCHEME.fullmatch(address), address
    if url and url[1].lower() == _INET_SCHEME[datagram]:
        host_port = url[2]  # and read as host:port below ("/" in it refused there)
    elif url:
        scheme, path = url[1].lower(), url[2]
        if scheme == "udg" and not datagram:
            raise ValueError(f"{address!r} is a datagram socket, for udp_address (--udp-address)")
        if scheme not in _UNIX_SCHEMES[datagram] or not path:
            forms = ["host:port", f"{_INET_SCHEME[datagram]}://host:port", "a Unix socket path"]
            forms += [f"{name}:///path" for name in _UNIX_SCHEMES[datagram]]
            kind = "a datagram address" if datagram else "address"
            raise ValueError(
                f"{kind} must be {', '.join(forms[:-1])} or {forms[-1]}, not {address!r}"
            )
        return socket.AF_UNIX, path
    elif "/" in address or address.startswith("unix:"):
        path = address.removeprefix("unix:")
        if not path:
            raise ValueError(f"address {address!r} names no Unix socket path")
        return socket.AF_UNIX, path
    match = _HOST_PORT.fullmatch(host_port)
    if not match or not 1 <= int(match[2]) <= 65535:
        if host_port.count(":") > 1 and not host_port.startswith("["):
            raise ValueError(f"address {address!r}: an IPv6 address takes brackets, as in "
                             "[::1]:12341")  # fmt: skip
        raise ValueError(f"address must be host:port or a Unix socket path, not {address!r}")
    host = (match[1] or "").strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(match[2]))


def parse_job_id(job: JobRef) -> int:
    """``7``, ``"7"`` or ``"id:7"`` -> ``7``; anything else raises ``ValueError``.

    Users porting from the original keep the ``id:N`` strings its ``queue:add`` replied,
    so both forms are taken. Checked here rather than left to the service so that a typo is
    a ``ValueError`` naming the value, not a ``404 Job 0 not found`` from a lax conversion."""
    if isinstance(job, bool) or not isinstance(job, int | str):
        raise ValueError(f"job id must be N or 'id:N', not {job!r}")
    # As the service reads it (bgservice.queue.commands.job_id): blanks around N and after "id:" go.
    if isinstance(job, int):
        text = str(job) if 0 < job <= MAX_JOB_ID else "-"
    else:
        text = job.strip().removeprefix("id:").strip()
    # isascii: isdigit() alone takes digits of other scripts and "²", which the service
    # refuses; the length check comes before int() so that a huge string costs nothing.
    ok = text.isascii() and text.isdigit() and len(text) <= 19
    if not (ok and 0 < int(text) <= MAX_JOB_ID):
        raise ValueError(f"job id must be N or 'id:N' with 1 <= N <= {MAX_JOB_ID}, not {job!r}")
    return int(text)


def _bytes(data: Data) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    # bytes() took more: 5 was five NUL bytes, [104, 105] b"hi", 10**7 ten megabytes.
    raise ValueError(f"data must be str or bytes, not {type(data).__name__}")


# A module name, as the service reads one (protocol.MODULE_NAME). Any other name was a
# silent wrong call: "echo:x" called echo with "x:DATA", "ec ho" echo.
MODULE_RULE = "a module name is one or more of A-Z a-z 0-9 _ -"


def encode_module(module: str) -> bytes:
    """A module name as sent: text, UTF-8, of ``MODULE_NAME``'s characters. ``bytes`` are
    refused as any non-text is (its ``encode`` was an ``AttributeError``), and so is a
    ``str`` with lone surrogates (what Python makes of a command-line argument that is not
    UTF-8), or another character: a ``ValueError``."""
    if not isinstance(module, str):
        raise ValueError(f"module must be str, not {type(module).__name__}")
    try:
        encoded = module.encode()
    except UnicodeEncodeError:
        try:  # the bytes the shell gave, if that is where it came from
            shown = repr(module.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            shown = ascii(module)
        raise ValueError(f"module name {shown} is not UTF-8 text") from None
    if not MODULE_NAME.fullmatch(module):  # (worded as the PHP client's)
        why = f"{MODULE_RULE} (the service drops any other character, and a ':' ends the name)"
        raise ValueError(f"module name {module!r} is not one the service can take: {why}")
    return encoded


def request(module: str, data: Data = b"") -> bytes:
    return encode_module(module) + b":" + _bytes(data)


def add_request(module: str, data: Data = b"", **options: Any) -> bytes:
    """``queue:add[?OPTIONS]:MODULE:DATA`` (docs/queue.md); ``None`` options are left out.
    No ``wait``: its reply is the job's result, not the id ``add`` reads (``run``)."""
    if options.get("wait") is not None:  # sent, the job ran, and its result was no id
        raise ValueError(f"add() takes no wait= option (it returns the job's id): {RUN}")
    return _add(module, data, options)


def run_request(module: str, data: Data = b"", **options: Any) -> bytes:
    """``queue:add?wait=1&OPTIONS:MODULE:DATA``: add-and-wait, the job's result replied."""
    if "wait" in options:  # (it could only say no wait, which run() is not)
        raise ValueError("run() takes no wait= option: it waits (add() does not)")
    return _add(module, data, {"wait": True, **options})


def _add(module: str, data: Data, options: dict[str, Any]) -> bytes:
    after = options.get("after")
    if after is not None:  # job ids in either form; one, or several (all done first)
        many = after if isinstance(after, list | tuple) else [after]
        options["after"] = ",".join(str(parse_job_id(one)) for one in many)
    if isinstance(options.get("tags"), list | tuple):  # tags=["a", "b"] -> "a,b"
        for tag in options["tags"]:  # (["a,b"] went out as two tags, silently)
            if not isinstance(tag, str) or not tag.strip() or "," in tag:
                one = "one tag, not empty and without a comma (a string 'a,b' is two tags)"
                raise ValueError(f"each item of tags is {one}, not {tag!r:.80}")
        options["tags"] = ",".join(options["tags"]) or None
    given = {k: _option(v) for k, v in options.items() if v is not None}
    query = "?" + urllib.parse.urlencode(given, safe="") if given else ""
    return f"queue:add{query}:".encode() + request(module, data)


def add_requests(jobs: Iterable[JobSpec]) -> list[bytes]:
    """``add_request`` for each job of ``add_many``, all checked before anything is sent:
    a malformed one is a ``ValueError`` naming it (it was an IndexError, or "echo" read
    as module "e"), as PHP's addMany; no ``wait``: its reply, no id, holds all after it."""
    made = []
    for n, job in enumerate(jobs):
        if not isinstance(job, tuple | list) or len(job) not in (2, 3):
            shape = "(module, data) or (module, data, options)"
            raise ValueError(f"add_many(): job {n} must be {shape}, not {job!r:.80}")
        options = job[2] if len(job) == 3 else {}
        if not isinstance(options, dict):
            raise ValueError(f"add_many(): job {n}: options must be a dict, not {options!r:.80}")
        if options.get("wait") is not None:
            raise ValueError(f"add_many() takes no wait= option (job {n}; it returns ids): {RUN}")
        try:
            made.append(_add(job[0], job[1], dict(options)))
        except ValueError as exc:  # a bad module, data, after id or at: which job's
            raise ValueError(f"add_many(): job {n}: {exc}") from None
    return made


def _option(value: Any) -> str:
    """As the service reads it; a ``timedelta`` (``delay=``) in seconds, an aware ``datetime``
    (``at=``) epoch seconds: str() was refused. A naive one, local or UTC, is ambiguous."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, datetime.timedelta):
        return str(value.total_seconds())
    if isinstance(value, datetime.datetime):
        if value.utcoffset() is None:
            raise ValueError(f"a datetime must be timezone-aware (naive is ambiguous): {value!r}")
        return str(value.timestamp())
    return str(value)


def queue_request(command: str, job: JobRef | None = None, **options: Any) -> bytes:
    """``queue:COMMAND[?OPTIONS][:id:N]``; ``job`` as ``parse_job_id`` takes it. An option
    None or False is left out: the command's default, and the request a service from
    before the option takes (``retry``'s ``dependents``)."""
    given = {k: _option(v) for k, v in options.items() if v is not None and v is not False}
    query = "?" + urllib.parse.urlencode(given, safe="") if given else ""
    tail = b"" if job is None else b":id:%d" % parse_job_id(job)
    return f"queue:{command}{query}".encode() + tail


def schedule_request(name: str, module: str, data: Data = b"", **options: Any) -> bytes:
    """``queue:schedule?name=NAME&OPTIONS:MODULE:DATA`` (docs/queue.md, Schedules)."""
    given = {k: _option(v) for k, v in {"name": name, **options}.items() if v is not None}
    query = urllib.parse.urlencode(given, safe="")
    return f"queue:schedule?{query}:".encode() + request(module, data)


def named_request(command: str, name: str) -> bytes:
    """``queue:COMMAND:NAME`` for a schedule (unschedule, pause, resume, fire)."""
    return f"queue:{command}:{name}".encode()
