"""What the shell commands print for a person (bgservice/cli_format.py): pure."""

from __future__ import annotations

import datetime as dt

from bgservice import cli_format as fmt

NOW = 1_796_000_000.0


def test_span_reads_as_a_person_says_it() -> None:
    cases = [(0.0123, "12 ms"), (4.25, "4.2 s"), (42, "42 s"), (185, "3 min 5 s"),
             (3600, "1 h"), (7500, "2 h 5 min"), (90000, "1 d 1 h"), (86430, "1 d")]  # fmt: skip
    assert [fmt.span(s) for s in dict(cases)] == [text for _, text in cases]


def test_ages_and_local_times() -> None:
    assert fmt.age(NOW - 5, NOW) == "5.0 s ago"
    assert fmt.age(NOW + 600, NOW) == "in 10 min"
    assert fmt.age(None, NOW) == "-"
    local = dt.datetime.fromtimestamp(NOW - 65).strftime("%Y-%m-%d %H:%M:%S")
    assert fmt.moment(NOW - 65, NOW) == f"{local} (1 min 5 s ago)"
    # A time no date can show (a job an older service let be due in the year 58894): the
    # number, not a traceback.
    assert fmt.moment(1_796_371_400_000.0, NOW) == "1796371400000 (Unix time)"
    assert fmt.moment(1e30, NOW) == "1000000000000000019884624838656 (Unix time)"


def test_a_time_less_than_half_a_second_away_is_ahead_not_ago() -> None:
    # A schedule's next run 107 ms away read "(107 ms ago)": the future began 0.5 s on.
    assert fmt.age(NOW + 0.107, NOW) == "in 107 ms"
    assert fmt.zoned(NOW + 0.107, NOW, dt.UTC).endswith(" UTC (in 107 ms)")
    assert fmt.age(NOW - 0.107, NOW) == "107 ms ago"
    assert fmt.age(NOW, NOW) == fmt.age(NOW + 0.0001, NOW) == "now"


def test_table_aligns_and_right_aligns_numbers() -> None:
    lines = fmt.table(("id", "module", "error"), [(7, "sleep", None), (1234, "echo", "boom")])
    assert lines == ["  id  module  error", "   7  sleep   -", "1234  echo    boom"]


def test_a_table_lines_up_wide_characters_by_the_columns_they_take() -> None:
    # A CJK name took len() columns: every column after it was out of line on its row.
    rows = [["日本語の名前", "echo", 1], ["ab", "sleep", 22], ["e\u0301x", "log", 3]]
    lines = fmt.table(["name", "module", "n"], rows)
    starts = {fmt.width(line[: line.index(r[1])]) for line, r in zip(lines[1:], rows, strict=True)}
    assert starts == {14}, lines  # the widest name: 12 columns, then two blanks
    assert len({fmt.width(line.rstrip()) for line in lines[1:]}) == 1, lines  # n right-aligned
    assert fmt.width("日本") == 4 and fmt.width("e\u0301") == 1 and fmt.width("ab") == 2


def test_a_table_keeps_a_value_of_several_lines_on_its_row() -> None:
    lines = fmt.table(("id", "error"), [(1, "Traceback (most recent call last):\n  ValueError: x")])
    assert lines == ["id  error", " 1  Traceback (most recent call last): /   ValueError: x"]


def test_progress_bar() -> None:
    assert fmt.bar(1, 4, 8) == "[##------]  25%"
    assert fmt.progress({"done": 3, "total": 3, "message": "done"}, 4) == "[####] 100% done"
    assert fmt.progress(None) == "-"
    assert fmt.bar(5, 0, 4) == "[----]   0%"  # a total of 0 is no progress, not a crash


def test_job_lines_show_times_and_durations() -> None:
    job = {"id": 3, "module": "sleep", "state": "done", "priority": 0, "attempts": 1,
           "max_retries": 2, "created": NOW - 10, "run_at": NOW - 10, "started": NOW - 9,
           "finished": NOW - 6, "duration": 3.0, "status": 200}  # fmt: skip
    text = "\n".join(fmt.job_lines(job, NOW))
    assert "attempts:     1 of 3" in text
    assert "duration:     3.0 s" in text
    assert "(6.0 s ago)" in text and "1796" not in text  # no epoch floats


def test_job_lines_show_every_field_a_newer_service_sends_too() -> None:
    job = {"id": 3, "module": "sleep", "state": "waiting", "name": "report", "tags": ["a"],
           "source": "http:site", "interruptions": 2, "throttled_until": NOW + 50,
           "checkpoint": "{}", "lease_owner": "host-a"}  # fmt: skip
    lines = fmt.job_lines(job, NOW)
    assert "throttled:    until " in "\n".join(lines) and "(in 50 s)" in "\n".join(lines)
    assert lines[-1] == "lease owner:  host-a"  # one it does not know: last, as it is
    for line in ("name:         report", "tags:         a", "interrupted:  2",
                 "source:       http:site", "checkpoint:   {}"):  # fmt: skip
        assert line in lines


