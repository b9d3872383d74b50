"""A port's stash of spare buffers, recycled last in, first out, so that receiving writes into buffers that
are still in cache.

A ring position's buffer is next written one whole ring turn later (1024 slots: megabytes of traffic), long
after it left the cache; so the copy of every received frame first had to fetch the lines it overwrites. DPDK
avoids that with its mempool cache: the mbuf a burst frees is the next one a burst allocates. The stash does
the same within netmap's rules, where the kernel side may change the buffer of a slot it owns (netmap pipes
swap buffers between rings the same way):

- ``take`` (before an rxsync fills slots): each slot takes the most recently given buffer, and leaves its own
  in the stash;
- ``give`` (after a txsync read its slots, or a sink released them): each slot's buffer becomes the most
  recent, and the slot gets the stash's oldest.

A stash is a ring of ``size`` buffer indices and a cursor: the most recent is at ``cursor - 1``. It always
holds exactly ``size`` buffers (every operation is a swap), so a port's buffers are only permuted between its
rings and its stash. Only the daemon's forwarders use it (forward.with_stash), never a netmap application's
syncs: pkt-gen and the like fill TX buffers once and count on a slot keeping its buffer. Nor do the one-copy
passes between two vhost-user ports (a link's, a switch's): their slots refer to the guests' buffers, and
their own, never written, need not be hot (taking and giving cost 4-6 % of such a pass at 64 bytes).

The compiled nm_stash_take / nm_stash_give (datapath/kring.cdef) do the work; ``take`` and ``give`` here are
their reference (tests/unit/test_stash.py compares them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import ffi
from vhostmap.datapath.cfield import CField
from vhostmap.netmap.abi import NM_RESERVED_BUFS
from vhostmap.netmap.allocator import AllocatorExhausted, NetmapMemory

# Buffers per port: a few bursts' worth (the hot set is what one pass takes and gives, far less); 256
# buffers of 2 KiB are 512 KiB, the L2 of a core of this machine.
STASH_BUFFERS = 256


class BufferStash:
    """The buffers ``bufs`` in a last-in-first-out ring (``c``: the struct nm_stash the compiled passes use),
    registered with ``memory`` as held (NetmapMemory.hold) and given back to it by close(). An empty stash
    does nothing."""

    cursor = CField("Where the next given buffer goes; the newest is just before.", mask=0xFFFF_FFFF)

    def __init__(self, bufs: npt.ArrayLike, memory: NetmapMemory | None = None) -> None:
        self.memory = memory
        self.bufs: npt.NDArray[np.uint32] = np.array(bufs, dtype=np.uint32).ravel()
        self.c: Any = ffi.new("struct nm_stash *")
        self.c.bufs = ffi.from_buffer("uint32_t[]", self.bufs)
        self.c.size = len(self.bufs)
        if memory is not None:
            memory.hold(self.bufs)  # buffers here are not lost to a ring reinit (NetmapMemory.restock)

    @classmethod
    def allocate(cls, memory: NetmapMemory, size: int = STASH_BUFFERS) -> BufferStash:
        """A stash of ``size`` buffers taken from ``memory``; empty if it has too few free."""
        try:
            return cls(memory.alloc_buffers(size), memory)
        except AllocatorExhausted:
            return cls(np.empty(0, dtype=np.uint32), memory)

    @property
    def size(self) -> int:
        """Buffers in the stash (0: disabled)."""
        return len(self.bufs)

    def take(self, slots: npt.NDArray[np.void], nbufs: int, first: int, count: int) -> None:
        """Reference of nm_stash_take: ``count`` slots from ``first`` take the most recent buffers."""
        for i in self._valid(slots, nbufs, first, count):
            self.cursor = (self.cursor - 1) % self.size
            self._swap(slots, i)

    def give(self, slots: npt.NDArray[np.void], nbufs: int, first: int, count: int) -> None:
        """Reference of nm_stash_give: the buffers of ``count`` slots from ``first`` become the newest."""
        for i in self._valid(slots, nbufs, first, count):
            self._swap(slots, i)
            self.cursor = (self.cursor + 1) % self.size

    def _valid(self, slots: npt.NDArray[np.void], nbufs: int, first: int, count: int) -> list[int]:
        """The slots of the range whose buffer may be swapped: a reserved or out-of-range index (a ring user
        wrote it after the checks) stays where it is."""
        n = len(slots)
        if not self.size or first >= n:
            return []
        idx = [(first + k) % n for k in range(count)]
        return [i for i in idx if NM_RESERVED_BUFS <= int(slots[i]["buf_idx"]) < nbufs]

    def _swap(self, slots: npt.NDArray[np.void], i: int) -> None:
        mine = int(self.bufs[self.cursor])
        self.bufs[self.cursor] = int(slots[i]["buf_idx"])
        slots[i]["buf_idx"] = mine

    def close(self) -> None:
        """Give the buffers back to the allocator (the port is going away); the stash is empty after."""
        if self.memory is not None:
            self.memory.release_held(self.bufs)
            self.memory.unhold(self.bufs)
        self.c.size = self.c.cursor = 0
        self.bufs = self.bufs[:0]
