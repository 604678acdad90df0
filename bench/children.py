"""Every process a benchmark script starts, and the stop signals that end them all.

A child runs in a session of its own, so that stopping it also stops what it started
(loadgen's process per connection, queue_load.py's producers, a service's workers: its
process group is killed after it), and so that a terminal's Ctrl-C reaches the script
alone, which then stops its children in order. SIGTERM, SIGINT and SIGHUP (a CI timeout,
``timeout``, Ctrl-C, a closed terminal) become one exception, ``Interrupted``, raised in
the main thread: every ``finally`` on the way out runs. Where an exception would lose
track of a process (between its start and its registration, while the others are being
stopped) a signal waits until that step is done; a second signal while the script
unwinds is ignored, as the unwinding is bounded (``STOP_GRACE``, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Seconds a server has to exit after SIGTERM before its group is killed: more than the
# service's own shutdown_grace (10 s by default), so that it ends its calls itself.
STOP_GRACE = 15.0


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, as KeyboardInterrupt is: ``except
    Exception`` on the way must not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process a signal ended


def stop_process(proc: subprocess.Popen[Any], grace: float = STOP_GRACE) -> None:
    """SIGTERM to ``proc``, up to ``grace`` seconds for it to exit, then SIGKILL to its
    process group (what it started and left behind), then reap it. Does nothing to a
    process already reaped: its group id could belong to a new process by now."""
    if proc.returncode is not None:
        return
    if grace > 0:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    # WNOWAIT: the exited leader stays a zombie, so its pid (the group's id) cannot be
    # reused before the group is killed.
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            break
        time.sleep(0.01)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is empty: everything exited by itself
    proc.kill()  # in case it left its group; a no-op on a zombie
    proc.wait()


class Children:
    """The processes started so far, each in a session of its own; ``close`` stops them."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []
        self._held = 0
        self._pending: int | None = None
        self._fired = False

    def catch_signals(self) -> None:
        """From now on SIGTERM, SIGINT and SIGHUP raise ``Interrupted`` (main thread only)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def release_signals(self) -> None:
        """The default actions again (once everything is stopped)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._fired:
            return  # already unwinding: let the clean-up finish
        if self._held:
            self._pending = signum
            return
        self._fired = True
        raise Interrupted(signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        """A block no stop signal interrupts: one that arrives meanwhile is raised at its end."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if not self._held and self._pending is not None and not self._fired:
                self._fired = True
                raise Interrupted(self._pending)

    def spawn(self, command: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``command`` in a session of its own, registered before any signal can
        interrupt."""
        with self.held():
            proc = subprocess.Popen(command, start_new_session=True, **kwargs)
            self._procs.append(proc)
        return proc

    def output(self, command: list[str], timeout: float, **kwargs: Any) -> str:
        """Run a client to its end and return its standard output; it and what it
        started are killed if it outlasts ``timeout`` seconds, fails, or a signal comes."""
        proc = self.spawn(command, stdout=subprocess.PIPE, text=True, **kwargs)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{command[0]} took more than {timeout:g} s (see --timeout)") from None
        finally:
            stop_process(proc, grace=0)  # a client: nothing to shut down gently
            self._procs.remove(proc)
        if proc.returncode:
            tail = f": {str(out)[-2000:]}" if out else ""
            raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode}){tail}")
        return str(out)

    def close(self) -> None:
        """Stop every process still registered, the last started first (a service before
        the redis-server it uses)."""
        with self.held():
            while self._procs:
                stop_process(self._procs.pop())
