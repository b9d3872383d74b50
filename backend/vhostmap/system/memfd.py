"""Shared memory the daemon hands to a peer: a memfd sealed at its size.

A peer that receives the fd could shrink the file under the daemon's mapping, and the daemon's next touch of
a page past the new end would kill it with SIGBUS; sealed against shrinking and growing, the size is final.
"""

from __future__ import annotations

import fcntl
import os


def sealed_memfd(name: str, size: int) -> int:
    """A new memfd of ``size`` bytes (zeros) nobody can resize (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd
