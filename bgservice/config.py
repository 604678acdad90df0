"""Frozen settings: defaults -> ``service.config`` -> command line, validated once.

The file is TOML (every key is described in the shipped ``service.config``); a JSON list of
``{"server", "address", "port"}`` listeners written for the original still loads. Relative
paths are taken from the file's own folder, so the service finds its modules wherever it is
started. Any invalid value raises ``ConfigError`` naming the key, its line where it can be
found and, unless it is a secret, the value; the CLI exits 2 before anything starts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgservice.config_checks import (
    ALERT_CHECKS,
    HTTP_CHECKS,
    LIMIT_CHECKS,
    LISTENER_CHECKS,
    LOG_CHECKS,
    MODE_FORMS,
    QUEUE_CHECKS,
    REDIS_CHECKS,
    RELOAD_CHECKS,
    TOP_CHECKS,
    WORKER_CHECKS,
    Network,
    check_port,
    check_string,
)
from bgservice.config_env import apply_env
from bgservice.config_file import Reader, conflicts, original_servers, read_config, toml_error
from bgservice.errors import BadRequest, ConfigError
from bgservice.queue.commands import MAX_AFTER, MAX_PAGE, MAX_TAGS, TAG_CHARS
from bgservice.queue.schedules import BadSchedule, Schedule, table_schedule

DEFAULT_PORT = 12341
LOOPBACK = "127.0.0.1"
ANY = {"0.0.0.0", "::", ""}  # hosts that take every address: a port there clashes


@dataclass(frozen=True)
class Listener:
    """One listener: a TCP + UDP pair on host:port, and/or Unix stream/datagram sockets."""

    name: str = "default"
    host: str | None = LOOPBACK
    port: int | None = DEFAULT_PORT
    tcp: bool = True
    udp: bool = True
    unix: str | None = None
    unix_dgram: str | None = None
    mode: int = 0o660
    group: int | None = None  # the socket files' group (its id); None: the service's own


NO_TIMEOUT = 10 * 365 * 86400.0  # "no limit": finite, so every timer and pool takes it


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 16 * 1024 * 1024
    max_connections: int = 1024
    max_buffered_bytes: int = 256 * 1024 * 1024  # unfinished requests, all connections
    read_timeout: float = 10.0
    write_timeout: float = 30.0  # a client that takes none of its reply for this long
    idle_timeout: float = 300.0
    one_shot_end: str = "segment"  # or "quiet": see docs/protocol.md
    quiet_ms: float = 5.0
    quiet_large_ms: float = 100.0
    large_bytes: int = 64 * 1024
    max_pipeline: int = 64
    call_timeout: float = 30.0
    threads: int = 16
    stuck_threads: int = 16  # replacements for threads stuck past a timeout (threads.py)
    udp_queue: int = 10_000
    udp_workers: int = 4
    udp_receive_buffer: int = 4 * 1024 * 1024
    shutdown_grace: float = 10.0
    gc_threshold: int = 20_000  # allocations between young collections (collector.py)


@dataclass(frozen=True)
class QueueSettings:
    workers: int = 4
    keep_results: float = 3600.0
    keep_history: float = 7 * 86400.0
    retries: int = 0
    max_interruptions: int = 3  # runs cut by a crash, then the job fails (a poison pill)
    backoff: float = 1.0
    backoff_max: float = 300.0
    backoff_jitter: float = 0.25  # a retry waits 75-100 % of its backoff (engine.decide)
    max_waiting: int = 100_000
    max_waiting_bytes: int = 1 << 30  # the data of waiting and running jobs (embedded)
    commit_ms: float = 0.0
    backend: str = "sqlite"
    job_timeout: float | None = None  # no timeout= and no module TIMEOUT; None: none (days)
    # Job names and tags: the longest name, the most tags, and how many distinct names
    # /metrics labels on their own (the rest count as name="other"). docs/queue.md.
    max_name_chars: int = 200
    max_tags: int = MAX_TAGS
    metrics_names: int = 50
    max_checkpoint_bytes: int = 65536  # request.job.save_checkpoint(text): its UTF-8 size
    # What one request may ask (bgservice.queue.commands): ids in after=, a tag's length,
    # jobs per state in a list; and schedules kept, service.config's included (scheduler).
    max_dependencies: int = MAX_AFTER
    max_tag_chars: int = TAG_CHARS
    max_page: int = MAX_PAGE
    max_schedules: int = 1000


@dataclass(frozen=True)
class RedisSettings:
    """The shared queue (``[queue] backend = "redis"``): several instances, one queue."""

    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "bgservice"
    lease: float = 30.0
    connect_timeout: float = 2.0
    command_timeout: float = 5.0  # s a command may wait for Redis's reply (redis_db.py)
    url_from: str = "[redis] url"  # or $BGSERVICE_REDIS_URL (config_env): errors name it
    file_url: str = ""  # the file's own url where url_from is not: a password still there


@dataclass(frozen=True)
class HttpSettings:
    """The operator's HTTP API, metrics and dashboard (off unless ``enabled``)."""

    enabled: bool = False
    host: str = LOOPBACK
    port: int = 12380
    token: str | None = None  # the token "default", of scope operate
    tokens: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # name: (token, scope)
    allowed_hosts: tuple[str, ...] = ()  # Host names besides IPs and localhost (origins.py)
    max_wait: float = 300.0  # seconds GET /api/v1/jobs/{id}?wait= may hold a request


