"""``queue:`` command text -> typed commands. Pure: no asyncio, no storage.

The syntax is ``queue:COMMAND[?OPTIONS][:ARGUMENTS]``. The original's three commands are
the option-less forms (``queue:add:MODULE:DATA``, ``queue:get:id:N``,
``queue:check:id:N``); options ride in a query string on the command word, which the
original's forms never contain, e.g. ``queue:add?priority=5&retries=3:less:SOURCE``.
docs/protocol.md lists every command and option.
"""

from __future__ import annotations

import math
import re
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bgservice.errors import BadRequest, UnknownQueueRequest, did_you_mean
from bgservice.protocol import MODULE_NAME, split_request

COMMANDS = frozenset(
    {"add", "get", "check", "status", "cancel", "retry", "list", "stats"}
    | {"schedules", "schedule", "unschedule", "pause", "resume", "fire"}
)
# The options each command reads, none unless named here: any other is refused
# (queue:get?timeout=5 waited as long as ever, silently). queue:add's and
# queue:schedule's parsers check their own.
FILTERS = frozenset({"module", "name", "tag"})  # queue:list's: the jobs listed have all given
READ_OPTIONS = {"list": frozenset({"state", "limit", "offset"}) | FILTERS,
                "stats": frozenset({"window"}), "retry": frozenset({"dependents"})}  # fmt: skip
OWN_OPTIONS = frozenset({"add", "schedule"})
STATES = ("waiting", "running", "done", "failed", "cancelled")
MAX_INT = 2**63 - 1  # SQLite's INTEGER: whole numbers beyond it cannot be stored
ADD_OPTIONS = frozenset(
    {"priority", "delay", "at", "retries", "backoff", "timeout", "unique", "after", "wait"}
    | {"name", "tags", "source"}
)
# Defaults of the [queue] keys that bound what a request may ask (docs/protocol.md, Limits).
MAX_AFTER = 100  # max_dependencies: ids in after=, a fan-in, not a copy of the queue
TAG_CHARS = 64  # max_tag_chars: the longest tag
MAX_TAGS = 10  # max_tags: tags of one job
MAX_PAGE = 1000  # max_page: jobs per state in one queue:list reply (and an HTTP page)
TAG = re.compile(r"[A-Za-z0-9_.:-]+")


class ParseLimits(Protocol):
    """What ``parse_add`` and ``parse_list`` are bounded by: ``QueueSettings`` has each."""

    @property
    def max_dependencies(self) -> int: ...
    @property
    def max_tag_chars(self) -> int: ...
    @property
    def max_tags(self) -> int: ...
    @property
    def max_page(self) -> int: ...


@dataclass(frozen=True)
class DefaultLimits:
    """The defaults, for a caller without the service's settings (tests, schedules)."""

    max_dependencies: int = MAX_AFTER
    max_tag_chars: int = TAG_CHARS
    max_tags: int = MAX_TAGS
    max_page: int = MAX_PAGE


DEFAULTS = DefaultLimits()


# Command and AddSpec are values, yet not frozen: they are made for every request, and a
# frozen dataclass's __init__ calls object.__setattr__ per field (AddSpec: 2.3 us, 0.55 us
# unfrozen).
@dataclass
class Command:
    name: str
    options: dict[str, str]
    args: bytes


@dataclass
class AddSpec:
    module: str
    data: bytes
    priority: int = 0
    run_at: float | None = None
    retries: int | None = None
    backoff: float | None = None
    timeout: float | None = None
    unique: str | None = None
    after: tuple[int, ...] = ()  # run when all of these are done
    wait: bool = False  # reply with the job's result, not its id (add-and-wait)
    name: str | None = None  # what people see in lists, the dashboard and /metrics
    tags: tuple[str, ...] = ()
    # Where it came from: "tcp:PEER", "unix", "http:TOKEN", "scheduler:NAME", "job:ID"; set
    # by the front door, not by the caller (source= is for operate-scope HTTP tokens).
    source: str | None = None
    # Set by the scheduler, not by a request: (schedule name, slot) this job is the run of,
    # recorded with the job in one commit (bgservice.queue.scheduler).
    mark: tuple[str, float] | None = None


