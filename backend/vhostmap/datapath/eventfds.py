"""Eventfds a peer shares with us, used so that the peer can never make the calling thread wait.

A front-end's kick, call and err eventfds and a netmap application's kick and irq eventfds are one open file
description on both sides: the peer can clear O_NONBLOCK, fill the counter to 0xfffffffffffffffe or empty it
behind our back, and a plain read() or write() would then sleep in the datapath or control thread. Here:

* `signal` adds 1 through the compiled, guarded write (datapath/eventfd.cdef): it returns at once, or after
  about a millisecond when the peer made the write sleep, and says which;
* `drain` reads with preadv2(RWF_NOWAIT), which returns EAGAIN on an empty counter whatever O_NONBLOCK says
  (pwritev2 has no such flag for eventfds: EOPNOTSUPP, hence the guard for writes);
* `check_eventfd` says whether an fd a peer handed over is an eventfd the datapath can use.
"""

from __future__ import annotations

import enum
import os

from vhostmap.datapath import lib

# What /proc/self/fd/N reads for an eventfd (fs/eventfd.c names its anonymous inode so).
EVENTFD_LINK = "anon_inode:[eventfd]"

# The field of /proc/self/fdinfo/N that says EFD_SEMAPHORE (Linux 6.4 and later print it).
_SEMAPHORE_FIELD = "eventfd-semaphore:"

_COUNTER = bytearray(8)


class Signal(enum.IntEnum):
    """What `signal` did."""

    OK = lib.VHU_EVENTFD_OK
    FULL = lib.VHU_EVENTFD_FULL
    BLOCKED = lib.VHU_EVENTFD_BLOCKED
    FAILED = lib.VHU_EVENTFD_FAILED


#: Why a signal did not go through, for log lines and broken-port reasons.
SIGNAL_FAILURES = {
    Signal.FULL: "its counter is saturated (the peer never reads it)",
    Signal.BLOCKED: "the peer made it blocking and saturated it (the write had to be interrupted)",
    Signal.FAILED: "the write failed (not an eventfd any more, or closed)",
}


def signal(fd: int) -> Signal:
    """Add 1 to eventfd ``fd`` without ever sleeping more than the guard's period (about 1 ms)."""
    return Signal(lib.vhu_eventfd_signal(fd))


def drain(fd: int) -> int:
    """Reset eventfd ``fd``'s counter; what it held, 0 if it was empty (or is not readable any more).

    preadv2(RWF_NOWAIT) never sleeps, even on an eventfd the peer made blocking and emptied between our epoll
    wake-up and this read."""
    try:
        os.preadv(fd, [_COUNTER], -1, os.RWF_NOWAIT)
    except OSError:
        return 0
    return int.from_bytes(_COUNTER, "little")


def check_eventfd(fd: int, *, readable: bool) -> str | None:
    """Why ``fd`` cannot serve as an eventfd of the datapath, or None when it can.

    It must be an eventfd (a pipe, a regular file, a memfd or /dev/null would make epoll refuse it or the
    worker spin, as nothing drains them); one the worker reads (``readable``: a kick) must not be an
    EFD_SEMAPHORE eventfd either, as each read takes only 1 from its counter and a peer could keep the worker
    waking up 2**64 times."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        return f"fd {fd} cannot be inspected: {e.strerror}"
    if target != EVENTFD_LINK:
        return f"fd {fd} is {target}, not an eventfd"
    if readable and _is_semaphore(fd):
        return f"fd {fd} is an EFD_SEMAPHORE eventfd"
    return None


def _is_semaphore(fd: int) -> bool:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith(_SEMAPHORE_FIELD):
                    return line.split(":", 1)[1].strip() == "1"
    except OSError:
        pass
    return False
