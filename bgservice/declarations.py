"""What a module file declares, checked once it has imported: its handlers, ``ACCEPTS``,
``TIMEOUT``, ``EXECUTION`` and ``PROCESSES`` (docs/modules.md); and whether a new save may
replace the version serving now."""

from __future__ import annotations

import inspect
import logging
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bgservice.errors import Forbidden
from bgservice.origin import Origin

# What ACCEPTS may name: tcp, udp, queue.
ACCEPTS = frozenset(origin.accepts for origin in Origin)
# What EXECUTION may say (the error lists them): "process", or "default" as when left out.
EXECUTIONS = frozenset({"default", "process"})
log = logging.getLogger(__name__)


class ModuleLoadError(Exception):
    """A module file that did not import; the message names file, line and error."""


@dataclass(frozen=True)
class Handler:
    fn: Callable[..., Any]
    is_async: bool


def handler(module: types.ModuleType, attr: str) -> Handler | None:
    fn = getattr(module, attr, None)
    if fn is None:
        return None
    if not callable(fn):
        raise ModuleLoadError(f"{attr} is not callable")
    return Handler(fn, inspect.iscoroutinefunction(fn))


def declarations(
    module: types.ModuleType, tcp: Handler | None, udp: Handler | None
) -> tuple[frozenset[str], float | None, str, int | None]:
    accepts_raw = getattr(module, "ACCEPTS", None)
    if accepts_raw is None:
        accepts = frozenset(({"tcp", "queue"} if tcp else set()) | ({"udp"} if udp else set()))
    elif isinstance(accepts_raw, str) or not set(accepts_raw) <= ACCEPTS:
        raise ModuleLoadError(f"ACCEPTS must be a set drawn from {sorted(ACCEPTS)}")
    else:
        accepts = frozenset(accepts_raw)
    timeout = getattr(module, "TIMEOUT", None)
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ModuleLoadError("TIMEOUT must be a finite number of seconds greater than 0")
    execution = getattr(module, "EXECUTION", None)
    if execution is None:
        execution = "default"
    elif not isinstance(execution, str) or execution not in EXECUTIONS:
        raise ModuleLoadError('EXECUTION must be "process", or "default" (as when left out)')
    processes = getattr(module, "PROCESSES", None)
    if processes is not None and (
        isinstance(processes, bool) or not isinstance(processes, int) or processes < 1
    ):
        raise ModuleLoadError("PROCESSES must be a whole number of at least 1")
    if processes is not None and execution != "process":
        # Not an error: a save that drops EXECUTION to leave process mode may keep it.
        log.warning("module %s: PROCESSES = %d has no effect without EXECUTION = "
                    '"process" (its calls run in the service)',
                    module.__name__.rpartition(".")[2], processes)  # fmt: skip
    return accepts, (float(timeout) if timeout else None), execution, processes


def queue_from(module: types.ModuleType) -> frozenset[str] | None:
    """``QUEUE_FROM``: the sources that may queue this module's jobs (None: any). Each is
    a source's kind (``scheduler``, ``http``, ``tcp``, ``unix``, ``job``) or a whole
    source (``http:ops``, ``scheduler:nightly``): see ``allowed``."""
    return _sources(module, "QUEUE_FROM", '{"scheduler"}')


def call_from(module: types.ModuleType) -> frozenset[str] | None:
    """``CALL_FROM``: the sources that may call this module directly (None: any): a
    listener kind (``tcp``, ``unix``, ``udp``, ``unix_dgram``) or one with the peer's
    address (``tcp:127.0.0.1``): see ``allowed``. Queued runs are governed by
    ``QUEUE_FROM``, not by this."""
    return _sources(module, "CALL_FROM", '{"unix", "tcp:10.0.0.5"}')


def _sources(module: types.ModuleType, key: str, example: str) -> frozenset[str] | None:
    raw = getattr(module, key, None)
    if raw is None:
        return None
    # A set, list or tuple of names, not empty (it admitted no one: "call only from  "); a
    # number was a TypeError, a generator was used up by this check.
    if not isinstance(raw, set | frozenset | list | tuple) or not raw or not all(
        isinstance(s, str) and s for s in raw
    ):
        raise ModuleLoadError(f"{key} must be a set of sources, e.g. {example}")
    return frozenset(raw)


def allowed(source: str, rule: frozenset[str]) -> bool:
    """``source`` (``kind:detail``) matches a rule entry that names it whole, its kind, or
    its kind and host without the port (``tcp:127.0.0.1`` for ``tcp:127.0.0.1:50312``; an
    IPv6 host, bracketed in sources, with or without them: ``tcp:[::1]``, ``tcp:::1``)."""
    if source in rule:
        return True
    kind, _, detail = source.partition(":")
    if kind in rule:
        return True
    if ":" not in detail:
        return False
    host = detail.rpartition(":")[0]
    return f"{kind}:{host}" in rule or f"{kind}:{host.strip('[]')}" in rule


def admit(rule: frozenset[str], source: str, what: str) -> None:
    """403 naming the rule when ``source`` does not match it: ``what`` says what is refused
    (``module invoices: queue``, ``module cache_reset: call``)."""
    if not allowed(source, rule):
        only = ", ".join(sorted(rule))
        raise Forbidden(f"{what} only from {only} (source {source or None})")


def serves(name: str, has_handler: bool, had_handler: bool) -> None:
    """Raise if a save that defines no handler at all would replace one that served.

    An editor that saves in place truncates the file before writing it: for that moment
    the file imports as a valid module with no handlers, and swapping it in would answer
    every call ``501`` (issue 18). It fails like a syntax error instead: the last good
    version keeps serving until the real content arrives. A file that never had a handler
    (the shipped ``fail`` example) still loads, and answers ``501``."""
    if had_handler and not has_handler:
        raise ModuleLoadError(f"{name}: defines no handler (handle_tcp or handle_udp)")
