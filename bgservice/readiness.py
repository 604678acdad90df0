"""Telling others the service is ready: the ``--ready-file`` (the bound addresses as
JSON, for scripts and tests) and systemd's readiness protocol (``Type=notify``)."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

from bgservice.errors import ConfigError

log = logging.getLogger(__name__)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def check_ready_file(path: Path) -> None:
    """A ``ConfigError`` unless the ready file can be written (its folder exists and is
    writable). Checked before the start: found at its end, the service was listening
    already, and died with a traceback and its run marker left behind."""
    tmp = _tmp(path)
    try:
        tmp.touch()
        tmp.unlink()
    except OSError as exc:
        raise ConfigError(
            f"--ready-file {path}: cannot write to it: {exc.strerror or exc}"
        ) from None


def write_ready_file(path: Path, ready: dict[str, Any]) -> None:
    """Written whole, then renamed: a script never reads half of it."""
    tmp = _tmp(path)
    tmp.write_text(json.dumps(ready))
    tmp.replace(path)


def sd_notify(notify_socket: str | None, message: bytes) -> None:
    """One datagram to ``NOTIFY_SOCKET`` (an ``@`` name is in the abstract namespace)."""
    if not notify_socket:
        return
    address = notify_socket
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)