def test_jobs_lines_say_when() -> None:
    listing = {
        "waiting": [{"id": 9, "state": "waiting", "module": "echo", "priority": 5,
                     "attempts": 0, "created": NOW - 3, "run_at": NOW + 60}],
        "running": [{"id": 8, "state": "running", "module": "sleep", "priority": 0,
                     "attempts": 1, "created": NOW - 3, "started": NOW - 2}],
    }  # fmt: skip
    lines = fmt.jobs_lines(listing, NOW)
    assert lines[0].split() == ["id", "state", "module", "prio", "tries", "created", "when",
                                "error"]  # fmt: skip
    assert "due in 1 min" in lines[1] and "running 2.0 s" in lines[2]
    assert fmt.jobs_lines({"waiting": []}, NOW) == ["no jobs"]


def test_stats_and_queue_stats_are_summaries() -> None:
    stats = {"uptime": 3700, "requests": 12, "errors": 1, "in_flight": {"sleep": 2},
             "modules": {"test": {"tcp": {"requests": 11, "errors": 1}}}}  # fmt: skip
    text = "\n".join(fmt.stats_lines(stats))
    assert "uptime:      1 h 1 min" in text and "in flight:   sleep 2" in text
    assert text.splitlines()[-1].split() == ["test", "tcp", "11", "1"]
    hours = [{"hour": NOW, "runs": 5, "busy_seconds": 9.5}]
    window = {"seconds": 3600.0, "runs": 5, "busy_seconds": 9.5, "by_hour": hours}
    queue = {"counts": {"waiting": 2}, "oldest_waiting_age": 65.0, "finished_per_minute": 3,
             "workers": 4, "window": window}  # fmt: skip
    text = "\n".join(fmt.queue_stats_lines(queue, NOW))
    assert "oldest waiting: 1 min 5 s" in text and "busy 9.5 s" in text
    assert "workers:        4\n" in text
    # Redis: the counts and busy time are every instance's, and so are the workers.
    text = "\n".join(fmt.queue_stats_lines({**queue, "cluster_workers": 9}, NOW))
    assert "workers:        9 (4 here)\n" in text


def test_stats_show_alerts_threads_and_workers() -> None:
    # Failed alerts and stuck threads showed with --json only.
    alerts = {"module": "mail", "raised": 9, "sent": 5, "summarised": 1, "failed": 2,
              "dropped": 0, "held": 1}  # fmt: skip
    threads = {"size": 8, "busy": 3, "stuck": 1, "stuck_limit": 4}
    workers = {"resize": {"processes": 2, "busy": 1, "started": 5, "retiring": 1}}
    stats = {"alerts": alerts, "threads": threads, "workers": workers}
    text = "\n".join(fmt.stats_lines(stats))
    assert "alerts:      9 raised: 5 sent, 1 summarised, 2 failed, 0 dropped, 1 held" in text
    assert "threads:     3 of 8 busy, 1 stuck (up to 4 replaced)" in text
    assert "workers:     resize 1 of 2 busy (5 started, 1 retiring)" in text
    quiet = "\n".join(fmt.stats_lines({"threads": {"size": 8}, "workers": {}}))
    assert "alerts:      off" in quiet and "workers:     none" in quiet


def test_top_screen_fits_and_counts_waiting_per_module() -> None:
    view = {
        "address": "127.0.0.1:1", "rate": 12.5,
        "stats": {"uptime": 10, "in_flight": {"steps": 1}, "connections": {"open": 2}},
        "queue_stats": {"counts": {"running": 1, "waiting": 3}, "workers": 4},
        "running": [{"id": 4, "module": "steps", "started": NOW - 2,
                     "progress": {"done": 1, "total": 2, "message": "half"}}],
        "waiting": [{"module": "echo", "run_at": NOW}, {"module": "echo", "run_at": NOW + 60},
                    {"module": "sleep", "run_at": NOW}],
    }  # fmt: skip
    lines = fmt.top_lines(view, NOW, width=80, height=40)
    text = "\n".join(lines)
    assert "requests 12.5/s" in text and "1 running on 4 workers, 3 waiting" in text
    assert "50% half" in text
    assert [line.split() for line in lines if line.startswith(("echo", "sleep"))] == [
        ["echo", "2", "1", "1"], ["sleep", "1", "1", "0"]]  # fmt: skip
    assert all(len(line) <= 80 for line in lines)
    short = fmt.top_lines(view, NOW, width=30, height=5)
    assert len(short) == 5 and short[-1].startswith("...") and all(len(s) <= 30 for s in short)
    # A worker held by a handler past its job's timeout: why nothing starts, said.
    view["queue_stats"] = {"counts": {"running": 0, "waiting": 3}, "workers": 1,
                           "workers_held": 1}  # fmt: skip
    held = "\n".join(fmt.top_lines(view, NOW, width=100, height=40))
    assert "0 running on 1 workers (1 held past a timeout), 3 waiting" in held
    # Redis: the counts are of every instance sharing the queue, and so are the workers.
    view["queue_stats"] = {"counts": {"running": 5, "waiting": 3}, "workers": 4,
                           "cluster_workers": 8}  # fmt: skip
    shared = "\n".join(fmt.top_lines(view, NOW, width=100, height=40))
    assert "5 running on 8 workers (4 here), 3 waiting" in shared
    view["queue_stats"]["workers_held"] = 1
    held_here = "\n".join(fmt.top_lines(view, NOW, width=100, height=40))
    assert "on 8 workers (4 here, 1 held past a timeout here), 3 waiting" in held_here
