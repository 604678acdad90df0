"""The queue command parser: pure, and over a real service for what reaches the queue."""

from __future__ import annotations

import json

import pytest

from bgservice.errors import BadRequest, UnknownQueueRequest
from bgservice.queue.commands import job_id, parse, parse_add, parse_list, parse_window


def test_the_originals_forms_parse_unchanged():
    cmd = parse(b"add:less:@c: red; a { color: @c }")
    assert (cmd.name, cmd.options) == ("add", {})
    spec = parse_add(cmd)
    assert spec.module == "less" and spec.data == b"@c: red; a { color: @c }"
    assert job_id(parse(b"get:id:42")) == 42
    assert job_id(parse(b"check:id:42\n")) == 42
    assert job_id(parse(b"status:7")) == 7


def test_options_ride_on_the_command_word():
    spec = parse_add(
        parse(
            b"add?priority=-2&delay=5&retries=3&backoff=0.5&timeout=9&unique=a%20b%3Ac&after=id%3A4"
            b":echo:x?y=z"
        ),
        now=1000.0,
    )
    assert spec.priority == -2 and spec.run_at == 1005.0
    assert (spec.retries, spec.backoff, spec.timeout) == (3, 0.5, 9.0)
    assert spec.unique == "a b:c" and spec.after == (4,)  # ":" in a value is %3A
    assert spec.data == b"x?y=z"  # a '?' in the data is data


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"add?priority=high:echo:x", "option priority"),
        (b"add?delay=-1:echo:x", "option delay"),
        (b"add?timeout=0:echo:x", "option timeout"),
        (b"add?retries=1.5:echo:x", "option retries"),
        (b"add?colour=red:echo:x", "unknown option 'colour'"),
        (b"add?priorty=1:echo:x", "unknown option 'priorty', did you mean priority"),
        (b"add?delay=nan:echo:x", "option delay"),
        (b"add::x", "expected queue:add:MODULE:DATA"),
        (b"add?priority=9223372036854775808:echo:x", "option priority: must be between"),
        (b"add?priority=-9223372036854775808:echo:x", "option priority: must be between"),
        # Past SQLite's bound too, the bound named is the priority's own (it said 2^63-1).
        (b"add?priority=10000000000000000000:echo:x",
         "option priority: must be between -9007199254740991 and 9007199254740991"),
        (b"add?after=99999999999999999999:echo:x", "option after: must be between"),
        # A millisecond timestamp for `at` (from JavaScript): a date 50,000 years away.
        (b"add?at=1796371400000:echo:x", "option at: the time it gives is after the year 9999"),
        (b"add?delay=1e300:echo:x", "option delay: the time it gives is after the year 9999"),
        (b"add?timeout=inf:echo:x", "option timeout: must be a finite number greater than 0"),
        (b"add?timeout=0:echo:x", "option timeout: must be a finite number greater than 0"),
        # Numbers as Python reads them, not as a request writes them (job ids never were).
        (b"add?priority=1_000:echo:x", "option priority: expected a whole number, got '1_000'"),
        ("add?priority=\u0663:echo:x".encode(), "option priority: expected a whole number"),
        ("add?delay=\u0661.\u0665:echo:x".encode(), "option delay: expected a number"),
        (b"add?delay=1_0:echo:x", "option delay: expected a number, got '1_0'"),
        (b"add?after=1,2_0:echo:x", "option after: expected a whole number"),
    ],
)
def test_bad_options_are_named(raw, message):
    with pytest.raises(BadRequest, match=message):
        parse_add(parse(raw))


def test_repeated_dependencies_count_once_however_written():
    many = b",".join([b"7", b"id%3A7", b"07", b" 7"] * 60)  # 240 ids, one job
    assert parse_add(parse(b"add?after=" + many + b":echo:x")).after == (7,)
    ids = ",".join(map(str, range(1, 102))).encode()  # 101 jobs: one too many
    with pytest.raises(BadRequest, match="at most 100 job ids"):
        parse_add(parse(b"add?after=" + ids + b":echo:x"))


def test_unknown_command_is_the_originals_500():
    with pytest.raises(UnknownQueueRequest) as err:
        parse(b"frobnicate:1")
    assert err.value.code == 500 and err.value.message == "Unknown queue request"


def test_bad_ids():
    for raw in (b"get:id:", b"get:id:x", b"get:-1", b"get", b"get:id:\xc2\xb2"):
        with pytest.raises(BadRequest, match="expected id:N"):
            job_id(parse(raw))
    with pytest.raises(BadRequest, match="expected id:N, got '\u0663'"):  # echoed as sent
        job_id(parse("get:\u0663".encode()))
    assert job_id(parse(b"get:id:9223372036854775807")) == 2**63 - 1
    for raw in (b"get:id:9223372036854775808", b"get:id:" + b"9" * 5000):
        with pytest.raises(BadRequest, match="out of range"):
            job_id(parse(raw))