@dataclass(frozen=True)
class JobFilter:
    """``queue:list``'s filters: the jobs of this module, of this name (``name=``), with
    this tag among theirs; None: any. Compared exactly."""

    module: str | None = None
    name: str | None = None
    tag: str | None = None

    def __bool__(self) -> bool:
        return not (self.module is None and self.name is None and self.tag is None)

    def matches(self, module: str, name: str | None, tags: Sequence[str]) -> bool:
        return ((self.module is None or module == self.module)
                and (self.name is None or name == self.name)
                and (self.tag is None or self.tag in tags))  # fmt: skip


NO_FILTER = JobFilter()


@dataclass(frozen=True)
class ListSpec:
    state: str | None
    limit: int
    offset: int
    where: JobFilter = NO_FILTER  # limit and offset count the jobs it matches


def parse(data: bytes) -> Command:
    head, _, args = data.partition(b":")
    # Bytes that are not UTF-8, raw or percent-encoded, are kept apart (surrogateescape),
    # so that check_options refuses them: decoded as U+FFFD, unique=%FF and unique=%FE
    # were one key, and two jobs shared it.
    word, _, query = head.decode("utf-8", "surrogateescape").strip().partition("?")
    if word not in COMMANDS:
        raise UnknownQueueRequest()
    if not query:  # the original's forms, and most requests: nothing to parse
        return Command(word, {}, args)
    try:
        pairs = urllib.parse.parse_qsl(
            query, keep_blank_values=True, strict_parsing=True, errors="surrogateescape"
        )
    except ValueError:
        raise BadRequest(f"queue:{word}: options must be name=value&name=value") from None
    check_options(word, pairs)
    command = Command(word, unrepeated(pairs, "option"), args)
    read = READ_OPTIONS.get(word, frozenset())
    if word not in OWN_OPTIONS and (unknown := set(command.options) - read):
        takes = f"options: {', '.join(sorted(read))}" if read else "it takes no options"
        key = sorted(unknown)[0]
        raise BadRequest(f"queue:{word}: unknown option {key!r}{did_you_mean(key, read)} ({takes})")
    return command


def check_options(word: str, pairs: Iterable[tuple[str, str]]) -> None:
    """Each option's name and value text (UTF-8), and each value given: queue:COMMAND's
    query, and what ``request.add_job`` was given, alike."""
    for name, value in pairs:
        if not _is_text(name):  # (shown as sent: the raw bytes would spoil the reply)
            shown = urllib.parse.quote(name, safe="", errors="surrogateescape")
            raise BadRequest(f"option {shown}: its name is not valid UTF-8 text")
        if not value:  # unique= once meant no key, silently; HTTP refuses it too
            if word == "schedule" and name == "name":  # (there is no default name)
                raise BadRequest("option name: empty (a schedule needs a name)")
            raise BadRequest(f"option {name}: empty (leave it out for the default)")
        if not _is_text(value):
            raise BadRequest(f"option {name}: not valid UTF-8 text")


def _is_text(text: str) -> bool:
    """No lone surrogate: what a byte that is not UTF-8 decodes to (surrogateescape),
    and what no store can keep."""
    if text.isascii():  # nearly every option: the cheapest test
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unrepeated(pairs: list[tuple[str, str]], what: str) -> dict[str, str]:
    """Name/value pairs as a dict, each name at most once: ``after=1&after=2`` once kept
    only the last, silently; a repeated name is a mistake worth a 400."""
    found: dict[str, str] = {}
    for name, value in pairs:
        if name in found:
            raise BadRequest(f"{what} {name}: given more than once")
        found[name] = value
    return found


def job_id(command: Command) -> int:
    """``id:N`` (the original's form) or a bare ``N``."""
    text = command.args.decode("utf-8", "replace").strip()  # (echoed as sent in an error)
    if text.startswith("id:"):
        text = text[3:].strip()
    return parse_id(text, f"queue:{command.name}")


def parse_id(text: str, where: str) -> int:
    """A job id: digits, within SQLite's INTEGER range (no job has a larger id)."""
    if not (text.isascii() and text.isdigit()):
        raise BadRequest(f"{where}: expected id:N, got {text[:40]!r}")
    if not text.strip("0"):  # as the clients refuse it: no job has it, and never will
        raise BadRequest(f"{where}: job ids start at 1, got {text[:40]!r}")
    if len(text) > 19 or int(text) > MAX_INT:
        raise BadRequest(f"{where}: job id out of range (at most {MAX_INT})")
    return int(text)