@dataclass(frozen=True)
class AlertSettings:
    """Where errors are reported: a module of the user's choice, rate-limited."""

    module: str | None = None
    events: tuple[str, ...] = ("error", "reload", "job", "restart", "unknown")
    max_per_minute: int = 5
    summary_seconds: float = 60.0


@dataclass(frozen=True)
class WorkerSettings:
    processes: int = 2
    max_calls: int = 0
    max_memory_mb: float = 0.0


@dataclass(frozen=True)
class Settings:
    listeners: tuple[Listener, ...] = (Listener(),)
    modules: Path = Path("modules")
    db: Path = Path("bgservice.db")
    allow: tuple[Network, ...] = tuple(map(ipaddress.ip_network, ("127.0.0.0/8", "::1/128")))
    limits: Limits = field(default_factory=Limits)
    queue: QueueSettings = field(default_factory=QueueSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    module_limits: Mapping[str, int] = field(default_factory=dict)
    module_rates: Mapping[str, tuple[int, float]] = field(default_factory=dict)  # (N, per s)
    reload_debounce_ms: float = 50.0
    reload_import_timeout: float = 30.0  # s; an import still running then fails the load
    verbose: bool = False
    global_handler: int = 0
    log_file: Path | None = None
    lag_warn_ms: float = 100.0
    schedules: tuple[Schedule, ...] = ()  # [[schedule]] tables: recurring jobs
    source: Path | None = None  # the config file read, if any (named where it can help)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_SECTIONS = {"limits", "queue", "log", "reload", "listen", "workers", "redis", "http", "alerts"}
_SECTIONS.add("schedule")  # [[schedule]]: bgservice.queue.schedules


def _octal(reader: Reader, value: int, index: int) -> bool:
    """The ``index``-th listener's integer ``mode`` was written in octal: ``mode = 770`` is
    decimal, and would let anyone in. Inline tables (``listen = [{..., mode = 0o600}]``)
    have no line of their own: there, some ``mode =`` in the file must spell it 0o..."""
    literal = reader.literal("mode", "listen", index)
    if literal:
        return literal.startswith("0o")
    inline = re.findall(r"\bmode\"?\s*=\s*0o([0-7][0-7_]*)", reader.text)
    return any(int(digits.replace("_", ""), 8) == value for digits in inline)


def _listener(reader: Reader, raw: Any, index: int, base: Path) -> Listener:
    where = f"[[listen]] #{index + 1} "
    values = reader.table(raw, LISTENER_CHECKS, where, "listen", index)
    values.setdefault("name", f"listener{index + 1}")
    for key in ("unix", "unix_dgram"):  # from the file's folder, as every path here
        if key in values:
            values[key] = str(base / values[key])
    if isinstance(raw.get("mode"), int) and not _octal(reader, raw["mode"], index):
        problem = f"must be {MODE_FORMS}, got {raw['mode']!r}"
        raise reader.fail(where, "mode", problem, "listen", index)
    if not ({"host", "port"} & values.keys()) and not ({"unix", "unix_dgram"} & values.keys()):
        raise reader.fail(
            where, "port", "a listener needs host/port, unix or unix_dgram", "listen", index
        )
    sockets = {"unix", "unix_dgram"} & values.keys()
    if not (values.get("tcp", True) or values.get("udp", True) or sockets):
        problem = f"listener {values['name']!r} would serve nothing: tcp and udp are both "
        problem += "false and it has no unix or unix_dgram socket"
        raise reader.fail(where, "tcp", problem, "listen", index)
    if "host" not in values and "port" not in values:
        values["host"] = values["port"] = None
    return Listener(**values)


def _distinct(reader: Reader, listeners: tuple[Listener, ...]) -> None:
    """No two sockets on one port of one host or on one path, a listener's own unix and
    unix_dgram included: the second was refused at the start as "address already in use
    - is another service running?", exit 1, which a service manager restarts for ever
    (two socket files on one path deleted each other's)."""
    seen: dict[Any, tuple[int, str]] = {}
    for index, listener in enumerate(listeners):
        places = [("port", (listener.host, listener.port))] if listener.port else []
        places += [(key, path) for key in ("unix", "unix_dgram")
                   if (path := getattr(listener, key)) is not None]  # fmt: skip
        for key, place in places:
            first, first_key = seen.setdefault(place, (index, key))
            if (first, first_key) != (index, key):
                what = "port" if key == "port" else "path"
                problem = f"the same {what} as [[listen]] #{first + 1}'s {first_key}"
                raise reader.fail(f"[[listen]] #{index + 1} ", key, problem, "listen", index)


def _from_legacy_json(reader: Reader, data: list[Any]) -> Settings:
    """The original's format: ``[{"server": "alpha", "address": "0.0.0.0", "port": 12341}]``."""
    listeners = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "port" not in item:
            raise reader.fail(f"listener #{i + 1} ", "port", "each entry needs a port")
        if unknown := sorted(set(item) - {"server", "address", "port"}):  # ("adress")
            problem = "unknown key (the original's keys: server, address, port)"
            raise reader.fail(f"listener #{i + 1} ", unknown[0], problem)
        try:
            listeners.append(
                Listener(
                    name=str(item.get("server", f"listener{i + 1}")),
                    host=check_string(item.get("address", LOOPBACK)),
                    port=check_port(item["port"]),
                )
            )
        except ValueError as exc:
            raise reader.fail(f"listener #{i + 1} ", "address/port", str(exc)) from None
    if not listeners:
        raise reader.fail("", "listeners", "the list is empty")
    return Settings(listeners=tuple(listeners))


def _from_toml(reader: Reader, data: dict[str, Any], base: Path) -> Settings:
    unknown = set(data) - set(TOP_CHECKS) - _SECTIONS
    if unknown:
        key = sorted(unknown)[0]
        hint = " (host and port go in a [[listen]] table)" if key in ("host", "port") else ""
        raise reader.fail("", key, reader.unknown(key, set(TOP_CHECKS) | _SECTIONS, hint))
    top = reader.table({k: v for k, v in data.items() if k in TOP_CHECKS}, TOP_CHECKS, "")
    limits = reader.table(data.get("limits", {}), LIMIT_CHECKS, "[limits] ", "limits")
    queue = reader.table(data.get("queue", {}), QUEUE_CHECKS, "[queue] ", "queue")
    log = reader.table(data.get("log", {}), LOG_CHECKS, "[log] ", "log")
    reload = reader.table(data.get("reload", {}), RELOAD_CHECKS, "[reload] ", "reload")
    workers = reader.table(data.get("workers", {}), WORKER_CHECKS, "[workers] ", "workers")
    redis = reader.table(data.get("redis", {}), REDIS_CHECKS, "[redis] ", "redis")
    http = reader.table(data.get("http", {}), HTTP_CHECKS, "[http] ", "http")
    alerts = reader.table(data.get("alerts", {}), ALERT_CHECKS, "[alerts] ", "alerts")
    for table, key, problem in conflicts(limits, Limits, queue, QueueSettings):
        raise reader.fail(f"[{table}] ", key, problem, table)
    apply_env(http, redis)
    raw_listeners = data.get("listen", [])
    if not isinstance(raw_listeners, list):
        raise reader.fail("", "listen", "must be an array of tables: [[listen]]")
    settings = Settings(
        limits=Limits(**limits),
        queue=QueueSettings(**{k: v for k, v in queue.items() if not k.startswith("module_")}),
        module_limits=queue.get("module_limits", {}),
        module_rates=queue.get("module_rates", {}),
        workers=WorkerSettings(**workers),
        redis=RedisSettings(**redis),
        http=HttpSettings(**http),
        alerts=AlertSettings(**alerts),
        reload_debounce_ms=reload.get("debounce_ms", Settings.reload_debounce_ms),
        reload_import_timeout=reload.get("import_timeout", Settings.reload_import_timeout),
        verbose=log.get("verbose", False),
        global_handler=log.get("global_handler", 0),
        lag_warn_ms=log.get("lag_warn_ms", Settings.lag_warn_ms),
        log_file=base / log["file"] if "file" in log else None,
    )
    changes: dict[str, Any] = {
        "modules": base / top.get("modules", "modules"),
        "db": base / top.get("db", "bgservice.db"),
    }
    if raw_listeners:
        changes["listeners"] = tuple(
            _listener(reader, raw, i, base) for i, raw in enumerate(raw_listeners)
        )
        _distinct(reader, changes["listeners"])
    if "allow" in top:
        changes["allow"] = top["allow"]
    changes["schedules"] = _schedules(reader, data.get("schedule", []))
    if len(changes["schedules"]) > settings.queue.max_schedules:
        problem = f"service.config has {len(changes['schedules'])} [[schedule]] tables, more"
        raise reader.fail("[queue] ", "max_schedules", f"{problem} than this", "queue")
    return settings.replace(**changes)


def _schedules(reader: Reader, raw: Any) -> tuple[Schedule, ...]:
    """``[[schedule]]`` tables -> schedules (bgservice.queue.schedules checks each)."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise reader.fail("", "schedule", "must be an array of tables: [[schedule]]")
    out: dict[str, Schedule] = {}
    for index, table in enumerate(raw):
        values, where = dict(table), f"[[schedule]] #{index + 1} "
        try:
            schedule = table_schedule(values)
            if schedule.name in out:
                raise BadSchedule("name", f"{schedule.name!r} is the name of an earlier schedule")
        except BadRequest as exc:  # the key at fault, and its line
            key = exc.key if isinstance(exc, BadSchedule) else "name"
            raise reader.fail(where, key, exc.message, "schedule", index) from None
        out[schedule.name] = schedule
    return tuple(out.values())


def load(path: Path) -> Settings:
    """Read and validate a config file; relative paths are taken from its folder."""
    text = read_config(path)
    reader = Reader(path, text)
    base = path.resolve().parent
    if (servers := original_servers(path, text)) is not None:
        return _from_legacy_json(reader, servers).replace(
            modules=base / "modules", db=base / "bgservice.db"
        )
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise toml_error(path, text, str(exc)) from None
    return _from_toml(reader, parsed, base)


def with_overrides(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    modules: Path | None = None,
    db: Path | None = None,
    verbose: bool | None = None,
    global_handler: int | None = None,
    log_file: Path | None = None,
) -> Settings:
    """Apply command-line values. ``--host``/``--port`` replace the listeners by one."""
    changes: dict[str, Any] = {}
    if host is not None or port is not None:
        first = next((li for li in settings.listeners if li.port is not None), Listener())
        changes["listeners"] = (
            Listener(
                name=first.name,
                host=host if host is not None else first.host or LOOPBACK,
                port=port if port is not None else first.port,
            ),
        )
    for key, value in (
        ("modules", modules),
        ("db", db),
        ("verbose", verbose),
        ("global_handler", global_handler),
        ("log_file", log_file),
    ):
        if value is not None:
            changes[key] = value
    settings = settings.replace(**changes)
    _http_apart(settings)
    return settings


def _http_apart(settings: Settings) -> None:
    """No listener on the HTTP API's port (-p applied; 0 picks a free one): it was "address
    already in use - is another service running?", exit 1, restarted for ever."""
    for index, li in enumerate(settings.listeners):
        hosts, http = {li.host, settings.http.host}, settings.http
        if http.enabled and li.port == http.port != 0 and (len(hosts) == 1 or hosts & ANY):
            raise ConfigError(f"[http] port {http.port}: [[listen]] #{index + 1} (or -p) has it")
