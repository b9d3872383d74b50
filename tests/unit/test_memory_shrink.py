"""A front-end that shrinks its guest memory (or its dirty log) after the daemon mapped it: the next access
raises SIGBUS. That breaks its own port, with a log line naming the region; the daemon, its control socket
and every other port go on (datapath/guard.cdef). Without the guard the same front-end kills the daemon,
which the last test shows in a child process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemons import FRAME, RunningDaemon, StartDaemon, exchange

from vhostmap.control.client import ControlError, call
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.frontend import DRIVER_OK_STATUS, HUGE_PAGE, FakeFrontend
from vhostmap.lab.wait import wait_until
from vhostmap.vhost_user.errors import GuestMemoryError
from vhostmap.vhost_user.memory import GuestMemory
from vhostmap.vhost_user.messages import MemoryRegion, MemoryTable
from vhostmap.virtio.spec import (
    VHOST_F_LOG_ALL,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    bit,
)

RX, TX = 0, 1
PAGE = 4096
UVA = 0x7F00_0000_0000
REGION_GONE = (
    r"virtqueue 1: guest memory region 0 \(gpa 0x0\+0x[0-9a-f]+\) shrank under the backend \(SIGBUS\)"
)
# Any of b's queues: a batch that takes nothing logs its used ring's flags / avail_event write too.
LOG_GONE = r"virtqueue [01]: the dirty log \(0x[0-9a-f]+ bytes\) shrank under the backend \(SIGBUS\)"


def assert_daemon_lives(d: RunningDaemon, fc: FakeFrontend, fe: FakeFrontend) -> None:
    """The other link forwards both ways, and the control socket answers."""
    exchange(fc, fe)
    exchange(fe, fc)
    assert [d.device(p).broken for p in "ce"] == [None, None]
    status = call(str(d.workdir / "control.sock"), "status")
    assert set(status["ports"]) >= {"a", "b", "c", "e"}


@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize("hugepages", [False, True], ids=["memfd", "hugetlbfs"])
def test_shrunk_guest_memory_breaks_only_its_port(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture, hugepages: bool
) -> None:
    # hugetlbfs as QEMU's guest RAM on /dev/hugepages: the guard can only replace whole huge pages.
    d = start_daemon({"a": "", "b": "", "c": "", "e": ""}, links=["a,b", "c,e"])
    fa = d.frontend("a", hugepages=hugepages)
    assert os.fstat(fa.memfd).st_blksize == (HUGE_PAGE if hugepages else PAGE)
    fb, fc, fe = (d.frontend(p) for p in "bce")
    exchange(fa, fb, 3)

    fa.shrink_memory(0)
    # Kicked, the device reads a's transmit ring: past the end of the file now.
    os.eventfd_write(fa.queues[TX].kick, 1)
    reason = d.wait_broken("a")
    assert re.fullmatch(REGION_GONE, reason), reason
    assert f"port a: device broken: {reason}" in caplog.messages
    assert d.totals("a")["errors"] == 1
    assert fa.get_status() == DRIVER_OK_STATUS | VIRTIO_CONFIG_S_NEEDS_RESET

    assert_daemon_lives(d, fc, fe)
    # a's peer is untouched, its frames for a dropped as for a NIC without carrier.
    assert d.device("b").broken is None
    fb.transmit([FRAME])
    d.wait(lambda: d.totals("a")["tx_dropped"] == 1, "b's frame for a to be dropped")


@pytest.mark.usefixtures("datapath")
def test_shrunk_dirty_log_breaks_only_its_port(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "", "b": "", "c": "", "e": ""}, links=["a,b", "c,e"])
    fa, fc, fe = d.frontend("a"), d.frontend("c"), d.frontend("e")
    fb = d.frontend(
        "b", features=bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VHOST_F_LOG_ALL)
    )
    bitmap = fb.set_log_base()
    bitmap.close()  # the front-end's own view of the log dies with the file too
    exchange(fa, fb, 3)

    fb.shrink_log(0)
    fb.post_receive_buffers(4)
    fa.transmit([FRAME])  # delivered into b's memory, then logged: past the end of the log's file
    reason = d.wait_broken("b")
    assert re.fullmatch(LOG_GONE, reason), reason
    assert f"port b: device broken: {reason}" in caplog.messages
    assert d.device("a").broken is None
    assert_daemon_lives(d, fc, fe)


# Starts ``vhostmap serve`` (argv[1:]) with the SIGBUS guard never installed: the daemon as it was before.
UNGUARDED = """
import runpy, sys
import vhostmap.vhost_user.memory as memory
memory._install_guard = lambda: None
sys.argv = ["vhostmap", *sys.argv[1:]]
runpy.run_module("vhostmap.cli", run_name="__main__")
"""


class _Unguarded(VhostmapDaemon):
    """``vhostmap serve`` without the SIGBUS guard."""

    def command_line(self) -> list[str]:
        args = super().command_line()
        assert args[:3] == [sys.executable, "-m", "vhostmap.cli"]
        return [sys.executable, "-c", UNGUARDED, *args[3:]]


@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_shrunk_guest_memory_in_a_daemon_process(sock_dir: Path, guarded: bool) -> None:
    """The same front-end against ``vhostmap serve``: with the guard its port breaks and the daemon serves
    on; without it (the child process as it was before) the daemon dies of SIGBUS, which proves the test
    reaches the fault."""
    ports = [f"{p}=vhost-user,path={sock_dir}/{p}.sock" for p in "abce"]
    # The child inherits the datapath fixture's choice through the environment.
    daemon = (VhostmapDaemon if guarded else _Unguarded)(sock_dir, ports, links=["a,b", "c,e"])
    with daemon:
        fes = {p: FakeFrontend(f"{sock_dir}/{p}.sock") for p in "abce"}
        try:
            for fe in fes.values():
                fe.connect()
                fe.negotiate()
            exchange(fes["a"], fes["b"], 3)
            fes["a"].shrink_memory(0)
            os.eventfd_write(fes["a"].queues[TX].kick, 1)
            if not guarded:
                wait_until(
                    lambda: not daemon.alive, 30, "the unguarded daemon to die", details=daemon.diagnostics
                )
                assert daemon.stop() == -signal.SIGBUS, daemon.diagnostics()
                return
            wait_until(
                lambda: daemon.stats()["a"]["broken"],
                10,
                "port a to be marked broken",
                details=daemon.diagnostics,
            )
            assert re.fullmatch(REGION_GONE, daemon.stats()["a"]["broken"])
            exchange(fes["c"], fes["e"])
            exchange(fes["e"], fes["c"])
            assert daemon.stats()["b"]["broken"] is None
            assert "port a: device broken: virtqueue 1: guest memory region 0" in daemon.diagnostics()
        finally:
            for fe in fes.values():
                fe.close()
        try:
            call(daemon.control, "status", timeout=5)
        except (ControlError, OSError) as e:  # pragma: no cover (the assertion says it)
            pytest.fail(f"the control socket stopped answering: {e}")


# --- the guard itself ---------------------------------------------------------------------------------------


def memfd(size: int) -> int:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_region_beyond_its_file_is_refused() -> None:
    fd = memfd(PAGE)
    try:
        with GuestMemory() as mem, pytest.raises(GuestMemoryError, match="length is greater than file size"):
            mem.set_table(MemoryTable((MemoryRegion(0, 2 * PAGE, UVA, 0),)), [os.dup(fd)])
    finally:
        os.close(fd)


def test_a_shrunk_region_reads_zeros_is_named_and_a_new_table_clears_it() -> None:
    fd = memfd(4 * PAGE)
    with GuestMemory() as mem:
        mem.set_table(MemoryTable((MemoryRegion(0, 4 * PAGE, UVA, 0),)), [os.dup(fd)])
        mem.write(3 * PAGE, b"guest")
        assert not mem.gone and mem.gone_reason() is None
        os.ftruncate(fd, PAGE)
        # SIGBUS, caught: the whole region is zero pages now, the first page too.
        assert mem.read(3 * PAGE, 5) == bytes(5)
        assert mem.read(0, 1) == b"\0"
        assert mem.gone
        assert mem.gone_reason() == "guest memory region 0 (gpa 0x0+0x4000) shrank under the backend (SIGBUS)"
        os.ftruncate(fd, 4 * PAGE)
        mem.set_table(MemoryTable((MemoryRegion(0, 4 * PAGE, UVA, 0),)), [os.dup(fd)])
        assert not mem.gone
        assert mem.read(3 * PAGE, 5) == bytes(5)  # the file's own pages, zero after the truncation
    os.close(fd)


# A SIGBUS that is not in guest memory: with the guard installed (a region mapped), the process must still
# die of it, after faulthandler's traceback when faulthandler was enabled before or after the guard.
REAL_BUG = """
import faulthandler, mmap, os, sys
from vhostmap.vhost_user.memory import GuestMemory
from vhostmap.vhost_user.messages import MemoryRegion, MemoryTable
if sys.argv[1] == "before":
    faulthandler.enable()
fd = os.memfd_create("guest"); os.ftruncate(fd, 4096)
mem = GuestMemory(); mem.set_table(MemoryTable((MemoryRegion(0, 4096, 1 << 40, 0),)), [fd])
if sys.argv[1] == "after":
    faulthandler.enable()
    fd = os.memfd_create("guest"); os.ftruncate(fd, 4096)
    mem.set_table(MemoryTable((MemoryRegion(0, 4096, 1 << 40, 0),)), [fd])  # installs the guard again
bug = os.memfd_create("not-guest"); os.ftruncate(bug, 8192)
mm = mmap.mmap(bug, 8192); os.ftruncate(bug, 0)
print("reached", flush=True)
mm[100]
print("survived", flush=True)
"""


@pytest.mark.parametrize("faulthandler", ["off", "before", "after"])
def test_a_sigbus_outside_guest_memory_still_kills(faulthandler: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", REAL_BUG, faulthandler],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGBUS, proc.stderr
    assert proc.stdout == "reached\n"
    tracebacks = proc.stderr.count("Fatal Python error: Bus error")
    assert tracebacks == (0 if faulthandler == "off" else 1), proc.stderr
