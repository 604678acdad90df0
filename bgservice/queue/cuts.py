"""Attempts the service cut, on the embedded engine: by a crash (``interrupted``, found
``running`` at the next start) or by a graceful stop (``handed_back``). Either way the job
waits again and its attempt is given back (``given_back``): it ran to no end of the
handler's, so it takes none of the job's ``retries=``, which are for the handler's errors
(a deploy during a long job took one of them), and the next run is the same attempt again,
as Sidekiq does; the cut is in the run history (``interrupted_run``), and a crash's in the
job's ``interruptions``, bounded by ``[queue] max_interruptions``. The Redis engine does
the same in Lua (redis_scripts.py: REAP, RELEASE)."""

from __future__ import annotations

import logging

from bgservice.queue.job import Job, JobState
from bgservice.queue.store import Run

log = logging.getLogger(__name__)


def interrupted_run(job: Job) -> Run:
    """The record of an attempt cut by a crash (found ``running`` at the next start).
    When it ended is unknown: it is recorded up to the last moment it was known to run,
    its start, so the history counts the attempt without inventing busy time."""
    started = job.started if job.started is not None else job.created
    return Run(job.id, job.module, job.attempts, started, started, "interrupted")


def interrupted(job: Job, limit: int) -> str | None:
    """A job found running at a start: a crash (``kill -9``, power loss) cut its attempt.
    It waits again, its attempt given back, the cut counted; past ``limit`` ([queue]
    max_interruptions) the error it fails with instead: a job that crashes the service
    would crash it at every start.
    (On Redis, REAP does the same in Lua: its error reads the same.)"""
    job.move(JobState.WAITING)
    job.interruptions += 1
    if job.cancel_requested:  # acknowledged ("cancelling"): it ends cancelled
        return None
    if job.interruptions <= limit:
        given_back(job)
        log.warning("job %d (%s) was running when the service stopped: it runs again "
                    "(interrupted %d time(s); [queue] max_interruptions = %d)", job.id,
                    job.module, job.interruptions, limit)  # fmt: skip
        return None
    return (f"Job {job.id} interrupted {job.interruptions} times, more than [queue] "
            f"max_interruptions ({limit}): each of those runs ended with the service "
            "(crash, kill -9, power loss, or a lease that ran out); not run again")  # fmt: skip


def handed_back(job: Job) -> Run:
    """A job a graceful stop cut (still running when its grace ended): waiting again for
    the next start, its attempt given back, and not an interruption (a crash's): the
    Redis engine's RELEASE does the same. Returns its run, for the history."""
    log.warning("job %d (%s) cut by the stop: it runs again", job.id, job.module)
    run = interrupted_run(job)
    job.move(JobState.WAITING)
    given_back(job)
    return run


def given_back(job: Job) -> None:
    job.attempts = max(job.attempts - 1, 0)
