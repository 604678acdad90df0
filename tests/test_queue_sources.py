"""Where jobs come from, and who may queue what, against a real service on both engines:
every job records its source; a module's QUEUE_FROM refuses the others with a 403 that
names the rule; source= is the operator's (the HTTP token holder's) alone."""

from __future__ import annotations

import json

from tests.conftest import wait_until, write_module
from tests.queue_helpers import add, both_engines, status  # noqa: F401 (a fixture)

INVOICES = """
QUEUE_FROM = {"scheduler"}

async def handle_tcp(request):
    return "invoiced " + request.text
"""

FAN_OUT = """
async def handle_tcp(request):
    return str(await request.add_job_async("echo", "child"))
"""

HTTP = "[http]\nenabled = true\nport = 0\n"


def test_every_job_records_its_source(make_service, modules_dir):
    write_module(modules_dir, "fan", FAN_OUT)
    svc = make_service(HTTP)
    by_tcp = add(svc, b"queue:add:echo:x")
    assert status(svc, by_tcp)["source"].startswith("tcp:127.0.0.1:")
    parent = add(svc, b"queue:add:fan:")
    child = int(svc.call(b"queue:get:id:%d" % parent))
    assert status(svc, child)["source"] == f"job:{parent}"
    # Called directly, its handler adds with the call's own source, as queue:add records it.
    direct = int(svc.call(b"fan:"))
    assert status(svc, direct)["source"].startswith("tcp:127.0.0.1:")
    _, job, _ = svc.http("POST", "/api/v1/jobs", {"module": "echo"})
    assert job["source"] == "http"
    made = wait_until(lambda: (r := svc.call(b"queue:schedule?name=n&every=3600:echo:s"))
                      and not r.startswith(b"503") and r)  # fmt: skip
    assert json.loads(made)["name"] == "n"
    fired = int(svc.call(b"queue:fire:n")[3:])
    assert status(svc, fired)["source"] == "scheduler:n"


def test_a_module_queued_only_by_the_scheduler(make_service, modules_dir):
    write_module(modules_dir, "invoices", INVOICES)
    svc = make_service(HTTP)
    reply = svc.call(b"queue:add:invoices:monthly")  # the original's form, refused
    assert reply.startswith(b"403: module invoices: queue only from scheduler (source tcp:")
    status_code, error, _ = svc.http("POST", "/api/v1/jobs", {"module": "invoices"})
    assert status_code == 403 and error["error"]["status"] == "PERMISSION_DENIED"
    assert "queue only from scheduler (source http)" in error["error"]["message"]
    assert svc.call(b"invoices:direct") == b"invoiced direct"  # QUEUE_FROM is about jobs


MONTHLY = '[[schedule]]\nname = "monthly"\nmodule = "invoices"\ndata = "all"\nevery = 1\n'


def test_no_client_queues_a_scheduler_only_module_through_a_schedule(make_service, modules_dir):
    # Found by a security review: any client made (or replaced) a run-time schedule of
    # invoices, or fired the config's, and its job ran as source scheduler:NAME. What a
    # client makes or fires is now a job it could add itself.
    write_module(modules_dir, "invoices", INVOICES)
    write_module(modules_dir, "billing", INVOICES.replace('{"scheduler"}', '{"scheduler", "tcp"}'))
    svc = make_service(HTTP + MONTHLY)
    wait_until(lambda: not svc.call(b"queue:schedules").startswith(b"503"))
    refused = b"403: module invoices: queue only from scheduler (source tcp:127.0.0.1:"
    assert svc.call(b"queue:schedule?name=evil&every=3600:invoices:mine").startswith(refused)
    assert svc.call(b"queue:fire:monthly").startswith(refused)
    body = {"name": "evil", "module": "invoices", "every": 3600}
    for path, sent in (("/api/v1/schedules", body), ("/api/v1/schedules/monthly:run", None)):
        code, error, _ = svc.http("POST", path, sent)
        assert code == 403 and "queue only from scheduler (source http)" in str(error), error
    assert [s["name"] for s in json.loads(svc.call(b"queue:schedules"))] == ["monthly"]
    # The config's schedule runs (source scheduler:monthly) ...
    first = wait_until(lambda: json.loads(svc.call(b"queue:list?state=done")).get("done"))
    assert first[0]["module"] == "invoices" and first[0]["source"] == "scheduler:monthly"
    assert svc.call(b"queue:get:id:%d" % first[0]["id"]) == b"invoiced all"
    # ... and a client the module admits makes and fires schedules of it as before.
    made = json.loads(svc.call(b"queue:schedule?name=bills&every=3600:billing:due"))
    assert made["name"] == "bills"
    fired = svc.call(b"queue:fire:bills")
    assert svc.call(b"queue:get:" + fired) == b"invoiced due"
    assert status(svc, int(fired[3:]))["source"] == "scheduler:bills"


