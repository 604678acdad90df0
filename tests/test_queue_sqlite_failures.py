"""The SQLite job store when things go wrong around it: commits that fail (the database
locked by another process, a file size limit, a damaged file), its file deleted, linked
or not writable, a newer schema, a folder made read-only, a full disk at the start; and
the backup and restore of docs/deploy.md. Each on a real service over real sockets."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import GATE, REPO, Framed, ServiceProcess, wait_until, write_module
from tests.queue_helpers import add, status

HTTP = "[http]\nenabled = true\nport = 0\n"


def _row(db: Path, jid: int) -> tuple[str, int] | None:
    """Job ``jid``'s (state, attempts) as its row has them (a read-only connection)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT state, attempts FROM jobs WHERE id = ?", (jid,)).fetchone()


def _runs(db: Path) -> list[tuple[int, int, str]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT job, attempt, outcome FROM runs ORDER BY rowid").fetchall()


def _sql(db: Path, statement: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        with conn:
            return conn.execute(statement).fetchall()
    finally:
        conn.close()


def _errors(svc: ServiceProcess) -> list[str]:
    return [line for line in svc.log().splitlines() if " ERROR " in line]


def _settled(svc: ServiceProcess) -> ServiceProcess:
    """``svc`` once its schedules are loaded: a read of the store the start makes just
    after "ready", which a lock taken before it would fail with an ERROR of its own."""
    wait_until(lambda: not svc.call(b"queue:schedules").startswith(b"503"))
    return svc


def _running_on_disk(svc: ServiceProcess, db: Path, gate: Path) -> int:
    """A gate job, started: running in memory and on disk (its start committed)."""
    jid = add(svc, b"queue:add:gate:" + str(gate).encode())
    wait_until(lambda: _row(db, jid) == ("running", 1))
    return jid


class Locked:
    """An operator's sqlite3 session holding the write lock (BEGIN IMMEDIATE, as an UPDATE
    typed without COMMIT does) for longer than the service's busy timeout."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


@contextlib.contextmanager
def _ended_while_locked(
    make_service, modules_dir: Path, tmp_path: Path
) -> Iterator[tuple[ServiceProcess, Path, int]]:
    """(service, db, job id): a gate job that started (on disk), then ended (its result
    delivered, from memory) while an operator's session holds the write lock, released
    when the block ends."""
    write_module(modules_dir, "gate", GATE)
    svc = _settled(make_service())
    db, gate = tmp_path / "jobs.db", tmp_path / "gate-open"
    jid = _running_on_disk(svc, db, gate)
    operator = Locked(db)
    try:
        gate.touch()
        assert svc.call(b"queue:get:id:%d" % jid) == b"open"
        yield svc, db, jid
    finally:
        operator.release()


def test_a_jobs_end_a_locked_database_did_not_take_is_stored_once_it_is_free(
    make_service, modules_dir, tmp_path
):
    # Found by review: the commit of a job's end failed (the database locked past the busy
    # timeout) and the end was only logged: the row stayed "running", and after a clean
    # restart the job ran a second time; each refused add was two ERROR lines.
    with _ended_while_locked(make_service, modules_dir, tmp_path) as (svc, db, jid):
        adds = Framed(svc.tcp, timeout=30)  # (each commit waits out the busy timeout, 5 s)
        adds.send(*(b"queue:add:echo:while locked %d" % i for i in range(3)))
        one_shot = svc.call(b"queue:add:echo:one more", timeout=30)
        replies = [adds.recv() for _ in range(3)]
        adds.close()
        assert _row(db, jid) == ("running", 1)  # its end not stored yet
        assert status(svc, jid)["state"] == "done"
    wait_until(lambda: _row(db, jid) == ("done", 1))  # written once the lock went
    assert _runs(db) == [(jid, 1, "done")]
    cause = b"Job store unavailable: database is locked"
    assert replies == [(503, cause)] * 3
    assert one_shot == b"503: " + cause
    svc.wait_for_log("job store writes again after")
    errors = _errors(svc)
    assert len(errors) == 1 and "job store: a commit failed (database is locked)" in errors[0]
    assert svc.log().count("job store writes again after") == 1
    # The refused adds were not stored, and a clean restart does not run the job again.
    assert svc.stop() == 0
    svc.start()
    assert svc.call(b"queue:check:id:%d" % jid) == b"2"
    assert _runs(db) == [(jid, 1, "done")]
    assert add(svc, b"queue:add:echo:after") > jid
    assert _sql(db, "SELECT COUNT(*) FROM jobs") == [(2,)]  # the gate job's and this one


def test_a_stop_while_the_database_is_locked_names_the_jobs_whose_state_it_did_not_store(
    make_service, modules_dir, tmp_path
):
    with _ended_while_locked(make_service, modules_dir, tmp_path) as (svc, db, jid):
        svc.wait_for_log("database is locked")  # (the end's commit failed)
        assert svc.stop() == 0  # (its last try waits out the busy timeout too)
    assert re.search(
        rf"ERROR .*job store: stopped with the state changes of 1 jobs not stored \(database "
        rf"is locked\): .* jobs {jid}$", svc.log(), re.M
    ), svc.log()[-2000:]
    assert _row(db, jid) == ("running", 1)  # as the log said: it runs again at the start


def test_commits_past_a_file_size_limit_refuse_adds_with_the_cause_and_keep_the_rest(
    make_service, modules_dir, tmp_path
):
    # RLIMIT_FSIZE at the -wal's size: every commit's write past it fails, "disk I/O
    # error", as on a full disk; the limit raised again is the disk freed. Found by review:
    # a cancel answered 503 while the disk was full was lost, and /metrics had the queue up.
    write_module(modules_dir, "gate", GATE)
    svc = make_service(HTTP)
    db, gate = tmp_path / "jobs.db", tmp_path / "gate-open"
    jid = _running_on_disk(svc, db, gate)
    later = add(svc, b"queue:add?delay=3600:echo:later")
    again = add(svc, b"queue:add?delay=3600:echo:again")
    assert svc.call(b"queue:cancel:id:%d" % again) == b"cancelled"
    for _ in range(4):  # (a -wal far larger than the log, which the limit bounds too)
        add(svc, b"queue:add?delay=3600:echo:" + b"x" * 200_000)
    wal = os.path.getsize(tmp_path / "jobs.db-wal")  # (no checkpoint yet: its end)
    resource.prlimit(svc.proc.pid, resource.RLIMIT_FSIZE, (wal, resource.RLIM_INFINITY))
    refused = svc.call(b"queue:add:echo:x")
    code, body, headers = svc.http("POST", "/api/v1/jobs", {"module": "echo", "data": "x"})
    up_meanwhile = _queue_up(svc)
    gate.touch()
    assert svc.call(b"queue:get:id:%d" % jid) == b"open"
    cancel = svc.call(b"queue:cancel:id:%d" % later)
    assert svc.call(b"queue:check:id:%d" % later) == b"2"  # cancelled, in memory
    retry = svc.call(b"queue:retry:id:%d" % again)
    assert svc.call(b"queue:get:id:%d" % again) == b"again"  # retried, in memory
    stats = svc.call(b"queue:stats")
    assert _row(db, jid) == ("running", 1) and _row(db, later) == ("waiting", 0)
    assert _row(db, again) == ("cancelled", 0)
    resource.prlimit(svc.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    wait_until(lambda: _row(db, jid) == ("done", 1) and _row(db, later) == ("cancelled", 0))
    assert _row(db, again) == ("done", 1)
    assert sorted(_runs(db)) == [(jid, 1, "done"), (again, 1, "done")]
    cause = "Job store unavailable: disk I/O error"
    assert refused == stats == b"503: " + cause.encode()
    assert (code, body["error"]["message"], headers["Retry-After"]) == (503, cause, "5")
    assert cancel == f"503: {cause} (the cancel may not survive a restart)".encode()
    assert retry == f"503: {cause} (the retry may not survive a restart)".encode()
    svc.wait_for_log("job store writes again after")
    assert (up_meanwhile, _queue_up(svc)) == (0, 1)
    assert len(_errors(svc)) == 1, _errors(svc)


def _queue_up(svc: ServiceProcess) -> float:
    _, text, _ = svc.http("GET", "/metrics")
    [value] = re.findall(r"^bgservice_queue_up (\S+)$", text, re.M)
    return float(value)


def test_the_database_deleted_while_running_is_not_made_anew_and_is_said(make_service, tmp_path):
    # Found by review: queue:stats' reader opened the path lazily and made a new, empty
    # database there (then answered 500 "no such table"); the next start took that file:
    # the acknowledged jobs lost, their ids handed out again.
    svc = make_service("[queue]\nkeep_results = 2\n")  # (an expiry sweep every 0.5 s)
    db = tmp_path / "jobs.db"
    add(svc, b"queue:add?delay=600:echo:delayed")
    for name in ("jobs.db", "jobs.db-wal", "jobs.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    reply = svc.call(b"queue:stats")
    assert reply.startswith(b"503: Job store unavailable: "), reply
    assert not db.exists()
    svc.wait_for_log("the job store's file")
    assert f"the job store's file {db} was deleted or replaced while running" in svc.log()
    assert add(svc, b"queue:add:echo:x")  # the open file takes them still
    assert svc.stop() == 0
    assert svc.log().count("was deleted or replaced while running") == 1


def test_a_second_service_on_a_link_to_the_database_is_refused(make_service, tmp_path):
    # Found by review: DB.lock was named after the path as written, so a service started on
    # a symbolic link to another's database shared it, and both ran its jobs.
    first = make_service(root=tmp_path / "first")
    db = tmp_path / "first" / "jobs.db"
    for kind, making in (("symbolic", os.symlink), ("hard", os.link)):
        other = tmp_path / kind
        other.mkdir()
        making(db, other / "jobs.db")
        second = make_service(root=other, start=False).start(wait=False)
        assert second.wait() == 1, second.log()
        expected = (f" (pid {first.proc.pid})" if kind == "symbolic"
                    else ", under another name (a hard link to the same file)")  # fmt: skip
        assert "is in use by another bgservice" + expected in second.log(), second.log()
    assert add(first, b"queue:add:echo:mine") == 1


def test_a_database_of_a_newer_schema_is_refused_and_a_new_one_gets_the_version(
    make_service, tmp_path
):
    # Found by review: no schema version: a downgraded service misread the newer rows.
    svc = make_service()
    db = tmp_path / "jobs.db"
    add(svc, b"queue:add:echo:x")
    assert svc.stop() == 0
    [(version,)] = _sql(db, "PRAGMA user_version")
    assert version >= 1  # (sqlite_schema.SCHEMA_VERSION)
    _sql(db, "PRAGMA user_version = 1000")
    svc.start(wait=False)
    assert svc.wait() == 1
    assert (f"{db} was written by a newer bgservice (schema version 1000; this one knows up "
            f"to {version}, and would misread it)") in svc.log()  # fmt: skip


def test_a_backup_restored_as_docs_deploy_md_says_hands_out_no_id_twice(make_service, tmp_path):
    # A restored backup handed out again the ids given out after it was taken: a client
    # holding one read another job's result. docs/deploy.md's statement moves the counter.
    [statement] = re.findall(r'"(UPDATE meta SET [^"]*next_id[^"]*)"',
                             (REPO / "docs" / "deploy.md").read_text())  # fmt: skip
    svc = make_service()
    db, backup = tmp_path / "jobs.db", tmp_path / "backup.db"
    before = add(svc, b"queue:add?delay=3600:echo:before the backup")
    _sql(db, f"VACUUM INTO '{backup}'")  # online, while the service runs (docs/deploy.md)
    assert svc.stop() == 0
    svc.start()  # (a new block of ids)
    handed_out = add(svc, b"queue:add:echo:a secret of user 1")
    assert svc.stop() == 0
    for name in ("jobs.db-wal", "jobs.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    shutil.copy(backup, db)
    _sql(db, statement)
    svc.start()
    assert add(svc, b"queue:add:echo:of user 2") > handed_out
    assert status(svc, before)["state"] == "waiting"


# --- with file permissions that count: root's would not --------------------------------

# Root may write anything (CAP_DAC_OVERRIDE): as root, the service of these tests runs
# without the capabilities that pass over file permissions, as a service's own user would
# (dropped from the bounding set before it starts: none after its exec).
_DAC_CAPS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
_PR_CAPBSET_DROP = 24


def _unprivileged() -> None:
    """In the child, before its exec: file permissions apply to it, even as root."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _DAC_CAPS:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def unprivileged(tmp_path: Path) -> Iterator[Callable[[Path], UnprivilegedService]]:
    """Makes services that file permissions apply to (``UnprivilegedService``), stopped at
    the end whatever the test did (they are not make_service's)."""
    made: list[UnprivilegedService] = []

    def make(db: Path) -> UnprivilegedService:
        made.append(UnprivilegedService(tmp_path, db))
        return made[-1]

    yield make
    for svc in made:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


class UnprivilegedService(ServiceProcess):
    """A service that file permissions apply to, its database at ``db``."""

    def __init__(self, root: Path, db: Path) -> None:
        super().__init__(root)
        self.config.write_text(self.config.read_text().replace(str(root / "jobs.db"), str(db)))
        self.own_group = True  # (so that the child runs _in_child)

    def _in_child(self) -> None:
        super()._in_child()
        _unprivileged()


def test_a_folder_made_read_only_while_running_does_not_fail_the_stop(tmp_path, unprivileged):
    # Found by review: the stop could not remove DB.running from a folder made read-only
    # meanwhile: a traceback, exit 1, and the next start warned of an unclean stop.
    data = tmp_path / "data"
    data.mkdir()
    svc = unprivileged(data / "jobs.db")
    try:
        svc.start()
        assert add(svc, b"queue:add:echo:one") == 1
        data.chmod(0o555)
        assert svc.stop() == 0
        data.chmod(0o755)
        log = svc.log()
        assert "Traceback" not in log
        assert f"cannot remove {data / 'jobs.db.running'}" in log
        assert "emptied instead, which the next start takes for a clean stop" in log
        svc.start()
        assert svc.call(b"queue:check:id:1") == b"2"
        assert "unclean stop" not in svc.log()
    finally:
        data.chmod(0o755)


def _check(folder: Path, db: Path) -> subprocess.CompletedProcess[str]:
    (folder / "modules").mkdir(exist_ok=True)
    (folder / "check.config").write_text(f'modules = "{folder / "modules"}"\ndb = "{db}"\n')
    return subprocess.run(
        [sys.executable, str(REPO / "service.py"), "--check", "-c", "check.config"],
        cwd=folder, capture_output=True, text=True, timeout=60, preexec_fn=_unprivileged,
    )  # fmt: skip


def test_a_database_in_a_read_only_folder_or_read_only_itself_fails_the_check_and_start(
    tmp_path, unprivileged
):
    # Found by review: with the file there (and its lock file), --check passed a folder the
    # start could not make the -wal in; and a read-only file started "ready", then refused
    # every add.
    data = tmp_path / "data"
    data.mkdir()
    db = data / "jobs.db"
    svc = unprivileged(db)
    svc.start()
    assert add(svc, b"queue:add?delay=600:echo:x") == 1
    assert svc.stop() == 0
    assert (data / "jobs.db.lock").exists()
    data.chmod(0o555)
    done = _check(tmp_path, db)
    data.chmod(0o755)
    assert done.returncode == 2, done.stdout
    assert (f"the queue database {db}: its folder {data} is not writable (SQLite makes the "
            "database's -wal and -shm files there)") in done.stderr  # fmt: skip
    db.chmod(0o444)
    done = _check(tmp_path, db)
    assert done.returncode == 2 and f"the queue database {db}: not writable" in done.stderr
    proc = svc.start(wait=False).proc
    assert proc is not None
    wait_until(lambda: proc.poll() is not None or svc.ready_file.exists())
    assert proc.poll() == 1, svc.log()  # (it came up "ready")
    assert (f"cannot open the job queue (database {db}): {db} cannot be written (attempt to "
            "write a readonly database): the service's user must be able to write the file "
            "and its folder") in svc.log()  # fmt: skip


def test_concurrent_adds_during_a_lock_share_the_one_error_line(make_service, tmp_path):
    """The log does not flood: 40 adds refused while the database is locked, one ERROR
    (it was two per add: the commit's and the add's)."""
    svc = _settled(make_service())
    operator = Locked(tmp_path / "jobs.db")
    try:
        replies: list[bytes] = []
        threads = [threading.Thread(target=lambda: replies.append(
            svc.call(b"queue:add:echo:x", timeout=40))) for _ in range(40)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        operator.release()
    assert len(_errors(svc)) == 1, _errors(svc)
    assert replies == [b"503: Job store unavailable: database is locked"] * 40
    svc.wait_for_log("job store writes again after")
    assert _sql(tmp_path / "jobs.db", "SELECT COUNT(*) FROM jobs") == [(0,)]


def _integrity(db: Path) -> list[tuple]:
    """What ``PRAGMA integrity_check`` says of ``db`` (read-only): [("ok",)] when sound."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return [(str(exc),)]


def test_a_commit_that_fails_on_a_damaged_file_says_so_and_what_to_do(make_service, tmp_path):
    # Found by review: a commit that failed on a damaged page ("database disk image is
    # malformed", SQLITE_CORRUPT) was said and retried as a passing failure, with no word of
    # the damage nor of what to do about it.
    svc = make_service()
    db = tmp_path / "jobs.db"
    adds = Framed(svc.tcp, timeout=30)
    for first in range(0, 3000, 100):  # ~7 MB: more than SQLite's page cache (2 MB)
        batch = range(first, first + 100)
        adds.send(*(b"queue:add?delay=3600:echo:job %04d " % i + b"." * 2000 for i in batch))
        assert [adds.recv() for _ in batch] == [(200, b"id:%d" % (i + 1)) for i in batch]
    adds.close()
    assert svc.stop() == 0  # (its -wal copied into the file)
    # Restarted, it reads its 3000 jobs in id order, so job 1001's page is out of its cache
    # (which keeps the last read); that page, in the middle of the file, and its neighbours
    # become garbage under the running service, as a bad disk or a cp over it would do.
    svc.start()
    [(page_size,)] = _sql(db, "PRAGMA page_size")
    page = db.read_bytes().index(b"job 1000 ") // page_size
    with db.open("r+b") as file:
        file.seek((page - 1) * page_size)
        file.write(b"\xff" * 3 * page_size)
    cause = b"Job store unavailable: database disk image is malformed"
    assert svc.call(b"queue:cancel:id:1001") == cause.join((b"503: ", b" (the cancel may not "
                                                            b"survive a restart)"))  # fmt: skip
    svc.wait_for_log("job store: a commit failed")
    [error] = _errors(svc)
    assert ("job store: a commit failed (database disk image is malformed): new jobs are "
            "refused (503), the state changes of jobs are kept in memory and written once it "
            f"commits again; the database file {db} is damaged: stop the service, check it "
            f'with sqlite3 {db} "PRAGMA integrity_check", and restore a backup (docs/deploy.md, '
            "Backups and the job store's failures)") in error  # fmt: skip
    assert svc.stop() == 0
    assert _integrity(db) != [("ok",)]  # what the check it names says of the file


def test_a_start_on_a_file_that_is_no_database_says_what_to_do(make_service, tmp_path):
    # Found by review: the start said only SQLite's words ("file is not a database"),
    # where a commit on a damaged file names the check to run and the backup to restore;
    # at the start, the db path may also name another file.
    db = tmp_path / "jobs.db"
    db.write_bytes(b"not a database, a log file copied over it\n" * 200)
    svc = make_service(start=False)
    assert svc.start(wait=False).wait() == 1, svc.log()
    assert (f"cannot open the job queue (database {db}): file is not a database; the "
            f"database file {db} is damaged, or is not the queue's (is db the right path?): "
            f'check it with sqlite3 {db} "PRAGMA integrity_check", and restore a backup') \
        in svc.log(), svc.log()[-1500:]  # fmt: skip


# --- a full disk: a small file system of its own ------------------------------------------

_CLONE_NEWNS, _MS_REC, _MS_PRIVATE = 0x00020000, 0x4000, 0x40000


def _full_disk(folder: Path, room: int) -> None:
    """In a child: ``folder`` a 64 KiB file system with ``room`` bytes left, in a mount
    namespace of the child's own (no one else sees it; it goes with the process)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for failed, what in (
        (lambda: libc.unshare(_CLONE_NEWNS), "unshare"),
        (lambda: libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount"),
        (lambda: libc.mount(b"tmpfs", bytes(folder), b"tmpfs", 0, b"size=64k"), "mount"),
    ):
        if failed() != 0:
            raise OSError(ctypes.get_errno(), what)
    stat = os.statvfs(folder)
    with (folder / "filler").open("wb") as filler:
        filler.write(b"\0" * (stat.f_bavail * stat.f_frsize - room))


def _need_tmpfs(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        subprocess.run(["true"], preexec_fn=partial(_full_disk, probe, 0), check=True)
    except subprocess.SubprocessError:
        pytest.skip("no tmpfs can be mounted here (it takes CAP_SYS_ADMIN)")


class FullDiskService(ServiceProcess):
    """A service whose database is in ``full``, a file system with ``room`` bytes left."""

    def __init__(self, root: Path, room: int) -> None:
        super().__init__(root)
        self.db = root / "full" / "jobs.db"
        self.db.parent.mkdir()
        self.config.write_text(self.config.read_text().replace(str(root / "jobs.db"), str(self.db)))
        self.room = room
        self.own_group = True  # (so that the child runs _in_child)

    def _in_child(self) -> None:
        super()._in_child()
        _full_disk(self.db.parent, self.room)


@pytest.mark.parametrize("room", [0, 4096, 16384])
def test_a_start_on_a_full_disk_says_so_and_exits(tmp_path, room):
    # Found by review: it said only what failed first: DB.lock's "[Errno 28] No space left
    # on device", SQLite's "database or disk is full" (the file's first page), or "disk I/O
    # error" (its -shm, 32 KiB), with no word of where.
    _need_tmpfs(tmp_path)
    svc = FullDiskService(tmp_path, room)
    try:
        assert svc.start(wait=False).wait() == 1, svc.log()
    finally:
        if svc.proc is not None and svc.proc.poll() is None:  # (started, before the fix)
            svc.proc.kill()
            svc.proc.wait()
    assert re.search(
        rf"ERROR .*cannot open the job queue \(database {svc.db}\): no space left on the "
        rf"device holding {svc.db} \(\d+ bytes free; [^)]+\): free some space there, or "
        "give db a path on another file system$", svc.log(), re.M
    ), svc.log()[-2000:]


def test_the_check_warns_of_a_device_nearly_full(tmp_path):
    # --check said nothing of free space: a start then failed on it, and a running
    # service refused new jobs (503) once it filled.
    _need_tmpfs(tmp_path)
    full, db = tmp_path / "full", tmp_path / "full" / "jobs.db"
    full.mkdir()
    (tmp_path / "modules").mkdir()
    (tmp_path / "check.config").write_text(f'modules = "{tmp_path / "modules"}"\ndb = "{db}"\n')
    done = subprocess.run(
        [sys.executable, str(REPO / "service.py"), "--check", "-c", "check.config"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        preexec_fn=partial(_full_disk, full, 4096),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # a warning: it may yet start
    assert re.search(
        rf"warning: the device holding the queue database {db} has \d+ bytes free \(less than "
        r"1024 KiB\): the start may fail on it", done.stderr
    ), done.stderr
    roomy = _check(tmp_path, tmp_path / "jobs.db")  # (this one's device has room)
    assert roomy.returncode == 0 and "bytes free" not in roomy.stderr, roomy.stderr
