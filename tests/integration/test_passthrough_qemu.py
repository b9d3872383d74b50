"""A passthrough port reaches a real guest: QEMU's ivshmem-doorbell device takes vhostmap's ivshmem server
protocol, and the guest finds the port's region as BAR 2 of PCI device 1af4:1110, header first.

One boot of the lab's busybox guest (no NIC): the guest reads BAR 2's size from sysfs and the header's first
bytes through /dev/mem (busybox devmem; no driver claims the device, so its BARs are open to it), reads its
ID from BAR 0 and rings the daemon's doorbell there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vhostmap.ivshmem.protocol import DAEMON_PEER_ID, GUEST_ID
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.qemu import QemuGuest
from vhostmap.lab.wait import wait_until
from vhostmap.netmap.abi import PT_MAGIC, PT_VERSION, PtHeader

pytestmark = pytest.mark.slow

# Prints, for the ivshmem device: BAR 0's start address, BAR 2's start address and BAR 2's size.
FIND_BARS = (
    "for d in /sys/bus/pci/devices/*; do "
    'if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1110 ]; then '
    "set -- $(sed -n 1p $d/resource) $(sed -n 3p $d/resource); "
    'echo "$1 $4 $(stat -c %s $d/resource2)"; fi; done'
)
# BAR 0 registers (ivshmem-spec.rst): IVPosition (the guest's ID) and Doorbell (peer << 16 | vector).
IVPOSITION, DOORBELL = 8, 12


def test_guest_sees_the_region_as_bar2_header_first(guest_kernel: GuestKernel, sock_dir: Path) -> None:
    sock = sock_dir / "pt0.sock"
    with VhostmapDaemon(sock_dir, [f"pt0=passthrough,path={sock},slots=256"]) as daemon:
        extra = [
            "-chardev", f"socket,id=iv0,path={sock}",
            "-device", "ivshmem-doorbell,chardev=iv0,vectors=1",
        ]  # fmt: skip
        with QemuGuest(kernel=guest_kernel, workdir=sock_dir / "q", extra_args=extra) as guest:
            guest.wait_ready()
            daemon.wait_connected("pt0")
            counters = daemon.stats()["pt0"]["passthrough"]
            assert counters["attached"] and counters["generation"] == 1
            found = guest.run(FIND_BARS, check=True).output.split()
            assert len(found) == 3, f"no single ivshmem device in the guest: {found}"
            bar0, start, size = found
            bar = int(size)
            region = counters["region_bytes"]
            # BAR 2 is the memfd: a power of two holding the region.
            assert bar & (bar - 1) == 0 and region <= bar < 2 * region, (bar, region)
            base = int(start, 16)
            magic = guest.run(f"devmem {base:#x} 64", check=True).output.strip()
            assert int(magic, 16).to_bytes(8, "little") == PT_MAGIC
            words = guest.run(f"devmem {base + 8:#x} 64", check=True).output.strip()
            version = int(words, 16) & 0xFFFF_FFFF
            assert version == PT_VERSION
            offset = PtHeader.region_size.offset
            region_size = int(guest.run(f"devmem {base + offset:#x} 64", check=True).output.strip(), 16)
            assert region_size == region
            # The guest's ID is the one the server gave; its doorbell, rung as the header says, is the
            # port's kick.
            regs = int(bar0, 16)
            position = int(guest.run(f"devmem {regs + IVPOSITION:#x} 32", check=True).output.strip(), 16)
            assert position == GUEST_ID
            doorbell = (DAEMON_PEER_ID << 16) | 0
            guest.run(f"devmem {regs + DOORBELL:#x} 32 {doorbell:#x}", check=True)
            wait_until(
                lambda: daemon.stats()["pt0"]["passthrough"]["doorbells"] >= 1, 10, "the guest's doorbell"
            )
            guest.poweroff()
        # QEMU gone: the port is released.
        wait_until(lambda: not daemon.status()["ports"]["pt0"]["connected"], 10, "pt0 released after QEMU")
        assert not daemon.stats()["pt0"]["passthrough"]["attached"]
