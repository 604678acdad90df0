"""``bgservice call|send|queue|stats|modules|ping``: a running service from the shell.

Thin: every command is one or two methods of ``bgservice.client.Client``. Exit codes that
scripts can rely on:

    0  done
    1  the service replied an error (``NNN: message`` on stderr)
    2  usage error (bad option or argument)
    3  the service cannot be reached (down, wrong address)
    4  no reply within --timeout

DATA ``-`` reads standard input (binary-safe); no DATA sends an empty one.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from bgservice.client import DEFAULT_ADDRESS, Client, ClientTimeout, ServiceDown, parse_job_id
from bgservice.errors import ReplyError

EXIT_REPLY, EXIT_DOWN, EXIT_TIMEOUT = 1, 3, 4
F = TypeVar("F", bound=Callable[..., Any])


class JobIdType(click.ParamType):
    """A job id as ``N`` or ``id:N`` (what the original's ``queue:add`` replied, and what
    scripts ported from it keep); a bad one is a usage error (exit 2), never job 0."""

    name = "ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_job_id(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


JOB_ID = JobIdType()


def _client_options(fn: F) -> F:
    """--address, --udp-address, --timeout on every client command."""
    options = [
        click.option(
            "-a",
            "--address",
            envvar="BGSERVICE_ADDRESS",
            default=DEFAULT_ADDRESS,
            show_default=True,
            help="host:port or Unix socket path of the service ($BGSERVICE_ADDRESS).",
        ),
        click.option("--udp-address", help="For send: UDP host:port or Unix datagram path."),
        click.option(
            "-t", "--timeout", type=float, default=30.0, show_default=True, help="Seconds."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@contextlib.contextmanager
def _talking(address: str, timeout: float, udp_address: str | None = None) -> Iterator[Client]:
    """A client, with its failures turned into messages and exit codes."""
    client = Client(address, timeout=timeout, udp_address=udp_address)
    try:
        yield client
    except ReplyError as exc:
        click.echo(f"{exc.code}: {exc.message}", err=True)
        sys.exit(EXIT_REPLY)
    except ServiceDown as exc:
        click.echo(f"bgservice: service down: {exc}", err=True)
        sys.exit(EXIT_DOWN)
    except ClientTimeout as exc:
        click.echo(f"bgservice: timeout: {exc}", err=True)
        sys.exit(EXIT_TIMEOUT)
    finally:
        client.close()


def _data(data: str | None) -> bytes:
    if data == "-":
        return sys.stdin.buffer.read()
    return (data or "").encode()


def _out(body: bytes) -> None:
    sys.stdout.buffer.write(body)
    if sys.stdout.isatty() and not body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


def _json_out(value: Any, compact: bool) -> None:
    click.echo(json.dumps(value, separators=(",", ":")) if compact else json.dumps(value, indent=2))


@click.command()
@click.argument("module")
@click.argument("data", required=False)
@_client_options
def call(module: str, data: str | None, address: str, udp_address: str | None, timeout: float):
    """Call MODULE with DATA over TCP and print its reply."""
    with _talking(address, timeout) as client:
        _out(client.call(module, _data(data)))


@click.command()
@click.argument("module")
@click.argument("data", required=False)
@_client_options
def send(module: str, data: str | None, address: str, udp_address: str | None, timeout: float):
    """Fire and forget MODULE with DATA over UDP (nothing comes back)."""
    with _talking(address, timeout, udp_address) as client:
        client.send(module, _data(data))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One line of JSON.")
@_client_options
def stats(as_json: bool, address: str, udp_address: str | None, timeout: float) -> None:
    """The service's counters (service:stats)."""
    with _talking(address, timeout) as client:
        _json_out(client.stats(), as_json)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@_client_options
def modules(as_json: bool, address: str, udp_address: str | None, timeout: float) -> None:
    """The modules and their state (service:modules)."""
    with _talking(address, timeout) as client:
        found = client.modules()
    if as_json:
        _json_out(found, True)
        return
    click.echo(f"{'module':16} {'state':8} {'accepts':16} error")
    for m in found:
        accepts = ",".join(m.get("accepts") or []) or "-"
        click.echo(f"{m['name']:16} {m['state']:8} {accepts:16} {m.get('error') or ''}")


@click.command()
@_client_options
def ping(address: str, udp_address: str | None, timeout: float) -> None:
    """Exit 0 if the service answers, 3 if it is down."""
    with _talking(address, timeout) as client:
        client.ping()
    click.echo("pong")


# --- queue ------------------------------------------------------------------------------


@click.group()
def queue() -> None:
    """The job queue (docs/queue.md)."""


