"""The process's limit on open files, raised at the start.

Every connection is a file descriptor, as are the listeners, the job store's files, the
log file and the pipes to process workers and node. A soft limit of 1024 (what systemd
and most shells give) was reached long before ``[limits] max_connections`` on a service
with a TCP listener, a Unix socket and the HTTP API (1024 each): a connection past it
was reset by the failed accept (EMFILE), with no ``503`` and no line, and a module
starting a worker got ``Too many open files``. The soft limit is raised to the hard one
at the start, as Go's runtime does (since 1.19) and nginx's ``worker_rlimit_nofile``;
one still below what the listeners may hold is a warning that names what to change.
"""

from __future__ import annotations

import logging
import resource

from bgservice.config import Settings

log = logging.getLogger(__name__)

# Descriptors kept for what is not a client's connection: listeners, the job store, logs,
# process workers' pipes, node, the reloader's watches.
SPARE = 256


def wanted(settings: Settings) -> int:
    """Descriptors the listeners may hold at once (``max_connections`` each), and SPARE."""
    streams = sum(
        (listener.tcp and listener.port is not None) + (listener.unix is not None)
        for listener in settings.listeners
    )
    streams += settings.http.enabled
    return settings.limits.max_connections * streams + SPARE


def raise_limit(settings: Settings) -> int:
    """Raise the soft limit on open files to the hard one; warn when it stays below what
    the listeners may need. Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted(settings)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # (a hard limit above the kernel's nr_open)
            log.debug("open files: the limit stays %d (%s)", soft, exc)
    if soft < need:
        log.warning(
            "open files: at most %d (ulimit -n), but [limits] max_connections %d on every "
            "listener may need %d: connections past the limit are reset without a reply; "
            "raise the hard limit (LimitNOFILE= in the systemd unit, ulimit -Hn) or lower "
            "max_connections",
            soft, settings.limits.max_connections, need,
        )  # fmt: skip
    return soft
