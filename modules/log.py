"""Fire-and-forget logging over UDP, one file per channel, rotated by size.

Over UDP (or Unix datagrams):
    ``log:MESSAGE``                              channel ``main``, level INFO
    ``log:?channel=payments&level=error:MESSAGE``  (options as in the compiler modules)
Each message becomes one line, ``2026-01-31T12:00:00.123Z ERROR 127.0.0.1:5300 MESSAGE``,
in ``LOG_DIR/CHANNEL.log``; newlines inside a message are written as ``\\n`` so one line
is one message, and other control characters visibly (``\\x1b``), so that whoever can
send a datagram cannot drive the terminal of whoever tails the file. A file larger than
MAX_BYTES is renamed ``CHANNEL.log.1`` (``.1`` to ``.2`` ... up to BACKUPS) and a new one
started.

Levels: the eight of syslog, and its short names ``warn``, ``err``, ``crit``, ``emerg``
(written as WARNING, ERROR, CRITICAL, EMERGENCY). An option other than ``channel`` and
``level`` is refused, as a bad channel or level is: a mistyped ``chanel=`` must not send
a message to ``main`` unnoticed.

Over TCP: ``log:tail`` or ``log:tail?channel=payments&lines=50`` replies the last lines.

The handler only stamps the message and puts it on a bounded queue; one writer thread
takes everything queued at once and appends it per channel with a single write, so a
flood costs the event loop microseconds per datagram and the disk one write per batch.
A full queue drops the message and counts it: ``service:stats`` shows, under
``module_stats.log``, how many were received, written, dropped and rejected (bad channel
names), so no line is ever lost silently. Each kind of trouble (rejected datagrams, a full
queue, a file that cannot be written) is logged at most once every WARN_EVERY seconds,
the next line saying how many more came, so a flood, or a full disk, does not flood the
service's log. A channel file deleted or renamed behind the
writer's back (by hand, or a logrotate without ``copytruncate``) is noticed before the next
write pass to it, as ``logging.handlers.WatchedFileHandler`` does it: the path's
``os.stat`` against the open handle's ``os.fstat``, and a new file is opened when they
differ (counted as ``reopened``). A file emptied from outside (``copytruncate``) is
measured by its ``os.fstat`` size, not the handle's offset, so it is not rotated at once.
(A hand-written writer rather than ``logging.handlers.RotatingFileHandler`` behind a
``QueueListener``: that pair writes and flushes one record at a time and cannot report
drops.)

Settings: the constants below, or the environment variables named beside them.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from pathlib import Path
from typing import IO, Any

from bgservice import ReplyError, Request

from . import _env

log = logging.getLogger(__name__)

# The log folder: $BGSERVICE_LOG_DIR, else "logs" beside the modules folder.
LOG_DIR = Path(
    os.environ.get("BGSERVICE_LOG_DIR") or Path(__file__).resolve().parent.parent / "logs"
)


def _setting(name: str, default: int, least: int) -> int:
    """``$name`` as a whole number of at least ``least`` (unset or empty: ``default``).
    Anything else fails the module's load with a ``ValueError`` naming the variable: a
    queue size of 0 was an unbounded queue (``queue.Queue(0)``), which never drops."""
    value, problem = _env.number(name, default, int, least, None)
    if problem is not None:
        raise ValueError(problem)
    return int(value)


MAX_BYTES = _setting("BGSERVICE_LOG_MAX_BYTES", 10 * 1024 * 1024, 1)
BACKUPS = _setting("BGSERVICE_LOG_BACKUPS", 5, 0)
QUEUE_SIZE = _setting("BGSERVICE_LOG_QUEUE", 100_000, 1)  # messages waiting
# Channels (files, each up to MAX_BYTES x (1 + BACKUPS)) at most, those already in LOG_DIR
# counted: any sender could name a new one per datagram (3,000 datagrams, 3,000 files).
MAX_CHANNELS = _setting("BGSERVICE_LOG_CHANNELS", 100, 1)
BATCH = 10_000  # most messages one write pass takes from the queue
MAX_TAIL = 10_000
WARN_EVERY = 5.0  # s: a log line about one kind of trouble at most this often
LEVELS = frozenset(
    {"DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "CRITICAL", "ALERT", "EMERGENCY"}
)
# syslog's short names (``logger -p user.warn``, rsyslog), written as the level they name.
ALIASES = {"WARN": "WARNING", "ERR": "ERROR", "CRIT": "CRITICAL", "EMERG": "EMERGENCY"}
SEND_OPTIONS = ("channel", "level")
TAIL_OPTIONS = ("channel", "lines")
_CHANNEL = re.compile(r"[A-Za-z0-9_-]{1,64}")

Entry = tuple[str, str]  # (channel, the whole line with its newline)
counts: Counter[str] = Counter()
_queue: queue.Queue[Entry | None] = queue.Queue(QUEUE_SIZE)
_writer: threading.Thread | None = None
_channels: set[str] | None = None  # the channels with a file (read from LOG_DIR at first)


def _channel(name: str) -> str:
    """A channel name is a file name: letters, digits, ``-``, ``_``; anything else is refused."""
    if not _CHANNEL.fullmatch(name):
        raise ValueError(f"bad channel name {name[:40]!r} (letters, digits, - and _)")
    return name


def _options(query: str, known: tuple[str, ...]) -> dict[str, str]:
    """``a=1&b=2`` as a dict; an option not ``known`` is a ValueError naming them (a
    mistyped name was ignored: its message went to ``main``, its tail was main's)."""
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option {unknown[0][:40]!r} (options: {', '.join(known)})")
    return options


def _parse(data: bytes) -> tuple[str, str, str]:
    """datagram -> (channel, level, message)."""
    text = data.decode("utf-8", "replace")
    if not text.startswith("?"):
        return "main", "INFO", text
    head, sep, message = text[1:].partition(":")
    if not sep:
        raise ValueError("expected ?channel=NAME&level=LEVEL:MESSAGE")
    options = _options(head, SEND_OPTIONS)
    level = (options.get("level") or "INFO").upper()
    level = ALIASES.get(level, level)
    if level not in LEVELS:
        raise ValueError(f"bad level {level[:20]!r} (one of {', '.join(sorted(LEVELS))}; "
                         f"or {', '.join(ALIASES).lower()})")  # fmt: skip
    return _channel(options.get("channel") or "main"), level, message


# What a terminal would act on rather than show (ESC sequences clear the screen or recolour
# it for whoever tails the file; CR overwrites a line; U+2028/2029 break lines for some
# viewers), written visibly instead: \r and \n as before, any other C0 control but TAB,
# DEL and the C1 controls as \xNN, U+2028/2029 as \uNNNN.
_CONTROLS = "".join(map(chr, [*range(0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0)]))
_CONTROLS += "\u2028\u2029"
_CONTROL = re.compile(f"[{re.escape(_CONTROLS)}]")
_ESCAPES = {c: f"\\x{ord(c):02x}" if c < "\u0100" else f"\\u{ord(c):04x}" for c in _CONTROLS}
_ESCAPES |= {"\n": "\\n", "\r": "\\r"}


def _visible(text: str) -> str:
    """``text`` with its controls escaped. ``isprintable`` first: a line with none (the
    usual one) costs one scan in C and no copy; a line with a TAB, or a character that
    is not "printable" but harmless (NBSP), is searched again, and only one with a
    control is rebuilt (a ``str.translate`` table was 3-4 times slower there: its values
    are strings, which takes it off its fast path)."""
    return text if text.isprintable() else _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    return _ESCAPES[match[0]]


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


async def handle_udp(request: Request) -> None:
    counts["received"] += 1
    try:
        channel, level, message = _parse(request.data)
    except ValueError as exc:
        counts["rejected"] += 1
        _rejected(1, "log: datagram from %s rejected: %s", _visible(str(request.peer)), exc)
        return
    if not _room_for(channel):
        counts["rejected"] += 1
        _rejected(1, "log: datagram from %s rejected: a new channel %r, but there are %d "
                  "($BGSERVICE_LOG_CHANNELS)", _visible(str(request.peer)), channel,
                  MAX_CHANNELS)  # fmt: skip
        return
    message = _visible(message.rstrip("\r\n"))
    # The peer too: a Unix datagram sender's path or abstract "@name" is whatever it chose.
    line = f"{_stamp(time.time())} {level} {_visible(str(request.peer or '-'))} {message}\n"
    _start_writer()
    try:
        _queue.put_nowait((channel, line))
    except queue.Full:
        counts["dropped"] += 1
        _full(1, "log: queue full (%d): dropping messages", QUEUE_SIZE)


def _room_for(channel: str) -> bool:
    """Whether ``channel`` has a file, or may have one: fewer than MAX_CHANNELS do. (The
    folder is listed once, at the first message: a few hundred microseconds.)"""
    global _channels
    if _channels is None:
        _channels = {path.name[:-4] for path in LOG_DIR.glob("*.log")}
    if channel in _channels:
        return True
    if len(_channels) >= MAX_CHANNELS:
        return False
    _channels.add(channel)
    return True


class _Sparse:
    """One kind of trouble: a log line at most every WARN_EVERY s, so that a flood of bad
    datagrams, or a disk full under a flood of good ones, does not flood the service's
    log. What comes between lines is counted and said WARN_EVERY s after the last line,
    so a flood's end is never unsaid (``bgservice.logs.Sparse`` does this on the event
    loop; the writer thread has none: a timer thread, at most one pending per kind)."""

    def __init__(self, level: int, what: str) -> None:
        self.level = level
        self.what = what  # what the count counts: "datagrams rejected"
        self._last = float("-inf")  # when the last line was logged
        self._count = 0  # since then
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # the loop's thread and the writer's both report

    def __call__(self, count: int, text: str, *args: Any) -> None:
        """``count`` more; a line, ``text % args``, if one is due, else counted for later."""
        with self._lock:
            self._count += count
            now = time.monotonic()
            if now - self._last < WARN_EVERY:
                if self._timer is None:
                    self._timer = threading.Timer(self._last + WARN_EVERY - now, self._later)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._last, earlier, self._count, self._timer = now, self._count - count, 0, None
        more = f" ({earlier} more {self.what} since the last line)" if earlier else ""
        log.log(self.level, text + "%s", *args, more)

    def _later(self) -> None:
        if threading.current_thread() is self._timer:  # (else replaced by a line since)
            self.flush()

    def flush(self) -> None:
        """Say what came since the last line, now."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, count, self._count = None, self._count, 0
            if count:
                self._last = time.monotonic()
        if count:
            log.log(self.level, "log: %d more %s since the last line", count, self.what)


_rejected = _Sparse(logging.WARNING, "datagrams rejected")
_full = _Sparse(logging.WARNING, "messages dropped (queue full)")
_moved = _Sparse(logging.WARNING, "files deleted or moved away")
_unwritten = _Sparse(logging.ERROR, "lines not written")


def _start_writer() -> None:
    global _writer
    if _writer is None:
        _writer = threading.Thread(target=_write_loop, name="bgservice-log-writer", daemon=True)
        _writer.start()


class _Files:
    """Open log files by channel, with size-based rotation."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.open: dict[str, IO[bytes]] = {}

    def path(self, channel: str) -> Path:
        return self.folder / f"{channel}.log"

    def write(self, channel: str, lines: list[str]) -> None:
        """Append ``lines``, rotating first whenever the next chunk would pass MAX_BYTES."""
        self._check(channel)
        chunk: list[bytes] = []
        # The file's size, not the handle's offset: after a truncate from outside
        # (logrotate's copytruncate) an O_APPEND handle's offset is the old size until the
        # next write, and the emptied file was rotated at once, pushing a backup out.
        size = os.fstat(self._file(channel).fileno()).st_size
        for line in lines:
            data = line.encode("utf-8", "replace")
            if size + len(data) > MAX_BYTES and (size or chunk):
                self._file(channel).write(b"".join(chunk))
                chunk = []
                self._rotate(channel)
                size = 0
            chunk.append(data)
            size += len(data)
        self._file(channel).write(b"".join(chunk))

    def _file(self, channel: str) -> IO[bytes]:
        if channel not in self.open:
            if len(self.open) >= 64:  # keep file handles bounded with many channels
                self.close()
            self.folder.mkdir(parents=True, exist_ok=True)
            self.open[channel] = self.path(channel).open("ab", buffering=0)
        return self.open[channel]

    def _check(self, channel: str) -> None:
        """Close the channel's handle if its path is gone or is another file now (deleted,
        moved away): the next write opens the file at the path again. One ``stat`` and one
        ``fstat`` per channel per write pass (a few microseconds), not per line."""
        file = self.open.get(channel)
        if file is None:
            return
        try:
            now = os.stat(file.name)  # the path it was opened by
        except FileNotFoundError:
            now = None
        mine = os.fstat(file.fileno())
        if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            del self.open[channel]
            file.close()
            counts["reopened"] += 1
            _moved(1, "log: %s was deleted or moved away: writing to a new file", file.name)

    def _rotate(self, channel: str) -> None:
        self.open.pop(channel).close()
        base = self.path(channel)
        for n in range(BACKUPS - 1, 0, -1):
            older = base.with_name(f"{base.name}.{n}")
            if older.exists():
                older.replace(base.with_name(f"{base.name}.{n + 1}"))
        if BACKUPS > 0:
            base.replace(base.with_name(f"{base.name}.1"))
        else:
            base.unlink()
        counts["rotations"] += 1

    def close(self) -> None:
        for file in self.open.values():
            file.close()
        self.open.clear()


def _write_loop() -> None:
    files = _Files(LOG_DIR)
    running = True
    while running:
        batch, running = _take_batch()
        _write_batch(files, batch)
    files.close()


def _take_batch() -> tuple[dict[str, list[str]], bool]:
    """Wait for one message, then take what else is queued (up to BATCH); False: stop."""
    batch: dict[str, list[str]] = defaultdict(list)
    item = _queue.get()
    taken = 0
    while item is not None:
        batch[item[0]].append(item[1])
        taken += 1
        if taken >= BATCH:
            return batch, True
        try:
            item = _queue.get_nowait()
        except queue.Empty:
            return batch, True
    return batch, False


def _write_batch(files: _Files, batch: dict[str, list[str]]) -> None:
    for channel, lines in batch.items():
        try:
            files.write(channel, lines)
            counts["written"] += len(lines)
        except OSError as exc:
            counts["write_errors"] += len(lines)
            files.close()
            path = files.path(channel)
            _unwritten(len(lines), "log: cannot write %d lines to %s: %s", len(lines), path, exc)


def unload() -> None:
    """Write what is queued, then stop the writer (runs in a thread: it may block)."""
    if _writer is not None:
        _queue.put(None)
        _writer.join(timeout=30)
    for sparse in (_rejected, _full, _moved, _unwritten):
        sparse.flush()  # what was counted since the last line is not lost with the module


def stats() -> dict[str, int]:
    return {
        **{k: counts[k] for k in ("received", "written", "dropped", "rejected")},
        "write_errors": counts["write_errors"],
        "rotations": counts["rotations"],
        "reopened": counts["reopened"],
        "queued": _queue.qsize(),
    }


def handle_tcp(request: Request) -> bytes:
    """``tail[?channel=NAME&lines=N]``: the last N (default 100) lines of a channel's file."""
    text = request.text.strip()
    word, _, query = text.partition("?")
    if word != "tail":
        raise ReplyError(400, "log over TCP: tail?channel=NAME&lines=N (messages go over UDP)")
    try:
        options = _options(query, TAIL_OPTIONS)
        channel = _channel(options.get("channel") or "main")
    except ValueError as exc:
        raise ReplyError(400, f"log:tail: {exc}") from None
    return _tail(LOG_DIR / f"{channel}.log", _lines(options.get("lines") or "100"))


def _lines(text: str) -> int:
    if not (text.isdecimal() and 1 <= int(text) <= MAX_TAIL):
        raise ReplyError(400, f"log:tail: lines must be a whole number, 1-{MAX_TAIL}: "
                              f"got {text[:20]!r}")  # fmt: skip
    return int(text)


def _tail(path: Path, lines: int) -> bytes:
    """The last ``lines`` lines, read backwards in blocks (files can be large)."""
    try:
        with path.open("rb") as file:
            end = file.seek(0, os.SEEK_END)
            data = b""
            while end > 0 and data.count(b"\n") <= lines:
                step = min(65536, end)
                end -= step
                file.seek(end)
                data = file.read(step) + data
    except FileNotFoundError:
        raise ReplyError(404, f"log:tail: no log for channel {path.stem}") from None
    return b"".join(data.splitlines(keepends=True)[-lines:])
