"""Recurring jobs: what a schedule is, when its runs fall, which of them are due. Pure: no
asyncio, no storage (bgservice.queue.scheduler fires them, the engines store them).

A schedule has *slots*, the moments its runs fall on: every ``every`` seconds (counted
from the Unix epoch, so an hourly schedule fires on the hour), or what a cron expression
gives in its time zone. Firing a slot adds an ordinary job whose unique key is
``schedule:NAME@SLOT``; the engine records the slot as fired in the same transaction (or
Lua script) that adds the job, so that a restart neither loses a slot nor fires it twice,
and of several instances on one Redis exactly one fires it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# cronsim (by the author of healthchecks.io) rather than a parser of our own: it follows
# Debian cron's semantics (day-of-month OR day-of-week, L, LW, #; not W, which it refuses)
# and its DST rules: a job at a fixed hour and minute runs once when clocks go back, and
# at the end of the gap when they go forward; one with * in those fields by the clock.
from cronsim import CronSim, CronSimError

from bgservice.errors import BadRequest, did_you_mean
from bgservice.queue.commands import AddSpec, Command, parse_add

MISSED = ("skip", "once")
FLAGS = {True: True, False: False, "1": True, "0": False, "true": True, "false": False,
         "yes": True, "no": False}  # fmt: skip
# A fixed bound, not a setting (docs/protocol.md, Limits): a name is an identifier, and it
# is in every run's unique key (schedule:NAME@SLOT, at most 88 characters, whatever
# [queue] max_name_chars says: that bounds what clients send).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A slot fired up to this late still counts as on time for missed = "skip" (a timer that
# fired late, a restart within the minute); older ones were missed.
GRACE = 60.0
# Job options a schedule may carry (queue:add's, less those that make no sense per run).
OPTIONS = frozenset({"priority", "retries", "backoff", "timeout"})
# The keys of a schedule besides those options: all of them in a [[schedule]] table; at
# run time module and data are the request's, and there is no options table.
KEYS = ("name", "module", "data", "cron", "every", "tz", "missed", "paused", "options")
RUN_TIME_KEYS = ("name", "cron", "every", "tz", "missed", "paused")
# Debian cron's nicknames, as the five fields they stand for (@reboot has no slots).
ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}  # fmt: skip
# Missed slots are counted for the log up to this many (a cron schedule's slots cost a
# step of CronSim each, 10 us: a minutely one down for a month took half a second).
COUNT_MAX = 1000


class BadSchedule(BadRequest):
    """A schedule that cannot be made (a 400); ``key`` is the option, or the key of its
    ``[[schedule]]`` table, at fault, so that a config error points at its line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Schedule:
    name: str
    module: str
    data: bytes = b""
    cron: str | None = None
    every: float | None = None
    tz: str = "UTC"
    missed: str = "once"
    options: dict[str, str] = field(default_factory=dict)
    paused: bool = False
    origin: str = "runtime"  # "config": defined in service.config, replaced at each start
    # Who paused it: "config" (paused = true there: it holds while the config says so) or
    # "runtime" (queue:pause, or paused=1 when added: it holds across restarts and config
    # changes until queue:resume); None while it runs, or stored by an older version.
    paused_by: str | None = None
    # When it was last resumed (queue:resume, or the config's pause lifted): no slot up to
    # then fires, and the last slot fired before its pause stays its last (None: never).
    resumed: float | None = None

    def next_slot(self, after: float) -> float:
        """The first slot strictly after ``after`` (Unix time)."""
        if self.every is not None:
            # Slot n is n * every; the quotient rounds either way for a fractional every
            # (1.1 s), so the slot number is corrected until it is strictly after.
            n = math.floor(after / self.every) + 1
            while n * self.every <= after:
                n += 1
            while (n - 1) * self.every > after:
                n -= 1
            return n * self.every
        return next(self._cron_slots(after))

    def _cron_slots(self, after: float) -> Iterator[float]:
        """Its cron slots strictly after ``after``, in order."""
        assert self.cron is not None
        for moment in CronSim(self.cron, datetime.fromtimestamp(after, ZoneInfo(self.tz))):
            # A job at a fixed hour and minute is worked out in wall-clock time, without
            # the fold: from the second pass of an hour the clocks repeat, that hour's slot
            # is its first pass's, before ``after`` (Debian cron runs it once: passed).
            if (slot := moment.timestamp()) > after:
                yield slot

    def latest_slot(self, now: float) -> float:
        """The last slot at or before ``now``."""
        if self.every is not None:
            n = math.floor(now / self.every)
            while n * self.every > now:
                n -= 1
            while (n + 1) * self.every <= now:
                n += 1
            return n * self.every
        assert self.cron is not None
        # A microsecond on, so that a slot at ``now`` itself counts (going back, CronSim
        # starts before its moment). Added in UTC: an aware datetime plus a timedelta has
        # fold 0, so a moment in the second pass of a repeated hour read as the first pass,
        # an hour earlier, and a restart there fired each slot of that hour (61 jobs).
        moment = datetime.fromtimestamp(math.floor(now), UTC) + timedelta(microseconds=1)
        slots = CronSim(self.cron, moment.astimezone(ZoneInfo(self.tz)), reverse=True)
        latest = next(slots).timestamp()
        # Going back works a fixed hour and minute out in wall-clock time: from a repeated
        # hour's second pass it misses that hour's first-pass slot. Checked forward, which
        # knows the fold (one step when it was right).
        while (following := self.next_slot(latest)) <= now:
            latest = following
        return latest

    def is_slot(self, moment: float) -> bool:
        """Whether ``moment`` is one of its slots (one step of CronSim, not two)."""
        if self.every is not None:
            return self.latest_slot(moment) == moment
        return self.next_slot(moment - 1) == moment  # (cron slots are whole minutes)

    def missed_slots(self, last: float, slot: float) -> int:
        """How many slots before ``slot`` do not run, given the last one fired (or the
        moment it was made, or resumed): those in (since(last), slot); up to COUNT_MAX."""
        since = self.since(last)
        if self.every is not None:
            first = self.next_slot(since)
            return 0 if first >= slot else min(round((slot - first) / self.every), COUNT_MAX)
        count = 0
        for moment in self._cron_slots(since):
            if moment >= slot or count == COUNT_MAX:
                break
            count += 1
        return count

    def since(self, last: float) -> float:
        """After when its slots fire, given the last one fired (or the moment it was
        made): after that, and after it was last resumed."""
        return last if self.resumed is None else max(last, self.resumed)

    def due(self, last: float, now: float) -> float | None:
        """The slot to fire now, if any, given the last one fired (or the moment the
        schedule was made): the latest slot in (since(last), now]. With ``missed =
        "skip"`` only if it is within ``GRACE`` of now; with ``"once"`` whatever its age
        (slots missed while the service was down run once, not once each)."""
        following = self.next_slot(self.since(last))
        if following > now:
            return None
        # On time, the slot after last is the latest: one step of CronSim, not two.
        latest = following if self.next_slot(following) > now else self.latest_slot(now)
        if self.missed == "skip" and now - latest > GRACE:
            return None
        return latest

    @property
    def times(self) -> tuple[str | None, float | None, str]:
        """What its slots are worked out from: a change of these makes it a new schedule
        (its slots start after the change), a change of its job's options does not."""
        return self.cron, self.every, self.tz

    def unique_key(self, slot: float) -> str:
        return f"schedule:{self.name}@{slot:.3f}"

    @property
    def source(self) -> str:
        """Where its jobs are added from, as they record it (and QUEUE_FROM checks)."""
        return f"scheduler:{self.name}"

    def spec(self, slot: float | None) -> AddSpec:
        """The job of one run: of ``slot`` (its unique key and mark name the slot), or
        None for a run now (``queue:fire``), which is an ordinary job."""
        request = self.module.encode() + b":" + self.data
        spec = parse_add(Command("add", dict(self.options), request))
        spec = dataclasses.replace(spec, source=self.source)
        if slot is None:
            return spec
        return dataclasses.replace(spec, unique=self.unique_key(slot), mark=(self.name, slot))

    def stored(self) -> str:
        """The definition as stored (JSON), without its runtime state."""
        values = asdict(self)
        values["data"] = self.data.decode("latin-1")
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_stored(cls, text: str | bytes) -> Schedule:
        values = json.loads(text)
        values["data"] = values["data"].encode("latin-1")
        return cls(**values)

    def describe(
        self, last: float | None, now: float, upcoming: float | None = None,
        last_is_slot: bool | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """As listed. ``upcoming``: its next slot after ``last`` (or GRACE before now), if
        known; ``last_is_slot``: whether ``last`` is a slot, if known (a cron schedule's
        slots cost a CronSim each: 1,000 listed took 33 ms)."""
        since = now if last is None else self.since(last)
        if not self.paused and (upcoming is None or upcoming <= now or since > now):
            upcoming = self.next_slot(max(now, since))
        if last_is_slot is None:
            last_is_slot = last is not None and self.is_slot(last)
        return {
            "name": self.name,
            "module": self.module,
            "cron": self.cron,
            "every": self.every,
            "tz": self.tz,
            "missed": self.missed,
            "options": self.options,
            "paused": self.paused,
            "origin": self.origin,
            # ``last`` is the moment it was made until a slot fires: not a slot, not shown.
            "last_slot": last if last_is_slot else None,
            "next_run": None if self.paused else upcoming,
        }


def _no_stray(name: str, values: dict[str, Any], keys: tuple[str, ...]) -> None:
    """A key no schedule takes, refused first: evrey = 60 was "give either cron or every",
    nmae=a "name must be ...": what the typo left out, not the typo."""
    stray = sorted(set(values) - {*KEYS, *OPTIONS})
    if stray:
        raise _unknown(name, stray[0], {*keys, *OPTIONS})


def _unknown(name: str, key: str, known: set[str]) -> BadSchedule:
    """A key a schedule does not take, the nearest one it does first (a typo)."""
    guess, keys = did_you_mean(key, known), ", ".join(sorted(known))
    label = f"schedule {name:.64}" if name else "schedule"
    return BadSchedule(key, f"{label}: unknown key {key!r:.40}{guess} (keys: {keys})")


# The TOML type of each key of a [[schedule]] table, as every other key of service.config
# is typed: data = { user = "bob" } was sent as Python's repr of the table, true as
# "True", and every = "60" or name = 7 were taken (a number, a string over HTTP).
_NUMBER = (int, float)
_TABLE_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "module": (str,), "data": (str,), "cron": (str,), "tz": (str,),
    "missed": (str,), "every": _NUMBER, "paused": (bool,), "options": (dict,),
    **dict.fromkeys(OPTIONS, _NUMBER),
}  # fmt: skip
_TOML = {str: "a string", bool: "true or false", dict: "a table", list: "an array",
         int: "a number", float: "a number"}  # fmt: skip