@queue.command("add")
@click.argument("module")
@click.argument("data", required=False)
@click.option("--priority", type=int, help="Higher runs first.")
@click.option("--delay", type=float, help="Seconds to wait before it may run.")
@click.option("--at", type=float, help="Unix time it may run at.")
@click.option("--retries", type=int, help="Retries after a 5xx or a timeout.")
@click.option("--backoff", type=float, help="First retry delay in seconds (doubles).")
@click.option("--job-timeout", "job_timeout", type=float, help="The job's own timeout (s).")
@click.option("--unique", help="Unique key: an equal waiting/running job is reused.")
@click.option("--after", type=JOB_ID, help="Run only after this job (N or id:N) has finished well.")
@click.option("--json", "as_json", is_flag=True, help='Print {"id": N}.')
@_client_options
def queue_add(
    module: str,
    data: str | None,
    job_timeout: float | None,
    as_json: bool,
    address: str,
    udp_address: str | None,
    timeout: float,
    **options: Any,
) -> None:
    """Queue a job of MODULE with DATA; prints its id."""
    with _talking(address, timeout) as client:
        jid = client.add(module, _data(data), timeout=job_timeout, **options)
    _json_out({"id": jid}, True) if as_json else click.echo(jid)


@queue.command("get")
@click.argument("job", type=JOB_ID)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr while waiting (default: when stderr is a terminal).",
)
@_client_options
def queue_get(
    job: int, progress: bool | None, address: str, udp_address: str | None, timeout: float
) -> None:
    """Wait for JOB and print its result (exit 1 with its error if it failed)."""
    if progress is None:
        progress = sys.stderr.isatty()
    with _talking(address, timeout) as client:
        if progress:
            _follow(client, job, timeout)
        _out(client.get(job))


def _follow(client: Client, job: int, timeout: float) -> None:
    """A live progress bar from queue:status until the job has finished (polled four times
    a second: a display, not a wait; the result itself comes from queue:get)."""
    deadline = time.monotonic() + timeout
    with click.progressbar(length=1000, label=f"job {job}", file=sys.stderr) as bar:
        shown = 0
        while time.monotonic() < deadline:
            status = client.status(job)
            progress = status.get("progress") or {}
            if progress.get("total"):
                done = int(1000 * min(progress["done"] / progress["total"], 1.0))
                bar.label = f"job {job}: {progress.get('message') or status['state']}"
                bar.update(done - shown)
                shown = done
            if status["state"] not in ("waiting", "running"):
                bar.update(1000 - shown)
                return
            time.sleep(0.25)


@queue.command("check")
@click.argument("job", type=JOB_ID)
@_client_options
def queue_check(job: int, address: str, udp_address: str | None, timeout: float) -> None:
    """0 waiting, 1 running, 2 finished."""
    with _talking(address, timeout) as client:
        click.echo(client.check(job))


@queue.command("status")
@click.argument("job", type=JOB_ID)
@click.option("--json", "as_json", is_flag=True, help="One line of JSON.")
@_client_options
def queue_status(
    job: int, as_json: bool, address: str, udp_address: str | None, timeout: float
) -> None:
    """JOB's state, progress, position, attempts, times and last error."""
    with _talking(address, timeout) as client:
        _json_out(client.status(job), as_json)


@queue.command("cancel")
@click.argument("job", type=JOB_ID)
@_client_options
def queue_cancel(job: int, address: str, udp_address: str | None, timeout: float) -> None:
    """Cancel a waiting JOB, or ask a running one to stop."""
    with _talking(address, timeout) as client:
        click.echo(client.cancel(job))


@queue.command("retry")
@click.argument("job", type=JOB_ID)
@_client_options
def queue_retry(job: int, address: str, udp_address: str | None, timeout: float) -> None:
    """Run a failed or cancelled JOB again."""
    with _talking(address, timeout) as client:
        click.echo(client.retry(job))


@queue.command("list")
@click.argument(
    "state",
    required=False,
    type=click.Choice(["waiting", "running", "done", "failed", "cancelled"]),
)
@click.option("--limit", type=int, help="At most this many per state.")
@click.option("--offset", type=int, default=0)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@_client_options
def queue_list(
    state: str | None,
    limit: int | None,
    offset: int,
    as_json: bool,
    address: str,
    udp_address: str | None,
    timeout: float,
) -> None:
    """Jobs waiting, running and failed (or of one STATE)."""
    with _talking(address, timeout) as client:
        found = client.list(state, limit, offset)
    if as_json:
        _json_out(found, True)
        return
    click.echo(f"{'id':>8} {'state':9} {'module':14} {'prio':>4} {'tries':>5} error")
    for jobs in found.values():
        for j in jobs:
            error = (j.get("error") or "")[:60]
            click.echo(
                f"{j['id']:>8} {j['state']:9} {j['module']:14} {j['priority']:>4} "
                f"{j['attempts']:>5} {error}"
            )


@queue.command("stats")
@click.option("--window", type=float, help="Seconds of history (default: the service's).")
@click.option("--json", "as_json", is_flag=True, help="One line of JSON.")
@_client_options
def queue_stats(
    window: float | None, as_json: bool, address: str, udp_address: str | None, timeout: float
) -> None:
    """Counts per state, oldest waiting job, jobs per minute, busy time per hour."""
    with _talking(address, timeout) as client:
        _json_out(client.queue_stats(window), as_json)


def register_client_commands(group: click.Group) -> None:
    for command in (call, send, queue, stats, modules, ping):
        group.add_command(command)
