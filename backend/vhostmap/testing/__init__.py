"""vhostmap.testing: a pytest plugin and helpers for testing network software in QEMU guests wired through
vhostmap (switches, links, host namespaces, testpmd peers), parallel-safe and cleaned up after every test.

Installed with vhostmap, the plugin is active in every pytest session (entry point ``pytest11: vhostmap``,
module `vhostmap.testing.plugin`, whose docstring lists the fixtures). Outside pytest, `Lab` and
`vhostmap.testing.topology.build` do the same as a context manager.

What it needs on the machine: QEMU (TCG is enough), the guest kernel built by ``scripts/guest-kernel``
(cached in $VHOSTMAP_CACHE, default /var/cache/vhostmap), root (namespaces, TAPs), and dpdk-testpmd with
hugepages for the ``testpmd`` fixture.
"""

from vhostmap.lab.channel import CompletedCommand, GuestCommandFailed, GuestError
from vhostmap.lab.qemu import Nic
from vhostmap.lab.testpmd import Testpmd, VhostPort, VirtioUserPort
from vhostmap.lab.userimage import ImageSpec
from vhostmap.lab.wait import WaitTimeout, wait_until
from vhostmap.testing.lab import Daemon, Guest, HostNamespace, HostTap, Lab
from vhostmap.testing.leftovers import sweep
from vhostmap.testing.names import LabNames
from vhostmap.testing.topology import Topology, TopologyError, build

__all__ = [
    "CompletedCommand",
    "Daemon",
    "Guest",
    "GuestCommandFailed",
    "GuestError",
    "HostNamespace",
    "HostTap",
    "ImageSpec",
    "Lab",
    "LabNames",
    "Nic",
    "Testpmd",
    "Topology",
    "TopologyError",
    "VhostPort",
    "VirtioUserPort",
    "WaitTimeout",
    "build",
    "sweep",
    "wait_until",
]