def table_schedule(table: dict[str, Any]) -> Schedule:
    """A ``[[schedule]]`` table's schedule: each key of the TOML type it takes (an
    option's in ``options`` too), then checked as ``make_schedule`` checks every one."""
    values, name = dict(table), table.get("name")
    label = f"schedule {name:.64}" if isinstance(name, str) else "schedule"
    options = values.get("options")
    tabled = options.items() if isinstance(options, dict) else ()
    for where, key, value in [*((k, k, values.get(k)) for k in _TABLE_TYPES),
                              *(("options", k, v) for k, v in tabled if k in OPTIONS)]:  # fmt: skip
        kinds = _TABLE_TYPES[key]
        if value is None or (isinstance(value, kinds) and (bool in kinds) == (type(value) is bool)):
            continue
        given = _TOML.get(type(value), type(value).__name__)  # (a date-time: datetime)
        raise BadSchedule(where, f"{label}: {key} must be {_TOML[kinds[0]]}, not {given}")
    return make_schedule(values, values.pop("data", "").encode(), "config")


def make_schedule(values: dict[str, Any], data: bytes, origin: str = "runtime") -> Schedule:
    """A checked schedule from a ``[[schedule]]`` table or ``queue:schedule`` options;
    ``BadSchedule`` naming what is wrong, and the key it is wrong in."""
    values = dict(values)
    name = str(values.pop("name", "") or "")
    keys = KEYS if origin == "config" else RUN_TIME_KEYS
    _no_stray(name, values, keys)
    if not NAME.fullmatch(name):
        raise BadSchedule(
            "name",
            "schedule: name must be 1-64 letters, digits, '_', '.' or '-' "
            f"(starting with a letter or digit), got {name[:70]!r}",
        )
    module = str(values.pop("module", "") or "")
    if not module or ":" in module:
        raise BadSchedule("module", f"schedule {name}: module is missing or has a ':'")
    cron, every, tz = _timing(name, values)
    missed = str(values.pop("missed", "once"))
    if missed not in MISSED:
        problem = f"missed must be one of {', '.join(MISSED)}"
        raise BadSchedule("missed", f"schedule {name}: {problem}")
    paused = values.pop("paused", False)
    options = values.pop("options", None) or {}
    if not isinstance(options, dict):
        problem = "options must be a table of queue:add options"
        raise BadSchedule("options", f"schedule {name}: {problem}")
    tabled = set(options)  # given in the options table (a key of its own wins)
    own = {k: values.pop(k) for k in list(values) if k in OPTIONS}
    options.update(own)
    if values:
        raise _unknown(name, sorted(values)[0], {*keys, *OPTIONS})
    unknown = set(options) - OPTIONS
    if unknown:
        problem = f"option {sorted(unknown)[0]!r} is not one of {', '.join(sorted(OPTIONS))}"
        raise BadSchedule("options", f"schedule {name}: {problem}")
    flag = paused.lower() if isinstance(paused, str) else paused
    if not isinstance(flag, (bool, str)) or flag not in FLAGS:  # "maybe" was false, silently
        problem = f"paused must be true or false, got {paused!r:.40}"
        raise BadSchedule("paused", f"schedule {name}: {problem}")
    paused = FLAGS[flag]
    schedule = Schedule(
        name=name,
        module=module,
        data=data,
        cron=cron,
        every=every,
        tz=tz,
        missed=missed,
        options={k: str(v) for k, v in options.items()},
        paused=paused,
        origin=origin,
        paused_by=origin if paused else None,
    )
    for key, value in schedule.options.items():  # each value, as queue:add checks it
        try:
            parse_add(Command("add", {key: value}, module.encode() + b":"))
        except BadRequest as exc:
            where = "options" if key in tabled and key not in own else key
            raise BadSchedule(where, f"schedule {name}: {exc.message}") from None
    return schedule


