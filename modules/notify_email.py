"""Mails alerts through SMTP: the example target of ``[alerts] module = "notify_email"``.

The service calls it with an alert as JSON (bgservice/alerts.py):
``{"event": "job", "title": "...", "message": "...", "module": "less", "job": 12,
"time": 1795400000.0, "host": "web1", "counts": {...}}`` and it sends one mail,
subject ``[bgservice@HOST] TITLE``, body the message and the details. It is a plain
``def``, so the blocking SMTP conversation runs in the service's thread pool, never on
the event loop. It can also be called by hand: ``bgservice call notify_email '{"title":
"test"}'`` checks the settings.

Settings, from the environment of the service (e.g. the systemd unit's Environment=):
    BGSERVICE_SMTP_HOST      server (default localhost)
    BGSERVICE_SMTP_PORT      port (default 25; 465 means implicit TLS)
    BGSERVICE_SMTP_STARTTLS  1, true, yes or on to upgrade the connection with STARTTLS;
                             0, false, no, off or empty: not (default; any case)
    BGSERVICE_SMTP_USER      login, with BGSERVICE_SMTP_PASSWORD (default: no login)
    BGSERVICE_SMTP_FROM      sender (default bgservice@HOST)
    BGSERVICE_SMTP_TO        recipients, comma-separated (required)
    BGSERVICE_SMTP_TIMEOUT   seconds for the whole conversation (default 20, at most
                             55: TIMEOUT less 5 s, so that the send ends before its call)

The timeout bounds the whole send, not each socket operation (smtplib's own timeout
is per operation: a server sending its greeting a byte a second would hold it forever).
A watchdog thread shuts the connection's socket down when the time is up, which wakes the
blocked smtplib call at once; the reply is then ``502 ... timed out after N s``. It does
the same as soon as the call has given up (a queued job's ``timeout=`` shorter than the
conversation, a ``queue:cancel``: ``request.job.cancelled``), and nothing more is sent to
the server from then on, the mail's data included: a job that failed on its timeout and is
retried does not also deliver the mail of the attempt it gave up on. A timeout after the
server had the whole mail (the final ``.`` sent, its ``250`` not read yet) may still leave
it delivered: many servers keep a mail they received whether or not the client stays for
their reply, so delivery is at least once, and a retried job may send it twice. Only the
host name lookup (``getaddrinfo``) cannot be interrupted: a hung resolver can add its own
delay before the 502 (nothing is sent after it if the call has given up meanwhile). A port
or timeout that is not a number in its range is refused with a ``500`` naming the variable,
as missing recipients are, and so is a STARTTLS that is none of the
words above (read as off, a typo would send the login in clear text). Line breaks (CR,
LF and the other Unicode line separators) in the alert's title or host become spaces in
the mail's headers, so an alert cannot inject a header (``Bcc:``) and is still sent.
"""

from __future__ import annotations

import json
import os
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from bgservice import ReplyError, Request

TIMEOUT = 60.0
# The longest BGSERVICE_SMTP_TIMEOUT: the watchdog then ends a conversation before the call
# does (its 504 would leave the thread sending, and maybe delivering, behind it).
MAX_SMTP_TIMEOUT = TIMEOUT - 5.0
POLL = 0.05  # seconds between the watchdog's looks at whether the call has given up
# Who may make it send: the service's own alerts (never governed by these), this host
# (``bgservice call notify_email`` to check the settings), schedules and jobs. Any client
# of the service could otherwise mail the operators text of its choosing under the
# service's name (phishing); a site whose other hosts should use it adds them here
# (``"tcp:10.0.0.5"``), as docs/modules.md says of CALL_FROM and QUEUE_FROM.
LOCAL = {"unix", "tcp:127.0.0.1", "tcp:::1"}
CALL_FROM = LOCAL
QUEUE_FROM = LOCAL | {"scheduler", "job"}


def _settings() -> dict[str, str]:
    env = os.environ
    return {
        "host": env.get("BGSERVICE_SMTP_HOST", "localhost"),
        "port": env.get("BGSERVICE_SMTP_PORT", "25"),
        "starttls": env.get("BGSERVICE_SMTP_STARTTLS", "0"),
        "user": env.get("BGSERVICE_SMTP_USER", ""),
        "password": env.get("BGSERVICE_SMTP_PASSWORD", ""),
        "from": env.get("BGSERVICE_SMTP_FROM", f"bgservice@{socket.gethostname()}"),
        "to": env.get("BGSERVICE_SMTP_TO", ""),
        "timeout": env.get("BGSERVICE_SMTP_TIMEOUT", "20"),
    }


def _one_line(value: object) -> str:
    """A header value: every line break (``str.splitlines``'s) folded into a space."""
    return " ".join(str(value).splitlines())


def compose(alert: dict, sender: str, recipients: list[str]) -> EmailMessage:
    host = alert.get("host") or socket.gethostname()
    mail = EmailMessage()
    mail["Subject"] = _one_line(f"[bgservice@{host}] {alert.get('title', 'alert')}")[:250]
    mail["From"] = _one_line(sender)
    mail["To"] = _one_line(", ".join(recipients))
    stamp = alert.get("time")
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not 0 <= stamp < 1e11:
        stamp = time.time()  # absent or not a plausible Unix time: now
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(stamp))
    details = [f"event:  {alert.get('event', '-')}", f"time:   {when}", f"host:   {host}"]
    for key in ("module", "job"):
        if alert.get(key) is not None:
            details.append(f"{key + ':':<8}{alert[key]}")
    if alert.get("counts") and isinstance(alert["counts"], dict):
        details.append("counts: " + ", ".join(f"{k} {v}" for k, v in alert["counts"].items()))
    mail.set_content("\n".join(details) + "\n\n" + str(alert.get("message", "")) + "\n")
    return mail


