"""A minimal blocking beanstalkd client: the few commands the queue benchmark needs.

The protocol is lines of text (beanstalkd's doc/protocol.txt): a command line, for ``put``
a body, and a reply line, for ``reserve`` a body. Written here rather than taken from
PyPI so that the benchmark needs nothing beyond the standard library, and so that what
the client costs per job is plain to see.
"""

from __future__ import annotations

import socket


class BeanstalkError(RuntimeError):
    """An unexpected reply: the reply line itself is the message."""


class Beanstalk:
    def __init__(self, host: str, port: int, timeout: float | None = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def use(self, tube: str) -> None:
        """Where ``put`` goes from now on."""
        self._command(f"use {tube}".encode(), b"USING")

    def watch(self, tube: str) -> None:
        self._command(f"watch {tube}".encode(), b"WATCHING")

    def ignore(self, tube: str) -> None:
        self._command(f"ignore {tube}".encode(), b"WATCHING")

    def put(self, body: bytes, priority: int = 1024, ttr: int = 60) -> int:
        """Queue ``body`` on the used tube; its job id (once beanstalkd has it in its
        binlog, when it runs with one)."""
        head = f"put {priority} 0 {ttr} {len(body)}\r\n".encode()
        words = self._command(head + body, b"INSERTED")
        return int(words[1])

    def reserve(self) -> tuple[int, bytes]:
        """Wait for a job on the watched tubes: (id, body)."""
        words = self._command(b"reserve", b"RESERVED")
        body = self.reader.read(int(words[2]) + 2)[:-2]  # the body, then \r\n
        return int(words[1]), body

    def delete(self, job: int) -> None:
        self._command(b"delete %d" % job, b"DELETED")

    def _command(self, line: bytes, expected: bytes) -> list[bytes]:
        self.sock.sendall(line + b"\r\n")
        reply = self.reader.readline()
        words = reply.split()
        if not words or words[0] != expected:
            raise BeanstalkError(reply.decode("ascii", "replace").strip() or "connection closed")
        return words
