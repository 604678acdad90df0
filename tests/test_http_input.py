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
    # (A schedule's "retries": "1_0" made jobs with 10 retries through its "options" table,
    # which is no field any more: test_a_schedule_takes_its_job_options_as_fields_only.)
    assert_no_internal_error(svc)


def _error(reply: object) -> str:
    assert isinstance(reply, dict), reply
    return str(reply["error"]["message"])


def test_unknown_query_parameters_are_400_naming_the_ones_the_route_reads(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # Ignored over HTTP, though the socket refuses them: ?wiat=10 answered at once (the
    # client sure it had waited), ?stat=failed listed every state, ?windw=60 gave an hour.
    svc = make_service(HTTP)
    _, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "data": "x", "delay": 300})
    jid = job["id"]
    for method, path, message in [
        ("GET", f"{API}/jobs/{jid}?wiat=10",
         "unknown query parameter 'wiat', did you mean wait? (parameters: wait)"),
        ("GET", f"{API}/jobs?stat=failed", "unknown query parameter 'stat', did you mean state? "
         "(parameters: limit, module, name, offset, page_size, page_token, state, tag)"),
        ("GET", f"{API}/queue/stats?windw=60",
         "unknown query parameter 'windw', did you mean window? (parameters: window)"),
        ("GET", f"{API}/stats?x=1", "unknown query parameter 'x' (it takes none)"),
        ("GET", f"{API}/modules/echo?verbose=1", "unknown query parameter 'verbose'"),
        ("GET", "/metrics?name[]=x", "unknown query parameter 'name[]'"),
        ("GET", f"{API}/schedules?x", "unknown query parameter 'x'"),
        ("POST", f"{API}/jobs/{jid}:cancel?force=1", "unknown query parameter 'force'"),
        ("DELETE", f"{API}/jobs/{jid}?wait=1", "unknown query parameter 'wait' (it takes none)"),
    ]:  # fmt: skip
        status, reply = raw_request(svc, method, path)
        assert status == 400, (path, reply)
        assert _error(reply).startswith(message), (path, reply)
    host, port = svc.info["http"]
    conn = http.client.HTTPConnection(host, port, timeout=15)
    conn.request("HEAD", f"{API}/jobs?stat=failed")
    assert conn.getresponse().status == 400  # (HEAD: GET's handler, no body)
    conn.close()
    # Nothing was done: the job still waits; a job posted with a query is not added.
    body = b'{"module": "echo", "data": "y", "delay": 300}'
    status, reply = raw_request(svc, "POST", f"{API}/jobs?priority=5", body)
    assert status == 400 and "unknown query parameter 'priority'" in _error(reply)
    _, listing, _ = svc.http("GET", f"{API}/jobs?state=waiting")
    assert [j["id"] for j in listing["jobs"]["waiting"]] == [jid]
    # What each route reads still works, the deprecated paging too; the dashboard's files
    # are a page, not the API: a query (a cache buster, a campaign tag) still opens it.
    for path in (f"{API}/jobs/{jid}?wait=0", f"{API}/jobs?state=failed&page_size=1",
                 f"{API}/jobs?limit=5&offset=0", f"{API}/queue/stats?window=60",
                 "/dashboard/?utm_source=mail", "/dashboard/app.js?v=2"):  # fmt: skip
        assert raw_request(svc, "GET", path)[0] == 200, path
    assert_no_internal_error(svc)


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("unique", "", "unique="),
        ("name", "", "name="),
        ("tags", "", "tags="),
        ("tags", [], "tags="),
        ("source", "", "source="),
    ],
)
def test_an_empty_string_option_is_refused_as_over_the_socket(
    make_service: Callable[..., ServiceProcess], field: str, value: object, option: str
) -> None:
    # Taken for "not given": two jobs with "unique": "" were both added, where the socket
    # answers 400. null still means not given; an empty list of tags is the socket's tags=.
    svc = make_service(HTTP)
    socket_reply = svc.call(f"queue:add?{option}:echo:x".encode()).decode()
    assert socket_reply == f"400: option {field}: empty (leave it out for the default)"
    for _ in range(2):
        body = {"module": "echo", "data": "x", "delay": 300, field: value}
        status, reply, _ = svc.http("POST", f"{API}/jobs", body)
        assert (status, f"{status}: {_error(reply)}") == (400, socket_reply)
    _, listing, _ = svc.http("GET", f"{API}/jobs?state=waiting")
    assert listing["jobs"]["waiting"] == []
    status, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", field: None})
    assert status == 201 and job[field] in (None, [], "http"), job  # (http: source's default)


