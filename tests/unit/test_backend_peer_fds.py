"""One peer never stops another port: eventfds a front-end (or a netmap application) shares with the daemon
cannot stall the datapath thread or the control thread, whatever the peer does to them.

Each attack runs over the real socket against port a (linked to b) while another link (c, e) of the same
daemon must keep forwarding and the control socket keep answering; the attacking port is refused or marked
broken with a log line naming why.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from daemons import FRAME, RunningDaemon, StartDaemon, exchange
from test_backend_hostile import RX, TX

from vhostmap.apps import client
from vhostmap.control import client as control
from vhostmap.lab.frontend import DRIVER_OK_STATUS, FakeFrontend
from vhostmap.netmap.abi import RING_HEADER_SIZE, SLOT_DTYPE
from vhostmap.vhost_user.messages import Request, VringFile
from vhostmap.virtio.spec import VIRTIO_CONFIG_S_NEEDS_RESET

# An eventfd counter cannot go higher: a write of 1 then fails (EAGAIN), or sleeps if O_NONBLOCK is clear.
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE


def control_path(d: RunningDaemon) -> str:
    return str(d.workdir / "control.sock")


def others_unaffected(d: RunningDaemon, fc: FakeFrontend, fe: FakeFrontend) -> None:
    """The other link forwards both ways and the control socket answers."""
    exchange(fc, fe)
    exchange(fe, fc)
    assert control.call(control_path(d), "stats", timeout=5.0)["ports"]["c"]["broken"] is None
    assert d.daemon.worker.workers[0]._thread.is_alive()


def set_blocking(fd: int) -> None:
    """Clear O_NONBLOCK on the open file description ``fd`` shares with the daemon's copy."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


@pytest.fixture
def bad_fds(tmp_path: Path) -> Iterator[Callable[[str], int]]:
    """Makes fds of a kind the datapath cannot use; closes them at teardown."""
    opened: list[int] = []

    def make(kind: str) -> int:
        if kind == "regular-file":
            fd = os.open(tmp_path / "kick", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        elif kind == "memfd":
            fd = os.memfd_create("not-a-kick", os.MFD_CLOEXEC)
        elif kind == "dev-null":
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        elif kind == "pipe":
            fd, w = os.pipe()
            os.write(w, b"x")  # readable for ever: nothing in the daemon reads a pipe kick
            opened.append(w)
        else:
            assert kind == "semaphore"
            fd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            os.eventfd_write(fd, EVENTFD_MAX)  # each read takes 1: 2**64 wake-ups
        opened.append(fd)
        return fd

    yield make
    for fd in opened:
        os.close(fd)


KINDS = ["regular-file", "memfd", "dev-null", "pipe"]
CASES = [(Request.SET_VRING_KICK, k) for k in [*KINDS, "semaphore"]] + [
    (r, k) for r in (Request.SET_VRING_CALL, Request.SET_VRING_ERR) for k in KINDS
]


@pytest.mark.parametrize(("request_", "kind"), CASES, ids=[f"{r.name}-{k}" for r, k in CASES])
def test_an_fd_that_is_no_usable_eventfd_is_refused_and_breaks_only_its_port(
    start_daemon: StartDaemon,
    caplog: pytest.LogCaptureFixture,
    bad_fds: Callable[[str], int],
    request_: Request,
    kind: str,
) -> None:
    d = start_daemon({"a": "", "b": "", "c": "", "e": ""}, links=["a,b", "c,e"])
    fa, fb, fc, fe = (d.frontend(p) for p in "abce")
    exchange(fa, fb, 3)

    fd = bad_fds(kind)
    accepted = fa.checked(request_, VringFile(TX, False), (fd,))
    others_unaffected(d, fc, fe)
    assert not accepted  # a failure ack (REPLY_ACK)
    reason = d.wait_broken("a")
    why = "an EFD_SEMAPHORE eventfd" if kind == "semaphore" else "not an eventfd"
    assert reason.startswith(f"{request_.name} queue {TX}: fd ") and reason.endswith(why)
    assert f"port a: device broken: {reason}" in caplog.messages
    assert any(m.startswith(f"port a: {request_.name} refused: queue {TX}: fd ") for m in caplog.messages)
    assert fa.get_status() == DRIVER_OK_STATUS | VIRTIO_CONFIG_S_NEEDS_RESET

    # A reset with proper eventfds brings the port back.
    fa.restart()
    exchange(fa, fb)
    exchange(fb, fa)


@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
def test_a_saturated_call_eventfd_breaks_only_its_port(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture, blocking: bool
) -> None:
    d = start_daemon({"a": "", "b": "", "c": "", "e": ""}, links=["a,b", "c,e"])
    fa, fb, fc, fe = (d.frontend(p) for p in "abce")
    exchange(fb, fa, 3)

    # The front-end fills its call eventfd to the top (and makes it blocking: it shares the open file),
    # then asks for an interrupt on the next frame it receives.
    call = fa.queues[RX].call
    with pytest.raises(BlockingIOError):
        while True:
            os.eventfd_read(call)
    os.eventfd_write(call, EVENTFD_MAX)
    if blocking:
        set_blocking(call)
    fa.post_receive_buffers(1)
    fa.enable_calls(fa.queues[RX])
    fb.transmit([FRAME])

    reason = d.wait_broken("a")
    why = "the peer made it blocking and saturated it" if blocking else "its counter is saturated"
    assert reason.startswith(f"virtqueue {RX}: call eventfd refused the interrupt: {why}")
    assert f"port a: device broken: {reason}" in caplog.messages
    assert d.totals("a")["tx_packets"] == 4  # the frame was delivered; only its interrupt was refused
    others_unaffected(d, fc, fe)

    # The front-end reads its interrupts again and resets the device: back to work.
    assert os.eventfd_read(call) == EVENTFD_MAX
    set_nonblocking(call)
    fa.restart()
    exchange(fb, fa)
    exchange(fa, fb)


# A front-end that kicks, then reads its own kick back a moment later, at random: sooner or later between the
# worker's epoll wake-up and its read of the kick, which must then not sleep.
KICK_THIEF = """
import os, random, sys, time
fd, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
counter = bytearray(8)
while time.monotonic() < end:
    os.eventfd_write(fd, 1)
    for _ in range(random.randrange(400)):
        pass
    try:
        os.preadv(fd, [counter], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        pass
"""

READ_SYSCALL = 0  # x86_64


def sleeping_in_read(tid: int) -> bool:
    """Whether thread ``tid`` of this process sleeps in read(2) (/proc/self/task/TID/syscall)."""
    with open(f"/proc/self/task/{tid}/syscall") as f:
        fields = f.read().split()
    return bool(fields) and fields[0] == str(READ_SYSCALL)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="read(2) is syscall 0 on x86_64 only")
