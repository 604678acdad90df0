"""What a file in the modules folder is (``classify``: a module, a helper, neither) and
what a module file declares, checked once it has imported: its handlers, ``ACCEPTS``,
``TIMEOUT``, ``EXECUTION`` and ``PROCESSES`` (docs/modules.md); how a failed import is
described, and a misnamed file or a module named like a command warned of; and whether a
new save may replace the version serving now."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
import math
import re
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgservice.errors import Forbidden
from bgservice.origin import Origin

# What ACCEPTS may name: tcp, udp, queue.
ACCEPTS = frozenset(origin.accepts for origin in Origin)
# What EXECUTION may say (the error lists them): "process", or "default" as when left out.
EXECUTIONS = frozenset({"default", "process"})
# A module's file name, and a helper's (docs/modules.md, Hot reload).
_MODULE_FILE = re.compile(r"([A-Za-z0-9-][A-Za-z0-9_-]*)\.py")
_HELPER_FILE = re.compile(r"(_[A-Za-z0-9_-]*)\.py")
log = logging.getLogger(__name__)


def classify(filename: str) -> tuple[str, str] | None:
    """``("module", name)``, ``("helper", name)``, ``("misnamed", filename)`` for another
    ``.py`` file (ignored, but logged), or None for a file to ignore without a word (hidden
    ones, editors' swap, backup and test files: ``.x.py``, ``.#x.py``, ``x.py~``, ``4913``)."""
    if m := _MODULE_FILE.fullmatch(filename):
        return "module", m.group(1)
    if m := _HELPER_FILE.fullmatch(filename):
        return "helper", m.group(1)
    if filename.lower().endswith(".py") and not filename.startswith("."):
        return "misnamed", filename
    return None


# What a start logs and ``serve --check`` warns of, worded here once for both (registry.py,
# preflight.py): two copies of a message drift, and the check must say what the log will.
def misnamed_file_warning(filename: str) -> str:
    """A ``.py`` file ``classify`` calls misnamed: no request can reach it."""
    return f"ignoring {filename}: not a module name (docs/modules.md)"


def reserved_name_warning(name: str) -> str:
    """A module named like a service command (``queue``, ``service``): the service answers
    ``NAME:...`` itself, so the module loads and is never called."""
    return f"module {name}: never called ({name}:... is the service's): rename it"


HANDLER_NAMES = ("handle_tcp", "handle_udp")


def misspelled_handler(name: str, module: types.ModuleType) -> str | None:
    """For a module that defines no handler, a warning naming a function of its own that
    looks like a misspelled one (``handle_tpc``, ``handle_TCP``, ``handle``, ``handler``):
    it loaded as "loaded" with no word, and only a call's ``501`` told. (A module with no
    such function, as the shipped ``fail``, is left alone.)"""
    if any(hasattr(module, handler) for handler in HANDLER_NAMES):
        return None
    for attr, value in vars(module).items():
        if not inspect.isfunction(value) or value.__module__ != module.__name__:
            continue
        ratio = {h: difflib.SequenceMatcher(None, attr.lower(), h).ratio() for h in HANDLER_NAMES}
        near = max(HANDLER_NAMES, key=ratio.__getitem__)  # (a tie: handle_tcp)
        if ratio[near] >= 0.6 or attr.lower().startswith("handle"):
            return (f"module {name}: defines no handler; {attr} looks like a misspelled "
                    f"{near} (never called as it is)")  # fmt: skip
    return None


def open_jobs_warning(name: str, module: types.ModuleType) -> str | None:
    """For a module whose ``CALL_FROM`` limits its callers while its jobs are open to
    every client: ``queue:add?wait=1`` replies the job's result as a call would, so the
    rule alone guards nothing (docs/deploy.md, Sources). Read from a module that loaded:
    its declarations were checked."""
    callers = getattr(module, "CALL_FROM", None)
    if not callers or getattr(module, "QUEUE_FROM", None) is not None:
        return None
    accepts = getattr(module, "ACCEPTS", None)
    if "queue" not in (accepts if accepts is not None else {"queue"}) or not hasattr(
        module, "handle_tcp"
    ):
        return None
    return (f"module {name}: CALL_FROM admits only {', '.join(sorted(callers))}, but any "
            "client may queue its jobs, and queue:add?wait=1 replies as a call does: add "
            "QUEUE_FROM, or take \"queue\" out of ACCEPTS")  # fmt: skip


def load_warnings(name: str, module: types.ModuleType) -> list[str]:
    """What a start logs of a module that loaded, and ``serve --check`` says: worded once."""
    found = (misspelled_handler(name, module), open_jobs_warning(name, module))
    return [warning for warning in found if warning]


class ModuleLoadError(Exception):
    """A module file that did not import; the message names file, line and error."""


def describe_failure(exc: BaseException, path: Path) -> str:
    """``FILE:LINE: Type: message`` for what an import of ``path`` raised: the line is the
    last of the modules folder's in the traceback (a helper's, where it raised)."""
    if isinstance(exc, SyntaxError):
        name = Path(exc.filename or path).name
        where = name if exc.lineno is None else f"{name}:{exc.lineno}"  # (not "FILE:None")
        return f"{where}: {type(exc).__name__}: {exc.msg}"
    line = None
    filename = path.name
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).parent == path.parent:
            line, filename = frame.lineno, Path(frame.filename).name
    where = f"{filename}:{line}" if line else filename
    return f"{where}: {type(exc).__name__}: {exc}"


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
    return Handler(fn, makes_coroutine(fn))


