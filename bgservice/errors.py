"""The service's errors: one root exception, one subclass per reply code.

Every error a client can see is one of these. Its ``code`` is the 3-digit status that
both wire formats carry (see docs/protocol.md): as ``NNN: message`` in the original's
one-shot format, as the status field of a framed reply.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ServiceError(Exception):
    """Root of every error that becomes a reply. ``str(error)`` is the message."""

    code = 500
    default_message = "Internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class UnknownRequest(ServiceError):
    """No module and no built-in command of that name (the original's reply)."""

    code = 400
    default_message = "Unknown request"


class BadRequest(ServiceError):
    """A built-in command with arguments it cannot read."""

    code = 400
    default_message = "Bad request"


class Forbidden(ServiceError):
    """The peer's address is not in the ``allow`` list."""

    code = 403
    default_message = "Forbidden"


class NotFound(ServiceError):
    """A queue job id that does not exist or has expired."""

    code = 404
    default_message = "Not found"


class TransportNotAccepted(ServiceError):
    """The module exists but does not take requests over this transport."""

    code = 405
    default_message = "Transport not accepted"


class RequestTimeout(ServiceError):
    """The request was not received completely within ``read_timeout``."""

    code = 408
    default_message = "Request timeout"


class Conflict(ServiceError):
    """A queue operation that does not fit the job's state (e.g. retry of a waiting job)."""

    code = 409
    default_message = "Conflict"


class Cancelled(ServiceError):
    """``queue:get`` of a job that was cancelled."""

    code = 410
    default_message = "Job cancelled"


class DependencyFailed(ServiceError):
    """A job whose ``after`` job failed or was cancelled."""

    code = 424
    default_message = "Dependency failed"


class TooLarge(ServiceError):
    """The request is larger than ``max_request_bytes``."""

    code = 413
    default_message = "Request too large"


class HandlerError(ServiceError):
    """The module's handler raised; the message names the exception, not its traceback."""

    code = 500


class UnknownQueueRequest(ServiceError):
    """A ``queue:`` command that does not exist (code and text kept from the original)."""

    code = 500
    default_message = "Unknown queue request"


class NoHandler(ServiceError):
    """The module defines no handler for this transport (e.g. the shipped ``fail``)."""

    code = 501
    default_message = "Module has no handler for this transport"


class ModuleLoadFailed(ServiceError):
    """The module's file never imported; the message names the file, line and error."""

    code = 502
    default_message = "Module failed to load"


class Busy(ServiceError):
    """Too many connections, a full queue, or the service is shutting down."""

    code = 503
    default_message = "Service busy"


class CallTimeout(ServiceError):
    """The handler did not finish within its timeout."""

    code = 504
    default_message = "Timed out"


class WorkerDied(ServiceError):
    """The worker process running the call died (crash, ``os._exit``, out of memory)."""

    code = 500
    default_message = "Worker process died"


class Interrupted(ServiceError):
    """A queued job's runs were cut by crashes more than ``[queue] max_interruptions``
    times: it may be what crashes the service (a poison pill), so it fails, not run again."""

    code = 500
    default_message = "Job interrupted too often"


class ReplyError(ServiceError):
    """Raised by a module to reply with a code of its choice (4xx or 5xx), e.g. a
    compiler's syntax error as ``422``."""

    def __init__(self, code: int, message: str) -> None:
        if not 400 <= code <= 599:
            raise ValueError(f"a reply code is 400-599, not {code}")
        super().__init__(message)
        self.code = code


class ConfigError(Exception):
    """``service.config`` or a command-line value is invalid. Not a reply: exit code 2."""


class Unmet(ValueError):
    """A config value that is right but needs what is not installed (an extra): its error
    shows no value (", got True" after the install command read as if true were wrong)."""


NEAR_CHARS = 100  # the longest word did_you_mean compares (a name is 64 characters at most)


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``", did you mean X?"`` for the known name nearest ``word`` when one is near enough
    to be its typo (difflib, as click names a mistyped command), else ``""``: for each
    message that refuses an unknown name and lists the known ones. A word longer than any
    name is no typo of one: not compared (a megabyte's took 100 ms of the loop)."""
    if len(word) > NEAR_CHARS:
        return ""
    near = difflib.get_close_matches(word, sorted(known), n=1)
    return f", did you mean {near[0]}?" if near else ""