class _Watchdog:
    """Shuts the SMTP connection's socket down once ``seconds`` have passed or the call
    has given up (``gave_up()``), and from then on refuses every send (``check``)."""

    def __init__(self, seconds: float, gave_up: Callable[[], bool] = lambda: False) -> None:
        self.lock = threading.Lock()
        self.expired = False
        self.socks: list[socket.socket] = []
        self.deadline = time.monotonic() + seconds
        self.gave_up = gave_up
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="smtp-watchdog", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(min(POLL, max(self.deadline - time.monotonic(), 0))):
            if time.monotonic() >= self.deadline or self.gave_up():
                self.fire()
                return

    def check(self) -> None:
        """Before anything goes to the server: nothing once the time is up or the call
        gave up (the watchdog may not have looked yet)."""
        if self.expired or self.gave_up() or time.monotonic() >= self.deadline:
            self.fire()
            raise TimeoutError("timed out")

    def adopt(self, sock: socket.socket) -> None:
        """The TCP socket smtplib just opened, before any TLS handshake: kept as a duplicate
        (a TLS wrap detaches the original), whose shutdown ends the connection for every
        handle on it. Refused if the time is already up."""
        with self.lock:
            if self.expired:
                sock.close()
                raise TimeoutError("timed out")
            self.socks.append(sock.dup())

    def close(self) -> None:
        self.done.set()
        with self.lock:
            for sock in self.socks:
                sock.close()
            self.socks.clear()

    def fire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a recv/send blocked on it
                except OSError:
                    pass


class _SMTP(smtplib.SMTP):
    """smtplib.SMTP that hands its TCP socket to a watchdog."""

    watchdog: _Watchdog

    def open(self, host: str, port: int) -> None:
        # smtplib sets _host only in __init__ (connecting there would be out of the
        # watchdog's reach); TLS (SMTP_SSL, STARTTLS) checks the certificate against it.
        self._host = host
        self.connect(host, port)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        self.watchdog.adopt(sock)
        return sock

    def send(self, s: Any) -> None:
        # Every command and the mail's data pass here: none once the call gave up.
        self.watchdog.check()
        super().send(s)


class _SMTP_SSL(smtplib.SMTP_SSL, _SMTP):
    """Method order SMTP_SSL, _SMTP, SMTP: the TCP socket is adopted before the handshake."""


def _number(
    s: dict[str, str], key: str, kind: type[int] | type[float], low: float, high: float
) -> float:
    """A numeric setting, or a 500 naming the variable."""
    name = f"BGSERVICE_SMTP_{key.upper()}"
    try:
        value = kind(s[key])
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ReplyError(
            500, f"notify_email: {name} must be a number {low:g}-{high:g}, not {s[key][:40]!r}"
        )
    return value


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _switch(s: dict[str, str], key: str) -> bool:
    """An on/off setting, or a 500 naming the variable: "yes" read as off sent the
    password in clear text."""
    word = s[key].strip().lower()
    if word not in _ON + _OFF:
        raise ReplyError(
            500,
            f"notify_email: BGSERVICE_SMTP_{key.upper()} must be 1/true/yes/on or "
            f"0/false/no/off, not {s[key][:40]!r}",
        )
    return word in _ON


def handle_tcp(request: Request) -> str:
    try:
        alert = json.loads(request.data or b"{}")
    except ValueError:  # not JSON (or not UTF-8): the text is the message
        alert = {"title": request.text[:200], "message": request.text}
    if not isinstance(alert, dict):
        raise ReplyError(400, "notify_email: expected an alert as a JSON object")
    s = _settings()
    recipients = [r.strip() for r in s["to"].split(",") if r.strip()]
    if not recipients:
        raise ReplyError(500, "notify_email: set BGSERVICE_SMTP_TO to the recipients")
    port = int(_number(s, "port", int, 1, 65535))
    timeout = _number(s, "timeout", float, 0.001, MAX_SMTP_TIMEOUT)
    starttls = _switch(s, "starttls")
    mail = compose(alert, s["from"], recipients)
    smtp = (_SMTP_SSL if port == 465 else _SMTP)(timeout=timeout)  # not connected yet
    job = request.job
    gave_up = (lambda: job.cancelled) if job is not None else (lambda: False)
    smtp.watchdog = watchdog = _Watchdog(timeout, gave_up)
    watchdog.start()
    try:
        smtp.open(s["host"], port)
        if starttls:
            smtp.starttls()
        if s["user"]:
            smtp.login(s["user"], s["password"])
        smtp.send_message(mail)
    except (OSError, smtplib.SMTPException) as exc:
        problem = str(exc)
        if watchdog.expired and gave_up():
            problem = "stopped: the call gave up (its timeout passed, or it was cancelled)"
        elif watchdog.expired:
            problem = f"timed out after {timeout:g} s (BGSERVICE_SMTP_TIMEOUT)"
        raise ReplyError(502, f"notify_email: {s['host']}:{port}: {problem}") from None
    finally:
        try:
            smtp.quit()  # bounded by the watchdog too; sent is sent even if this fails
        except (OSError, smtplib.SMTPException):
            smtp.close()
        watchdog.close()
    return f"sent to {len(recipients)}"
