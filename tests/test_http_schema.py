"""The OpenAPI document says what the API does (issue 18, item 10): a request the document
calls valid is served, one it calls invalid gets a 400, each checked against a real
service. tests/test_http_fuzz.py explores the same question at random."""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

import jsonschema  # the test extra: a missing one must fail, not skip
import pytest
import referencing
from conftest import ServiceProcess, wait_until

from bgservice.http.openapi import FILE as OPENAPI

API = "/api/v1"
HTTP = "[http]\nenabled = true\nport = 0\n"
DOCUMENT: dict[str, Any] = json.loads(OPENAPI.read_text())
BIG = 2**63  # one past SQLite's INTEGER


def _validator(schema: dict[str, Any], document: dict[str, Any] = DOCUMENT) -> Any:
    resource = referencing.Resource.from_contents(
        document, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry = referencing.Registry().with_resource("urn:openapi", resource)
    # The document's own references ("#/components/...") resolve against the document.
    rebased = json.loads(json.dumps(schema).replace('"#/components/', '"urn:openapi#/components/'))
    return jsonschema.Draft202012Validator(rebased, registry=registry)


def _operation(method: str, path: str) -> dict[str, Any]:
    """The document's operation for a concrete path such as /api/v1/jobs/5."""
    for template, item in DOCUMENT["paths"].items():
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/:]+", re.escape(template))
        if re.fullmatch(pattern, path) and method.lower() in item:
            operation: dict[str, Any] = item[method.lower()]
            return operation
    raise AssertionError(f"{method} {path} is not in the document")


def _typed(schema: dict[str, Any], text: str) -> Any:
    """A query or path value as the JSON value it stands for (None: not of the type)."""
    kind = schema.get("type")
    try:
        if kind == "integer":
            return int(text) if re.fullmatch(r"-?\d+", text) else None
        if kind == "number":
            return float(text)
    except ValueError:
        return None
    return text


