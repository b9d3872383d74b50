"""The guard of eventfd writes (datapath/eventfd.c): a held guard (the datapath worker's) is armed only while
writes happen, so a thread that stops writing, even one that never sleeps (poll mode), takes at most one more
of its signals; and a write that the peer makes sleep is still interrupted after the guard was disarmed."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from vhostmap.datapath import eventfds, lib

GUARD_S = lib.VHU_EVENTFD_GUARD_NS / 1e9


def in_a_thread(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` on a thread of its own (the guard is per thread) and return what it found."""
    found: dict[str, Any] = {}

    def run() -> None:
        try:
            lib.vhu_eventfd_guard_hold(1)
            found.update(body())
        finally:
            lib.vhu_eventfd_guard_hold(0)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    return found


def spin_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Busy-wait (the thread never sleeps, as in poll mode) until ``predicate``; whether it came true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
    return True


def test_a_held_guard_disarms_itself_once_the_writes_stop() -> None:
    def body() -> dict[str, Any]:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            assert lib.vhu_eventfd_guarded() == 1
            assert eventfds.signal(fd) is eventfds.Signal.OK
            armed = lib.vhu_eventfd_guard_armed()
            start = lib.vhu_eventfd_guard_expiries()
            expired = spin_until(lambda: lib.vhu_eventfd_guard_expiries() > start)
            after_expiry = lib.vhu_eventfd_guard_armed()
            count = lib.vhu_eventfd_guard_expiries()
            # Fifty periods of a thread that never sleeps: not one more signal.
            spin_until(lambda: False, 50 * GUARD_S)
            quiet = lib.vhu_eventfd_guard_expiries() - count
            assert eventfds.signal(fd) is eventfds.Signal.OK  # the next write arms it again
            rearmed = lib.vhu_eventfd_guard_armed()
            return {
                "armed": armed,
                "expired": expired,
                "after": after_expiry,
                "quiet": quiet,
                "rearmed": rearmed,
                "count": eventfds.drain(fd),
            }
        finally:
            os.close(fd)

    found = in_a_thread(body)
    assert found == {"armed": 1, "expired": True, "after": 0, "quiet": 0, "rearmed": 1, "count": 2}


def test_a_write_the_peer_made_sleep_is_interrupted_after_the_guard_disarmed_itself() -> None:
    def body() -> dict[str, Any]:
        ok = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        hostile = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, as a peer can make ours
        try:
            os.eventfd_write(hostile, 0xFFFF_FFFF_FFFF_FFFE)  # full: a blocking write sleeps
            assert eventfds.signal(ok) is eventfds.Signal.OK
            start = lib.vhu_eventfd_guard_expiries()
            spin_until(lambda: lib.vhu_eventfd_guard_expiries() > start)
            disarmed = not lib.vhu_eventfd_guard_armed()
            t0 = time.monotonic()
            result = eventfds.signal(hostile)
            took = time.monotonic() - t0
            return {"disarmed": disarmed, "result": result, "took": took}
        finally:
            os.close(ok)
            os.close(hostile)

    found = in_a_thread(body)
    assert found["disarmed"] and found["result"] is eventfds.Signal.BLOCKED
    assert found["took"] < 0.5  # about one period; generous for a loaded machine