def test_list_and_window():
    assert parse_list(parse(b"list")).state is None
    assert parse_list(parse(b"list:failed")).state == "failed"
    spec = parse_list(parse(b"list?state=done&limit=5000&offset=10"))
    assert (spec.state, spec.limit, spec.offset) == ("done", 1000, 10)
    with pytest.raises(BadRequest):
        parse_list(parse(b"list:sleeping"))
    where = parse_list(parse(b"list?module=echo&name=Monthly%20report&tag=a.b:failed")).where
    assert (where.module, where.name, where.tag) == ("echo", "Monthly report", "a.b")
    assert where.matches("echo", "Monthly report", ("x", "a.b"))
    assert not where.matches("echo", "monthly report", ("a.b",))  # exactly: case and all
    assert not where.matches("echo", "Monthly report", ("a.bc",))  # a whole tag
    assert not parse_list(parse(b"list")).where  # no filter
    assert parse_window(parse(b"stats")) == 3600.0
    assert parse_window(parse(b"stats:86400")) == 86400.0
    assert parse_window(parse(b"stats?window=60")) == 60.0
    # Given both ways, one was ignored; now refused.
    with pytest.raises(BadRequest, match=r"queue:list: state given twice \(\?state= and after"):
        parse_list(parse(b"list?state=waiting:running"))
    with pytest.raises(BadRequest, match="queue:stats: window given twice"):
        parse_window(parse(b"stats?window=60:120"))


@pytest.mark.parametrize(
    "raw, message",
    [
        # options a command does not read (only add and schedule refused theirs)
        (b"get?timeout=5:id:1", "queue:get: unknown option 'timeout' (it takes no options)"),
        (b"cancel?force=1:id:1", "queue:cancel: unknown option 'force'"),
        (b"check?wait=1:id:1", "queue:check: unknown option 'wait'"),
        (b"status?x=1:1", "queue:status: unknown option 'x'"),
        (b"retry?delay=5:1", "queue:retry: unknown option 'delay'"),
        (b"fire?x=1:nightly", "queue:fire: unknown option 'x'"),
        (b"list?state=done&page=2",
         "queue:list: unknown option 'page' (options: limit, module, name, offset, state, tag)"),
        (b"stats?windw=60",
         "queue:stats: unknown option 'windw', did you mean window? (options: window)"),
        # an option given empty, and job id 0
        (b"add?unique=:echo:x", "option unique: empty (leave it out for the default)"),
        (b"add?name=&priority=1:echo:x", "option name: empty"),
        (b"list?state=", "option state: empty"),
        (b"get:id:0", "queue:get: job ids start at 1, got '0'"),
        (b"status:000", "queue:status: job ids start at 1"),
    ],
)
def test_what_a_command_does_not_read_is_refused(raw, message):
    """Once silent: queue:get?timeout=5 waited as long as ever, a misspelt window= summed
    the default hour, unique= was taken for no key, and queue:get:0 answered 404 Job 0 not
    found (HTTP refuses empty parameters; the clients refuse id 0 before sending)."""
    with pytest.raises(BadRequest) as refused:
        command = parse(raw)
        if command.name in ("get", "check", "status", "cancel", "retry"):
            job_id(command)
    assert message in str(refused.value)


def test_the_options_a_command_reads_still_parse():
    assert parse_list(parse(b"list?state=done&limit=5&offset=10")).limit == 5
    assert parse_window(parse(b"stats?window=60")) == 60.0
    assert job_id(parse(b"get:id:42")) == 42


@pytest.mark.parametrize("option", ["unique", "name", "tags"])
def test_an_option_that_is_not_utf8_is_refused_naming_it(service, option):
    """Decoded with U+FFFD for each bad byte, unique=%FF and unique=%FE were one key: the
    second add answered the first's id, and its job was never queued."""
    for raw in (b"%FF", b"%FE", b"a%C3", b"\xff"):  # percent-encoded or sent as it is
        reply = service.call(b"queue:add?delay=100&" + option.encode() + b"=" + raw + b":echo:x")
        assert reply == f"400: option {option}: not valid UTF-8 text".encode(), raw
    framed = service.framed()  # the framed form reads its options alike
    refused = (400, f"option {option}: not valid UTF-8 text".encode())
    assert framed.call(b"queue:add?" + option.encode() + b"=%FE:echo:x") == refused
    framed.close()
    counts = json.loads(service.call(b"queue:stats"))["counts"]
    assert sum(counts.values()) == 0  # nothing was stored


def test_an_option_name_that_is_not_utf8_is_shown_as_sent(service):
    assert service.call(b"queue:add?%FF=1:echo:x") == (
        b"400: option %FF: its name is not valid UTF-8 text"
    )
    assert service.call(b"queue:list?%FE=") == b"400: option %FE: its name is not valid UTF-8 text"


def test_text_that_is_utf8_keeps_each_key_apart(service):
    # The same text, percent-encoded or not, is one key; other text is another.
    first = service.call(b"queue:add?delay=100&unique=%C3%A9:echo:x")
    assert first.startswith(b"id:")
    assert service.call("queue:add?delay=100&unique=\u00e9:echo:x".encode()) == first
    other = service.call(b"queue:add?delay=100&unique=%C3%A8:echo:x")
    assert other.startswith(b"id:") and other != first
    status = json.loads(service.call(b"queue:status:" + first))
    assert status["unique"] == "\u00e9"
