"""The operator's HTTP API (bgservice/http/api.py), driven over real HTTP."""

from __future__ import annotations

import base64
import http.client
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
from conftest import GATE, ServiceProcess, wait_until, write_module

pytest.importorskip("aiohttp")

HTTP = "[http]\nenabled = true\nport = 0\n"
API = "/api/v1"


@pytest.fixture
def svc(make_service: Callable[..., ServiceProcess], modules_dir: Path) -> ServiceProcess:
    write_module(modules_dir, "boom", "def handle_tcp(request):\n    raise ValueError('boom')\n")
    return make_service(HTTP)


def test_off_by_default(service: ServiceProcess) -> None:
    assert "http" not in service.info
    assert "HTTP API" not in service.log()


def test_modules(svc: ServiceProcess) -> None:
    status, body, _ = svc.http("GET", f"{API}/modules")
    assert status == 200
    names = {m["name"]: m for m in body["modules"]}
    assert names["echo"]["state"] == "loaded" and names["echo"]["error"] is None
    assert names["echo"]["execution"] == "loop"
    status, one, _ = svc.http("GET", f"{API}/modules/echo")
    assert (status, one["name"], one["accepts"]) == (200, "echo", ["queue", "tcp", "udp"])
    status, body, headers = svc.http("GET", f"{API}/modules/nope")
    assert status == 404
    assert headers["Content-Type"].startswith("application/json")
    assert body == {
        "error": {"code": 404, "message": "Module nope not found", "status": "NOT_FOUND"}
    }


def test_add_a_job_with_options_and_read_its_result(svc: ServiceProcess) -> None:
    job = {"module": "echo", "data": "héllo", "priority": 7, "retries": 2, "timeout": 5,
           "backoff": 0.5, "unique": "k1"}  # fmt: skip
    status, body, headers = svc.http("POST", f"{API}/jobs", job)
    assert status == 201, body
    jid = body["id"]
    assert headers["Location"] == f"jobs/{jid}"  # (relative: behind a sub-path proxy too)
    assert urljoin(f"{API}/jobs", headers["Location"]) == f"{API}/jobs/{jid}"
    assert (body["module"], body["priority"], body["max_retries"], body["timeout"]) == (
        "echo", 7, 2, 5.0)  # fmt: skip
    status, done, _ = svc.http("GET", f"{API}/jobs/{jid}?wait=10")
    assert status == 200
    assert (done["state"], done["status"], done["result"]) == ("done", 200, "héllo")
    # The socket protocol sees the same job.
    assert svc.call(f"queue:get:id:{jid}".encode()) == "héllo".encode()


def test_binary_data_and_results_travel_as_base64(svc: ServiceProcess) -> None:
    raw = bytes(range(256))
    body = {"module": "echo", "data_base64": base64.b64encode(raw).decode()}
    status, job, _ = svc.http("POST", f"{API}/jobs", body)
    assert status == 201
    _, done, _ = svc.http("GET", f"{API}/jobs/{job['id']}?wait=10")
    assert "result" not in done
    assert base64.b64decode(done["result_base64"]) == raw


def test_a_job_added_over_the_socket_is_read_over_http(svc: ServiceProcess) -> None:
    jid = int(svc.call(b"queue:add:echo:from the socket").decode().split(":")[1])
    _, job, _ = svc.http("GET", f"{API}/jobs/{jid}?wait=10")
    assert job["result"] == "from the socket"


def test_wait_returns_the_status_of_an_unfinished_job(svc: ServiceProcess) -> None:
    _, job, _ = svc.http("POST", f"{API}/jobs", {"module": "sleep", "data": "3000"})
    status, seen, _ = svc.http("GET", f"{API}/jobs/{job['id']}?wait=0.2")
    assert status == 200 and seen["state"] in ("waiting", "running")
    assert "result" not in seen


