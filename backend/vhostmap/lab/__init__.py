"""The lab: QEMU guests, dpdk-testpmd peers and host network plumbing for tests, the demo and benchmarks.

One idea per module: `guestkernel` (where the guest kernel and initramfs are), `qemu` (boot a guest with
vhost-user NICs), `channel` (run commands in a lab guest), `testpmd` (dpdk-testpmd as front-end or back-end,
with counters), `netns` (namespaces, veths, TAPs) and `wait` (waiting on conditions with deadlines).
"""

from vhostmap.lab.channel import (
    CommandChannel,
    CompletedCommand,
    GuestCommandFailed,
    GuestCommandTimeout,
    GuestError,
)
from vhostmap.lab.guestkernel import GuestKernel, GuestKernelMissing
from vhostmap.lab.netns import Netns, NetnsError, Tap, VethPair, unique_name
from vhostmap.lab.qemu import Nic, QemuGuest
from vhostmap.lab.testpmd import PortStats, Testpmd, TestpmdError, VhostPort, VirtioUserPort
from vhostmap.lab.wait import WaitTimeout, wait_until

__all__ = [
    "CommandChannel",
    "CompletedCommand",
    "GuestCommandFailed",
    "GuestCommandTimeout",
    "GuestError",
    "GuestKernel",
    "GuestKernelMissing",
    "Netns",
    "NetnsError",
    "Nic",
    "PortStats",
    "QemuGuest",
    "Tap",
    "Testpmd",
    "TestpmdError",
    "VethPair",
    "VhostPort",
    "VirtioUserPort",
    "WaitTimeout",
    "unique_name",
    "wait_until",
]
