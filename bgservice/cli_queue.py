"""``bgservice queue ...``: the job queue from the shell (docs/queue.md): add, get, check,
status, cancel, retry, list, stats. Thin, as cli_client's commands: each one or two
``Client`` methods, the same exit codes."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import click

from bgservice import cli_format, cli_top
from bgservice.cli_client import (
    JOB_ID,
    JSON,
    MODULE,
    TAG,
    TEXT,
    _data,
    _echo,
    _json_out,
    _out,
    _show,
    _talking,
    _timeout,
    client_options,
)
from bgservice.client import ClientTimeout, ReplyTooLarge, ServiceDown
from bgservice.errors import ReplyError


@click.group()
@client_options
def queue() -> None:
    """The job queue (docs/queue.md)."""


@queue.command("add", short_help="Queue a job of MODULE with DATA; print its id.")
@MODULE
@click.argument("data", required=False)
@click.option("--priority", type=int, help="Higher runs first.")
@click.option("--delay", type=float, help="Seconds to wait before it may run.")
@click.option("--at", type=float, help="Unix time it may run at.")
@click.option("--retries", type=int, help="Retries after a 5xx or a timeout.")
@click.option("--backoff", type=float, help="First retry delay in seconds (doubles).")
@click.option("--job-timeout", "job_timeout", type=float, help="The job's own timeout (s).")
@click.option("--unique", type=TEXT, help="Unique key: an equal waiting/running job is reused.")
@click.option(
    "--after",
    type=JOB_ID,
    multiple=True,
    help="Run only after this job (N or id:N) has finished well; repeat for several.",
)
@click.option("--wait", is_flag=True, help="Wait for the job and print its result, not its id.")
@click.option("--name", type=TEXT, help="A name people see in lists, the dashboard and /metrics.")
@click.option("--tag", "tags", type=TAG, multiple=True, help="A tag; repeat for several.")
@click.option("--json", "as_json", is_flag=True, help='Print {"id": N}.')
@client_options
def queue_add(
    module: str,
    data: str | None,
    job_timeout: float | None,
    after: tuple[int, ...],
    tags: tuple[str, ...],
    wait: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Queue a job of MODULE with DATA; prints its id (with --wait, its result)."""
    if wait and as_json:  # (the result was printed as it came, the --json left unsaid)
        raise click.UsageError("--json prints the id; --wait prints the result as it came")
    options.update(after=after or None, tags=list(tags) or None)
    with _talking(module) as client:
        body = _data(data)  # (stdin first: -t bounds the waits for the service, not it)
        deadline = time.monotonic() + _timeout()
        jid = client.add(module, body, timeout=job_timeout, **options)
        if wait:  # an add, then a get (not queue:add?wait=1): the id is known if cut short
            try:
                _out(client.get(jid, timeout=max(deadline - time.monotonic(), 0.01)))
            except ReplyTooLarge as exc:  # (a ServiceDown, but the job has ended: its result)
                exc.add_note(f"bgservice: job {jid} has ended: bgservice queue get {jid} "
                             "--max-reply-bytes BYTES reads its result")  # fmt: skip
                raise
            except (KeyboardInterrupt, ClientTimeout, ServiceDown) as exc:  # (a stop: it waits)
                exc.add_note(f"bgservice: job {jid} goes on: bgservice queue get {jid} (or cancel)")
                raise
            except ReplyError as exc:  # (a bare 404 for the job it had just added)
                if exc.code == 404:
                    exc.add_note(f"bgservice: job {jid} ended before its result was asked "
                                 "for, and the service did not keep it ([queue] keep_results)")
                raise
            return
    _json_out({"id": jid}) if as_json else _echo(jid)


