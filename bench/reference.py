"""The benchmark's reference: the thinnest uvloop server that does the benchmark's work.

No modules, no sanitising, no limits, no logging, no durability: the practical ceiling
for a Python server on this machine. It answers ``test:...`` with ``Test`` in the
original's one-shot form (reply at the first read, then close) and in bgservice's framed
form (docs/protocol.md), counts UDP datagrams, and keeps an in-memory queue for
``queue:add:echo:DATA`` -> ``id:N`` and ``queue:get:id:N``; ``stats`` replies the UDP
count as JSON. Run: ``python bench/reference.py PORT`` (0: any); prints the port.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import sys

import uvloop

PREFACE = b"\x00:F1"
LENGTH = struct.Struct(">I")
udp_received = 0
results: dict[bytes, bytes] = {}
ids = itertools.count(1)


def answer(request: bytes) -> bytes:
    if request.startswith(b"queue:add:echo:"):
        job = str(next(ids)).encode()
        results[job] = request[15:]  # "runs" at once: an echo
        return b"id:" + job
    if request.startswith(b"queue:get:id:"):
        return results.pop(request[13:], b"")
    if request.startswith(b"stats"):
        return b'{"udp": %d}' % udp_received
    return b"Test"


class Stream(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.framed: bool | None = None

    def data_received(self, data: bytes) -> None:
        if self.framed is None:
            self.framed = data.startswith(PREFACE)
            if not self.framed:
                self.transport.write(answer(data))
                self.transport.close()
                return
            self.transport.write(PREFACE)
            data = data[len(PREFACE) :]
        self.buffer += data
        out = []
        while len(self.buffer) >= 4:
            (n,) = LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < 4 + n:
                break
            reply = answer(self.buffer[4 : 4 + n])
            out.append(b"200" + LENGTH.pack(len(reply)) + reply)
            self.buffer = self.buffer[4 + n :]
        if out:
            self.transport.write(b"".join(out))


class Datagrams(asyncio.DatagramProtocol):
    def datagram_received(self, data: bytes, addr: object) -> None:
        global udp_received
        udp_received += 1


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Stream, "127.0.0.1", port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_datagram_endpoint(Datagrams, local_addr=("127.0.0.1", port))
    # The service's default receive buffer ([limits] udp_receive_buffer), so that UDP loss
    # compares the servers, not their kernel buffers.
    transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024
    )
    print(port, flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