def _http_waiting(svc: ServiceProcess) -> float:
    """The ``?wait=`` requests open now, as /metrics counts them."""
    _, text, _ = svc.http("GET", "/metrics")
    found = re.search(r"^bgservice_http_waiting (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


@pytest.mark.parametrize("queue_backend", ["sqlite", "redis"])
def test_a_job_that_expires_as_it_ends_is_added_and_its_wait_gets_the_result(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    # keep_results = 0: POST read the job back after the add, found it expired (an echo
    # ends as it starts) and answered 404, so a client that asked again ran it twice; a
    # ?wait= read it back once it ended and answered 404 too, where queue:get (and
    # queue:add's id:N) answer whatever keep_results says.
    write_module(modules_dir, "gate", GATE)
    write_module(modules_dir, "fails", "async def handle_tcp(request):\n    raise ValueError\n")
    svc = make_service(HTTP + "[queue]\nkeep_results = 0\n")
    ids = set()
    for n in range(5):
        for body, end in [({"module": "echo", "data": f"hi {n}"}, ("done", 200, f"hi {n}")),
                          ({"module": "fails", "retries": 0}, ("failed", 500, None))]:  # fmt: skip
            status, job, headers = svc.http("POST", f"{API}/jobs", body)
            assert status == 201, job
            assert headers["Location"] == f"jobs/{job['id']}"
            assert job["module"] == body["module"] and job["id"] not in ids
            ids.add(job["id"])
            if job.get("expired"):  # ended before the reply: what the add knows of it
                assert (job["state"], job["status"]) == end[:2], job
                assert end[2] is None or job["result"] == end[2]
            else:
                assert job["state"] in ("waiting", "running"), job
    gate = svc.root / "gate-open"
    _, job, _ = svc.http("POST", f"{API}/jobs", {"module": "gate", "data": str(gate)})
    replies: list[tuple[int, Any, dict[str, str]]] = []
    url = f"{API}/jobs/{job['id']}?wait=60"
    waiter = threading.Thread(target=lambda: replies.append(svc.http("GET", url)))
    waiter.start()
    wait_until(lambda: _http_waiting(svc) == 1)
    gate.touch()  # the job ends while the request waits for it
    waiter.join(30)
    ((status, done, _),) = replies
    assert status == 200, done
    assert (done["id"], done["module"], done["expired"]) == (job["id"], "gate", True)
    assert (done["state"], done["status"], done["result"]) == ("done", 200, "open")
    # A read after its end has no record to read: 404, as queue:get answers.
    assert svc.http("GET", f"{API}/jobs/{job['id']}")[0] == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "the body must be a JSON object"),
        (b"[1, 2]", "the body must be a JSON object"),
        ({"data": "x"}, "field module: expected a module name"),
        ({"module": "echo", "colour": "red"}, "unknown field 'colour'"),
        ({"module": "echo", "priority": "high"}, "field priority: expected a number"),
        ({"module": "echo", "priority": "5"}, "field priority: expected a number"),
        ({"module": "echo", "priority": 1.5}, "field priority: expected a whole number"),
        ({"module": "echo", "priority": True}, "field priority: expected a number"),
        ({"module": "echo", "unique": 5}, "field unique: expected a string"),
        ({"module": ""}, "field module: expected a module name"),
        ({"module": "ec ho"}, "field module: expected a module name"),
        ({"module": "echo", "data": 5}, "field data: expected a string"),
        ({"module": "echo", "data_base64": "!!"}, "field data_base64: not valid base64"),
        ({"module": "echo", "timeout": 0}, "timeout: must be a finite number greater than 0"),
        ({"module": "nosuchmodule"}, "field module: unknown module 'nosuchmodule'"),
        ({"module": "echo", "data": "\ud800"}, "field data: not valid Unicode"),
        ({"module": "\ud800"}, "field module: expected a module name"),
        ({"module": "echo", "unique": "\udfff"}, "field unique: not valid Unicode"),
        (b'{"module": "echo", "priority": ' + b"9" * 5000 + b"}", "must be a JSON object"),
        ({"module": "echo", "data_base64": 5}, "field data_base64: expected a base64"),
        ({"module": "echo", "data": "x", "data_base64": "eA=="}, "give one, not both"),
    ],
)
def test_bad_jobs_get_400_with_the_reason(svc: ServiceProcess, body: object, message: str) -> None:
    status, reply, _ = svc.http("POST", f"{API}/jobs", body)
    assert status == 400
    assert reply["error"]["code"] == 400
    assert message in reply["error"]["message"]


def test_bodies_the_server_cannot_read_are_400_not_internal_errors(svc: ServiceProcess) -> None:
    import http.client

    host, port = svc.info["http"]
    for headers, body in (
        ({"Content-Type": "application/json; charset=bogus-cs"}, b'{"module": "echo"}'),
        ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, b"not gzip"),
    ):
        conn = http.client.HTTPConnection(host, port, timeout=15)
        conn.request("POST", f"{API}/jobs", body, headers)
        response = conn.getresponse()
        assert response.status == 400, (headers, response.read())
        assert json.loads(response.read())["error"]["status"] == "INVALID_ARGUMENT"
        conn.close()
    # aiohttp met the broken gzip body again draining it, and logged a traceback at ERROR.
    assert "internal error" not in svc.log() and "Traceback" not in svc.log()
    assert svc.http("GET", f"{API}/modules")[0] == 200


def test_a_content_encoding_the_service_cannot_decode_is_415(svc: ServiceProcess) -> None:
    # aiohttp took an unknown coding for identity and read the body as it came.
    body = json.dumps({"module": "echo", "data": "x", "delay": 60}).encode()
    import http.client

    host, port = svc.info["http"]
    conn = http.client.HTTPConnection(host, port, timeout=15)
    conn.request("POST", f"{API}/jobs", body, {"Content-Encoding": "zstd-ish"})
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    conn.close()
    assert response.status == 415 and "Content-Encoding 'zstd-ish'" in error["message"]
    assert svc.http("GET", f"{API}/jobs?state=waiting")[1]["jobs"]["waiting"] == []