def documented_valid(method: str, url: str, body: Any = None) -> bool:
    """Does the document accept this request (path and query parameters, JSON body)?"""
    split = urllib.parse.urlsplit(url)
    operation = _operation(method, split.path)
    pairs = urllib.parse.parse_qsl(split.query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        return False  # no parameter of the document is an array: one value each
    values = dict(pairs)
    if set(values) - {p["name"] for p in operation.get("parameters", [])}:
        return False  # a query parameter the operation does not list
    template = next(t for t, i in DOCUMENT["paths"].items() if i.get(method.lower()) is operation)
    for name, value in zip(template.split("/"), split.path.split("/"), strict=True):
        if name.startswith("{"):
            values[name.strip("{}")] = value
    for parameter in operation.get("parameters", []):
        if parameter["name"] not in values:
            continue
        value = _typed(parameter["schema"], values[parameter["name"]])
        if value is None or not _validator(parameter["schema"]).is_valid(value):
            return False
    if body is not None:
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        return bool(_validator(schema).is_valid(body))
    return True


def documented_statuses(method: str, url: str) -> set[str]:
    return set(_operation(method, urllib.parse.urlsplit(url).path)["responses"])


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    service = ServiceProcess(tmp_path_factory.mktemp("schema"), HTTP).start()
    yield service
    service.stop()


# (method, url, body): what the issue found, and the neighbours of each.
CASES = [
    ("GET", f"{API}/jobs?limit=1001", None),  # more than a page holds: answered as 1000
    ("GET", f"{API}/jobs?limit=0", None),
    ("GET", f"{API}/jobs?limit={BIG}", None),
    ("GET", f"{API}/jobs?offset={BIG - 1}", None),
    ("GET", f"{API}/jobs?offset={BIG}", None),
    ("GET", f"{API}/jobs?state=", None),
    ("GET", f"{API}/jobs?limit=5&limit=6", None),
    ("GET", f"{API}/jobs?state=done&module=echo&name=Monthly%20report&tag=a.b:c-d_e", None),
    ("GET", f"{API}/jobs?module=e:cho", None),  # filters as queue:list checks them
    ("GET", f"{API}/jobs?module=", None),
    ("GET", f"{API}/jobs?name=", None),
    ("GET", f"{API}/jobs?tag=a,b", None),
    ("GET", f"{API}/jobs?tag={'t' * 65}", None),
    ("GET", f"{API}/jobs?tag=a&tag=a", None),
    ("GET", f"{API}/jobs?page_size=5&limit=-1", None),  # ignored, yet out of bounds: a 400
    ("GET", f"{API}/jobs?page_size=5&limit=7&offset=2", None),  # ignored, and fine
    ("POST", f"{API}/jobs", {"module": ""}),
    ("POST", f"{API}/jobs", {"module": "e:cho"}),
    ("POST", f"{API}/jobs", {"module": "ec ho"}),
    ("POST", f"{API}/jobs", {"module": "echo"}),
    ("POST", f"{API}/jobs", {"module": "echo", "priority": "5"}),
    ("POST", f"{API}/jobs", {"module": "echo", "priority": -(BIG - 1), "delay": 60}),
    ("POST", f"{API}/jobs", {"module": "echo", "priority": BIG}),
    ("POST", f"{API}/jobs", {"module": "echo", "retries": BIG}),
    ("POST", f"{API}/jobs", {"module": "echo", "after": BIG}),
    ("POST", f"{API}/jobs", {"module": "echo", "at": -1}),
    ("POST", f"{API}/jobs", {"module": "echo", "unique": 7}),
    ("GET", f"{API}/jobs/{BIG - 1}", None),  # valid, and no such job: 404
    ("GET", f"{API}/jobs/{BIG}", None),
    ("POST", f"{API}/jobs/{BIG - 1}/cancel", None),
    ("POST", f"{API}/jobs/{BIG}/cancel", None),
    ("POST", f"{API}/jobs/{BIG - 1}/retry", None),
    ("POST", f"{API}/jobs/{BIG}/retry", None),
    ("GET", f"{API}/jobs/1?wait=301", None),
    ("GET", f"{API}/queue/stats?window=false&window=", None),
    ("GET", f"{API}/queue/stats?window=", None),
    ("GET", f"{API}/queue/stats?window=0.5", None),
    ("GET", f"{API}/queue/stats?window=60", None),
    ("GET", f"{API}/queue/stats?windw=60", None),  # ignored: an hour's stats, silently
    ("GET", f"{API}/jobs/1?wiat=10", None),
    ("GET", f"{API}/jobs?stat=failed", None),
    ("GET", f"{API}/modules?x=1", None),
    ("POST", f"{API}/jobs", {"module": "echo", "unique": ""}),  # taken for no key
    ("POST", f"{API}/jobs", {"module": "echo", "tags": []}),
    # tags as one string, as docs/http.md offers: checked as a list's items are (" a , b "
    # was trimmed to a and b); a repeat counts toward max_tags in both forms (a list of 11
    # repeats was served while the document says 10 at most).
    ("POST", f"{API}/jobs", {"module": "echo", "tags": "a,b"}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": "a,a"}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": " a , b "}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": "a,,b"}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": ","}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": "t" * 65}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": ",".join("abcdefghij")}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": ",".join("abcdefghijk")}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": ",".join("a" * 11)}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": ["a"] * 11}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": ["a"] * 10}),
    # Times past the end of 9999 (the document set no maximum).
    ("POST", f"{API}/jobs", {"module": "echo", "at": 253402300799}),
    ("POST", f"{API}/jobs", {"module": "echo", "at": 253402300800}),
    ("POST", f"{API}/jobs", {"module": "echo", "delay": 1e308}),
    ("POST", f"{API}/jobs", {"module": "echo", "delay": 2e11}),
    ("POST", f"{API}/schedules", {"name": "e1", "module": "echo", "every": 31622400}),
    ("POST", f"{API}/schedules", {"name": "e2", "module": "echo", "every": 31622401}),
    # null is "not given" for a job's options and data (the document said no).
    ("POST", f"{API}/jobs", {"module": "echo", "priority": None, "after": None}),
    ("POST", f"{API}/jobs", {"module": "echo", "tags": None, "unique": None}),
    ("POST", f"{API}/jobs", {"module": "echo", "data": None}),
    ("POST", f"{API}/jobs", {"module": None}),
    ("POST", f"{API}/schedules", {"name": None, "module": "echo", "every": 60}),
    ("POST", f"{API}/schedules", {"name": "n", "module": None, "every": 60}),
]