def makes_coroutine(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` makes a coroutine, to run on the loop: an ``async def`` (or a
    partial or method of one), a decorator's sync wrapper made with ``functools.wraps``
    over one (it returns the coroutine), or an object with an ``async def __call__``. Only
    the first was seen: the others ran in a thread, their coroutine a bad reply."""
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.ismethod(fn):
        return makes_coroutine(fn.__func__)
    if inspect.isfunction(fn):  # (only a function: an object's __wrapped__ may run it itself)
        return inspect.iscoroutinefunction(inspect.unwrap(fn))
    if inspect.isroutine(fn) or isinstance(fn, type | functools.partial):
        return False
    return makes_coroutine(type(fn).__call__)  # the class's: an instance's own is not called


def declarations(
    module: types.ModuleType, tcp: Handler | None, udp: Handler | None
) -> tuple[frozenset[str], float | None, str, int | None]:
    accepts_raw = getattr(module, "ACCEPTS", None)
    if accepts_raw is None:
        accepts = frozenset(({"tcp", "queue"} if tcp else set()) | ({"udp"} if udp else set()))
    else:
        accepts = _accepts(accepts_raw)
    timeout = _timeout(getattr(module, "TIMEOUT", None))
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
    return accepts, timeout, execution, processes


def _accepts(raw: object) -> frozenset[str]:
    # Checked before it is made a set: a number was "TypeError: 'int' object is not
    # iterable", a list in it "unhashable type: 'list'"; an empty set loaded and answered
    # every call 405 (CALL_FROM refuses it: it admitted no one).
    if not isinstance(raw, set | frozenset | list | tuple) or not raw or not all(
        isinstance(a, str) and a in ACCEPTS for a in raw
    ):
        raise ModuleLoadError(f"ACCEPTS must be a set drawn from {sorted(ACCEPTS)}, not empty")
    return frozenset(raw)


def _timeout(raw: object) -> float | None:
    if raw is None:
        return None
    seconds = math.nan  # (what is no number fails below)
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        with contextlib.suppress(OverflowError):  # 10**400 was "OverflowError: int too large"
            seconds = float(raw)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ModuleLoadError("TIMEOUT must be a finite number of seconds greater than 0")
    return seconds


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
