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
    BGSERVICE_SMTP_STARTTLS  1 to upgrade the connection with STARTTLS (default 0)
    BGSERVICE_SMTP_USER      login, with BGSERVICE_SMTP_PASSWORD (default: no login)
    BGSERVICE_SMTP_FROM      sender (default bgservice@HOST)
    BGSERVICE_SMTP_TO        recipients, comma-separated (required)
    BGSERVICE_SMTP_TIMEOUT   seconds for the whole conversation (default 20)
"""

from __future__ import annotations

import json
import os
import smtplib
import socket
import time
from email.message import EmailMessage

from bgservice import ReplyError, Request

TIMEOUT = 60.0


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


def compose(alert: dict, sender: str, recipients: list[str]) -> EmailMessage:
    host = alert.get("host") or socket.gethostname()
    mail = EmailMessage()
    mail["Subject"] = f"[bgservice@{host}] {alert.get('title', 'alert')}"[:250]
    mail["From"] = sender
    mail["To"] = ", ".join(recipients)
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
    mail = compose(alert, s["from"], recipients)
    port, timeout = int(s["port"]), float(s["timeout"])
    smtp_class = smtplib.SMTP_SSL if port == 465 else smtplib.SMTP
    try:
        with smtp_class(s["host"], port, timeout=timeout) as smtp:
            if s["starttls"] == "1":
                smtp.starttls()
            if s["user"]:
                smtp.login(s["user"], s["password"])
            smtp.send_message(mail)
    except (OSError, smtplib.SMTPException) as exc:
        raise ReplyError(502, f"notify_email: {s['host']}:{port}: {exc}") from None
    return f"sent to {len(recipients)}"