def test_source_is_the_operators_to_set(make_service):
    svc = make_service(HTTP)
    assert svc.call(b"queue:add?source=cron:echo:x").startswith(b"403: option source:")
    code, error, _ = svc.http("POST", "/api/v1/jobs", {"module": "echo", "source": "cron"})
    assert code == 403 and "only for a token of scope operate" in error["error"]["message"]
    svc.stop()
    with_token = make_service('[http]\nenabled = true\nport = 0\ntoken = "s3cret-token"\n')
    code, job, _ = with_token.http(
        "POST", "/api/v1/jobs", {"module": "echo", "source": "cron"}, token="s3cret-token"
    )
    assert code == 201 and job["source"] == "cron"


TOKENS = """[http]
enabled = true
port = 0
[http.tokens]
ro = { token = "read-only-1", scope = "read" }
site = { token = "site-add-1", scope = "add" }
ops = { token = "ops-operate-1", scope = "operate" }
"""


def test_named_tokens_with_scopes(make_service):
    svc = make_service(TOKENS)
    job = {"module": "echo", "data": "x"}
    assert svc.http("GET", "/api/v1/jobs", token="read-only-1")[0] == 200
    code, error, _ = svc.http("POST", "/api/v1/jobs", job, token="read-only-1")
    assert code == 403 and error["error"]["status"] == "PERMISSION_DENIED"
    assert "token ro has scope read: not POST /api/v1/jobs" in error["error"]["message"]
    code, added, _ = svc.http("POST", "/api/v1/jobs", job, token="site-add-1")
    assert code == 201 and added["source"] == "http:site"
    code, error, _ = svc.http("POST", f"/api/v1/jobs/{added['id']}:cancel", token="site-add-1")
    assert code == 403 and "scope add" in error["error"]["message"]
    code, _, _ = svc.http("POST", "/api/v1/jobs", {**job, "source": "cron"}, token="site-add-1")
    assert code == 403  # source= is the operator's
    code, tagged, _ = svc.http(
        "POST", "/api/v1/jobs", {**job, "source": "cron"}, token="ops-operate-1"
    )
    assert code == 201 and tagged["source"] == "cron"
    assert svc.http("DELETE", "/api/v1/schedules/none", token="ops-operate-1")[0] in (404, 503)
    assert svc.http("GET", "/api/v1/jobs", token="wrong-token")[0] == 401
    assert svc.http("GET", "/metrics", token="read-only-1")[0] == 200


WHENCE = """
async def handle_tcp(request):
    return request.source
"""


def test_a_handler_sees_where_its_call_or_job_came_from(make_service, modules_dir):
    write_module(modules_dir, "whence", WHENCE)
    write_module(modules_dir, "whence_p", 'EXECUTION = "process"\n' + WHENCE)
    svc = make_service(HTTP)
    assert svc.call(b"whence:").startswith(b"tcp:127.0.0.1:")  # a direct call
    by_tcp = add(svc, b"queue:add:whence:")
    assert svc.call(b"queue:get:id:%d" % by_tcp) == status(svc, by_tcp)["source"].encode()
    _, job, _ = svc.http("POST", "/api/v1/jobs", {"module": "whence_p"})  # a worker process
    assert svc.call(b"queue:get:id:%d" % job["id"]) == b"http"
    wait_until(lambda: not svc.call(b"queue:schedules").startswith(b"503"))
    svc.call(b"queue:schedule?name=hourly&every=3600:whence_p:")
    fired = svc.call(b"queue:fire:hourly")
    assert svc.call(b"queue:get:" + fired) == b"scheduler:hourly"
