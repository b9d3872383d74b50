"""A front-end that shrinks its guest memory (or its dirty log) after the daemon mapped it: the next access
raises SIGBUS. That breaks its own port, with a log line naming the region; the daemon, its control socket
and every other port go on (datapath/guard.cdef). Without the guard the same front-end kills the daemon,
which the last test shows in a child process."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from conftest import RunningDaemon, StartDaemon
from vhostmap.control.client import ControlError, call
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.frontend import DRIVER_OK_STATUS, FakeFrontend
from vhostmap.lab.wait import wait_until
from vhostmap.virtio.spec import (
    VHOST_F_LOG_ALL,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    bit,
)

pytestmark = pytest.mark.usefixtures("datapath")

RX, TX = 0, 1
FRAME = bytes(range(60))
REGION_GONE = (
    r"virtqueue 1: guest memory region 0 \(gpa 0x0\+0x[0-9a-f]+\) shrank under the backend \(SIGBUS\)"
)
LOG_GONE = r"virtqueue 0: the dirty log \(0x[0-9a-f]+ bytes\) shrank under the backend \(SIGBUS\)"


def exchange(x: FakeFrontend, y: FakeFrontend, n: int = 10) -> None:
    """``n`` frames from x to y, byte-exact."""
    frames = [bytes([k]) * 60 + FRAME for k in range(n)]
    y.post_receive_buffers(n)
    x.transmit(frames)
    assert y.receive(n) == frames


def assert_daemon_lives(d: RunningDaemon, fc: FakeFrontend, fe: FakeFrontend) -> None:
    """The other link forwards both ways, and the control socket answers."""
    exchange(fc, fe)
    exchange(fe, fc)
    assert [d.device(p).broken for p in "ce"] == [None, None]
    status = call(str(d.workdir / "control.sock"), "status")
    assert set(status["ports"]) >= {"a", "b", "c", "e"}


def test_shrunk_guest_memory_breaks_only_its_port(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "", "b": "", "c": "", "e": ""}, links=["a,b", "c,e"])
    fa, fb, fc, fe = (d.frontend(p) for p in "abce")
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