@pytest.mark.parametrize(("method", "url", "body"), CASES)
def test_the_document_and_the_service_agree(
    svc: ServiceProcess, method: str, url: str, body: Any
) -> None:
    valid = documented_valid(method, url, body)
    status, reply, _ = svc.http(method, url, body)
    assert str(status) in documented_statuses(method, url), (status, reply)
    if valid:
        assert status in (200, 201, 404), (status, reply)  # 404: no such job
    else:
        assert status == 400, (status, reply)
        assert reply["error"]["code"] == 400


def test_a_page_larger_than_the_maximum_says_what_it_gave(svc: ServiceProcess) -> None:
    status, page, _ = svc.http("GET", f"{API}/jobs?limit=1001")
    assert (status, page["limit"]) == (200, 1000)


def test_the_checker_itself_knows_valid_from_invalid() -> None:
    """So a test above cannot pass by calling everything valid (or invalid)."""
    assert documented_valid("GET", f"{API}/jobs?limit=5&state=done")
    assert not documented_valid("GET", f"{API}/jobs?state=lost")
    assert not documented_valid("GET", f"{API}/jobs/abc")
    assert documented_valid("POST", f"{API}/jobs", {"module": "echo", "data": "x"})
    assert not documented_valid("POST", f"{API}/jobs", {"module": "echo", "colour": "red"})
    assert not documented_valid("GET", f"{API}/jobs?limit=5&colour=red")
    assert documented_valid("GET", f"{API}/jobs?module=echo&name=x&tag=y")
    assert not documented_valid("GET", f"{API}/jobs?tag=y,z")


# The optional fields the service refuses as null (none now), for all that its document
# declares.
NOT_NULL: dict[str, set[str]] = {"NewJob": set(), "NewSchedule": set()}


def _all_null(document: dict[str, Any], schema: str, given: dict[str, Any]) -> dict[str, Any]:
    """``given``, and every other optional field of ``schema`` that may be null, null."""
    declared = document["components"]["schemas"][schema]
    optional = set(declared["properties"]) - set(declared["required"]) - NOT_NULL[schema]
    return {**dict.fromkeys(sorted(optional - set(given))), **given}


def _body_schema(document: dict[str, Any], path: str) -> Any:
    operation = document["paths"][path]["post"]
    return _validator(operation["requestBody"]["content"]["application/json"]["schema"],
                      document)  # fmt: skip


def test_a_null_option_is_served_and_documented_as_not_given(svc: ServiceProcess) -> None:
    """null for an optional field was taken as "not given" while the document called it
    invalid: a generated client, or a validator, refused requests the service serves."""
    status, served, _ = svc.http("GET", f"{API}/openapi.json")
    assert status == 200
    job = _all_null(served, "NewJob", {"module": "echo", "data": "x"})
    assert len(job) == 14 and job["priority"] is None and job["after"] is None
    status, added, _ = svc.http("POST", f"{API}/jobs", job)
    assert (status, added["priority"], added["tags"], added["name"]) == (201, 0, [], None)
    assert _body_schema(served, f"{API}/jobs").is_valid(job)
    timings = [("every", 60), ("cron", "0 * * * *")]  # one of them: the other null
    for n, (key, timing) in enumerate(timings):
        schedule = _all_null(served, "NewSchedule", {"name": f"n{n}", "module": "echo",
                                                     key: timing})  # fmt: skip
        assert len(schedule) == 12 and schedule["missed"] is None
        status, made, _ = wait_until(lambda s=schedule: (r := svc.http(
            "POST", f"{API}/schedules", s)) and r[0] != 503 and r)  # fmt: skip
        assert (status, made[key], made["tz"], made["paused"]) == (201, timing, "UTC", False)
        assert _body_schema(served, f"{API}/schedules").is_valid(schedule)
    # The required fields stay non-null in both; a job's null data is empty data.
    status, added, _ = svc.http("POST", f"{API}/jobs", {**job, "data": None})
    assert status == 201 and _body_schema(served, f"{API}/jobs").is_valid({**job, "data": None})
    for path, body in [(f"{API}/jobs", {**job, "module": None}),
                       (f"{API}/schedules", {**schedule, "name": None})]:  # fmt: skip
        assert not _body_schema(served, path).is_valid(body)
        assert svc.http("POST", path, body)[0] == 400