def test_dashboard_paths_that_are_not_files_get_json_or_a_redirect(svc: ServiceProcess) -> None:
    status, page, _ = svc.http("GET", "/dashboard")  # no slash: was a 403 (a folder)
    assert status == 200 and "<title>bgservice" in page
    status, error, _ = svc.http("GET", "/dashboard/nope.js")  # was an empty 404
    assert status == 404 and "No file 'nope.js'" in error["error"]["message"]
    assert svc.http("GET", "/dashboard/app.js")[0] == 200
    assert svc.http("GET", "/dashboard/..%2fapi.py")[0] == 404


def test_cancel_and_retry(svc: ServiceProcess) -> None:
    _, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "data": "x", "delay": 60})
    jid = job["id"]
    assert job["state"] == "waiting"
    status, body, _ = svc.http("POST", f"{API}/jobs/{jid}:retry")
    assert status == 409 and "only failed or cancelled" not in body["error"]["message"]
    assert body["error"]["status"] == "FAILED_PRECONDITION"
    status, body, _ = svc.http("POST", f"{API}/jobs/{jid}:cancel")
    assert (status, body) == (200, {"id": jid, "state": "cancelled"})
    status, body, _ = svc.http("POST", f"{API}/jobs/{jid}:cancel")
    assert status == 409 and "already finished" in body["error"]["message"]
    _, seen, _ = svc.http("GET", f"{API}/jobs/{jid}")
    assert (seen["state"], seen["status"]) == ("cancelled", 410)
    status, again, _ = svc.http("POST", f"{API}/jobs/{jid}:retry")
    assert status == 200 and again["id"] == jid
    _, done, _ = svc.http("GET", f"{API}/jobs/{jid}?wait=10")
    assert (done["state"], done["result"]) == ("done", "x")
    assert svc.http("POST", f"{API}/jobs/999999:cancel")[0] == 404
    huge = 10**25  # beyond SQLite's INTEGER: a clear 400, and the queue goes on
    for method, path in (("GET", ""), ("POST", ":cancel"), ("POST", ":retry")):
        status, body, _ = svc.http(method, f"{API}/jobs/{huge}{path}")
        assert status == 400 and "job id out of range" in body["error"]["message"], body
    assert svc.http("GET", f"{API}/jobs/{jid}")[0] == 200


def test_failed_jobs_are_listed_and_retried(svc: ServiceProcess) -> None:
    _, job, _ = svc.http("POST", f"{API}/jobs", {"module": "boom"})
    _, done, _ = svc.http("GET", f"{API}/jobs/{job['id']}?wait=10")
    assert (done["state"], done["status"]) == ("failed", 500)
    assert "ValueError: boom" in done["result"]
    _, listed, _ = svc.http("GET", f"{API}/jobs?state=failed")
    assert [j["id"] for j in listed["jobs"]["failed"]] == [job["id"]]
    assert "ValueError: boom" in listed["jobs"]["failed"][0]["error"]
    status, retried, _ = svc.http("POST", f"{API}/jobs/{job['id']}:retry")
    assert status == 200 and retried["state"] in ("waiting", "running")
    _, again, _ = svc.http("GET", f"{API}/jobs/{job['id']}?wait=10")
    assert again["state"] == "failed" and again["attempts"] == 1


def test_list_pages_through_waiting_jobs_in_run_order(svc: ServiceProcess) -> None:
    # Delayed jobs are in line by when they come due, whatever their priority.
    ids = []
    for priority, delay in ((1, 50), (5, 10), (3, 30), (4, 20), (2, 40)):
        _, job, _ = svc.http("POST", f"{API}/jobs",
                             {"module": "echo", "priority": priority, "delay": delay})  # fmt: skip
        ids.append((delay, job["id"]))
    order = [jid for _, jid in sorted(ids)]
    _, page, _ = svc.http("GET", f"{API}/jobs?state=waiting&limit=2&offset=1")
    assert (page["limit"], page["offset"]) == (2, 1)
    assert [j["id"] for j in page["jobs"]["waiting"]] == order[1:3]
    _, everything, _ = svc.http("GET", f"{API}/jobs")
    assert set(everything["jobs"]) == {"waiting", "running", "failed"}
    status, body, _ = svc.http("GET", f"{API}/jobs?state=lost")
    assert status == 400 and "state must be one of" in body["error"]["message"]
    assert svc.http("GET", f"{API}/jobs?limit=0")[0] == 400


def test_jobs_are_listed_by_module_name_and_tag_a_page_at_a_time(svc: ServiceProcess) -> None:
    added = []
    for module, name, tags in (("echo", "report", ["monthly"]), ("echo", "report", ["weekly"]),
                               ("test", "report", ["monthly"]), ("echo", "Report", ["monthly"]),
                               ("echo", "report", ["monthly", "pdf"])):  # fmt: skip
        body = {"module": module, "name": name, "tags": tags, "delay": 600}
        status, job, _ = svc.http("POST", f"{API}/jobs", body)
        assert status == 201, job
        added.append(job["id"])
    query = f"{API}/jobs?state=waiting&module=echo&name=report&tag=monthly&page_size=1"
    status, first, _ = svc.http("GET", query)
    assert status == 200 and [j["id"] for j in first["jobs"]["waiting"]] == [added[0]]
    _, second, _ = svc.http("GET", f"{query}&page_token={first['next_page_token']}")
    assert [j["id"] for j in second["jobs"]["waiting"]] == [added[4]]
    assert second["next_page_token"] == ""  # (the filtered list's last page)
    _, every, _ = svc.http("GET", f"{API}/jobs?tag=pdf")
    assert {state: [j["id"] for j in rows] for state, rows in every["jobs"].items()} == {
        "waiting": [added[4]], "running": [], "failed": []}  # fmt: skip
    for query, message in [
        ("module=", "query parameter module: empty (leave it out for the default)"),
        ("tag=a&tag=b", "query parameter tag: given more than once"),
        ("modul=echo", "unknown query parameter 'modul', did you mean module?"),
        ("module=e:cho", "option module: expected a module name (A-Z a-z 0-9 _ -)"),
        ("tag=a,b", "option tag: one tag, 1-64 of"),
    ]:
        status, body, _ = svc.http("GET", f"{API}/jobs?{query}")
        assert status == 400 and message in body["error"]["message"], (query, body)