def _timing(name: str, values: dict[str, Any]) -> tuple[str | None, float | None, str]:
    """``cron`` or ``every``, and ``tz``, checked (and taken out of ``values``)."""
    cron, every = values.pop("cron", None), values.pop("every", None)
    if (cron is None) == (every is None):
        problem = "give either cron or every, not both or neither"
        raise BadSchedule("every" if every is not None else "cron", f"schedule {name}: {problem}")
    if every is not None:
        # Another zone was taken, and ignored: every counts seconds of the epoch. (UTC is
        # what its listing shows, and true: every = 86400 fires at 00:00 UTC.)
        if str(values.pop("tz", "UTC")) != "UTC":
            problem = "tz is for cron schedules (every counts seconds, in no time zone)"
            raise BadSchedule("tz", f"schedule {name}: {problem}")
        return None, _seconds(name, every), "UTC"
    tz = str(values.pop("tz", "UTC"))
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadSchedule("tz", f"schedule {name}: unknown time zone {tz[:60]!r}") from None
    cron = ALIASES.get(str(cron).strip().lower(), str(cron))
    if len(cron.split()) != 5:  # cronsim reads six as seconds first, Quartz as seconds too
        raise BadSchedule(
            "cron",
            f"schedule {name}: bad cron expression {cron[:60]!r}: five fields "
            "(minute hour day-of-month month day-of-week), or one of "
            f"{', '.join(ALIASES)}",
        )
    try:
        next(iter(CronSim(cron, datetime.now(ZoneInfo(tz)))))
    except (CronSimError, StopIteration) as exc:
        problem = f"bad cron expression {cron[:60]!r}: {exc}"
        raise BadSchedule("cron", f"schedule {name}: {problem}") from None
    return cron, None, tz


# A fixed sanity bound, not a setting (docs/protocol.md, Limits): longer than a year, a
# cron expression says it better.
EVERY_MAX = 366 * 86400.0


def _seconds(name: str, value: Any) -> float:
    problem = "every must be a number of seconds"
    try:
        if isinstance(value, bool):  # TOML's true was float(True): every second
            raise TypeError(problem)
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):  # (an integer of 400 digits)
        raise BadSchedule("every", f"schedule {name}: {problem}") from None
    if not math.isfinite(seconds) or not 1 <= seconds <= EVERY_MAX:
        problem = f"every must be 1 to {EVERY_MAX:.0f} seconds (a year)"
        raise BadSchedule("every", f"schedule {name}: {problem}")
    return seconds
