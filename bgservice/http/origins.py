"""Which web pages may drive the HTTP API when no token guards it.

With no token, the ``allow`` list (loopback by default) is the only guard, and a browser
on that machine is inside it: any page it shows could POST a job (a ``text/plain`` form
post needs no preflight), or, by DNS rebinding (a name of the attacker's that turns to
127.0.0.1), read the jobs through the page's own origin. Two checks close both, as
Jupyter and webpack-dev-server do:

- the ``Host`` header names this service: an IP address, ``localhost`` (or a name under
  ``.localhost``), the ``[http] host`` it listens on, or one of ``[http] allowed_hosts``
  (``"*"``: any; ``"*.example.com"``: any name under example.com, not example.com itself;
  a reverse proxy passing its own name needs it there); a rebound name is none of these;
- a request that changes something (any method but GET, HEAD and OPTIONS) that carries
  an ``Origin`` (every browser sends one on such requests) comes from a page of this
  same host and port.

With a token configured neither applies: a page cannot learn the token, and a reverse
proxy in front may pass names and origins of its own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # (aiohttp's, the [http] extra's: config_checks imports this module at
    from multidict import CIMultiDictProxy  # every start, with or without the extra)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def check_hosts(value: Any) -> tuple[str, ...]:
    """``[http] allowed_hosts``: a list of host names (no ports), each maybe with a leading
    ``*.``, or ``["*"]``. ``"*.example.com"`` was once compared as written, letting no
    name in, unsaid; a ``*`` anywhere else (``jobs*.example.com``) is refused."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError('must be a list of host names, e.g. ["jobs.example.com"], or ["*"]')
    if any(":" in v or "/" in v for v in value):
        raise ValueError("must be host names without a scheme or port")
    names = tuple(v.lower().rstrip(".") for v in value)
    for name in names:
        if name != "*" and "*" in name.removeprefix("*."):
            raise ValueError(
                f"{name[:100]!r}: a * only as a whole first label (*.example.com), or alone"
            )
    return names


class BrowserGuard:
    def __init__(self, listen_host: str, allowed: Iterable[str]) -> None:
        self.names = {listen_host.lower(), "localhost", *allowed}
        self.any_host = "*" in self.names
        # "*.example.com" -> ".example.com": a name ending so (a subdomain, at any depth)
        self.suffixes = tuple(name[1:] for name in self.names if name.startswith("*."))

    def refusal(self, method: str, headers: CIMultiDictProxy[str]) -> str | None:
        """Why a request may not be served (for a 403), or None."""
        host = headers.get("Host")
        if host is not None and not self.any_host and not self._ours(_split(host)[0]):
            return (
                f"Host {host[:100]!r} is not a name of this service "
                "(add it to [http] allowed_hosts, or set a token)"
            )
        if method in SAFE_METHODS:
            return None
        origins = headers.getall("Origin", [])  # (a second one, foreign, went unchecked)
        if len(origins) > 1:
            return "more than one Origin header"
        if origins and not _same(origins[0], host):
            return f"a page of origin {origins[0][:100]!r} may not {method} here"
        return None

    def _ours(self, name: str) -> bool:
        if name in self.names or name.endswith((".localhost", *self.suffixes)):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def _split(host: str) -> tuple[str, int | None]:
    """A ``Host`` header's name (lower case, no IPv6 brackets, no final dot) and port."""
    host = host.strip().lower()
    if host.startswith("[") and "]" in host:
        name, rest = host[1 : host.index("]")], host[host.index("]") + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port_text = host.partition(":")
    port = int(port_text) if port_text.isascii() and port_text.isdigit() else None
    return name.rstrip("."), port


def _same(origin: str, host: str | None) -> bool:
    """Whether a page of ``origin`` is served from ``host`` (a missing port: the scheme's)."""
    try:
        parts = urlsplit(origin.strip().lower())
        origin_port = parts.port
    except ValueError:
        return False
    if host is None or parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return False  # "null" (a sandboxed page, a file), another scheme
    default = DEFAULT_PORTS[parts.scheme]
    name, port = _split(host)
    return parts.hostname.rstrip(".") == name and (origin_port or default) == (port or default)
