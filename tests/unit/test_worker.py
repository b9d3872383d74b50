"""The datapath worker: wakes on kicks, runs forwarders under the lock, sleeps when idle."""

from __future__ import annotations

import os
import pathlib
import threading
import time

import pytest

from vhostmap.daemon.worker import Worker, _drain


class CountingForwarder:
    """Moves `budget` units, one per round, and records every run."""

    def __init__(self, fds: list[int], budget: int = 0, fail: bool = False) -> None:
        self.name = "counting"
        self.fds = fds
        self.budget = budget
        self.runs = 0
        self.fail = fail
        self.ran = threading.Event()
        self.lock_held: list[bool] = []

    def wake_fds(self) -> list[int]:
        return self.fds

    def run(self) -> bool:
        self.runs += 1
        self.ran.set()
        if self.fail:
            raise RuntimeError("boom")
        if self.budget:
            self.budget -= 1
            return True
        return False


def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


@pytest.fixture
def worker():  # type: ignore[no-untyped-def]
    w = Worker()
    w.start()
    yield w
    w.stop()


def test_kick_runs_the_forwarder_and_drains_the_eventfd(worker: Worker) -> None:
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fwd = CountingForwarder([kick])
        worker.add(fwd)
        wait_for(lambda: fwd.runs >= 1)  # the initial pass after add
        before = fwd.runs
        os.eventfd_write(kick, 3)
        wait_for(lambda: fwd.runs > before)
        wait_for(lambda: _eventfd_empty(kick))
    finally:
        worker.stop()
        os.close(kick)


def test_busy_forwarder_runs_until_it_makes_no_progress(worker: Worker) -> None:
    fwd = CountingForwarder([], budget=500)
    worker.add(fwd)
    wait_for(lambda: fwd.budget == 0)
    assert fwd.runs >= 501


def test_failing_forwarder_is_removed_and_others_keep_running(worker: Worker) -> None:
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        bad = CountingForwarder([], fail=True)
        good = CountingForwarder([kick])
        worker.add(bad)
        worker.add(good)
        wait_for(lambda: bad.runs == 1 and good.runs >= 1)
        before = good.runs
        os.eventfd_write(kick, 1)
        wait_for(lambda: good.runs > before)
        assert bad.runs == 1
    finally:
        worker.stop()
        os.close(kick)


def test_idle_worker_does_not_spin(worker: Worker) -> None:
    assert not worker.poll  # interrupt mode is the default
    fwd = CountingForwarder([])
    worker.add(fwd)
    wait_for(lambda: fwd.runs >= 1)
    cpu_before = time.thread_time()
    runs = fwd.runs
    t0 = time.process_time()
    time.sleep(0.3)  # measuring idleness needs an interval, not synchronisation
    assert fwd.runs == runs
    assert time.process_time() - t0 < 0.1
    assert time.thread_time() - cpu_before < 0.1


def _eventfd_empty(fd: int) -> bool:
    try:
        value = os.eventfd_read(fd)
    except BlockingIOError:
        return True
    os.eventfd_write(fd, value)
    return False


def test_an_fd_epoll_refuses_is_ignored_and_logged_and_the_thread_goes_on(
    worker: Worker, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A regular file: epoll_ctl says EPERM. The forwarder that wants it still runs when its other fd fires,
    # and every other forwarder runs on its kicks.
    refused = os.open(tmp_path / "not-a-kick", os.O_RDWR | os.O_CREAT)
    kick, other = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        odd = CountingForwarder([refused, kick])
        good = CountingForwarder([other])
        good.name = "good"
        worker.add(odd)
        worker.add(good)
        wait_for(lambda: odd.runs >= 1 and good.runs >= 1)
        wait_for(lambda: any(f"fd {refused} cannot be watched" in m for m in caplog.messages))
        for fwd, fd in ((good, other), (odd, kick)):
            before = fwd.runs
            os.eventfd_write(fd, 1)
            wait_for(lambda fwd=fwd, before=before: fwd.runs > before)  # type: ignore[misc]
        assert worker._thread.is_alive()
        worker.refresh()  # a rebuild with the same refused fd: logged once
        before = good.runs
        os.eventfd_write(other, 1)
        wait_for(lambda: good.runs > before)
        assert sum(f"fd {refused} cannot be watched" in m for m in caplog.messages) == 1
    finally:
        worker.stop()
        for fd in (refused, kick, other):
            os.close(fd)


def test_the_drain_of_a_kick_never_sleeps(worker: Worker) -> None:
    # The peer shares the kick: it can make it blocking and empty it between epoll's answer and our read.
    kick = os.eventfd(0)  # blocking, empty
    try:
        done = threading.Event()
        thread = threading.Thread(target=lambda: (_drain(kick), done.set()), daemon=True)
        thread.start()
        assert done.wait(5), "the drain of an empty, blocking eventfd slept"
    finally:
        if done.is_set():
            os.close(kick)
        else:
            os.eventfd_write(kick, 1)  # wake the stuck read before closing
            thread.join(5)
            os.close(kick)
