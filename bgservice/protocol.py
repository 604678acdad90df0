"""Bytes <-> requests and replies, in both wire formats. Pure: no sockets, no asyncio.

Two formats share every TCP (and Unix stream) listener; docs/protocol.md is the reference.

* **One-shot** (the original's): the connection carries one request, ``module:data``; the
  reply is the module's output, or ``NNN: message`` for an error; then the service closes.
  Where the request ends is decided by the transport (half-close or a quiet gap).
* **Framed**: the client opens with the 4-byte preface ``\\x00:F1``; then every request is
  ``u32 length + payload`` and every reply ``3 ASCII digits status + u32 length + body``.
  The preface can never start a meaningful one-shot request: read as one, the text before
  its first colon is ``\\x00``, which cleans to an empty module name (always ``400``). The
  same trick as HTTP/2's connection preface, which HTTP/1.1 servers reject.
"""

from __future__ import annotations

import enum
import functools
import re
import struct
from dataclasses import dataclass

PREFACE = b"\x00:F1"
OK = 200

Reply = tuple[int, bytes]  # (status, body)

_LENGTH = struct.Struct(">I")
_REPLY_HEADER = struct.Struct(">3sI")
# A module name: what split_request keeps of the text before the first colon (any other
# byte dropped, as the original did). The modules folder names its files so; queue:list's
# module=, the JSON API and the clients check names against this one rule.
_NAME_CHARS = "A-Za-z0-9_-"
MODULE_NAME = re.compile(f"[{_NAME_CHARS}]+")
_NOT_NAME = re.compile(f"[^{_NAME_CHARS}]".encode())


class Mode(enum.Enum):
    ONE_SHOT = "one-shot"
    FRAMED = "framed"


def sniff(head: bytes) -> Mode | None:
    """Which format a connection speaks, from its first bytes; None: need more bytes."""
    if head.startswith(PREFACE):
        return Mode.FRAMED
    if len(head) < len(PREFACE) and PREFACE.startswith(head):
        return None
    return Mode.ONE_SHOT


def split_request(raw: bytes) -> tuple[str, bytes]:
    """``module:data`` -> (cleaned module name, raw data).

    The name is the text before the first colon with every byte outside
    ``A-Z a-z 0-9 - _`` removed; without a colon the whole request is the name.
    """
    head, _, data = raw.partition(b":")
    return (_name(head) if len(head) <= NAME_CACHED else _clean(head)), data


NAME_CACHED = 64  # heads up to this long have their cleaned name remembered


# Remembered: clients call a handful of modules, and the regex is most of the cost (a
# request without a colon is all head: only short heads are kept, so 256 take little).
@functools.lru_cache(maxsize=256)
def _name(head: bytes) -> str:
    return _clean(head)


def _clean(head: bytes) -> str:
    return _NOT_NAME.sub(b"", head).decode("ascii")


def one_shot_error(code: int, message: str) -> bytes:
    """An error reply in the original's format, matched by ``^[45][0-9]{2}:``."""
    return f"{code}: {message}".encode()


def framed_reply(status: int, body: bytes) -> bytes:
    """One framed reply: 3 ASCII digits, u32 big-endian body length, body."""
    digits = _STATUS.get(status) or b"%03d" % status
    return _REPLY_HEADER.pack(digits, len(body)) + body


_STATUS = {code: b"%03d" % code for code in range(100, 600)}  # formatted once, not per reply


def whole(reply: Reply, chunks: list[bytes]) -> Reply:
    """A reply with what the handler streamed through ``request.write()`` in front of its
    return value, for replies sent in one piece (framed replies, queued jobs' results)."""
    status, body = reply
    if chunks and status == OK:
        return status, b"".join(chunks) + body
    return reply


def framed_request(payload: bytes) -> bytes:
    """One framed request (for clients and tests): u32 big-endian length, payload."""
    return _LENGTH.pack(len(payload)) + payload


@dataclass(frozen=True, slots=True)
class Oversized:
    """A framed request longer than the limit; its payload is skipped, not buffered."""

    length: int


class FrameDecoder:
    """Splits a framed byte stream into request payloads.

    Memory stays bounded by ``max_size``: an oversized frame yields ``Oversized`` at once
    and its payload is discarded as it arrives, so the connection can go on.
    """

    def __init__(self, max_size: int) -> None:
        self._max = max_size
        self._buf = bytearray()
        self._skip = 0

    @property
    def partial(self) -> bool:
        """True while a frame has started but not finished arriving."""
        return bool(self._buf) or self._skip > 0

    @property
    def buffered(self) -> int:
        """Bytes held for the unfinished frame (a skipped oversized one holds none)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        if not self._buf and not self._skip and len(data) >= 4:
            # The common case, a lock-step client: exactly one whole frame, nothing before.
            length = _LENGTH.unpack_from(data)[0]
            if len(data) == 4 + length and length <= self._max:
                return [data[4:]]
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        buf = self._buf
        buf += data
        out: list[bytes | Oversized] = []
        pos = 0
        while len(buf) - pos >= 4:
            (length,) = _LENGTH.unpack_from(buf, pos)
            if length > self._max:
                out.append(Oversized(length))
                pos += 4
                dropped = min(length, len(buf) - pos)
                pos += dropped
                self._skip = length - dropped
                continue
            end = pos + 4 + length
            if end > len(buf):
                break
            out.append(bytes(buf[pos + 4 : end]))
            pos = end
        del buf[:pos]
        return out


class ReplyDecoder:
    """Splits a framed reply stream into (status, body) pairs (for clients and tests)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        size = _REPLY_HEADER.size
        while len(self._buf) - pos >= size:
            status, length = _REPLY_HEADER.unpack_from(self._buf, pos)
            if len(self._buf) - pos - size < length:
                break
            out.append((int(status), bytes(self._buf[pos + size : pos + size + length])))
            pos += size + length
        del self._buf[:pos]
        return out
