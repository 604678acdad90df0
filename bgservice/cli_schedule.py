"""``bgservice schedule ...``: recurring jobs from the shell (docs/queue.md, Schedules)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping, Sequence
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from bgservice import cli_format
from bgservice.cli_client import (
    JSON,
    MODULE,
    TEXT,
    _data,
    _echo,
    _show,
    _talking,
    client_options,
)


@click.group()
@client_options
def schedule() -> None:
    """Recurring jobs: list, add, pause, resume, remove, run now."""


@schedule.command("list", short_help="Every schedule: when it runs, its next and last run.")
@JSON
@client_options
def schedule_list(as_json: bool) -> None:
    """Every schedule: when it runs, its next run, the last slot it fired."""
    with _talking() as client:
        _show(client.schedules(), as_json, schedules_lines, time.time())


@schedule.command("add", short_help="Add (or replace) schedule NAME: a job of MODULE.")
@click.argument("name", type=TEXT)
@MODULE
@click.argument("data", required=False)
@click.option("--cron", type=TEXT, help='A cron expression, e.g. "0 3 * * *" (03:00 every day).')
@click.option("--every", type=float, help="Or: every this many seconds (at least 1).")
@click.option("--tz", type=TEXT, help="Time zone of the cron expression, e.g. Europe/Berlin [UTC].")
@click.option(
    "--missed",
    type=click.Choice(["once", "skip"]),
    help="Runs missed while the service was down: the latest once [once], or skip them.",
)
@click.option("--paused", is_flag=True, default=None, help="Add it paused.")
@click.option("--priority", type=int, help="Its jobs' priority.")
@click.option("--retries", type=int, help="Its jobs' retries after a 5xx.")
@click.option("--backoff", type=float, help="Its jobs' first retry delay (s; doubles).")
@click.option("--job-timeout", "job_timeout", type=float, help="Its jobs' own timeout (s).")
@JSON
@client_options
def schedule_add(
    name: str, module: str, data: str | None, job_timeout: float | None, as_json: bool,
    **options: Any,
) -> None:  # fmt: skip
    """Add (or replace) schedule NAME: a job of MODULE with DATA, by --cron or --every."""
    if (options["cron"] is None) == (options["every"] is None):  # a usage error, exit 2
        raise click.UsageError("give either --cron or --every")  # (not the service's 400)
    with _talking(module) as client:  # (an unknown module: the hint, as queue add's)
        made = client.schedule(name, module, _data(data), timeout=job_timeout, **options)
    _show([made], as_json, schedules_lines, time.time())


def _named(command: str, doc: str) -> None:
    @schedule.command(command, help=doc)
    @click.argument("name", type=TEXT)
    @client_options
    def run(name: str) -> None:
        with _talking() as client:
            if command == "remove":
                client.unschedule(name)
                _echo("removed")
            elif command == "run":
                _echo(client.fire(name))
            else:
                changed = client.pause(name) if command == "pause" else client.resume(name)
                _echo("\n".join(schedules_lines([changed], time.time())))


_named("pause", "Stop firing schedule NAME (its definition stays).")
_named("resume", "Fire schedule NAME again, from its next slot.")
_named("remove", "Remove schedule NAME (those of service.config are removed there).")
_named("run", "Run schedule NAME's job now (an ordinary job); prints its id.")


def schedules_lines(schedules: Sequence[Mapping[str, Any]], now: float) -> list[str]:
    """A row per schedule; its times in its own zone when it has a cron expression (whose
    hours are that zone's), else in the host's: each with its zone named."""
    if not schedules:
        return ["no schedules"]
    rows = [
        (
            s["name"],
            s["module"],
            s["cron"] or f"every {cli_format.span(s['every'])}",
            s["tz"] if s["cron"] else "",
            "paused" if s["paused"] else cli_format.zoned(s["next_run"], now, _zone(s)),
            cli_format.zoned(s["last_slot"], now, _zone(s)) if s["last_slot"] else "-",
            s["origin"],
        )
        for s in schedules
    ]
    headers = ("name", "module", "when", "tz", "next run", "last fired", "from")
    return cli_format.table(headers, rows)


def _zone(schedule: Mapping[str, Any]) -> dt.tzinfo | None:
    """A cron schedule's zone; None (the host's) for an every schedule, or for a zone this
    host's time zone database does not have (the time is then still right, and named)."""
    try:
        return ZoneInfo(schedule["tz"]) if schedule["cron"] else None
    except (ZoneInfoNotFoundError, ValueError):
        return None