def test_stats_match_the_socket_protocol(svc: ServiceProcess) -> None:
    for _ in range(3):
        assert svc.call(b"test:x") == b"Test"
    _, stats, _ = svc.http("GET", f"{API}/stats")
    assert stats["modules"]["test"]["tcp"]["requests"] == 3
    _, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "data": "1"})
    svc.http("GET", f"{API}/jobs/{job['id']}?wait=10")
    status, queue, _ = svc.http("GET", f"{API}/queue/stats?window=600")
    assert status == 200
    assert queue["counts"]["done"] >= 1 and queue["window"]["runs"] >= 1
    assert queue["window"]["seconds"] == 600
    over_socket = json.loads(svc.call(b"queue:stats?window=600"))
    assert queue["counts"] == over_socket["counts"]
    assert queue["window"]["by_hour"] == over_socket["window"]["by_hour"]
    assert svc.http("GET", f"{API}/queue/stats?window=soon")[0] == 400


def test_unknown_routes_and_methods_are_json_errors(svc: ServiceProcess) -> None:
    status, body, _ = svc.http("GET", f"{API}/nothing")
    assert (status, body["error"]["code"]) == (404, 404)
    status, body, headers = svc.http("DELETE", f"{API}/jobs")
    assert (status, body["error"]["code"]) == (405, 405)
    assert "POST" in headers["Allow"]


def test_dashboard_is_served(svc: ServiceProcess) -> None:
    status, page, _ = svc.http("GET", "/")  # redirected to /dashboard/
    assert status == 200 and "<title>bgservice</title>" in page
    status, script, headers = svc.http("GET", "/dashboard/page.js")
    assert status == 200 and "busy-chart" in script
    assert "javascript" in headers["Content-Type"]
    assert svc.http("GET", "/dashboard/app.js")[0] == 200


def test_the_token_guards_api_and_metrics_but_not_the_page(
    make_service: Callable[..., ServiceProcess],
) -> None:
    svc = make_service(HTTP + 'token = "s3cret-token"\n')
    status, body, headers = svc.http("GET", f"{API}/modules")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert body["error"]["code"] == 401
    assert svc.http("GET", f"{API}/modules", token="wrong")[0] == 401
    assert svc.http("GET", "/metrics")[0] == 401
    assert svc.http("GET", f"{API}/modules", token="s3cret-token")[0] == 200
    assert svc.http("GET", "/metrics", token="s3cret-token")[0] == 200
    assert svc.http("GET", "/dashboard/")[0] == 200
    assert svc.http("GET", "/dashboard")[0] == 200  # its redirect too (it asked for one)
    assert "bearer token required" in svc.log()


