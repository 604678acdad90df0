"""Replies with the request's data, byte for byte. Over UDP, logs its size."""

import logging

log = logging.getLogger(__name__)


async def handle_tcp(request):
    return request.data


async def handle_udp(request):
    log.info("echo datagram from %s: %d bytes", request.peer or "local", len(request.data))
