"""What each key of ``service.config`` accepts: one check per key, per table.

A check takes the raw value (from TOML, JSON or the command line) and returns it in the
type ``Settings`` holds, or raises ValueError saying what it must be; ``Reader``
(bgservice.config_file) names the key and line around that message.
"""

from __future__ import annotations

import grp
import re
import sys
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bgservice.access import Network, parse_network
from bgservice.errors import Unmet
from bgservice.http.origins import check_hosts
from bgservice.http.tokens import MIN_TOKEN_CHARS, check_tokens
from bgservice.queue.commands import MAX_INT
from bgservice.queue.rates import Rate, parse_rate

Check = Callable[[Any], Any]


def install(extra: str) -> str:
    """The command that installs an extra into the Python running the service (bgservice
    is not on PyPI: from a checkout, as scripts/install.sh installs it, it is the checkout)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return f"{sys.executable} -m pip install -e '{root}[{extra}]'"
    return f"{sys.executable} -m pip install 'bgservice[{extra}]'"


def _needs(extra: str, *packages: str) -> None:
    """Missing packages of an extra: said with the config (exit 2), not at their import."""
    if missing := [p for p in packages if find_spec(p) is None]:
        raise Unmet(f"needs {' and '.join(missing)}: {install(extra)}")


def redact_url(url: str) -> str:
    """A URL fit for a log line: its password (``user:PW@``, ``?password=PW``) replaced.
    The user part ends at the netloc's last '@', as urllib (and so redis-py) reads it: a
    password may hold an '@' of its own. Any query option named like a password, in any
    case (``ssl_password``, ``PASSWORD``), is replaced too."""
    scheme, sep, rest = url.partition("://")
    if sep:
        end = min([i for i in map(rest.find, "/?#") if i >= 0], default=len(rest))
        user, at, host = rest[:end].rpartition("@")
        if at and ":" in user:
            url = f"{scheme}://{user.partition(':')[0]}:***@{host}{rest[end:]}"
    return re.sub(r"([?&][^=&#]*password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


# The largest whole number any key takes: what SQLite's INTEGER, Redis and a C int64
# hold (TOML's own integers are 64-bit, but Python's reader takes any size). A value that
# reaches a system call as a C int has a lower bound of its own (INT_MAX).
INT_MAX = 2**31 - 1


def _whole(low: int, high: int = MAX_INT) -> Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ValueError(f"must be a whole number of at least {low} and at most {high}")
        return v

    return check


_positive_int = _whole(1)
_non_negative_int = _whole(0)


# The largest number a key in seconds (or ms, or MB) takes: 100 years of seconds. Past it
# a time only made absurd output (backoff = 1e300: a retry "due in" a 300-digit span).
MAX_NUMBER = 3_155_760_000


def _finite(v: Any) -> bool:
    """A number TOML wrote, not nan or inf (TOML has both; every limit needs a real one),
    nor past ``MAX_NUMBER``."""
    return not isinstance(v, bool) and isinstance(v, int | float) and abs(v) <= MAX_NUMBER


def _positive_number(v: Any) -> float:
    if not _finite(v) or v <= 0:
        raise ValueError(f"must be a number greater than 0 and at most {MAX_NUMBER}")
    return float(v)


def _non_negative_number(v: Any) -> float:
    if not _finite(v) or v < 0:
        raise ValueError(f"must be a number of at least 0 and at most {MAX_NUMBER}")
    return float(v)


def _optional_timeout(v: Any) -> float | None:
    """Seconds, or no limit: 0 or "none" (TOML has no null)."""
    if v == "none" or (not isinstance(v, bool) and v == 0):
        return None
    if not _finite(v) or v < 0:
        raise ValueError(f"must be a number of seconds up to {MAX_NUMBER}, or 0 or "
                         '"none" for no limit')  # fmt: skip
    return float(v)


def _at_most(high: float) -> Check:
    """A number of at least 0 and at most ``high``."""

    def check(v: Any) -> float:
        if not _finite(v) or not 0 <= v <= high:
            raise ValueError(f"must be a number of at least 0 and at most {high:g}")
        return float(v)

    return check


def check_string(v: Any) -> str:
    if not isinstance(v, str) or not v.strip() or "\0" in v:  # (" ": no host; NUL: no path)
        raise ValueError("must be a non-empty string, without NUL characters")
    return v


def check_token(v: Any) -> str:
    if not isinstance(v, str) or len(v) < MIN_TOKEN_CHARS:
        raise ValueError(f"must be a string of at least {MIN_TOKEN_CHARS} characters")
    return v


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def check_port(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        raise ValueError("must be a port number from 0 to 65535 (0: any free port)")
    return v


MODE_FORMS = 'an octal file mode written "770" or 0o770 (a bare 770 is decimal 770)'


def check_mode(v: Any) -> int:
    """A Unix socket's file mode: a string of octal digits (``"660"``, ``"0o660"``), or an
    integer. The integer's TOML spelling is checked by bgservice.config: only ``0o660``
    is octal there, and a bare ``660`` (decimal, 0o1224) would open the socket to all."""
    if isinstance(v, str) and (m := re.fullmatch(r"(?:0o)?([0-7]{1,4})", v)):
        v = int(m.group(1), 8)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o7777:
        raise ValueError(f"must be {MODE_FORMS}")
    return v


def check_group(v: Any) -> int:
    """The group a listener's Unix socket files are given (``www-data``, or a number): its
    id, looked up now, so a typo is a configuration error rather than a failed start."""
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= INT_MAX:
        return v
    if not isinstance(v, str):
        raise ValueError("must be a group's name (www-data) or number")
    try:
        return grp.getgrnam(check_string(v)).gr_gid
    except KeyError:
        raise ValueError(f"no group named {v!r} on this host") from None


def _networks(v: Any) -> tuple[Network, ...]:
    if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
        raise ValueError('must be a list of networks such as ["127.0.0.0/8", "10.0.0.0/8"]')
    return tuple(map(parse_network, v))


def _global_handler(v: Any) -> int:
    names = {"off": 0, "log": 1, "stderr": 2}
    if v not in names:
        raise ValueError('must be "off" (-e), "log" (-E) or "stderr" (-EE)')
    return names[v]


ONE_SHOT_ENDS = ("segment", "quiet")


def _one_shot_end(v: Any) -> str:
    if v not in ONE_SHOT_ENDS:
        raise ValueError(f"must be one of {', '.join(map(repr, ONE_SHOT_ENDS))}")
    return str(v)


def _backend(v: Any) -> str:
    if v not in ("sqlite", "redis"):
        raise ValueError('must be "sqlite" (one host, the default) or "redis" (shared)')
    if v == "redis":
        _needs("redis", "redis", "hiredis")
    return str(v)


def _http_enabled(v: Any) -> bool:
    if _boolean(v):
        _needs("http", "aiohttp", "prometheus_client")
    return bool(v)


# Options of a Redis URL's query that the service sets itself (bgservice.queue.redis_db),
# and what sets them: given in the URL, redis-py would let them replace the service's own.
OWN_REDIS_OPTIONS = {
    "socket_connect_timeout": "[redis] connect_timeout",
    "socket_timeout": "[redis] command_timeout",
    "health_check_interval": "the service: 15 s",
    "retry_on_timeout": "the service: it retries by itself",
}


def check_redis_url(v: Any) -> str:
    """A Redis URL checked whole, without connecting: a bad one is a configuration error
    now, not a traceback at start or, worse, something else silently (db 0 for "/zero").
    The messages never quote the URL: it may hold a password."""
    if not isinstance(v, str) or not re.match(r"^(rediss?|unix)://", v):
        raise ValueError('must be a URL such as "redis://127.0.0.1:6379/0" or "unix:///path"')
    parts = urlsplit(v)
    if parts.scheme != "unix" and not re.fullmatch(r"/?|/\d+", parts.path):
        raise ValueError("must end in the database's number, redis://HOST:PORT/N (N from 0)")
    for name in parse_qs(parts.query, keep_blank_values=True):
        if name in OWN_REDIS_OPTIONS:
            raise ValueError(f"option {name!r}: set by {OWN_REDIS_OPTIONS[name]}, not in the URL")
    if find_spec("redis") is None:  # (a site without the [redis] extra: checked at its use)
        return v
    from redis.asyncio.connection import ConnectionPool  # (redis-py's own URL parser)

    try:  # a connection object, not connected: it takes the options, or says which not
        ConnectionPool.from_url(v).make_connection()
    except TypeError as exc:
        option = re.search(r"argument '([^']*)'", str(exc))
        raise ValueError(f"option {option[1] if option else '?'!r} is not one redis-py "
                         "takes") from None  # fmt: skip
    except ValueError as exc:  # a port or an option's value (its name only: no value)
        raise ValueError(f"is not a valid Redis URL: {exc}") from None
    return v


ALERT_EVENTS = ("error", "reload", "job", "call", "restart", "unknown")


def _alert_events(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or any(e not in ALERT_EVENTS for e in v):
        raise ValueError(f"must be a list of events from {', '.join(ALERT_EVENTS)}")
    return tuple(dict.fromkeys(v))


def _module_limits(v: Any) -> dict[str, int]:
    if not isinstance(v, dict):
        raise ValueError("must be a table of module = limit")
    return {str(k): _positive_int(n) for k, n in v.items()}


def _module_rates(v: Any) -> dict[str, Rate]:
    if not isinstance(v, dict):
        raise ValueError('must be a table of module = "N/UNIT", e.g. { mail = "10/minute" }')
    return {str(k): parse_rate(r) for k, r in v.items()}


LIMIT_CHECKS: dict[str, Check] = {
    "max_request_bytes": _positive_int,
    "max_connections": _positive_int,
    "max_buffered_bytes": _positive_int,
    "read_timeout": _positive_number,
    "write_timeout": _positive_number,
    "idle_timeout": _positive_number,
    "quiet_ms": _positive_number,
    "quiet_large_ms": _positive_number,
    "one_shot_end": _one_shot_end,
    "large_bytes": _positive_int,
    "max_pipeline": _positive_int,
    "call_timeout": _positive_number,
    "threads": _positive_int,
    "stuck_threads": _non_negative_int,
    "udp_queue": _positive_int,
    "udp_workers": _positive_int,
    "udp_receive_buffer": _whole(1, INT_MAX),  # setsockopt(SO_RCVBUF) takes a C int
    "shutdown_grace": _non_negative_number,
    "gc_threshold": _whole(0, INT_MAX),  # gc.set_threshold takes a C int
}
QUEUE_CHECKS: dict[str, Check] = {
    "workers": _non_negative_int,
    "keep_results": _non_negative_number,
    "keep_history": _non_negative_number,
    "retries": _non_negative_int,
    "max_interruptions": _non_negative_int,
    "backoff": _non_negative_number,
    "backoff_max": _non_negative_number,
    "backoff_jitter": _at_most(1.0),
    "max_waiting": _positive_int,
    "max_waiting_bytes": _positive_int,
    "commit_ms": _at_most(60_000.0),  # a thread's wait: Python refuses one past ~292 years
    "module_limits": _module_limits,
    "module_rates": _module_rates,
    "backend": _backend,
    "job_timeout": _optional_timeout,
    "max_name_chars": _positive_int,
    "max_tags": _non_negative_int,
    "metrics_names": _non_negative_int,
    "max_checkpoint_bytes": _positive_int,
    "max_dependencies": _positive_int,
    "max_tag_chars": _positive_int,
    "max_page": _positive_int,
    "max_schedules": _non_negative_int,
}
# Keys whose values are secrets (a Redis URL may hold a password): an error names the key
# and the line, never the value.
SECRET_KEYS = frozenset({"url", "token", "tokens"})


def shown(key: str, value: Any, exc: ValueError | None = None) -> str:
    """What an error (``exc``) says of the value given: ``, got VALUE``, nothing for a
    secret or a value that is right (Unmet)."""
    return "" if key in SECRET_KEYS or isinstance(exc, Unmet) else f", got {value!r}"


def _lease(v: Any) -> float:
    """[redis] lease: renewed every lease / 3 s, and a dead instance's jobs wait a lease.
    Under a second, a pause of the event loop or a slow answer from Redis of a few hundred
    ms would let a live instance's job be taken over; over a day, a dead one's wait."""
    if not _finite(v) or not LEASE_MIN <= v <= LEASE_MAX:
        raise ValueError(f"must be a number of seconds from {LEASE_MIN:g} to {LEASE_MAX:g} "
                         "(a day): instances renew their leases every lease / 3 s")  # fmt: skip
    return float(v)


LEASE_MIN, LEASE_MAX = 1.0, 86400.0
REDIS_CHECKS: dict[str, Check] = {
    "url": check_redis_url,
    "prefix": check_string,
    "lease": _lease,
    "connect_timeout": _positive_number,
    "command_timeout": _positive_number,
}
HTTP_CHECKS: dict[str, Check] = {
    "enabled": _http_enabled,
    "host": check_string,
    "port": check_port,
    "token": check_token,
    "tokens": check_tokens,
    "allowed_hosts": check_hosts,
    "max_wait": _positive_number,
}
ALERT_CHECKS: dict[str, Check] = {
    "module": check_string,
    "events": _alert_events,
    "max_per_minute": _positive_int,
    "summary_seconds": _positive_number,
}
LISTENER_CHECKS: dict[str, Check] = {
    "name": check_string,
    "host": check_string,
    "port": check_port,
    "tcp": _boolean,
    "udp": _boolean,
    "unix": check_string,
    "unix_dgram": check_string,
    "mode": check_mode,
    "group": check_group,
}
TOP_CHECKS: dict[str, Check] = {
    "modules": check_string,
    "db": check_string,
    "allow": _networks,
}
LOG_CHECKS: dict[str, Check] = {
    "verbose": _boolean,
    "global_handler": _global_handler,
    "file": check_string,
    "lag_warn_ms": _positive_number,
}
RELOAD_CHECKS: dict[str, Check] = {
    "debounce_ms": _non_negative_number,
    "import_timeout": _positive_number,
}
WORKER_CHECKS: dict[str, Check] = {
    "processes": _positive_int,
    "max_calls": _non_negative_int,
    "max_memory_mb": _non_negative_number,
}
