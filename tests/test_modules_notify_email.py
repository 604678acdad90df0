"""The shipped ``notify_email`` module against a small SMTP stub of the test's own: the
timeout bounds the whole send, bad numeric settings are named, line breaks in an alert's
title or host cannot inject headers. (tests/test_alerts.py covers alerts end to end and
needs aiosmtpd; these need nothing beyond the standard library.)"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message

import pytest

from tests.conftest import ServiceProcess, recv_all, wait_until

GREETING = b"220 slow.example ESMTP stub\r\n"


class SmtpStub:
    """A loopback SMTP server in a thread: ``drip`` > 0 sends the greeting one byte every
    ``drip`` seconds (``hung_up_at``: the bytes it had sent when the client hung up);
    otherwise it accepts every mail and keeps it, with its RCPT TOs. ``accept_after``
    seconds pass between a mail's data and its ``250``, and a mail whose client hung up
    meanwhile is dropped (``dropped``), as aiosmtpd does; ``ended`` counts conversations."""

    def __init__(self, drip: float = 0.0, accept_after: float = 0.0) -> None:
        self.drip = drip
        self.accept_after = accept_after
        self.hung_up_at: int | None = None
        self.dropped = self.ended = 0
        self.mails: list[tuple[list[str], Message]] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                if self.drip:
                    for sent, byte in enumerate(GREETING):
                        if self.stopped.wait(self.drip):
                            return
                        if _hung_up(conn):
                            self.hung_up_at = sent
                            return
                        conn.sendall(bytes([byte]))
                    return  # then hang up
                self._converse(conn)
            except OSError:
                return
            finally:
                self.ended += 1

    def _converse(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        conn.sendall(b"220 stub.example ESMTP\r\n")
        recipients: list[str] = []
        while line := reader.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                conn.sendall(b"354 go on\r\n")
                data = b""
                while (chunk := reader.readline()) not in (b".\r\n", b""):
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                if self._hangs_up(conn, self.accept_after):
                    self.dropped += 1
                    return
                self.mails.append((recipients, message_from_bytes(data)))
                recipients = []
            elif verb == b"RCPT":
                recipients.append(line.decode().split(":", 1)[1].strip())
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            conn.sendall(b"250 stub.example\r\n" if verb != b"DATA" else b"250 queued\r\n")

    def _hangs_up(self, conn: socket.socket, seconds: float) -> bool:
        """Whether the client hangs up (or the stub stops) within ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self.stopped.wait(min(0.02, max(deadline - time.monotonic(), 0))):
            if _hung_up(conn):
                return True
            if time.monotonic() >= deadline:
                return False
        return True

    def close(self) -> None:
        self.stopped.set()
        self.server.close()


def _hung_up(conn: socket.socket) -> bool:
    """Whether the client closed its end (it sends nothing before the greeting)."""
    if not select.select([conn], [], [], 0)[0]:
        return False
    try:
        return not conn.recv(1)
    except OSError:
        return True


@pytest.fixture
def smtp_service(
    make_service: Callable[..., ServiceProcess], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., tuple[ServiceProcess, SmtpStub]]]:
    stubs: list[SmtpStub] = []

    def start(
        drip: float = 0.0, accept_after: float = 0.0, **env: str
    ) -> tuple[ServiceProcess, SmtpStub]:
        stub = SmtpStub(drip, accept_after)
        stubs.append(stub)
        settings = {"host": "127.0.0.1", "port": str(stub.port), "to": "ops@example.org"}
        for name, value in {**settings, **env}.items():
            monkeypatch.setenv(f"BGSERVICE_SMTP_{name.upper()}", value)
        return make_service(), stub

    yield start
    for stub in stubs:
        stub.close()


def test_the_timeout_bounds_the_whole_conversation(smtp_service) -> None:
    # Each byte of the greeting comes well within the timeout; the whole greeting does not
    # (the drip alone lasts 7 s): the service hangs up on the stub in the middle of it, at
    # about the fourth byte, where one that waited out the drip got all of it.
    svc, stub = smtp_service(drip=0.25, timeout="1")
    reply = svc.call(b"notify_email:" + json.dumps({"title": "slow"}).encode())
    assert reply.startswith(b"502: ")
    assert b"timed out after 1 s (BGSERVICE_SMTP_TIMEOUT)" in reply
    wait_until(lambda: stub.hung_up_at is not None)
    assert stub.hung_up_at is not None and stub.hung_up_at < len(GREETING) // 2


