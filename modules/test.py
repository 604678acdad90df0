"""The original's test module: replies ``Test`` over TCP, logs what it gets over UDP."""

import logging

log = logging.getLogger(__name__)


async def handle_tcp(request):
    return "Test"


async def handle_udp(request):
    log.info("test datagram from %s: %r", request.peer or "local", request.text[:200])
