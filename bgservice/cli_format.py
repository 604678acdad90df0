"""What the shell commands print for a person: the service's JSON as aligned tables,
times as local date-times with ages, and durations. Pure: values in, lines out (the
commands' ``--json`` prints the JSON itself, for scripts).

Every function takes ``now`` (epoch seconds) so that output is testable and one screen of
``bgservice top`` shows one instant.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Row = Sequence[object]
EMPTY = "-"


def span(seconds: float) -> str:
    """A length of time as a person reads it: ``850 ms``, ``4.2 s``, ``3 min 5 s``, ``2 h 4
    min``, ``3 d 2 h`` (two units at most: the rest is noise)."""
    seconds = abs(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    whole = int(seconds)
    parts: list[str] = []
    for name, size in units:
        if whole >= size or parts:
            parts.append(f"{whole // size} {name}")
            whole %= size
        if len(parts) == 2:
            break
    return " ".join(p for p in parts if not p.startswith("0 ")) or "0 s"


def age(when: float | None, now: float) -> str:
    """``5 s ago``, ``in 10 min`` or ``now``; ``-`` for no time."""
    if when is None:
        return EMPTY
    if abs(when - now) < 0.0005:  # (would read "0 ms ago")
        return "now"
    # (A run 107 ms away once read "107 ms ago": the future began half a second on.)
    return f"in {span(when - now)}" if when > now else f"{span(now - when)} ago"


def moment(when: float | None, now: float) -> str:
    """A local date-time and its age: ``2026-12-03 09:12:14 (5 s ago)``."""
    return _dated(when, now, None, "%Y-%m-%d %H:%M:%S")


def zoned(when: float | None, now: float, zone: dt.tzinfo | None) -> str:
    """A date-time in ``zone`` (the host's if None), the zone named, and its age:
    ``2026-12-05 02:30:00 CET (in 9 h 16 min)``, for rows that may be in different zones."""
    return _dated(when, now, zone, "%Y-%m-%d %H:%M:%S %Z")


def _dated(when: float | None, now: float, zone: dt.tzinfo | None, form: str) -> str:
    if when is None:
        return EMPTY
    try:
        # astimezone(None): the host's zone as it was at ``when`` (summer time or not).
        text = dt.datetime.fromtimestamp(when).astimezone(zone).strftime(form)
    except (ValueError, OverflowError, OSError):  # past the year 9999 (an older service's job)
        return f"{when:.0f} (Unix time)"
    return f"{text} ({age(when, now)})"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _one_line(value: object) -> str:
    return EMPTY if value is None else " / ".join(str(value).splitlines())


def table(headers: Row, rows: Iterable[Row]) -> list[str]:
    """Aligned columns, numbers right-aligned; ``None`` shows as ``-``; a value of several
    lines (an error with its traceback) on one, its lines joined by `` / ``."""
    values = [list(row) for row in rows]
    cells = [[_one_line(v) for v in row] for row in values]
    numeric = [bool(values) and all(_is_number(r[i]) for r in values) for i in range(len(headers))]
    widths = [max([width(str(h)), *(width(c[i]) for c in cells)]) for i, h in enumerate(headers)]
    lines = []
    for row in [[str(h) for h in headers], *cells]:
        padded = []
        for i, cell in enumerate(row):
            blank = " " * (widths[i] - width(cell))
            padded.append(blank + cell if numeric[i] else cell + blank)
        lines.append("  ".join(padded).rstrip())
    return lines


def width(text: str) -> int:
    """Columns ``text`` takes on a terminal: two for a wide character (CJK: a name such as
    日本語 put every column after it out of line), none for a combining mark. The stdlib's
    East Asian Width table serves a table's cells; wcwidth would be a dependency for it."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)  # fmt: skip


def pairs(items: Iterable[tuple[str, object]]) -> list[str]:
    """``key: value`` lines with the values aligned."""
    items = [(k, EMPTY if v is None else str(v)) for k, v in items]
    width = max((len(k) for k, _ in items), default=0)
    return [f"{k + ':':{width + 1}} {v}" for k, v in items]


def bar(done: float, total: float, width: int = 20) -> str:
    """``[########------------]  40%``"""
    share = min(max(done / total, 0.0), 1.0) if total else 0.0
    filled = round(share * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {share * 100:3.0f}%"


def progress(value: Mapping[str, Any] | None, width: int = 20) -> str:
    if not value:
        return EMPTY
    text = bar(value.get("done") or 0, value.get("total") or 0, width)
    return f"{text} {value['message']}" if value.get("message") else text


# --- the commands' output -----------------------------------------------------------------


def stats_lines(stats: Mapping[str, Any]) -> list[str]:
    """``bgservice stats``: the service's counters, then requests per module and transport."""
    lag = stats.get("loop_lag_ms") or {}
    udp = stats.get("udp") or {}
    reloads = stats.get("reloads") or {}
    conns = stats.get("connections") or {}
    threads = stats.get("threads") or {}
    lines = pairs([
        ("uptime", span(stats.get("uptime") or 0)),
        ("requests", f"{stats.get('requests', 0)} ({stats.get('errors', 0)} errors)"),
        ("in flight", _counts(stats.get("in_flight") or {})),
        ("connections", f"{conns.get('open', 0)} open, {conns.get('total', 0)} in all"),
        ("refused", _counts(stats.get("refused") or {})),
        ("udp", f"{udp.get('received', 0)} received, {udp.get('dropped', 0)} dropped"),
        ("reloads", f"{reloads.get('ok', 0)} ok, {reloads.get('failed', 0)} failed"),
        ("loop lag", f"{lag.get('last', 0):g} ms now, {lag.get('max', 0):g} ms at most"),
        ("threads", f"{threads.get('busy', 0)} of {threads.get('size', 0)} busy, "
                    f"{threads.get('stuck', 0)} stuck (up to {threads.get('stuck_limit', 0)} "
                    "replaced)"),
        ("workers", _workers(stats.get("workers") or {})),
        ("alerts", _alerts(stats["alerts"]) if "alerts" in stats else "off"),
    ])  # fmt: skip
    rows = [
        (name, transport, counts.get("requests", 0), counts.get("errors", 0))
        for name, by_transport in sorted((stats.get("modules") or {}).items())
        for transport, counts in sorted(by_transport.items())
    ]
    if rows:
        lines += ["", *table(("module", "via", "requests", "errors"), rows)]
    return lines


def _counts(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _workers(pools: Mapping[str, Mapping[str, int]]) -> str:
    """Per process-mode module: ``resize 2 of 2 busy (5 started, 3 waiting, 1 retiring)``."""
    parts = []
    for name, pool in sorted(pools.items()):
        retiring = f", {pool['waiting']} waiting" if pool.get("waiting") else ""
        retiring += f", {pool['retiring']} retiring" if pool.get("retiring") else ""
        busy = f"{pool.get('busy', 0)} of {pool.get('processes', 0)} busy"
        parts.append(f"{name} {busy} ({pool.get('started', 0)} started{retiring})")
    return ", ".join(parts) or "none"


def _alerts(alerts: Mapping[str, Any]) -> str:
    outcomes = ("sent", "summarised", "failed", "dropped", "held")
    return f"{alerts.get('raised', 0)} raised: " + ", ".join(
        f"{alerts.get(k, 0)} {k}" for k in outcomes
    )


def modules_lines(modules: Sequence[Mapping[str, Any]], now: float) -> list[str]:
    """``bgservice modules``: one row per module; the error of one that failed to load."""
    rows = [
        (
            m["name"],
            m["state"],
            ",".join(m.get("accepts") or []) or EMPTY,
            m.get("execution"),
            span(m["timeout"]) if m.get("timeout") else None,
            age(m.get("loaded_at"), now),
            m.get("reloads", 0),
            (m.get("error") or "")[:80],
        )
        for m in modules
    ]
    headers = ("module", "state", "accepts", "runs in", "timeout", "loaded", "reloads", "error")
    return table(headers, rows)


def job_lines(job: Mapping[str, Any], now: float) -> list[str]:
    """``bgservice queue status ID``: one job, a line per field, each field of the JSON
    (name, tags, source, throttled_until and more were once left out; one this does not
    know, from a newer service, comes last, as it is)."""
    tries = f"{job.get('attempts', 0)} of {1 + (job.get('max_retries') or 0)}"
    # Labels of at most 12 characters ("throttled", not "throttled until"): a longer one
    # would move every value's column, and scripts that read the text with it.
    lines = [
        ("job", job["id"]), ("module", job["module"]), ("name", job.get("name")),
        ("tags", ", ".join(job.get("tags") or []) or None), ("state", job["state"]),
        ("priority", job.get("priority")), ("position", job.get("position")),
        ("progress", progress(job.get("progress"))), ("attempts", tries),
        ("interrupted", job.get("interruptions") or None), ("source", job.get("source")),
        ("created", moment(job.get("created"), now)), ("runs at", moment(job.get("run_at"), now)),
        ("throttled", _until(job.get("throttled_until"), now)),
        ("started", moment(job.get("started"), now)),
        ("finished", moment(job.get("finished"), now)),
        ("duration", span(job["duration"]) if job.get("duration") is not None else None),
        ("timeout", span(job["timeout"]) if job.get("timeout") else None),
        ("unique", job.get("unique")), ("after", job.get("after")),
        ("status", job.get("status")), ("error", job.get("error")),
        ("cancel asked", "yes" if job.get("cancel_requested") else None),
        ("checkpoint", job.get("checkpoint")),
    ]  # fmt: skip
    others = [(k.replace("_", " "), v) for k, v in job.items() if k not in JOB_FIELDS]
    return pairs([*lines, *others])


def _until(when: float | None, now: float) -> str | None:
    return None if when is None else f"until {moment(when, now)}"


# The queue:status fields job_lines shows in its own way (max_retries: in "attempts").
JOB_FIELDS = frozenset({
    "id", "module", "name", "tags", "state", "priority", "position", "progress", "attempts",
    "max_retries", "interruptions", "source", "created", "run_at", "throttled_until",
    "started", "finished", "duration", "timeout", "unique", "after", "status", "error",
    "cancel_requested", "checkpoint",
})  # fmt: skip


def jobs_lines(listing: Mapping[str, Sequence[Mapping[str, Any]]], now: float,
               counts: Mapping[str, int] | None = None, offset: int = 0) -> list[str]:  # fmt: skip
    """``bgservice queue list``: every job listed, grouped by state as the service sent them,
    then, for a state with more jobs than the page showed (``counts``: queue:stats'), how
    many more and how to see them (the page was cut at 100 without a word)."""
    rows = [_job_row(job, now) for jobs in listing.values() for job in jobs]
    headers = ("id", "state", "module", "prio", "tries", "created", "when", "error")
    lines = table(headers, rows) if rows else ["no jobs"]
    for state, jobs in listing.items():
        more = (counts or {}).get(state, 0) - offset - len(jobs)
        if jobs and more > 0:
            lines.append(f"{more} more {state} (bgservice queue list {state} "
                         f"--offset {offset + len(jobs)})")  # fmt: skip
    return lines


def _job_row(job: Mapping[str, Any], now: float) -> Row:
    state = job["state"]
    if state == "running":
        when = f"running {span(now - job['started'])}" if job.get("started") else "running"
    elif state == "waiting":
        when = f"due {age(job['run_at'], now)}" if job.get("run_at", 0) > now else "due now"
    else:
        when = f"ended {age(job.get('finished'), now)}"
    module = job["module"] + (f" ({job['name']})" if job.get("name") else "")
    return (job["id"], state, module, job.get("priority", 0), job.get("attempts", 0),
            age(job.get("created"), now), when, (job.get("error") or "")[:60])  # fmt: skip


def queue_stats_lines(stats: Mapping[str, Any], now: float) -> list[str]:
    """``bgservice queue stats``: counts, the oldest waiting job, throughput, busy hours."""
    window = stats.get("window") or {}
    oldest = stats.get("oldest_waiting_age")
    lines = pairs([
        ("jobs", _counts(stats.get("counts") or {})),
        ("oldest waiting", span(oldest) if oldest is not None else None),
        ("finished", f"{stats.get('finished_per_minute', 0)} per minute"),
        ("workers", _queue_workers(stats) if "workers" in stats else None),
        (f"last {span(window.get('seconds') or 0)}",
         f"{window.get('runs', 0)} runs ({_counts(window.get('outcomes') or {})}), "
         f"busy {span(window.get('busy_seconds') or 0)}"),
    ])  # fmt: skip
    hours = [
        (moment(h["hour"], now).split(" (")[0][:-3], h.get("runs", 0),
         span(h.get("busy_seconds") or 0))
        for h in window.get("by_hour") or []
    ]  # fmt: skip
    if hours:
        lines += ["", *table(("hour from", "runs", "busy"), hours)]
    return lines


# --- bgservice top --------------------------------------------------------------------------


def top_lines(view: Mapping[str, Any], now: float, width: int = 100, height: int = 40) -> list[str]:
    """One screen of ``bgservice top``. ``view`` holds ``address``, ``stats``,
    ``queue_stats``, ``running`` and ``waiting`` (job lists) and ``rate`` (requests/s, or
    None before a second sample). Cut to ``height`` lines and ``width`` columns."""
    stats, queue = view["stats"], view["queue_stats"]
    counts = queue.get("counts") or {}
    rate = view.get("rate")
    lines = [
        f"bgservice {view['address']}   up {span(stats.get('uptime') or 0)}   "
        + dt.datetime.fromtimestamp(now).strftime("%H:%M:%S"),
        f"requests {EMPTY if rate is None else f'{rate:.1f}/s'}   "
        f"in flight {sum((stats.get('in_flight') or {}).values())}   "
        f"connections {(stats.get('connections') or {}).get('open', 0)}   "
        f"loop lag {(stats.get('loop_lag_ms') or {}).get('last', 0):g} ms",
        _jobs_line(queue),
        "",
    ]
    lines += _running_lines(view["running"], now, width)
    lines += ["", *_waiting_lines(view["waiting"], counts.get("waiting", 0), now)]
    if len(lines) > height:
        lines = [*lines[: height - 1], f"... {len(lines) - height + 1} more lines"]
    return [line[:width] for line in lines]


def _queue_workers(queue: Mapping[str, Any], noun: str = "") -> str:
    """The workers the counts are of (on Redis, every instance's), with this instance's
    beside them, and how many of its own handlers past their job's timeout hold."""
    here, every = queue.get("workers", EMPTY), queue.get("cluster_workers")
    shared = every is not None and every != here
    notes = [f"{here} here"] if shared else []
    if held := queue.get("workers_held"):
        notes.append(f"{held} held past a timeout" + (" here" if shared else ""))
    return f"{every if shared else here}{noun}" + (f" ({', '.join(notes)})" if notes else "")


def _jobs_line(queue: Mapping[str, Any]) -> str:
    if "unavailable" in queue:  # (its Redis away: the service answers, its queue cannot)
        return f"jobs: queue unavailable ({queue['unavailable']})"
    counts, oldest = queue.get("counts") or {}, queue.get("oldest_waiting_age")
    return (
        f"jobs: {counts.get('running', 0)} running on {_queue_workers(queue, ' workers')}"
        f", {counts.get('waiting', 0)} waiting"
        + (f" (oldest {span(oldest)})" if oldest is not None else "")
        + f", {queue.get('finished_per_minute', 0)} finished/min, "
        f"{counts.get('failed', 0)} failed"
    )


def _running_lines(running: Sequence[Mapping[str, Any]], now: float, width: int) -> list[str]:
    if not running:
        return ["running: none"]
    bar_width = max(10, min(30, width - 60))
    rows = [
        (job["id"], job["module"], span(now - job["started"]) if job.get("started") else None,
         progress(job.get("progress"), bar_width))
        for job in running
    ]  # fmt: skip
    return ["running:", *table(("id", "module", "for", "progress"), rows)]


def _waiting_lines(waiting: Sequence[Mapping[str, Any]], total: int, now: float) -> list[str]:
    """Waiting jobs counted per module (of those listed), with how many are not yet due."""
    if not total:
        return ["waiting: none"]
    per: dict[str, list[int]] = {}
    for job in waiting:
        ready_delayed = per.setdefault(job["module"], [0, 0])
        ready_delayed[(job.get("run_at") or 0) > now] += 1
    rows = sorted(((m, r + d, r, d) for m, (r, d) in per.items()), key=lambda row: -row[1])
    shown = f" ({len(waiting)} listed)" if len(waiting) < total else ""
    return [f"waiting: {total}{shown}",
            *table(("module", "waiting", "due", "delayed"), rows)]  # fmt: skip