@queue.command("get", short_help="Wait for JOB and print its result.")
@click.argument("job", type=JOB_ID)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr while waiting (default: when stderr is a terminal).",
)
@client_options
def queue_get(job: int, progress: bool | None) -> None:
    """Wait for JOB and print its result (exit 1 with its error if it failed)."""
    if progress is None:
        progress = sys.stderr.isatty()
    with _talking() as client:
        deadline = time.monotonic() + _timeout()
        if progress:
            cli_top.follow(client, job, deadline)
        # What is left of --timeout after the progress bar, so the whole wait is bounded
        # by it (a floor of 10 ms: a job that ended just now is still read).
        try:
            _out(client.get(job, timeout=max(deadline - time.monotonic(), 0.01)))
        except ClientTimeout as exc:  # (it read as a service that hung: a newcomer's report)
            exc.add_note(f"bgservice: job {job} has not ended within {_timeout():g} s: wait "
                         f"longer with -t SECONDS (bgservice queue check {job}: its state)")
            raise


@queue.command("check")
@click.argument("job", type=JOB_ID)
@client_options
def queue_check(job: int) -> None:
    """0 waiting, 1 running, 2 finished."""
    with _talking() as client:
        _echo(client.check(job))


@queue.command("status")
@click.argument("job", type=JOB_ID)
@JSON
@client_options
def queue_status(job: int, as_json: bool) -> None:
    """JOB's state, progress, position, attempts, times and last error."""
    with _talking() as client:
        _show(client.status(job), as_json, cli_format.job_lines, time.time())


@queue.command("cancel")
@click.argument("job", type=JOB_ID)
@client_options
def queue_cancel(job: int) -> None:
    """Cancel a waiting JOB, or ask a running one to stop."""
    with _talking() as client:
        _echo(client.cancel(job))


@queue.command("retry")
@click.argument("job", type=JOB_ID)
@click.option("--dependents", is_flag=True,
              help="Also bring back the jobs that failed because JOB did (424), transitively: "
                   "each waits for its --after jobs again.")  # fmt: skip
@client_options
def queue_retry(job: int, dependents: bool) -> None:
    """Run a failed or cancelled JOB again."""
    with _talking() as client:
        _echo(client.retry(job, dependents=dependents))


@queue.command("list")
@click.argument(
    "state",
    required=False,
    type=click.Choice(["waiting", "running", "done", "failed", "cancelled"]),
)
@click.option("--limit", type=click.IntRange(min=1), help="At most this many per state [100].")
@click.option("--offset", type=click.IntRange(min=0), default=0,
              help="Skip this many per state (the next page).")  # fmt: skip
@click.option("--module", type=TEXT, help="Only jobs of this module.")
@click.option("--name", type=TEXT, help="Only jobs of this name (queue add --name), exactly.")
@click.option("--tag", type=TEXT, help="Only jobs with this tag (queue add --tag), exactly.")
@JSON
@client_options
def queue_list(
    state: str | None, limit: int | None, offset: int, as_json: bool, **where: str | None
) -> None:
    """Jobs waiting, running and failed (or of one STATE). With --module, --name or --tag,
    only the jobs that match each one given: --limit and --offset count those (on Redis,
    found among the first 10,000 jobs of each state: docs/queue.md)."""
    with _talking() as client:
        listing = client.list(state, limit, offset, **where)
        # What a page left out, from the counts per state: not known of a filtered page
        # (the counts are of every job).
        counts = {} if as_json or any(where.values()) else client.queue_stats()["counts"]
        _show(listing, as_json, cli_format.jobs_lines, time.time(), counts, offset)


def _window(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """At least 1 s, finite (not FloatRange: nan passes its bounds), as the service has it:
    a usage error (exit 2), not its 400 (exit 1, an error reply to scripts)."""
    if value is not None and not (1 <= value < math.inf):
        raise click.BadParameter(f"{value} is not seconds of at least 1", ctx, param)
    return value


@queue.command("stats", short_help="Counts per state, jobs per minute, busy time.")
@click.option("--window", type=float, callback=_window,
              help="Seconds of history, at least 1 (default: the service's).")  # fmt: skip
@JSON
@client_options
def queue_stats(window: float | None, as_json: bool) -> None:
    """Counts per state, oldest waiting job, jobs per minute, busy time per hour."""
    with _talking() as client:
        _show(client.queue_stats(window), as_json, cli_format.queue_stats_lines, time.time())
