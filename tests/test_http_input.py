"""Bad input to the HTTP API, before and after authentication: always a 4xx JSON error,
never a 500 or a traceback in the log (issue 18, item 5). Against a real service."""

from __future__ import annotations

import http.client
import json
import re
import sys
from collections.abc import Callable

import pytest
from conftest import ServiceProcess

pytest.importorskip("aiohttp")

API = "/api/v1"
HTTP = "[http]\nenabled = true\nport = 0\n"


def raw_request(
    svc: ServiceProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str | bytes] | None = None,
) -> tuple[int, dict[str, object]]:
    """One request with headers as raw bytes (urllib would refuse to send them)."""
    host, port = svc.info["http"]
    conn = http.client.HTTPConnection(host, port, timeout=15)
    try:
        conn.putrequest(method, path)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        raw = response.read()
        if not response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, {"text": raw.decode()}
        return response.status, json.loads(raw)
    finally:
        conn.close()


def assert_no_internal_error(svc: ServiceProcess) -> None:
    log = svc.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


@pytest.mark.parametrize("path", ["/metrics", f"{API}/modules", f"{API}/jobs"])
def test_a_token_that_is_not_ascii_is_401_not_500(
    make_service: Callable[..., ServiceProcess], path: str
) -> None:
    svc = make_service(HTTP + 'token = "s3cret-token"\n')
    for given in (b"Bearer \xff", b"Bearer s3cr\xc3\xa9t", b"\xff\xfe s3cret-token"):
        status, body = raw_request(svc, "GET", path, headers={"Authorization": given})
        assert status == 401, (given, body)
        assert body["error"]["code"] == 401  # type: ignore[index]
    assert raw_request(svc, "GET", path, headers={"Authorization": "Bearer s3cret-token"})[0] == 200
    assert_no_internal_error(svc)


def test_a_token_with_non_ascii_letters_still_matches(
    make_service: Callable[..., ServiceProcess],
) -> None:
    svc = make_service(HTTP + 'token = "pässwörd"\n')
    right = "Bearer pässwörd".encode()
    assert raw_request(svc, "GET", f"{API}/stats", headers={"Authorization": right})[0] == 200
    wrong = "Bearer passwörd".encode()
    assert raw_request(svc, "GET", f"{API}/stats", headers={"Authorization": wrong})[0] == 401
    assert_no_internal_error(svc)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 1000 + b"]" * 1000,
        b'{"a": ' * 1000 + b"1" + b"}" * 1000,
        b'{"module": "echo", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["brackets", "objects", "inside-a-field"],
)
def test_deeply_nested_json_is_400_not_500(
    make_service: Callable[..., ServiceProcess], body: bytes
) -> None:
    svc = make_service(HTTP)
    status, reply = raw_request(svc, "POST", f"{API}/jobs", body)
    assert status == 400, reply
    message = reply["error"]["message"]  # type: ignore[index]
    # (Python 3.12 and later parse 1,000 levels: then the reply says what the body is not;
    # 100,000 are too deep for any)
    deep_enough = sys.version_info < (3, 12) or len(body) > 10_000
    assert "nested too deeply" in message or not deep_enough, message
    assert svc.http("GET", f"{API}/modules")[0] == 200
    assert_no_internal_error(svc)


def test_a_request_that_is_not_http_is_400_and_one_log_line(
    make_service: Callable[..., ServiceProcess],
) -> None:
    """aiohttp answers these itself (plain text, before any route); the log must not get a
    traceback at ERROR for what any client can send."""
    import socket

    svc = make_service(HTTP + 'token = "s3cret-token"\n')
    for raw in (
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Probe: \x00\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    ):
        with socket.create_connection(tuple(svc.info["http"]), timeout=15) as sock:
            sock.sendall(raw)
            assert re.match(rb"HTTP/1\.[01] 400 ", sock.recv(4096)), raw
    assert svc.http("GET", f"{API}/stats", token="s3cret-token")[0] == 200
    svc.wait_for_log("Error handling request from 127.0.0.1: 400")
    assert_no_internal_error(svc)
    assert "ERROR" not in svc.log()


def test_numbers_are_written_in_ascii_without_separators(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # Python's float() and int() read them all: ?wait=1_0 waited 10 s, an Arabic-Indic
    # 3 waited 3 s, and a schedule's retries "1_0" made jobs with 10 retries.
    svc = make_service(HTTP)
    _, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "data": "x"})
    for wait in ("1_0", "%D9%A3", "%201%20"):
        status, body = raw_request(svc, "GET", f"{API}/jobs/{job['id']}?wait={wait}")
        assert status == 400 and "wait: expected seconds" in body["error"]["message"], body
    status, body = raw_request(svc, "GET", f"{API}/queue/stats?window=1_000")
    assert status == 400 and "option window: expected a number" in body["error"]["message"]
    schedule = {"name": "s", "module": "echo", "every": 60, "options": {"retries": "1_0"}}
    status, body, _ = svc.http("POST", f"{API}/schedules", schedule)
    while status == 503:  # (the schedules are loading)
        status, body, _ = svc.http("POST", f"{API}/schedules", schedule)
    assert status == 400 and "option retries: expected a whole number" in body["error"]["message"]
    assert_no_internal_error(svc)
