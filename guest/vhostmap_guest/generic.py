"""Generic mode: the same netmap rings over a guest interface the kernel keeps, through AF_PACKET.

For guests whose NIC must stay with the kernel (or is not virtio), as netmap's generic adapter emulates
native rings on any interface: this is vhostmap's host-side GenericAdapter (TPACKET_V3 receive ring, one send
per frame), run in the guest over the guest's interface. One ring pair; ``poll`` sleeps on the packet socket.
"""

from __future__ import annotations

import contextlib
import select
import time
from pathlib import Path

from vhostmap.netmap.abi import if_size, ring_size
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.generic import GENERIC_RING_SIZE, GenericAdapter
from vhostmap.netmap.tap import link_is_up, set_link_up
from vhostmap.netmap.user import POLLIN, POLLOUT, PortSpec
from vhostmap_guest.port import AdapterPort

# Spare buffers beyond one per slot, for applications that swap buffers in and out of slots.
EXTRA_BUFFERS = 256
# Frames that may wait between the packet socket and the RX ring. netmap's generic adapter drops beyond 1024,
# but a guest application (Python, maybe under TCG) is slower than the kernel feeding it: a burst of a few
# thousand frames waits here instead of being dropped. Not more: every frame queued is parsed and copied by
# an rxsync, and a queue as large as the TPACKET ring (about 29000 small frames) made a receiver under TCG
# spend seconds per rxsync queueing a flood while its application got one ring of frames each time.
GUEST_RX_QUEUE_LIMIT = 4096
# How long an interface brought up here may take to get carrier (virtio_net: the device's link status).
CARRIER_TIMEOUT = 5.0


def generic_params(num_desc: int) -> AllocatorParams:
    """An allocator for one ring pair plus the host pair of ``num_desc`` slots each, and spare buffers."""
    return AllocatorParams(
        if_size=if_size(4),
        if_num=1,
        ring_size=ring_size(num_desc),
        ring_num=4,
        buf_size=2048,
        buf_num=4 * num_desc + EXTRA_BUFFERS,
    )


def wait_carrier(ifname: str, timeout: float = CARRIER_TIMEOUT) -> bool:
    """Wait until ``ifname`` has carrier (sends before that fail with ENETDOWN); whether it came."""
    path = Path(f"/sys/class/net/{ifname}/carrier")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # EINVAL while the interface is still down
            if path.read_text().strip() == "1":
                return True
        time.sleep(0.01)
    return False


class GenericPort(AdapterPort):
    """A guest interface in generic mode. ``adapter`` is its GenericAdapter (counters: ``counters()``)."""

    adapter: GenericAdapter


def open_generic(ifname: str, spec: PortSpec, *, num_desc: int = GENERIC_RING_SIZE) -> GenericPort:
    """Open ``spec``'s rings over interface ``ifname`` through AF_PACKET (bringing it up, and waiting for
    carrier, if it is down).

    Raises vhostmap's InterfaceError when the interface does not exist or the socket cannot be set up.
    """
    memory = NetmapMemory(generic_params(num_desc), name=f"vhostmap-{ifname}")
    try:
        # An application's frames wait in its ring while the guest's driver is busy, never dropped.
        adapter = GenericAdapter(
            ifname[:15],
            memory,
            ifname,
            num_desc=num_desc,
            rx_queue_limit=GUEST_RX_QUEUE_LIMIT,
            tx_backpressure=True,
        )
    except BaseException:
        memory.close()
        raise
    try:
        if not link_is_up(ifname):
            set_link_up(ifname)
            wait_carrier(ifname)
        reg = adapter.register(spec.mode, spec.ring_id)
    except BaseException:
        adapter.close()
        memory.close()
        raise
    fds = list(adapter.wake_fds())
    sock = [adapter.socket_fd]

    def wait(events: int, timeout: float) -> None:
        # Frames left in a TX ring wait for room in the socket's send buffer: writable when the driver has
        # completed some. (A full qdisc with room in the send buffer makes this return at once: txsync tries
        # again while the guest's kernel drains it.)
        select.select(fds if events & POLLIN else [], sock if events & POLLOUT else [], [], timeout)

    def release() -> None:
        try:
            adapter.close()
        finally:
            memory.close()

    return GenericPort(ifname, reg, wait=wait, release=release, mode="generic")