def test_a_front_end_that_reads_its_kick_back_never_stalls_the_datapath(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": "", "c": "", "e": ""}, links=["a,b", "c,e"])
    fa, fb, fc, fe = (d.frontend(p) for p in "abce")
    exchange(fa, fb, 3)
    kick = fa.queues[TX].kick
    set_blocking(kick)
    worker = d.daemon.worker.native_id
    assert worker is not None
    thief = subprocess.Popen(
        [sys.executable, "-c", KICK_THIEF, str(kick), "2.0"], pass_fds=(kick,), stdin=subprocess.DEVNULL
    )
    try:
        # Until the thief is done, or the worker sleeps in a read of the kick it took back (then stop the
        # thief at once: its next kick would wake the worker up).
        deadline = time.monotonic() + 30
        while thief.poll() is None and not sleeping_in_read(worker):
            assert time.monotonic() < deadline, "the kick thief did not finish"
            os.sched_yield()
    finally:
        thief.kill()
        thief.wait()
    others_unaffected(d, fc, fe)
    set_nonblocking(kick)
    exchange(fa, fb)


def test_an_application_that_saturates_its_irq_eventfd_stops_only_its_interrupts(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"c": "", "e": "", "x": ""}, links=["c,e"])
    fc, fe, fx = d.frontend("c"), d.frontend("e"), d.frontend("x")
    with client.open("x", control_path(d)) as app:
        irq = app._irq
        os.eventfd_write(irq, EVENTFD_MAX)
        set_blocking(irq)
        fx.transmit([FRAME])  # the application's RX ring gets a frame: the daemon interrupts it
        d.wait(lambda: app.stats()[0]["irq_refused"], "the irq eventfd to be given up")
        assert app.stats()[0]["irq_refused"].startswith("the peer made it blocking and saturated it")
        assert any(
            m.startswith("application x (pid ") and "irq eventfd refused" in m for m in caplog.messages
        )
        others_unaffected(d, fc, fe)
        # Its rings still sync on every kick: a polling application goes on.
        ring = app.rx_rings[0]
        app.rxsync()
        d.wait(lambda: len(ring.receive()) == 1, "the frame to reach the application")
        assert ring.receive().frames() == [FRAME]


@pytest.mark.usefixtures("datapath")
def test_a_bad_buf_idx_an_application_writes_into_a_link_ring_does_not_stop_the_link(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    # Every port's rings live in the one region an application maps: one that writes buffer indexes into the
    # free slots of a linked port's RX ring (where the next frames from its guest land) must not take the link
    # down, nor the other link.
    d = start_daemon({"a": "", "b": "", "c": "", "e": "", "x": ""}, links=["a,b", "c,e"])
    fa, fb, fc, fe = (d.frontend(p) for p in "abce")
    exchange(fa, fb, 3)
    kring = d.daemon.ports["a"].rx_rings[0]
    ring = kring.ring
    # The link released a's slots of that exchange; once a's next rxsync took them back, what the application
    # writes below lands only in free slots. (Written over slots still to be taken back, it would make a's
    # own prologue repair a's ring instead: the same outcome for the link, another log line.)
    d.wait(lambda: kring.nr_hwcur == ring.head, "a's RX ring to take back the slots the link released")
    with client.open("x", control_path(d)) as app:
        slots = np.frombuffer(
            app.region.mm, dtype=SLOT_DTYPE, count=ring.num_slots, offset=ring.offset + RING_HEADER_SIZE
        )
        slots["buf_idx"][:] = 0xFFFF_FF00
        frames = [bytes([k]) * 60 for k in range(4)]
        fb.post_receive_buffers(4)
        fa.transmit(frames)
        # Those frames went to the scratch buffer and were dropped by a ring reinit; the link is still there,
        # and the other link and the control socket never noticed. (The reinit gives each repaired slot a
        # buffer back: test_client_reinit.py.)
        d.wait(lambda: d.totals("a")["rx_packets"] == 7, "a's guest frames to be taken")
        others_unaffected(d, fc, fe)
        assert not any("failed; removed from the datapath" in m for m in caplog.messages)
        # The slots with the bad indexes reached b's TX ring, whose prologue refused and repaired them.
        assert any(
            m.startswith("b TX0: ring reinit: slot ") and "buf_idx 4294967040 >= nbufs" in m
            for m in caplog.messages
        )
        exchange(fb, fa)
        assert [d.device(p).broken for p in "abce"] == [None] * 4