def test_each_tag_in_a_list_is_one_tag_or_a_400(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # The list was joined with commas for the socket's parser: ["a,b"] became two tags
    # (201, ["a", "b"]) and [" a"] the tag "a", where the document's pattern refuses both.
    svc = make_service(HTTP)
    # The string's tags alike: " a , b " was trimmed to a and b.
    for tags, bad in [(["a,b"], "a,b"), (["ok", " a"], " a"), (["a", ""], ""), (["x y"], "x y"),
                      (" a , b ", " a "), ("a,,b", ""), ("a, b", " b")]:  # fmt: skip
        body = {"module": "echo", "delay": 300, "tags": tags}
        status, reply, _ = svc.http("POST", f"{API}/jobs", body)
        assert status == 400, (tags, reply)
        assert _error(reply) == ("field tags: each tag is one of A-Z a-z 0-9 _ . : - (a "
                                 f"string \"a,b\" or a list for several), not {bad!r}")  # fmt: skip
    _, listing, _ = svc.http("GET", f"{API}/jobs?state=waiting")
    assert listing["jobs"]["waiting"] == []
    # The string is the socket's comma-separated list, as documented; a list's tags stay whole.
    for tags, kept in [("x,y", ["x", "y"]), (["a", "b.c:d-e_f", "a"], ["a", "b.c:d-e_f"])]:
        status, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "tags": tags})
        assert (status, job["tags"]) == (201, kept), job
    status, reply, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "tags": ["t" * 65]})
    assert status == 400 and "([queue] max_tag_chars)" in _error(reply), reply


def _schedule(svc: ServiceProcess, body: dict[str, object]) -> tuple[int, object]:
    status, reply, _ = svc.http("POST", f"{API}/schedules", body)
    while status == 503 and "not loaded yet" in _error(reply):  # (the schedules are loading)
        status, reply, _ = svc.http("POST", f"{API}/schedules", body)
    return status, reply