def ascii_number(text: str) -> str:
    """A number's text as written in a request: ASCII, no digit separators, no spaces
    around it (Python's ``int`` and ``float`` take `` 1_000 `` and any script's digits;
    job ids never did). Else ``ValueError``."""
    if not text.isascii() or "_" in text or text != text.strip():
        raise ValueError(text)
    return text


def _number(name: str, text: str, minimum: float = 0.0, above: bool = False) -> float:
    """A finite number of at least ``minimum`` (``above``: greater than it)."""
    try:
        value = float(ascii_number(text))
    except ValueError:
        raise BadRequest(f"option {name}: expected a number, got {text[:40]!r}") from None
    if not math.isfinite(value) or value < minimum or (above and value == minimum):
        bound = "greater than" if above else "of at least"
        raise BadRequest(f"option {name}: must be a finite number {bound} {minimum:g}")
    return value


# The latest time a job may be due: the end of 9999, the last year dates are written in
# (a millisecond timestamp sent as `at` is a typo for a date 50,000 years away).
LATEST_RUN_AT = 253402300799.0


def _run_at(name: str, value: float) -> float:
    if value > LATEST_RUN_AT:
        raise BadRequest(f"option {name}: the time it gives is after the year 9999")
    return value


def _whole(name: str, text: str, minimum: int | None = 0, maximum: int = MAX_INT) -> int:
    """A whole number from ``minimum`` (None: ``-maximum``) to ``maximum``."""
    try:
        value = int(ascii_number(text))
    except ValueError:
        raise BadRequest(f"option {name}: expected a whole number, got {text[:40]!r}") from None
    low = -maximum if minimum is None else minimum
    if not low <= value <= maximum:
        raise BadRequest(f"option {name}: must be between {low} and {maximum}")
    return value


# The Redis engine orders its ready jobs by priority as a double, exact to 2^53: beyond it,
# two priorities would tie there and not in the embedded engine.
MAX_PRIORITY = 2**53 - 1


def _priority(text: str) -> int:
    return _whole("priority", text, None, MAX_PRIORITY)


def parse_add(
    command: Command,
    now: float | None = None,
    source: str | None = None,
    limits: ParseLimits = DEFAULTS,
) -> AddSpec:
    """``queue:add``'s options and ``MODULE:DATA`` as an AddSpec; ``source`` is where the
    request came from (an HTTP operator's ``source`` option takes its place); ``limits``
    the service's ``[queue]`` settings."""
    unknown = sorted(set(command.options) - ADD_OPTIONS)
    if unknown:
        raise BadRequest(
            f"queue:add: unknown option {unknown[0]!r}{did_you_mean(unknown[0], ADD_OPTIONS)} "
            f"(options: {', '.join(sorted(ADD_OPTIONS))})"
        )
    module, data = split_request(command.args)
    if not module:
        raise BadRequest("queue:add: expected queue:add:MODULE:DATA")
    o = command.options
    if not o:  # the original's form: nothing more to check
        return AddSpec(module=module, data=data, source=source)
    run_at = None
    if "delay" in o:
        run_at = _run_at("delay", (now or time.time()) + _number("delay", o["delay"]))
    if "at" in o:
        run_at = _run_at("at", _number("at", o["at"]))
    timeout = _number("timeout", o["timeout"], above=True) if "timeout" in o else None
    return AddSpec(
        module=module,
        data=data,
        priority=_priority(o["priority"]) if "priority" in o else 0,
        run_at=run_at,
        retries=_whole("retries", o["retries"]) if "retries" in o else None,
        backoff=_number("backoff", o["backoff"]) if "backoff" in o else None,
        timeout=timeout,
        unique=o.get("unique") or None,
        after=after_ids(o["after"], limits.max_dependencies) if "after" in o else (),
        wait=_flag("wait", o["wait"]) if "wait" in o else False,
        name=_name(o["name"]) if o.get("name") else None,
        tags=_tags(o["tags"], limits) if o.get("tags") else (),
        source=_name(o["source"]) if o.get("source") else source,
    )