@pytest.mark.parametrize(
    ("variable", "value"),
    # A timeout over the module's TIMEOUT (60) outlived the call: see the test below.
    [("port", "abc"), ("port", "70000"), ("timeout", "soon"), ("timeout", "56")],
)
def test_a_bad_number_setting_is_named(smtp_service, variable: str, value: str) -> None:
    svc, stub = smtp_service(**{variable: value})
    reply = svc.call(b"notify_email:" + json.dumps({"title": "t"}).encode())
    assert reply.startswith(b"500: notify_email: BGSERVICE_SMTP_" + variable.upper().encode())
    assert repr(value).encode() in reply
    assert b"ValueError" not in reply
    assert not stub.mails
    assert "Traceback" not in svc.log()


def test_line_breaks_in_title_and_host_are_folded(smtp_service) -> None:
    svc, stub = smtp_service()
    alert = {"title": "a\nBcc: victim@x", "host": "web1\r\nX-Injected: 1", "message": "m"}
    reply = svc.call(b"notify_email:" + json.dumps(alert).encode())
    assert reply == b"sent to 1"
    ((recipients, mail),) = stub.mails
    assert recipients == ["<ops@example.org>"]
    assert mail["Subject"] == "[bgservice@web1 X-Injected: 1] a Bcc: victim@x"
    assert mail["Bcc"] is None and mail["X-Injected"] is None
    other = {"title": "u\u2028v\x85w\x0bx"}  # the other line breaks str.splitlines knows
    assert svc.call(b"notify_email:" + json.dumps(other).encode()) == b"sent to 1"
    assert stub.mails[1][1]["Subject"].endswith("] u v w x")


@pytest.mark.parametrize(("value", "sent"), [("Yes", False), ("on", False), ("off", True)])
def test_starttls_takes_the_usual_words(smtp_service, value: str, sent: bool) -> None:
    # "yes", "true", "on" were read as off: the login went out in clear text. The stub
    # offers no STARTTLS, so asking for it fails the send (502): no mail in clear text.
    svc, stub = smtp_service(starttls=value)
    reply = svc.call(b"notify_email:" + json.dumps({"title": "t"}).encode())
    if sent:
        assert reply == b"sent to 1"
    else:
        assert reply.startswith(b"502: ") and b"STARTTLS" in reply, reply
        assert not stub.mails


def test_a_bad_starttls_is_named(smtp_service) -> None:
    svc, stub = smtp_service(starttls="maybe")
    reply = svc.call(b"notify_email:" + json.dumps({"title": "t"}).encode())
    assert reply.startswith(b"500: notify_email: BGSERVICE_SMTP_STARTTLS must be "), reply
    assert b"'maybe'" in reply and not stub.mails


def test_no_mail_goes_out_once_its_job_has_given_up(smtp_service) -> None:
    # A job whose timeout= is shorter than the conversation failed (504), and the thread it
    # left behind went on and delivered the mail: one per attempt, for a job that "failed".
    svc, stub = smtp_service(accept_after=2.5)
    alert = json.dumps({"title": "once"}).encode()
    reply = svc.call(b"queue:add?wait=1&timeout=0.5:notify_email:" + alert)
    assert reply == b"504: Module notify_email timed out after 0.5 s"
    wait_until(lambda: stub.ended == 1)
    assert (stub.dropped, stub.mails) == (1, [])


def test_only_this_host_may_make_it_mail(smtp_service) -> None:
    # Found by a security review: any client of the service could mail the operators text
    # of its choosing under the service's name. Calls and jobs from another host (here
    # 127.0.0.2, which is not in the module's CALL_FROM / QUEUE_FROM) are refused; this
    # host's check by hand still sends.
    svc, stub = smtp_service()
    payload = b"notify_email:" + json.dumps({"title": "Your password expires"}).encode()
    for request in (payload, b"queue:add:" + payload):
        with socket.socket() as outsider:
            outsider.settimeout(10)
            outsider.bind(("127.0.0.2", 0))
            outsider.connect(svc.tcp)
            outsider.sendall(request)
            outsider.shutdown(socket.SHUT_WR)
            reply = recv_all(outsider)
        assert reply.startswith(b"403: module notify_email: "), reply
        assert b"(source tcp:127.0.0.2:" in reply
    assert not stub.mails
    assert svc.call(payload) == b"sent to 1"
    assert len(stub.mails) == 1
