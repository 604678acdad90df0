"""The API in Google's style (issue 20, item 6): AIP-193 errors, AIP-136 custom methods,
AIP-158 page tokens, AIP-135 Delete; and the deprecated forms still served."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ServiceProcess

pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestClient, TestServer

from bgservice.errors import Conflict, NotFound
from bgservice.http.api import HttpApi

API = "/api/v1"
HTTP = "[http]\nenabled = true\nport = 0\n"


@pytest.fixture
def svc(make_service: Callable[..., ServiceProcess]) -> ServiceProcess:
    return make_service(HTTP)


def add(svc: ServiceProcess, **fields: Any) -> int:
    status, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", **fields})
    assert status == 201, job
    return int(job["id"])


def test_errors_name_their_canonical_status(
    svc: ServiceProcess, make_service: Callable[..., ServiceProcess]
) -> None:
    for method, path, code, name in (
        ("GET", f"{API}/modules/nope", 404, "NOT_FOUND"),
        ("GET", f"{API}/jobs/999999", 404, "NOT_FOUND"),
        ("GET", f"{API}/jobs?state=lost", 400, "INVALID_ARGUMENT"),
        ("DELETE", f"{API}/jobs", 405, "UNIMPLEMENTED"),
        ("GET", f"{API}/nothing", 404, "NOT_FOUND"),
    ):
        status, body, _ = svc.http(method, path)
        assert status == code and body["error"]["code"] == code, (path, body)
        assert body["error"]["status"] == name, (path, body)
        assert body["error"]["message"]
    locked = make_service(HTTP + 'token = "t0k-t0k-t0k"\n', root=svc.root / "locked")
    _, body, _ = locked.http("GET", f"{API}/stats")
    assert body["error"]["status"] == "UNAUTHENTICATED"


@pytest.mark.parametrize("jid", ["abc", "-1", "1.5", "%E2%91%A0", str(2**63)])
def test_a_job_id_that_is_no_number_is_400_not_404(svc: ServiceProcess, jid: str) -> None:
    status, body, _ = svc.http("GET", f"{API}/jobs/{jid}")
    assert (status, body["error"]["status"]) == (400, "INVALID_ARGUMENT"), body
    assert "expected id:N" in body["error"]["message"] or "out of range" in body["error"]["message"]


def test_cancel_and_retry_are_custom_methods_and_the_old_paths_still_work(
    svc: ServiceProcess,
) -> None:
    first, second = add(svc, delay=60), add(svc, delay=60)
    assert svc.http("POST", f"{API}/jobs/{first}:cancel")[1] == {"id": first, "state": "cancelled"}
    status, body, _ = svc.http("POST", f"{API}/jobs/{second}/cancel")  # deprecated alias
    assert (status, body) == (200, {"id": second, "state": "cancelled"})
    # A retried job runs at once; one whose handler needs no wait may be done already.
    again = ("waiting", "running", "done")
    assert svc.http("POST", f"{API}/jobs/{first}:retry")[1]["state"] in again
    assert svc.http("POST", f"{API}/jobs/{second}/retry")[1]["state"] in again
    status, body, _ = svc.http("GET", f"{API}/jobs/{first}:cancel")
    assert (status, body["error"]["status"]) == (405, "UNIMPLEMENTED")
    status, body, _ = svc.http("POST", f"{API}/jobs/{first}:explode")  # no such method
    assert (status, body["error"]["status"]) == (404, "NOT_FOUND")


def test_page_tokens_walk_the_waiting_jobs_in_run_order(svc: ServiceProcess) -> None:
    delays = (50, 10, 30, 20, 40)  # delayed jobs are in line by when they come due
    ids = [add(svc, priority=p, delay=d) for p, d in zip((1, 5, 3, 4, 2), delays, strict=True)]
    order = [jid for _, jid in sorted(zip(delays, ids, strict=True))]
    seen, token, pages = [], "", 0
    while True:
        query = "state=waiting&page_size=2" + (f"&page_token={token}" if token else "")
        status, page, _ = svc.http("GET", f"{API}/jobs?{query}")
        assert status == 200, page
        seen += [job["id"] for job in page["jobs"]["waiting"]]
        token, pages = page["next_page_token"], pages + 1
        if not token:
            break
    assert (seen, pages) == (order, 3)
    _, everything, _ = svc.http("GET", f"{API}/jobs?page_size=0")  # 0: the default size
    assert (everything["limit"], everything["next_page_token"]) == (100, "")
    assert svc.http("GET", f"{API}/jobs?page_size=5000")[1]["limit"] == 1000
    _, mixed, _ = svc.http("GET", f"{API}/jobs?page_size=2&limit=7&offset=3")
    assert (mixed["limit"], mixed["offset"]) == (2, 0)  # the deprecated pair is ignored


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("page_size=-1", "page_size: expected a whole number"),
        ("page_token=bm90IGEgdG9rZW4", "page_token: not a token this API gave out"),
        ("page_token=" + "W" * 400, "page_token: not a token this API gave out"),
        ("page_token=%%%", "page_token: not a token this API gave out"),
    ],
)
def test_bad_page_requests_are_400(svc: ServiceProcess, query: str, message: str) -> None:
    status, body, _ = svc.http("GET", f"{API}/jobs?{query}")
    assert status == 400 and message in body["error"]["message"], body


def test_a_page_token_belongs_to_its_filter(svc: ServiceProcess) -> None:
    for _ in range(3):
        add(svc, delay=60)
    _, page, _ = svc.http("GET", f"{API}/jobs?state=waiting&page_size=1")
    token = page["next_page_token"]
    assert token and base64.urlsafe_b64decode(token + "==")  # opaque, not secret
    status, body, _ = svc.http("GET", f"{API}/jobs?state=failed&page_token={token}")
    assert status == 400 and "made for state=waiting" in body["error"]["message"]
    # The filters too (module=, name=, tag=): the token's offset counts their jobs only.
    _, page, _ = svc.http("GET", f"{API}/jobs?state=waiting&module=echo&page_size=1")
    token = page["next_page_token"]
    assert token
    status, body, _ = svc.http("GET", f"{API}/jobs?state=waiting&page_token={token}")
    assert status == 400 and "made for module=echo" in body["error"]["message"], body
    query = f"state=waiting&module=echo&tag=x&page_token={token}"
    status, body, _ = svc.http("GET", f"{API}/jobs?{query}")
    assert status == 400 and "made for tag=(all)" in body["error"]["message"], body
    status, body, _ = svc.http("GET", f"{API}/jobs?state=waiting&module=echo&page_token={token}")
    assert status == 200 and body["offset"] == 1 and len(body["jobs"]["waiting"]) == 2, body


def test_delete_of_a_job(svc: ServiceProcess) -> None:
    """Against the real queue: a finished job is deleted, a waiting one is a 409."""
    done = add(svc, data="x")
    svc.http("GET", f"{API}/jobs/{done}?wait=10")
    status, body, _ = svc.http("DELETE", f"{API}/jobs/{done}")
    assert (status, body) == (200, {})
    assert svc.http("GET", f"{API}/jobs/{done}")[0] == 404
    waiting = add(svc, delay=60)
    status, body, _ = svc.http("DELETE", f"{API}/jobs/{waiting}")
    assert (status, body["error"]["status"]) == (409, "FAILED_PRECONDITION")


class DeletingQueue:
    """The one queue method the route needs, as docs/http.md asks the queue for it."""

    def __init__(self) -> None:
        self.finished, self.waiting = {1, 2}, {3}

    async def delete(self, jid: int) -> None:
        if jid in self.waiting:
            raise Conflict(f"Job {jid} is waiting: cancel it first")
        if jid not in self.finished:
            raise NotFound(f"Job {jid} not found (unknown or expired)")
        self.finished.discard(jid)


async def test_delete_route_against_a_queue_that_can_delete() -> None:
    from bgservice.config import Settings
    from bgservice.stats import Stats  # (the request log counts every request in it)

    api = HttpApi(Settings(), None, DeletingQueue(), None, None, Stats())  # type: ignore[arg-type]
    async with TestClient(TestServer(api.app)) as client:
        response = await client.delete(f"{API}/jobs/1")
        assert (response.status, await response.json()) == (200, {})
        response = await client.delete(f"{API}/jobs/1")
        assert response.status == 404
        assert (await response.json())["error"]["status"] == "NOT_FOUND"
        response = await client.delete(f"{API}/jobs/3")
        assert response.status == 409
        assert (await response.json())["error"]["status"] == "FAILED_PRECONDITION"
        response = await client.delete(f"{API}/jobs/abc")
        assert response.status == 400