def _name(text: str) -> str:
    if not text.isprintable() or text != text.strip():
        raise BadRequest("option name: printable characters, no blanks around them")
    return text


def _tags(text: str, limits: ParseLimits) -> tuple[str, ...]:
    """``tags=a,b`` -> ("a", "b"): at most max_tags given (a repeat counts, as a list's
    items in the HTTP document), each a ``_tag``, kept once."""
    if text.count(",") >= limits.max_tags:  # (one more tag than commas)
        raise BadRequest(f"option tags: at most {limits.max_tags} tags")
    tags = dict.fromkeys(t.strip() for t in text.split(","))
    return tuple(_tag("tags", "each tag is", t, limits.max_tag_chars) for t in tags)


def _tag(option: str, what: str, tag: str, most: int) -> str:
    """``tag`` if it is 1 to ``most`` of A-Z a-z 0-9 _ . : - (``[queue] max_tag_chars``)."""
    if len(tag) > most or not TAG.fullmatch(tag):
        problem = f"{what} 1-{most} of A-Z a-z 0-9 _ . : - ([queue] max_tag_chars)"
        raise BadRequest(f"option {option}: {problem}, not {tag[:70]!r}")
    return tag


def _flag(name: str, text: str) -> bool:
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise BadRequest(f"option {name}: expected 1 or 0, got {text[:40]!r}")


def parse_retry(command: Command) -> bool:
    """``queue:retry?dependents=1``: the jobs that failed because the job did come back too."""
    text = command.options.get("dependents")
    return text is not None and _flag("dependents", text)


def after_ids(text: str, most: int = MAX_AFTER) -> tuple[int, ...]:
    """``after=1,2,3`` (each N or id:N) -> the job ids, each once, in the order given:
    repeats count once against ``most``, however written (``7``, ``id:7``, ``07``)."""
    ids: dict[int, None] = {}
    for part in dict.fromkeys(part.strip().removeprefix("id:") for part in text.split(",")):
        ids[_whole("after", part, 1)] = None
        if len(ids) > most:
            raise BadRequest(f"option after: at most {most} job ids ([queue] max_dependencies)")
    return tuple(ids)


def parse_list(command: Command, limits: ParseLimits = DEFAULTS) -> ListSpec:
    """``queue:list``'s state, limit (at most ``[queue] max_page``: more is answered as
    that many), offset and filters."""
    state = _given_once(command, "state")
    if state and state not in STATES:
        # (options after the state were read as part of it: say where they go)
        hint = " (options go before the colon: queue:list?limit=N:STATE)" if "?" in state else ""
        raise BadRequest(f"queue:list: state must be one of {', '.join(STATES)}, not "
                         f"{state[:40]!r}{hint}")  # fmt: skip
    limit = _whole("limit", command.options.get("limit", "100"), 1)
    offset = _whole("offset", command.options.get("offset", "0"))
    return ListSpec(state or None, min(limit, limits.max_page), offset, _filter(command, limits))


def _filter(command: Command, limits: ParseLimits) -> JobFilter:
    """``module=``, ``name=`` and ``tag=`` (each given once, not empty: ``parse``), each
    refused when no job could have it: the rules of ``queue:add``'s."""
    module, name, tag = map(command.options.get, ("module", "name", "tag"))
    if module is not None and not MODULE_NAME.fullmatch(module):
        raise BadRequest(f"option module: expected a module name (A-Z a-z 0-9 _ -), "
                         f"not {module[:40]!r}")  # fmt: skip
    if tag is not None:
        _tag("tag", "one tag,", tag, limits.max_tag_chars)
    return JobFilter(module, None if name is None else _name(name), tag)


def _given_once(command: Command, name: str) -> str:
    """What ``queue:list?state=S`` or ``queue:list:S`` gives (``window`` of stats): both at
    once is refused, not one of them ignored."""
    option, text = command.options.get(name), command.args.decode("utf-8", "replace").strip()
    if option is not None and text:
        raise BadRequest(f"queue:{command.name}: {name} given twice (?{name}= and after the colon)")
    return option or text


def parse_window(command: Command) -> float:
    text = _given_once(command, "window")
    return _number("window", text, 1.0) if text else 3600.0
