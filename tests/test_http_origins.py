"""Which pages may drive the HTTP API with no token set (bgservice/http/origins.py): a
cross-site form post and a DNS-rebound name are refused, the service's own page and
command-line clients are not. Real HTTP, headers as a browser sends them."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import ServiceProcess

pytest.importorskip("aiohttp")

HTTP = "[http]\nenabled = true\nport = 0\n"
API = "/api/v1"
JOB = json.dumps({"module": "echo", "data": "x", "delay": 300}).encode()


def _send(
    svc: ServiceProcess, method: str, path: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, Any]:
    req = urllib.request.Request(svc.http_url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _waiting(svc: ServiceProcess) -> list[Any]:
    status, body, _ = svc.http("GET", f"{API}/jobs?state=waiting")
    assert status == 200
    return list(body["jobs"]["waiting"])


@pytest.fixture
def svc(make_service: Callable[..., ServiceProcess]) -> ServiceProcess:
    return make_service(HTTP + 'allowed_hosts = ["jobs.example.com"]\n')


def test_a_cross_site_form_post_adds_no_job(svc: ServiceProcess) -> None:
    # A page anywhere, shown by a browser on this machine, posting text/plain (no CORS
    # preflight): it added a job whenever no token was set.
    forged = {"Content-Type": "text/plain", "Origin": "http://attacker.example"}
    status, body = _send(svc, "POST", f"{API}/jobs", forged, JOB)
    assert status == 403 and body["error"]["status"] == "PERMISSION_DENIED"
    assert "origin 'http://attacker.example' may not POST" in body["error"]["message"]
    assert _send(svc, "POST", f"{API}/jobs", {"Origin": "null"}, JOB)[0] == 403
    assert _waiting(svc) == []


def test_the_services_own_page_and_clients_without_origin_may_post(svc: ServiceProcess) -> None:
    port = urlsplit(svc.http_url).port
    own = {"Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/json"}
    assert _send(svc, "POST", f"{API}/jobs", own, JOB)[0] == 201
    local = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    assert _send(svc, "POST", f"{API}/jobs", local, JOB)[0] == 201
    assert _send(svc, "POST", f"{API}/jobs", {}, JOB)[0] == 201  # curl, scripts: no Origin
    assert len(_waiting(svc)) == 3


def test_a_second_origin_header_is_not_let_past_the_check(svc: ServiceProcess) -> None:
    # Only the first was read: this service's own origin, then a foreign one, got a 201.
    url = urlsplit(svc.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=15)
    try:
        conn.putrequest("POST", f"{API}/jobs")
        conn.putheader("Origin", f"http://127.0.0.1:{url.port}")
        conn.putheader("Origin", "http://attacker.example")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(JOB)))
        conn.endheaders(JOB)
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 403, body
    assert body["error"]["message"] == "Forbidden: more than one Origin header"
    assert _waiting(svc) == []


def test_a_rebound_host_name_reads_nothing(svc: ServiceProcess) -> None:
    # DNS rebinding: the attacker's name now points at 127.0.0.1, so its page is
    # same-origin with the API and could read every job, unless the Host is checked.
    port = urlsplit(svc.http_url).port
    status, body = _send(svc, "GET", f"{API}/jobs", {"Host": f"rebound.example:{port}"})
    assert status == 403 and "Host 'rebound.example:" in body["error"]["message"]
    assert "[http] allowed_hosts" in body["error"]["message"]
    assert _send(svc, "GET", f"{API}/jobs", {"Host": f"jobs.example.com:{port}"})[0] == 200
    assert _send(svc, "GET", f"{API}/jobs", {"Host": f"[::1]:{port}"})[0] == 200


def test_with_a_token_the_token_is_the_guard(make_service: Callable[..., ServiceProcess]) -> None:
    svc = make_service(HTTP + 'token = "s3cret-token"\n')
    port = urlsplit(svc.http_url).port
    headers = {"Authorization": "Bearer s3cret-token", "Host": f"proxy.example:{port}",
               "Origin": "https://proxy.example"}  # fmt: skip
    assert _send(svc, "POST", f"{API}/jobs", headers, JOB)[0] == 201
    no_token = {"Origin": "http://attacker.example"}
    assert _send(svc, "POST", f"{API}/jobs", no_token, JOB)[0] == 401


def test_allowed_hosts_must_be_names(make_service: Callable[..., ServiceProcess]) -> None:
    svc = make_service(HTTP + 'allowed_hosts = ["jobs.example.com:80"]\n', start=False)
    svc.start(wait=False)
    assert svc.wait() == 2
    assert "[http] allowed_hosts (line" in svc.log()
    assert "must be host names without a scheme or port" in svc.log()


def test_a_leading_wildcard_allows_the_names_under_it(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # "*.example.com" was accepted and compared as written: no name matched it.
    svc = make_service(HTTP + 'allowed_hosts = ["*.example.com"]\n')
    port = urlsplit(svc.http_url).port
    for host, status in [("jobs.example.com", 200), ("a.b.example.com", 200),
                         ("JOBS.Example.com.", 200), ("example.com", 403),
                         ("evilexample.com", 403), ("example.com.evil.test", 403)]:  # fmt: skip
        assert _send(svc, "GET", f"{API}/jobs", {"Host": f"{host}:{port}"})[0] == status, host


@pytest.mark.parametrize("name", ["jobs*.example.com", "*.*.example.com", "jobs.*"])
def test_a_wildcard_elsewhere_stops_the_start(
    make_service: Callable[..., ServiceProcess], name: str
) -> None:
    svc = make_service(HTTP + f'allowed_hosts = ["{name}"]\n', start=False)
    svc.start(wait=False)
    assert svc.wait() == 2
    assert "[http] allowed_hosts (line" in svc.log()
    assert "a * only as a whole first label (*.example.com), or alone" in svc.log()