def test_the_token_can_come_from_the_environment(
    make_service: Callable[..., ServiceProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGSERVICE_HTTP_TOKEN", "from-env")
    svc = make_service(HTTP)
    assert svc.http("GET", f"{API}/stats")[0] == 401
    assert svc.http("GET", f"{API}/stats", token="from-env")[0] == 200


def test_off_loopback_the_allow_list_applies(make_service: Callable[..., ServiceProcess]) -> None:
    svc = make_service(HTTP + 'host = "0.0.0.0"\n', start=False)
    svc.config.write_text('allow = ["10.0.0.0/8"]\n' + svc.config.read_text())
    svc.start()
    svc.info["http"][0] = "127.0.0.1"
    status, body, _ = svc.http("GET", f"{API}/modules")
    assert (status, body["error"]["message"]) == (403, "Forbidden")


def test_a_taken_port_stops_the_start_with_a_clear_error(
    make_service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = make_service(f"[http]\nenabled = true\nport = {port}\n", start=False)
        svc.start(wait=False)
        assert svc.wait() == 1
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in svc.log()
    assert f"(another port: [http] port in {svc.config})" in svc.log()


def test_openapi_document_matches_the_routes(svc: ServiceProcess) -> None:
    from bgservice.config import Settings
    from bgservice.http.api import HttpApi
    from bgservice.http.openapi import FILE

    status, served, _ = svc.http("GET", f"{API}/openapi.json")
    assert status == 200
    document = json.loads(FILE.read_text())
    for doc in (served, document):  # (the latest delay counts from now: served as it is)
        doc["components"]["schemas"]["NewJob"]["properties"]["delay"].pop("maximum")
    assert served == {**document, "servers": [{"url": "/"}]}  # the file's numbers: defaults
    api = HttpApi(Settings(), None, None, None, None, None)  # type: ignore[arg-type]
    routes = set()
    for route in api.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix", "") + "/"
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)
        if route.method != "HEAD" and path != "/{unmatched}":  # (the 404s' and 405s')
            routes.add((route.method.lower(), path))
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert routes == documented
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], (method, path)


def test_schedules_over_http(make_service):
    svc = make_service("[http]\nenabled = true\nport = 0\n")
    body = {"name": "hourly", "module": "echo", "data": "h", "every": 3600, "priority": 3}
    status, made, headers = wait_until(
        lambda: (r := svc.http("POST", "/api/v1/schedules", body)) and r[0] != 503 and r
    )
    assert status == 201 and headers["Location"] == "schedules/hourly"
    assert made["options"] == {"priority": "3"} and made["next_run"] % 3600 == 0
    assert svc.http("GET", "/api/v1/schedules")[1]["schedules"][0]["name"] == "hourly"
    assert svc.http("POST", "/api/v1/schedules/hourly:pause")[1]["paused"] is True
    assert svc.http("GET", "/api/v1/schedules/hourly")[1]["next_run"] is None
    assert svc.http("POST", "/api/v1/schedules/hourly:resume")[1]["paused"] is False
    status, run, headers = svc.http("POST", "/api/v1/schedules/hourly:run")
    assert status == 201 and headers["Location"] == f"../jobs/{run['id']}"
    job = urljoin("/api/v1/schedules/hourly:run", headers["Location"])  # as a client reads it
    assert svc.http("GET", f"{job}?wait=10")[1]["result"] == "h"
    assert svc.http("DELETE", "/api/v1/schedules/hourly")[:2] == (200, {})
    status, error, _ = svc.http("GET", "/api/v1/schedules/hourly")
    assert status == 404 and error["error"]["status"] == "NOT_FOUND"
    status, error, _ = svc.http("POST", "/api/v1/schedules", {"name": "x", "module": "echo"})
    assert status == 400 and "give either cron or every" in error["error"]["message"]
    # Each field of the JSON type the document gives it (as POST /jobs): these were stored,
    # `every: true` as a schedule every second (found by a review).
    good = {"name": "t", "module": "echo", "every": 60}
    for change, message in [
        ({"every": True}, "field every: expected a number"),
        ({"every": "30"}, "field every: expected a number"),
        ({"module": "ec ho"}, "field module: expected a module name"),
        ({"priority": "5"}, "field priority: expected a number"),
        ({"priority": 1.5}, "field priority: expected a whole number"),
        ({"paused": "yes"}, "field paused: expected true or false"),
        ({"data": 5}, "field data: expected a string"),
        ({"options": [1]}, "unknown field 'options'"),
    ]:
        status, error, _ = svc.http("POST", "/api/v1/schedules", {**good, **change})
        assert status == 400 and error["error"]["message"].startswith(message), change
    assert svc.http("GET", "/api/v1/schedules")[1]["schedules"] == []


def test_a_schedule_without_its_name_or_module_says_which_and_null(svc: ServiceProcess) -> None:
    # "name": null was dropped as not given and answered "name must be ..., got ''": a
    # name the client never sent. Both are required (docs/http.md), null is not one.
    every = {"every": 60}
    for body, message in [
        ({"name": None, "module": "echo", **every}, "field name: required, got null"),
        ({"module": "echo", **every}, "field name: required, not given"),
        ({"name": "n", "module": None, **every}, "field module: required, got null"),
        ({"name": "n", **every}, "field module: required, not given"),
    ]:
        status, error, _ = svc.http("POST", f"{API}/schedules", body)
        assert (status, error["error"]["message"]) == (400, message), body
    status, made, _ = wait_until(  # a null optional field is still "not given"
        lambda: (r := svc.http("POST", f"{API}/schedules", {"name": "n", "module": "echo",
                                                            "tz": None, **every}))
        and r[0] != 503 and r
    )  # fmt: skip
    assert (status, made["name"], made["tz"]) == (201, "n", "UTC")


def test_a_schedule_every_too_large_for_a_float_is_a_400(svc: ServiceProcess) -> None:
    # An integer of 400 digits overflowed float(): 500, a traceback and an error alert.
    for every in (10**400, 1e308):
        body = {"name": "huge", "module": "echo", "every": every}
        status, error, _ = wait_until(
            lambda b=body: (r := svc.http("POST", f"{API}/schedules", b)) and r[0] != 503 and r
        )
        assert status == 400 and "schedule huge: every must be" in error["error"]["message"]
    assert "Traceback" not in svc.log()


def _reply_headers(svc: ServiceProcess, path: str, token: str | None = None) -> Any:
    """One GET's status and headers, its redirect not followed."""
    host, port = svc.info["http"]
    conn = http.client.HTTPConnection(host, port, timeout=15)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        reply = conn.getresponse()
        reply.read()
        return reply.status, reply.headers
    finally:
        conn.close()


def test_every_reply_forbids_framing_and_sniffing_and_none_is_cached_stale(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # No header stopped another site framing the dashboard (a click on a hidden Cancel),
    # a browser sniffing a type, or a cache keeping a job's result.
    svc = make_service(
        HTTP + 'token = "operate-token"\n'
        'tokens = { ro = { token = "read-only-token", scope = "read" } }\n'
    )
    for path, status, token in [
        ("/", 302, None),
        ("/dashboard/", 200, None),
        ("/dashboard/app.js", 200, None),
        ("/dashboard/style.css", 200, None),
        ("/dashboard/nope.js", 404, None),
        (f"{API}/modules", 401, None),
        (f"{API}/modules", 200, "operate-token"),
        (f"{API}/jobs/1", 404, "operate-token"),
        ("/metrics", 200, "read-only-token"),
        (f"{API}/openapi.json", 200, "read-only-token"),
    ]:
        got, headers = _reply_headers(svc, path, token)
        assert got == status, path
        assert headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        dashboard = path.startswith("/dashboard/")
        assert headers["Cache-Control"] == ("no-cache" if dashboard else "no-store"), path
    # The page's own policy: its files, its API, nothing else; relative paths all through,
    # so that it works under a proxy's sub-path.
    _, headers = _reply_headers(svc, "/dashboard/")
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert _reply_headers(svc, "/")[1]["Location"] == "dashboard/"
    _, page, _ = svc.http("GET", "/dashboard/")
    assert not re.search(r'(href|src)="/', page)
    _, script, _ = svc.http("GET", "/dashboard/app.js")
    assert 'const API = "../api/v1"' in script
    # The scope of the token used, for the page to offer only what it may do.
    assert _reply_headers(svc, f"{API}/stats", "read-only-token")[1][
        "Bgservice-Token-Scope"] == "read"  # fmt: skip
    assert _reply_headers(svc, f"{API}/stats", "operate-token")[1][
        "Bgservice-Token-Scope"] == "operate"  # fmt: skip


def test_a_range_the_dashboard_cannot_serve_is_ignored_not_416(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # RFC 9110 14.2: a range unit a server does not know MUST be ignored; aiohttp answered
    # it (and several ranges, and bad syntax) with a 416 and no file.
    svc = make_service(HTTP)
    host, port = svc.info["http"]
    whole = svc.http("GET", "/dashboard/app.js")[1].encode()

    def get(range_: str, **more: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(host, port, timeout=15)
        try:
            conn.request("GET", "/dashboard/app.js", headers={"Range": range_, **more})
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    for ignored in ("items=0-5", "bytes=0-1,5-6", "bytes=x-y", "bytes"):
        assert get(ignored) == (200, whole), ignored
    assert get("bytes=0-4") == (206, whole[:5])  # one it can serve: served
    assert get(f"bytes={len(whole) + 10}-")[0] == 416  # past the end: still refused
    # Two aiohttp served wrongly, as 206s: no byte at all, and a stale entity tag.
    assert get("bytes=-0") == (200, whole)
    assert get("bytes=0-4", **{"If-Range": '"stale-tag"'}) == (200, whole)


def test_queue_stats_names_the_busiest_names_only(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # One entry per distinct name: 90,000 waiting jobs of distinct names, a 4.7 MB reply
    # that every open dashboard asked for every 2 s. Now the [queue] max_page busiest.
    svc = make_service(HTTP + "[queue]\nmax_page = 3\n")
    for name, count in [("a", 1), ("b", 3), ("c", 2), ("d", 1), ("e", 4)]:
        for _ in range(count):
            job = {"module": "echo", "delay": 600, "name": name}
            assert svc.http("POST", f"{API}/jobs", job)[0] == 201
    status, stats, _ = svc.http("GET", f"{API}/queue/stats")
    assert status == 200
    assert stats["names"] == {n: {"waiting": w, "running": 0} for n, w in [("e", 4), ("b", 3),
                                                                          ("c", 2)]}  # fmt: skip
    assert stats["names_left_out"] == 2
    assert stats["counts"]["waiting"] == 11


@pytest.mark.parametrize("queue_backend", ["sqlite", "redis"])
def test_a_throttled_job_is_throttled_in_the_list_as_in_its_status(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # GET /jobs/N gave the time its module's rate lets it start; the list gave null.
    svc = make_service(HTTP + '[queue]\nmodule_rates = { echo = "1/minute" }\n')
    _, first, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "data": "1"})
    assert svc.http("GET", f"{API}/jobs/{first['id']}?wait=10")[1]["state"] == "done"
    _, second, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "data": "2"})
    one = wait_until(lambda: (r := svc.http("GET", f"{API}/jobs/{second['id']}")[1])
                     ["throttled_until"] and r)  # fmt: skip
    assert one["state"] == "waiting"
    for query in ("?state=waiting", ""):
        _, page, _ = svc.http("GET", f"{API}/jobs{query}")
        (row,) = [j for j in page["jobs"]["waiting"] if j["id"] == second["id"]]
        assert row["throttled_until"] == one["throttled_until"], query


def test_the_openapi_document_served_says_the_limits_configured(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # It was the file as shipped: wait at most 300 s, 10 tags, 100 ids in after, while the
    # service took what service.config allowed, so a client validating against the
    # document refused requests the service would serve.
    svc = make_service(HTTP + "max_wait = 600\n[queue]\nmax_tags = 20\nmax_tag_chars = 8\n"
                       "max_name_chars = 50\nmax_dependencies = 3\nmax_page = 50\n")
    _, doc, _ = svc.http("GET", f"{API}/openapi.json")
    job = doc["components"]["schemas"]["NewJob"]["properties"]
    listed, joined, _ = job["tags"]["oneOf"]  # a list, a string "a,b", null
    assert (listed["maxItems"], job["name"]["maxLength"]) == (20, 50)
    assert job["unique"]["maxLength"] == 50  # the same limit as the name's
    assert listed["items"]["maxLength"] == 8  # (not in the pattern: {1,5000000000}
    assert listed["items"]["pattern"] == "^[A-Za-z0-9_.:-]+$"  # broke validators)
    tag = "[A-Za-z0-9_.:-]"
    assert joined["pattern"] == f"^{tag}{{1,8}}(,{tag}{{1,8}}){{0,19}}$"
    # The latest delay and time it gives are served (they had no maximum: 1e308 was valid).
    assert job["at"]["maximum"] == 253402300799  # the end of 9999
    latest = job["delay"]["maximum"]
    assert 7000 * 365 * 86400 < latest < job["at"]["maximum"]
    for key, value in (("delay", latest), ("at", job["at"]["maximum"])):
        status, added, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", key: value})
        assert status == 201 and added["state"] == "waiting", (key, added)
    assert job["after"]["oneOf"][1]["maxItems"] == 3
    (wait,) = [p for p in doc["paths"]["/api/v1/jobs/{id}"]["get"]["parameters"]
               if p["name"] == "wait"]  # fmt: skip
    assert wait["schema"]["maximum"] == 600
    (size,) = [p for p in doc["paths"]["/api/v1/jobs"]["get"]["parameters"]
               if p["name"] == "page_size"]  # fmt: skip
    assert "0 or absent: 50; more than 50 are answered as 50" in size["description"]
    assert size["schema"]["default"] == 50
    assert doc["servers"] == [{"url": "/"}]  # where it was fetched from, whatever the port
    assert svc.http("GET", f"{API}/jobs/99999?wait=500")[0] == 404  # (the limit is real)


DOCUMENT = json.loads((Path(__file__).resolve().parent.parent
                       / "bgservice/http/openapi.json").read_text())  # fmt: skip


def _documented(method: str, path: str) -> set[str]:
    return set(DOCUMENT["paths"][path][method]["responses"])


def test_a_module_that_takes_no_jobs_is_422_with_the_socket_s_message(
    make_service: Callable[..., ServiceProcess], modules_dir: Path
) -> None:
    # The socket's 405 went out as HTTP's 405, without the Allow header HTTP requires
    # with one (and POST is served here): now a 422, as the document says.
    write_module(modules_dir, "tcponly", 'ACCEPTS = ["tcp"]\ndef handle_tcp(request):\n'
                 '    return "t"\n')  # fmt: skip
    write_module(modules_dir, "nohandler", "X = 1\n")
    svc = make_service(HTTP)
    socket_reply = svc.call(b"queue:add:tcponly:x").decode()
    assert socket_reply == "405: Module tcponly does not accept queue requests"
    status, error, headers = svc.http("POST", f"{API}/jobs", {"module": "tcponly"})
    assert (status, error["error"]["status"]) == (422, "FAILED_PRECONDITION")
    assert error["error"]["message"] == socket_reply[5:] and "Allow" not in headers
    documented = _documented("post", f"{API}/jobs")
    assert "422" in documented and "405" not in documented
    # POST /schedules answers as the jobs it would add would be: each status documented.
    for module, code, message in [
        ("tcponly", 422, "Module tcponly does not accept queue requests"),
        ("nohandler", 501, "Module nohandler has no TCP handler"),
        ("nosuch", 400, "field module: unknown module 'nosuch' (see GET /api/v1/modules)"),
        ("a" * 100_000, 400,  # (echoed whole: a reply as large as the name)
         f"field module: unknown module '{'a' * 100}'... (see GET /api/v1/modules)"),
    ]:
        body = {"name": "s", "module": module, "every": 60}
        status, error, _ = wait_until(
            lambda b=body: (r := svc.http("POST", f"{API}/schedules", b)) and r[0] != 503 and r
        )
        assert (status, error["error"]["message"]) == (code, message), module
        assert str(code) in _documented("post", f"{API}/schedules"), code
    assert {"422", "501", "502"} <= _documented("post", f"{API}/schedules/{{name}}:run")


SCOPED = (
    HTTP + 'token = "operate-token"\n'
    'tokens = { ro = { token = "read-only-token", scope = "read" }, '
    'site = { token = "site-add-token", scope = "add" } }\n'
)


def test_a_refusal_for_scope_still_says_the_token_s_scope(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # Set only once the scope allowed the request: the 403 itself came without it.
    svc = make_service(SCOPED)
    for method, path, token, scope in [
        ("POST", f"{API}/jobs", "read-only-token", "read"),
        ("POST", f"{API}/jobs/1:cancel", "site-add-token", "add"),
        ("DELETE", f"{API}/schedules/x", "site-add-token", "add"),
    ]:
        status, error, headers = svc.http(method, path, {"module": "echo"}, token=token)
        assert (status, error["error"]["status"]) == (403, "PERMISSION_DENIED"), path
        assert headers["Bgservice-Token-Scope"] == scope, path
    assert "Bgservice-Token-Scope" not in svc.http("GET", f"{API}/stats", token="wrong")[2]


@pytest.mark.parametrize(
    ("config", "names"),
    [
        (
            'tokens = { ro = { token = "one-secret", scope = "read" }, '
            'ops = { token = "one-secret", scope = "operate" } }\n',
            "ro and ops",
        ),
        (
            'token = "one-secret"\ntokens = { ro = { token = "one-secret", scope = "read" } }\n',
            "[http] token and ro",
        ),
    ],
    ids=["two-named", "token-and-named"],
)
def test_a_secret_shared_by_two_tokens_stops_the_start(
    make_service: Callable[..., ServiceProcess], config: str, names: str
) -> None:
    # The secret got the scope of the last token that matched: one configured read-only
    # could operate. Both tokens are named; the secret is not.
    svc = make_service(HTTP + config, start=False)
    svc.start(wait=False)
    code = svc.wait()
    log = svc.log()
    assert f"{names} have the same token: give each a secret of its own" in log, log
    assert "one-secret" not in log
    # A configuration error, exit 2 (the second is found as the HTTP API is built).
    assert code == 2
    assert "Traceback" not in log
    assert not svc.ready_file.exists()


def test_requests_are_logged_writes_and_refusals_always_reads_with_v(
    make_service: Callable[..., ServiceProcess],
) -> None:
    # access_log=None: not a line per request even with -v, and no trail of who added,
    # cancelled or deleted what.
    svc = make_service(SCOPED)
    _, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "delay": 300},
                         token="site-add-token")  # fmt: skip
    assert svc.http("POST", f"{API}/jobs/{job['id']}:cancel", token="operate-token")[0] == 200
    assert svc.http("GET", f"{API}/stats", token="read-only-token")[0] == 200
    assert svc.http("GET", f"{API}/stats", token="not-a-token")[0] == 401
    assert svc.http("DELETE", f"{API}/jobs/1", token="read-only-token")[0] == 403
    # A token sent the wrong way, as a query parameter: its name logged, not its value.
    assert svc.http("POST", f"{API}/jobs?access_token=operate-secret&x", {"module": "echo"},
                    token="site-add-token")[0] == 400  # fmt: skip
    svc.wait_for_log(f"HTTP POST {API}/jobs?access_token=*&x from 127.0.0.1 (token site): 400")
    jid = job["id"]
    svc.wait_for_log(f"HTTP POST {API}/jobs from 127.0.0.1 (token site): 201 {API}/jobs/{jid} ")
    svc.wait_for_log(f"HTTP POST {API}/jobs/{jid}:cancel from 127.0.0.1 (token default): 200 ")
    svc.wait_for_log(f"WARNING bgservice.http.site: HTTP GET {API}/stats from 127.0.0.1 "
                     "(no token): 401 Unauthorized")  # fmt: skip
    svc.wait_for_log(f"HTTP DELETE {API}/jobs/1 from 127.0.0.1 (token ro): 403 Forbidden: "
                     "token ro has scope read")  # fmt: skip
    log = svc.log()
    assert "INFO    bgservice.http.site: HTTP POST" in log
    assert f"GET {API}/stats from 127.0.0.1 (token ro)" not in log  # a read: only with -v
    assert not any(secret in log for secret in ("operate-token", "site-add-token",
                                                "read-only-token", "not-a-token",
                                                "operate-secret"))  # fmt: skip
    svc.stop()
    verbose = make_service(SCOPED, "-v", root=svc.root.parent / "verbose")
    assert verbose.http("GET", f"{API}/stats?x", token="read-only-token")[0] == 400
    verbose.wait_for_log(f"DEBUG   bgservice.http.site: HTTP GET {API}/stats?x from 127.0.0.1 "
                         "(token ro): 400 ")  # fmt: skip


def test_a_full_queue_says_when_to_ask_again(make_service: Callable[..., ServiceProcess]) -> None:
    # The 503 of max_connections said Retry-After; a full queue's (and a stop's) did not.
    svc = make_service(HTTP + "[queue]\nmax_waiting = 1\n")
    assert svc.http("POST", f"{API}/jobs", {"module": "echo", "delay": 300})[0] == 201
    status, error, headers = svc.http("POST", f"{API}/jobs", {"module": "echo", "delay": 300})
    assert (status, error["error"]["message"]) == (503, "Queue full (1 jobs)")
    assert headers["Retry-After"] == "1"
