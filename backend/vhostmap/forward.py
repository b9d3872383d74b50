"""Simple forwarders: a link cross-connecting two ports, and a sink for a port nobody consumes.

They are netmap *users* of the ports' rings, exactly like an application: they read received slots between
head and tail of an RX ring, hand them to a TX ring by swapping buffer indices (zero copy: both rings come
from the same allocator, as netmap's bridge and VALE do), advance head/cur and call txsync/rxsync.
Per-slot work is done by compiled kernels over whole ranges (numpy references beside them); Python runs once
per batch.
"""

from __future__ import annotations

import numpy as np

from vhostmap.datapath import lib
from vhostmap.netmap.abi import NS_MOREFRAG, RingView
from vhostmap.netmap.adapter import NetmapAdapter, swap_buffers


def ring_space(ring: RingView) -> int:
    """Slots the user owns: received frames on an RX ring, free slots on a TX ring."""
    return (ring.tail - ring.head) % ring.num_slots


# No limit for nm_swap_slots.
SWAP_ALL = 0xFFFF_FFFF


def swap_slots(src: RingView, dst: RingView, limit: int | None = None) -> int:
    """Move up to ``limit`` slots from ``src`` (an RX ring) to ``dst`` (a TX ring) by swapping buffers.

    Returns how many slots moved; both rings' head and cur advance by that much. The reference of the
    compiled nm_swap_slots the forwarders use (datapath/kring.cdef).
    """
    n = min(ring_space(src), ring_space(dst))
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        return 0
    swap_buffers(src, src.head, dst, dst.head, n)
    src.head = src.cur = (src.head + n) % src.num_slots
    dst.head = dst.cur = (dst.head + n) % dst.num_slots
    return n


def count_frames(ring: RingView, first: int, n: int) -> int:
    """Frames (slots without NS_MOREFRAG) among ``n`` slots from ``first``."""
    idx = (first + np.arange(n)) % ring.num_slots
    return int(np.count_nonzero((ring.slots["flags"][idx] & NS_MOREFRAG) == 0))


class Link:
    """What one port receives, the other sends, both ways, queue ``i`` to queue ``i mod n``."""

    def __init__(self, a: NetmapAdapter, b: NetmapAdapter) -> None:
        self.a, self.b = a, b
        self.name = f"link {a.name}<->{b.name}"

    def wake_fds(self) -> list[int]:
        """Kicks of both ports."""
        return [*self.a.wake_fds(), *self.b.wake_fds()]

    def run(self) -> bool:
        """One round both ways; True when any slot moved."""
        return (self._one_way(self.a, self.b) + self._one_way(self.b, self.a)) > 0

    @staticmethod
    def _one_way(src: NetmapAdapter, dst: NetmapAdapter) -> int:
        moved = 0
        ntx = dst.num_tx_rings
        for i in range(src.num_rx_rings):
            j = i % ntx
            src.rxsync(i)
            moved += lib.nm_swap_slots(src.rx_rings[i].c, dst.tx_rings[j].c, SWAP_ALL)
            dst.txsync(j)
        return moved


class Sink:
    """The consumer of a port with nothing attached: receives everything and drops it, counted."""

    def __init__(self, port: NetmapAdapter) -> None:
        self.port = port
        self.name = f"sink {port.name}"

    def wake_fds(self) -> list[int]:
        """Kicks of the port."""
        return list(self.port.wake_fds())

    def run(self) -> bool:
        """Receive and release every ring once; True when anything arrived."""
        got = 0
        for i in range(self.port.num_rx_rings):
            self.port.rxsync(i)
            frames = lib.nm_release_received(self.port.rx_rings[i].c)
            if frames:
                self.port.count_dropped(i, frames)
                got += frames
        return got > 0
