"""netmap pipes (netmap_pipe.c): two adapters cross-connected ring to ring, zero copy.

What one end sends on TX ring i arrives on the other end's RX ring i: a txsync moves the pending slots into
the peer's RX kring by swapping buffer indexes (both ends live in one allocator), an rxsync takes back what
the user released and pulls whatever the peer was still holding for lack of room. A full peer holds the
sender back (the slots stay pending on its TX ring); nothing is dropped inside a pipe.

The daemon uses a pipe for a switch port that belongs to a local application (``vale0:app``): one end (the
master) is attached to the switch like any port, the other end (the slave) is what the application
registers. Each end has an eventfd that the peer signals whenever it moved slots towards it or made room,
so whoever serves that end (the switch, the application's session) wakes up.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence

from vhostmap.netmap.adapter import NetmapAdapter, move_slots
from vhostmap.netmap.allocator import NetmapMemory
from vhostmap.netmap.kring import Kring
from vhostmap.netmap.offload import ALL_NEEDS


class PipeEnd(NetmapAdapter):
    """One end of a pipe; `make_pipe` builds the pair. It has no host rings (netmap's pipes have none).

    ``vnet``: its user takes frames with their virtio-net header and offloads (NS_VNET_HDR, as netmap's
    NETMAP_REQ_PORT_HDR_SET gives a VALE port a header), and may send such frames.
    """

    peer: PipeEnd
    TAPS_IN_HOOKS = True  # a move may happen in the peer's sync

    def __init__(
        self, name: str, memory: NetmapMemory, *, num_rings: int, num_desc: int, vnet: bool = False
    ) -> None:
        super().__init__(
            name,
            memory,
            num_tx_rings=num_rings,
            num_rx_rings=num_rings,
            num_tx_desc=num_desc,
            num_rx_desc=num_desc,
            host_rings=False,
        )
        self.carries_vnet_header = vnet
        self.event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Shared by both ends (make_pipe): a sync of one end moves the other's krings, and the two ends may
        # be served by different datapath threads (a switch's, an application's session).
        self.lock = threading.Lock()

    @property
    def accepted_offloads(self) -> int:
        """Every offload, when its user takes the header (``vnet``): it gets the frame as it is."""
        return ALL_NEEDS if self.carries_vnet_header else 0

    def nm_txsync(self, kring: Kring, flags: int) -> None:
        """Move what fits into the peer's RX ring of the same index; tell the peer."""
        with self.lock:
            moved = move_slots(kring, self.peer.rx_rings[kring.ring_id])
        if moved:
            self.peer.notify()

    def nm_rxsync(self, kring: Kring, flags: int) -> None:
        """Take back released slots, then pull what the peer could not move for lack of room."""
        kring.nr_hwcur = kring.rhead
        with self.lock:
            moved = move_slots(self.peer.tx_rings[kring.ring_id], kring)
        if moved:
            self.peer.notify()  # its TX ring has room again

    def notify(self) -> None:
        """Wake whoever serves this end."""
        if self.event >= 0:
            with contextlib.suppress(BlockingIOError):  # the counter is saturated: a wake-up is pending
                os.eventfd_write(self.event, 1)

    def wake_fds(self) -> Sequence[int]:
        """The end's eventfd (the peer moved slots here, or made room)."""
        return [self.event, *super().wake_fds()] if self.event >= 0 else list(super().wake_fds())

    def close(self) -> None:
        """Free the rings and close the eventfd."""
        super().close()
        if self.event >= 0:
            os.close(self.event)
            self.event = -1


def make_pipe(
    name: str, memory: NetmapMemory, *, num_rings: int = 1, num_desc: int = 512, vnet: bool = False
) -> tuple[PipeEnd, PipeEnd]:
    """A pipe: the master end is called ``name``, the slave ``name}`` (netmap's '{'/'}' pipe naming).
    ``vnet``: both ends carry virtio-net headers (see PipeEnd)."""
    master = PipeEnd(name, memory, num_rings=num_rings, num_desc=num_desc, vnet=vnet)
    try:
        slave = PipeEnd(f"{name}}}", memory, num_rings=num_rings, num_desc=num_desc, vnet=vnet)
    except BaseException:
        master.close()
        raise
    master.peer, slave.peer = slave, master
    slave.lock = master.lock
    return master, slave
