"""``bgservice call|send|stats|modules|ping|top``: a running service from the shell, and
what every client command shares (cli_queue.py and cli_schedule.py use it too).

Thin: every command is one or two methods of ``bgservice.client.Client``. Exit codes that
scripts can rely on (docs/clients.md): 0 done, 1 the service replied an error (``NNN:
message`` on stderr), 2 usage, 3 the service cannot be reached, 4 no reply within
--timeout, 5 a reply longer than --max-reply-bytes, 6 an answer standard output could not
take, 130 interrupted (Ctrl-C, as a shell reports SIGINT; not click's ``Aborted!``).

DATA ``-`` reads standard input (binary-safe); no DATA sends an empty one.

``-a/--address``, ``-t/--timeout``, ``--max-reply-bytes`` and ``--udp-address`` are taken
at every level (``bgservice -a X queue add``, ``bgservice queue -a X add``, ``bgservice
queue add -a X``): the innermost given wins, then ``$BGSERVICE_ADDRESS``, then the
default. ``--help`` shows them only where they apply: ``--udp-address`` on ``bgservice``
and send, ``-t`` and ``--max-reply-bytes`` everywhere but send (it gets no reply).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click

from bgservice import cli_format, cli_top
from bgservice.client import (
    DEFAULT_ADDRESS,
    MAX_REPLY_BYTES,
    Client,
    ClientTimeout,
    ReplyTooLarge,
    ServiceDown,
    parse_job_id,
)
from bgservice.client_requests import MAX_TIMEOUT, DatagramTooLarge, encode_module
from bgservice.errors import ReplyError

EXIT_REPLY, EXIT_DOWN, EXIT_TIMEOUT, EXIT_TOO_LARGE, EXIT_OUTPUT = 1, 3, 4, 5, 6
EXIT_INTERRUPTED = 130
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


class TextType(click.ParamType):
    """An option's text, sent in a request: UTF-8. Bytes that are not (a Latin-1 name
    from the shell) come in as surrogate escapes, which crashed the request's encoding
    with a traceback and exit 1 (an error reply to scripts): a usage error, showing them."""

    name = "TEXT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            str(value).encode()
        except UnicodeEncodeError:
            self.fail(f"not UTF-8: {os.fsencode(value)!r}", param, ctx)
        return str(value)


class TagType(TextType):
    """One tag of a repeated ``--tag``: the tags are sent joined with commas, so one with
    a comma in it was two tags, silently."""

    name = "TAG"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        tag = super().convert(value, param, ctx)
        if not tag or "," in tag:
            self.fail(f"one tag each, without a comma, not {tag!r} (repeat --tag)", param, ctx)
        return tag


TEXT, TAG = TextType(), TagType()


def _module(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        encode_module(value)  # ValueError: bytes that are not UTF-8, held as surrogates
    except ValueError as exc:  # a usage error (exit 2), not an encoding traceback (exit 1)
        raise click.BadParameter(str(exc), ctx, param) from None
    return value


MODULE = click.argument("module", callback=_module)


# Where the client options' values are kept: Context.meta is shared by a context and
# every one nested in it, so a value given to `bgservice` or `bgservice queue` reaches
# the command, and one given later (further in) replaces it.
_GIVEN = "bgservice.client_options"


def _seconds(ctx: click.Context, param: click.Parameter, value: float, least: float = 0) -> float:
    """Not FloatRange: nan passes its bounds (top -n nan crashed); -t 1e10 overflowed."""
    if not (least <= value <= MAX_TIMEOUT and value > 0):
        bounds = f"{f'from {least}' if least else 'above 0'} and at most {MAX_TIMEOUT:.0f} (a week)"
        raise click.BadParameter(f"{value} is not seconds {bounds}", ctx, param)
    return value


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if param.name == "timeout" and value is not None:
        _seconds(ctx, param, value)
    # "" ("$REMOTE" unset) fell back to $BGSERVICE_ADDRESS: another service than meant.
    if param.name in ("address", "udp_address") and value is not None and not value.strip():
        raise click.BadParameter("empty (leave the option out for the default)", ctx, param)
    if value is not None and param.name is not None:
        ctx.meta.setdefault(_GIVEN, {})[param.name] = value


def _options(udp: bool, reply: bool) -> Callable[[F], F]:
    """--address, --udp-address, --timeout, --max-reply-bytes: taken by every group and
    client command (a script's ``-t`` on send is not refused), shown in ``--help`` only
    where they apply."""
    kept: dict[str, Any] = {"callback": _remember, "expose_value": False}
    address = "host:port (or tcp://host:port) or Unix socket path of the service "
    address += f"[default: $BGSERVICE_ADDRESS, else {DEFAULT_ADDRESS}]"
    udp_address = "For send: UDP host:port, or Unix datagram path (or udg:///path)."
    timeout = "Seconds to wait for a reply [default: 30]."
    longest = f"The longest reply read; a longer one exits 5 [default: {MAX_REPLY_BYTES}]."
    options = [
        click.option("-a", "--address", help=address, **kept),
        click.option("--udp-address", hidden=not udp, help=udp_address, **kept),
        click.option("-t", "--timeout", type=float, hidden=not reply, help=timeout, **kept),
        click.option(
            "--max-reply-bytes",
            type=click.IntRange(min=1),
            metavar="BYTES",
            hidden=not reply,
            help=longest,
            **kept,
        ),
    ]

    def decorate(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


client_options = _options(udp=False, reply=True)  # a command that reads a reply
every_client_option = _options(udp=True, reply=True)  # bgservice itself, for any command


def _given() -> dict[str, Any]:
    return dict(click.get_current_context().meta.get(_GIVEN, {}))


def _address() -> str:
    return str(_given().get("address") or os.environ.get("BGSERVICE_ADDRESS") or DEFAULT_ADDRESS)


def _timeout() -> float:
    timeout = _given().get("timeout")
    return 30.0 if timeout is None else float(timeout)


def _max_reply_bytes() -> int:
    return int(_given().get("max_reply_bytes") or MAX_REPLY_BYTES)


@contextlib.contextmanager
def _talking(module: str | None = None) -> Iterator[Client]:
    """A client for the options given, with its failures turned into messages and exit
    codes (and the notes added to them on the way out: a job left queued, a hint)."""
    try:  # opens nothing yet; ValueError: a bad address (-t was checked as it was read)
        client = Client(
            _address(),
            timeout=_timeout(),
            udp_address=_given().get("udp_address"),
            max_reply_bytes=_max_reply_bytes(),
        )
    except ValueError as exc:  # a usage error: exit 2, as click's own
        raise click.UsageError(str(exc)) from None
    try:
        yield client
    except ReplyError as exc:
        if module and (exc.code, exc.message) == (400, "Unknown request"):
            exc.add_note(f"(no module named {module!r} is loaded: see 'bgservice modules')")
        _fail(f"{exc.code}: {exc.message}", exc, EXIT_REPLY)
    except ReplyTooLarge as exc:  # a ServiceDown to the Python client: here the service is up
        _fail(_too_large(client.address, exc), exc, EXIT_TOO_LARGE)
    except ServiceDown as exc:
        _fail(f"bgservice: service down: {exc}", exc, EXIT_DOWN)
    except ClientTimeout as exc:
        _fail(f"bgservice: timeout: {exc}", exc, EXIT_TIMEOUT)
    except KeyboardInterrupt as exc:  # not click's "Aborted!" and 1; a line of its own after ^C
        _fail("\n" * sys.stderr.isatty() + "bgservice: interrupted", exc, EXIT_INTERRUPTED)
    finally:
        client.close()


def _too_large(address: str, exc: ReplyTooLarge) -> str:
    """ReplyTooLarge's message in the CLI's words: the option to raise, not the keyword."""
    said = f"{address} sent a reply of {exc.size} bytes, more than --max-reply-bytes {exc.limit}"
    return f"bgservice: reply too large: {said} (the request may have run)"


def _fail(message: str, exc: BaseException, code: int) -> NoReturn:
    for line in (message, *getattr(exc, "__notes__", ())):
        click.echo(line, err=True)
    sys.exit(code)


def _data(data: str | None) -> bytes:
    if data == "-":
        return sys.stdin.buffer.read()
    # An argument's bytes as the shell gave them: bytes that are not UTF-8 come in as
    # surrogate escapes (PEP 383), which os.fsencode turns back into the same bytes.
    return os.fsencode(data or "")


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """Standard output that cannot take what the service answered (a full disk, closed,
    text its encoding has no bytes for) is exit 6 and a line saying so: it was a
    traceback and exit 1, which scripts read as an error reply, though the request had
    been served (a job queued). A closed pipe (``| head``) is click's: quiet."""
    try:
        if sys.stdout is None:  # (started with it closed: >&-)
            raise OSError(errno.EBADF, "standard output is closed")
        yield
    except OSError as exc:
        if exc.errno == errno.EPIPE or isinstance(exc, ServiceDown | ClientTimeout):
            raise  # (the client's: OSErrors too, for _talking to say; `top` reads in here)
        _fail(f"bgservice: cannot write the output ({exc.strerror or exc}): the request "
              "was served", exc, EXIT_OUTPUT)  # fmt: skip
    except UnicodeEncodeError as exc:
        why = f"in {sys.stdout.encoding} ({exc.reason}; PYTHONIOENCODING=utf-8 writes it)"
        _fail(f"bgservice: cannot write the output {why}: the request was served", exc,
              EXIT_OUTPUT)  # fmt: skip


def _out(body: bytes) -> None:
    with _writing():
        sys.stdout.buffer.write(body)
        if sys.stdout.isatty() and not body.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()


def _echo(text: object) -> None:
    """A line on standard output (``_writing``'s failures)."""
    with _writing():
        click.echo(text)  # (which flushes)


def _json_out(value: Any) -> None:
    """The service's JSON, on one line, for scripts (--json)."""
    _echo(json.dumps(value, separators=(",", ":")))


def _show(value: Any, as_json: bool, lines: Callable[..., list[str]], *args: Any) -> None:
    """--json: the JSON; otherwise what ``cli_format`` makes of it for a person."""
    _json_out(value) if as_json else _echo("\n".join(lines(value, *args)))


JSON = click.option("--json", "as_json", is_flag=True, help="The service's JSON, on one line.")


@click.command()
@MODULE
@click.argument("data", required=False)
@client_options
def call(module: str, data: str | None) -> None:
    """Call MODULE with DATA over TCP and print its reply. DATA "-" reads it from stdin
    (bgservice call less - < site.less); none is empty."""
    with _talking(module) as client:
        _out(client.call(module, _data(data)))


@click.command(short_help="Fire and forget MODULE with DATA over UDP.")
@MODULE
@click.argument("data", required=False)
@_options(udp=True, reply=False)
def send(module: str, data: str | None) -> None:
    """Fire and forget MODULE with DATA over UDP (nothing comes back); MODULE:DATA must fit
    in one datagram, as the kernel decides (65,507 bytes over IPv4), else exit 2. DATA "-"
    reads it from stdin."""
    with _talking() as client:
        if client.udp_address is None:  # a Unix stream socket: no datagram twin known
            raise click.UsageError(f"{client.address}: send needs --udp-address (unix_dgram)")
        try:
            client.send(module, _data(data))
        except DatagramTooLarge as exc:  # the kernel's EMSGSIZE: it could never be sent
            raise click.UsageError(f"send: {exc.reason}: use call or queue add") from None


@click.command()
@JSON
@client_options
def stats(as_json: bool) -> None:
    """The service's counters (service:stats)."""
    with _talking() as client:
        _show(client.stats(), as_json, cli_format.stats_lines)


@click.command()
@JSON
@client_options
def modules(as_json: bool) -> None:
    """The modules and their state (service:modules)."""
    with _talking() as client:
        _show(client.modules(), as_json, cli_format.modules_lines, time.time())


@click.command()
@client_options
def ping() -> None:
    """Exit 0 if the service answers, 3 if it is down."""
    with _talking() as client:
        client.ping()
    _echo("pong")


@click.command(short_help="Live view: running jobs, waiting counts, requests/s.")
@click.option("--once", is_flag=True, help="Print one screen and exit (always so off a terminal).")
@click.option(
    "-n",
    "--interval",
    type=float, callback=lambda ctx, param, value: _seconds(ctx, param, value, 0.1),
    default=1.0,
    show_default=True,
    help="Seconds between screens, over which the request rate is measured.",
)
@client_options
def top(once: bool, interval: float) -> None:
    """Live view: running jobs, waiting counts, requests/s (Ctrl-C quits, exit 130)."""
    with _talking() as client, _writing():
        watcher = cli_top.Watcher(client, _address())
        if once or not sys.stdout.isatty():
            cli_top.once(watcher, interval, sys.stdout)
        else:
            cli_top.live(watcher, interval, sys.stdout)

