"""The object a module's handler receives. See docs/modules.md."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Sink = Callable[[bytes], None]


def to_bytes(value: Any) -> bytes:
    """A handler's return value or streamed chunk as bytes; None is empty."""
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a reply must be str, bytes or None, not {type(value).__name__}")


@dataclass(eq=False)
class Request:
    """One call of a module.

    ``data`` is the raw bytes after the first colon, ``text`` the same decoded as UTF-8
    (undecodable bytes become U+FFFD). ``transport`` is ``tcp``, ``udp``, ``unix``,
    ``unix_dgram`` or ``queue``; ``peer`` is the client's ``host:port`` where there is one.
    """

    module: str
    data: bytes
    transport: str
    peer: str = ""
    _sink: Sink | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _loop_thread: int = field(default=0, repr=False)
    _text: str | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.data.decode("utf-8", errors="replace")
        return self._text

    @property
    def parts(self) -> list[str]:
        """The original's ``[module name, data]``."""
        return [self.module, self.text]

    def write(self, chunk: str | bytes) -> None:
        """Stream part of the reply now (TCP); the handler's return value follows it.

        Safe to call from a handler's thread. Over UDP there is no reply, so it does nothing.
        """
        if self._sink is None:
            return
        data = to_bytes(chunk)
        if not data:
            return
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._sink(data)
        else:
            self._loop.call_soon_threadsafe(self._sink, data)

    def bind(self, sink: Sink | None, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the transport's writer (done by the service, not by modules)."""
        self._sink = sink
        self._loop = loop
        self._loop_thread = threading.get_ident()
