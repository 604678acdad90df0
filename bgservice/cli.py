"""The command line: ``bgservice [serve]`` runs the service; the other subcommands talk
to a running one through the Python client (bgservice.client). No logic here.

``serve`` exit codes: 0 stopped cleanly, 1 could not listen, 2 bad configuration or
usage, 70 stopped by an unexpected error (without -E); ``serve --check``: 0 all good, 2 a
problem found (bgservice/preflight.py). The client commands' exit codes
are in bgservice/cli_client.py.
"""

from __future__ import annotations

import difflib
import logging
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import uvloop

from bgservice import __version__, cli_client, config, logs, open_files, preflight, readiness
from bgservice.cli_queue import queue
from bgservice.cli_schedule import schedule
from bgservice.config_checks import redact_url
from bgservice.errors import ConfigError
from bgservice.server import Service

DEFAULT_CONFIG = "service.config"


def _config_path(given: Path | None) -> Path | None:
    """The config file read: -c's, else ./service.config if there is one (a folder, a FIFO
    or a dangling link of that name is refused as with -c, not passed over unsaid)."""
    if given is None and os.path.lexists(DEFAULT_CONFIG):
        return Path(DEFAULT_CONFIG)
    return given


def _settings(config_path: Path | None, **overrides: object) -> config.Settings:
    config_path = _config_path(config_path)
    settings = config.load(config_path) if config_path else config.Settings()
    settings = settings.replace(source=config_path)
    return config.with_overrides(settings, **overrides)  # type: ignore[arg-type]


def _exposed_secrets(settings: config.Settings, config_path: Path | None) -> str | None:
    """A config file holding a secret that every user of the host may read: the install
    comment's ``install -m 644`` left HTTP tokens and the Redis password world-readable.
    A warning (as sshd refuses such a key file, but a start must not fail on an upgrade)."""
    if config_path is None:
        return None
    redis = settings.redis  # (the file's url, also where $BGSERVICE_REDIS_URL replaced it)
    url = redis.url if redis.url_from == config.RedisSettings.url_from else redis.file_url
    held = [name for name, there in (
        ("[http] token", bool(settings.http.token)), ("[http] tokens", bool(settings.http.tokens)),
        ("a password in [redis] url", redact_url(url) != url),
    ) if there]  # fmt: skip
    try:
        mode = config_path.stat().st_mode if held else 0
    except OSError:
        return None
    if not mode & stat.S_IROTH:
        return None
    return (f"{config_path} holds {' and '.join(held)}, and every user may read it (mode "
            f"{stat.S_IMODE(mode):o}): let only the service's user or group read it (the "
            "shipped unit reads it as group www-data: chmod 640, chgrp www-data), or give "
            "them as $BGSERVICE_HTTP_TOKEN and $BGSERVICE_REDIS_URL (docs/deploy.md)")  # fmt: skip


def _no_modules(folder: Path, given: Path | None, config_path: Path | None) -> str:
    """The missing modules folder, in full, and where its name came from: run from another
    folder, "modules folder modules does not exist" named no folder and a file not read."""
    if given is not None:
        source = "-m"
    elif config_path is not None:
        source = f"modules = in {config_path}, or -m DIR"
    else:
        source = (f"no {DEFAULT_CONFIG} in {Path.cwd()} either: run bgservice where its "
                  "modules/ and service.config are, or give -m DIR")  # fmt: skip
    return f"modules folder {folder.absolute()} does not exist ({source})"


