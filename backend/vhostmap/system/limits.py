"""Process limits the daemon needs: as many file descriptors as the system lets it have.

Every front-end costs fds (its socket, eventfds, guest memory), and the default soft RLIMIT_NOFILE (often
1024) would let a few VMs exhaust it for all the others; the hard limit is what the administrator allows.
"""

from __future__ import annotations

import resource


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (old soft limit, new soft limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # RLIM_INFINITY as a soft limit is refused for RLIMIT_NOFILE: nr_open is the real ceiling then.
    ceiling = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        return soft, ceiling
    return soft, soft


def _nr_open() -> int:
    """The kernel's ceiling on any process's fds (/proc/sys/fs/nr_open)."""
    with open("/proc/sys/fs/nr_open") as f:
        return int(f.read())