def test_a_schedule_takes_its_job_options_as_fields_only(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # An undocumented "options" object went past the type checks ("5" for 5, "1_0" for
    # 10) and lost silently to a field of the same name.
    svc = make_service(HTTP)
    good = {"name": "s", "module": "echo", "every": 60}
    for extra in ({"options": {"priority": "5"}}, {"options": {"priority": 5}, "priority": 7},
                  {"options": {"retries": "1_0"}}, {"colour": "red"}):  # fmt: skip
        status, reply = _schedule(svc, {**good, **extra})
        unknown = next(iter(extra))
        assert status == 400, (extra, reply)
        assert _error(reply).startswith(f"unknown field {unknown!r} (fields: backoff, cron, ")
    assert svc.http("GET", f"{API}/schedules")[1]["schedules"] == []
    status, made = _schedule(svc, {**good, "priority": 5, "retries": 2})
    assert status == 201 and made["options"] == {"priority": "5", "retries": "2"}  # type: ignore[index]


def test_a_body_over_the_limit_is_413_naming_the_limit_and_its_key(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # It said "Request Entity Too Large" (aiohttp's words), naming neither.
    svc = make_service(HTTP + "[limits]\nmax_request_bytes = 1000\n")
    body = json.dumps({"module": "echo", "data": "x" * 2000}).encode()
    status, reply = raw_request(svc, "POST", f"{API}/jobs", body)
    assert status == 413, reply
    assert _error(reply) == "Request too large (limit 1000 bytes, [limits] max_request_bytes)"
    assert svc.call(b"echo:" + b"x" * 2000).startswith(b"413: Request too large (limit 1000")
    assert_no_internal_error(svc)


def _first_reply(svc: ServiceProcess, head: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    """Send ``head`` (a request's headers; with ``body`` unless it asks for 100-continue),
    read what comes back first; then send ``body`` and read the rest (b"" when the first
    was a final reply)."""
    import socket

    with socket.create_connection(tuple(svc.info["http"]), timeout=15) as sock:
        if b"Expect:" not in head:
            sock.sendall(head + body)
            return sock.recv(65536), b""
        sock.sendall(head)
        first = sock.recv(65536)
        if not body or not first.startswith(b"HTTP/1.1 100 "):
            return first, b""
        sock.sendall(body)
        return first, sock.recv(65536)


def _post(headers: str) -> bytes:
    return (f"POST {API}/jobs HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Type: application/json\r\n{headers}\r\n").encode()  # fmt: skip


@pytest.mark.parametrize("expect", ["Expect: 100-continue\r\n", ""])
def test_a_body_announced_over_the_limit_is_413_before_it_is_sent(
    make_service: Callable[..., ServiceProcess], expect: str
) -> None:
    # With Expect, the client heard "100 Continue" and was refused only after 16 MB sent;
    # without it, the reply waited for the body (read_timeout, then a 408).
    svc = make_service(HTTP + "[limits]\nmax_request_bytes = 1000\n")
    first, _ = _first_reply(svc, _post(f"Content-Length: 100000000\r\n{expect}"))
    assert first.startswith(b"HTTP/1.1 413 "), first
    assert b"limit 1000 bytes" in first
    body = json.dumps({"module": "echo", "data": "x"}).encode()  # under it: served
    first, rest = _first_reply(svc, _post(f"Content-Length: {len(body)}\r\n{expect}"), body)
    assert (first + rest).count(b"HTTP/1.1 201 ") == 1, first + rest
    assert_no_internal_error(svc)


def test_100_continue_comes_only_once_the_token_lets_the_body_in(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # aiohttp's expect handler sent it as soon as the path matched, before any check.
    svc = make_service(HTTP + 'token = "s3cret-token"\n')
    body = json.dumps({"module": "echo", "data": "x"}).encode()
    length = f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"
    for refused, status in (("", b"401"), ("Authorization: Bearer wrong\r\n", b"401")):
        first, _ = _first_reply(svc, _post(length + refused), body)
        assert first.startswith(b"HTTP/1.1 " + status + b" "), first
    first, rest = _first_reply(svc, _post(length + "Authorization: Bearer s3cret-token\r\n"), body)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n", first
    assert rest.startswith(b"HTTP/1.1 201 "), rest
    first, _ = _first_reply(svc, _post(length.replace("100-continue", "200-ok")), body)
    assert first.startswith(b"HTTP/1.1 417 "), first  # an expectation it cannot meet
    assert b'"status": "INVALID_ARGUMENT"' in first and b"'200-ok'" in first, first
    assert_no_internal_error(svc)


def test_a_path_or_method_no_route_takes_gets_no_100_continue_either(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # aiohttp answers those with a route of its own, whose expect handler sent 100
    # Continue before any check: a client without a token uploaded its body for a 401.
    svc = make_service(HTTP + 'token = "s3cret-token"\n')
    body = b"x" * 100
    expect = f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"
    good = "Authorization: Bearer s3cret-token\r\n"
    for method, path, extra, status in [
        ("POST", f"{API}/job", "", b"401"), ("PUT", f"{API}/jobs", "", b"401"),
        ("POST", f"{API}/job", good, b"404"), ("PUT", f"{API}/jobs", good, b"405"),
        ("PUT", f"{API}/jobs/1:cancel", good, b"405"),
    ]:  # fmt: skip
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{expect}{extra}\r\n"
        first, _ = _first_reply(svc, head.encode(), body)
        assert first.startswith(b"HTTP/1.1 " + status + b" "), (method, path, first)
        assert b"Connection: close" in first, first  # (its body was never asked for)
        assert b'"code": ' + status in first, first  # JSON, as every error
    allowed = _first_reply(svc, f"PUT {API}/jobs HTTP/1.1\r\nHost: x\r\n{good}\r\n".encode())[0]
    assert b"Allow: " in allowed and b"POST" in allowed, allowed  # 405 says what it takes
    # A path with an encoded line break: a 404 as any other, its query unread (it was a
    # 400 naming the query's parameter, and asked for the body).
    for line, extra, sent in [(f"GET {API}/jobs%0A?state=waiting", "", b""),
                              ("POST /nope%0A", expect, body)]:  # fmt: skip
        head = f"{line} HTTP/1.1\r\nHost: x\r\n{good}{extra}\r\n"
        first, _ = _first_reply(svc, head.encode(), sent)
        assert first.startswith(b"HTTP/1.1 404 "), (head, first)
    assert_no_internal_error(svc)


def test_a_refusal_before_the_body_ends_the_connection_and_417_is_counted(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # Refused instead of 100 Continue, the connection was kept: the next request's bytes
    # were read as the body never sent (a 400, then closed). A 417 (an Expect other than
    # 100-continue) came before the middlewares: no log line, not in /metrics.
    import socket

    svc = make_service(HTTP + 'token = "s3cret-token"\n')
    head = (f"POST {API}/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 28\r\n"
            "Expect: 100-continue\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(tuple(svc.info["http"]), timeout=15) as sock:
        sock.sendall(head)
        reply = b""
        while chunk := sock.recv(65536):  # until the service closes it
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in reply, reply
    good = "Authorization: Bearer s3cret-token\r\n"
    first, _ = _first_reply(svc, _post(f"Content-Length: 2\r\nExpect: nope\r\n{good}"), b"{}")
    assert first.startswith(b"HTTP/1.1 417 ") and b"'nope'" in first, first
    svc.wait_for_log(f"HTTP POST {API}/jobs from 127.0.0.1 (no token): 417")
    _, metrics, _ = svc.http("GET", "/metrics", token="s3cret-token")
    assert re.search(r'bgservice_http_requests_total\{[^}]*code="417"[^}]*\} 1\.0', metrics)


def test_more_tags_than_max_tags_are_refused_before_any_is_checked(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # Each tag was checked first, a regex a tag: 8,000,000 commas held the loop 3 s for
    # the same 400. The count goes first now (what it answers shows the order).
    svc = make_service(HTTP + "[queue]\nmax_tags = 2\n")
    for tags in ("a,b, bad tag", ["a", "b", " bad tag"]):
        status, reply, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "tags": tags})
        assert (status, _error(reply)) == (400, "option tags: at most 2 tags"), tags


def test_a_schedule_field_sent_as_null_is_not_given(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # null meant "not given" for a job's fields, but a schedule's string fields refused
    # it: {"tz": null} was a 400 "expected a string".
    svc = make_service(HTTP)
    status, made = _schedule(svc, {"name": "s", "module": "echo", "every": 60, "cron": None,
                                   "tz": None, "missed": None, "data": None, "paused": None})
    assert status == 201, made
    assert made["paused"] is False and made["every"] == 60  # type: ignore[index]
    status, reply = _schedule(svc, {"name": None, "module": "echo", "every": 60})
    assert status == 400 and "name" in _error(reply), reply  # required: null is not a name