def _host(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An empty --host put TCP on every interface and UDP on loopback: refused, as the
    config file's empty host is."""
    if value is not None and not value.strip():
        raise click.BadParameter(
            "must be an address (127.0.0.1, ::1; 0.0.0.0: every IPv4 interface), not empty"
        )
    return value


class _ServeByDefault(click.Group):
    """``bgservice -c file -v`` is ``bgservice serve -c file -v``, as before subcommands;
    ``bgservice -a ADDR queue ...`` is a client command given the group's options; and
    ``bgservice -h`` lists every command, then serve's options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        asks_help = bool(args) and args[0] in ctx.help_option_names
        word = self._first_word(args)
        if word is not None and word not in self.commands and not word.startswith("-"):
            # serve takes no arguments: a word here is a mistyped command (it was "serve:
            # unexpected extra argument"); the nearest command named, as click names a
            # group's (bgservice queue lsit: "Did you mean 'list'?").
            near = difflib.get_close_matches(word, self.commands, n=1)
            guess = f" Did you mean {near[0]!r}?" if near else ""
            ctx.fail(f"No such command {word!r} (commands: {', '.join(self.commands)}).{guess}")
        if not asks_help and word not in self.commands:
            args = ["serve", *args]
        return super().parse_args(ctx, args)

    def _first_word(self, args: list[str]) -> str | None:
        """The first word after the options before it, the group's (-a X, -t5, --timeout=X;
        only before a command are they the group's) and serve's (bgservice -c FILE -v is
        serve's): a command's name, a mistyped one, an option neither takes, or None."""
        options = [p for c in (self, self.commands["serve"]) for p in c.params
                   if isinstance(p, click.Option)]  # fmt: skip
        flags = {o for p in options if p.is_flag or p.count for o in p.opts}
        valued = {o for p in options for o in p.opts} - flags
        i = 0
        while i < len(args):
            arg = args[i]
            if arg.partition("=")[0] in valued:
                i += 1 if "=" in arg else 2
            elif arg in flags or (not arg.startswith("--") and arg[:2] in valued | flags):
                i += 1  # a flag, or a short option with its value or flags after it (-t5, -EE)
            else:
                break
        return args[i] if i < len(args) else None

    def invoke(self, ctx: click.Context) -> Any:
        # A Ctrl-C held since bgservice.__main__ raises here, once the arguments are read.
        # Until the service's own handlers are in (Service.run) it ends the start as it
        # ends the client commands: exit 130, no traceback, not click's "Aborted!".
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            return super().invoke(ctx)
        except KeyboardInterrupt:
            sys.exit(130)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_help(ctx, formatter)
        serve = self.commands["serve"]
        params = [p for p in serve.get_params(ctx) if p.name != "help"]  # the group's -h is shown
        rows = [row for p in params if (row := p.get_help_record(ctx))]
        with formatter.section("Options of serve, the default command (bgservice [serve] ...)"):
            formatter.write_dl(rows)


class _Serve(click.Command):
    """serve's ``--help`` ends with the other commands, read from the group they are in:
    a command added later is listed without anyone remembering to."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        group = ctx.parent.command if ctx.parent else None
        if isinstance(group, click.Group):
            others = ", ".join(name for name in group.commands if name != self.name)
            formatter.write_paragraph()
            with formatter.indentation():
                formatter.write_text(
                    f"Other commands talk to a running service: {others} "
                    "(bgservice --help lists them; bgservice COMMAND --help)."
                )


@click.group(cls=_ServeByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@cli_client.every_client_option
def main() -> None:
    """bgservice: fire-and-forget UDP, TCP calls and a job queue for web applications.

    Without a command (or with serve) it runs the service; the other commands talk to a
    running one at -a/--address, which every level takes (bgservice -a X queue add ...,
    bgservice queue add -a X ...).
    """


@main.command(cls=_Serve)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help=f"Config file (TOML, or the original's JSON). Default: ./{DEFAULT_CONFIG} if present.",
)
@click.option("--host", callback=_host, help="Listen on this address only (one TCP+UDP listener).")
@click.option("-p", "--port", type=click.IntRange(0, 65535), help="TCP and UDP port (0: any).")
@click.option(
    "-m", "--modules", type=click.Path(path_type=Path, file_okay=False), help="Modules folder."
)
@click.option("--db", type=click.Path(path_type=Path, dir_okay=False), help="Queue database.")
@click.option("-v", "--verbose", is_flag=True, default=None, help="A debug line per request.")
@click.option(
    "-E",
    "global_handler",
    count=True,
    help="Global error handler: log unexpected errors and keep running; -EE: also to stderr.",
)
@click.option(
    "-e", "no_global_handler", is_flag=True, help="No global handler: stop on them (default)."
)
@click.option(
    "--log-file", type=click.Path(path_type=Path, dir_okay=False), help="Also log to this file."
)
@click.option(
    "--ready-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the bound addresses here as JSON once ready (for scripts and tests).",
)
@click.option(
    "--check",
    is_flag=True,
    help="Check the configuration and import every module, then exit (0: all good, 2: not).",
)
@click.version_option(__version__, "-V", "--version", prog_name="bgservice")
def serve(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    modules: Path | None,
    db: Path | None,
    verbose: bool | None,
    global_handler: int,
    no_global_handler: bool,
    log_file: Path | None,
    ready_file: Path | None,
    check: bool,
) -> None:
    """Run the service (the default command)."""
    handler = 0 if no_global_handler else (min(global_handler, 2) if global_handler else None)
    try:
        settings = _settings(
            config_path,
            host=host,
            port=port,
            modules=modules,
            db=db,
            verbose=verbose,
            global_handler=handler,
            log_file=log_file,
        )
    except ConfigError as exc:
        _config_error(str(exc))
    if not settings.modules.is_dir():  # a typo would serve nothing, and never notice the fix
        _config_error(_no_modules(settings.modules, modules, _config_path(config_path)))
    # The file is opened only here: a folder or an unwritable path is refused as bad input.
    named = "--log-file" if log_file else f"{_config_path(config_path)}: [log] file"
    if check:
        if ready_file is not None:
            _ready_file_or_exit(ready_file)
        _exit_now(_check(settings, _config_path(config_path), named))
    try:
        logs.setup(settings.verbose, settings.log_file, named)
    except ConfigError as exc:
        _config_error(str(exc))
    if ready_file is not None:  # (found at the end of the start: a traceback, listening)
        _ready_file_or_exit(ready_file)
    open_files.raise_limit(settings)  # (logged: after the logs' setup)
    if exposed := _exposed_secrets(settings, _config_path(config_path)):
        logging.getLogger(__name__).warning(exposed)
    service = Service(settings, ready_file, os.environ.get("NOTIFY_SOCKET"))
    code = uvloop.run(service.run())
    # Stopped: the threads modules made themselves (a ThreadPoolExecutor's are not
    # daemons) are not waited for, as the handlers' stuck ones are not.
    logging.shutdown()  # (its files flushed: os._exit runs no atexit hook)
    _exit_now(code)


def _config_error(message: str) -> NoReturn:
    click.echo(f"bgservice: configuration error: {message}", err=True)
    sys.exit(2)


def _ready_file_or_exit(ready_file: Path) -> None:
    try:
        readiness.check_ready_file(ready_file)
    except ConfigError as exc:
        _config_error(str(exc))


def _exit_now(code: int) -> None:
    """Exit without waiting for what modules left behind (a thread that is not a daemon,
    an atexit hook): the check or the service is over, and a script waits for its code."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _check(settings: config.Settings, config_path: Path | None, log_named: str) -> int:
    loaded, found = preflight.problems(settings, log_named)
    exposed = _exposed_secrets(settings, config_path)
    for warning in [*preflight.warnings(settings, loaded), *filter(None, [exposed])]:
        click.echo(f"bgservice: check: warning: {warning}", err=True)
    for problem in found:
        click.echo(f"bgservice: check: {problem}", err=True)
    if found:
        click.echo(f"bgservice: check failed: {len(found)} problem(s)", err=True)
        return 2
    click.echo("\n".join(preflight.summary(settings, config_path, loaded)))
    return 0


for command in (
    cli_client.call,
    cli_client.send,
    queue,
    cli_client.stats,
    cli_client.modules,
    cli_client.ping,
    cli_client.top,
    schedule,
):
    main.add_command(command)
