"""Ring helpers every forwarder uses: room in a ring, moving slots and whole frames between rings.

A forwarder is a netmap *user* of its ports' rings, exactly like an application: it reads received slots
between head and tail of an RX ring, hands them to a TX ring by swapping buffer indices (zero copy: both rings
come from the same allocator, as netmap's bridge and VALE do), and advances head and cur. These are the numpy
forms; the compiled passes do the same in C (datapath/kring.c), and the tests hold the two to each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import lib
from vhostmap.netmap.abi import NM_RESERVED_BUFS, NS_BUF_CHANGED, NS_MOREFRAG, NS_VNET_HDR, RingView
from vhostmap.netmap.adapter import NetmapAdapter, swap_buffers


class WordLock:
    """A lock word of datapath/locks.cdef as a context manager: the Python paths take the same short locks as
    the compiled passes (a destination ring, a switch's address table). Hold it for one ring's work only, and
    never across a blocking call or while taking another."""

    __slots__ = ("word",)

    def __init__(self, word: Any) -> None:
        self.word = word

    def __enter__(self) -> None:
        lib.vhu_lock(self.word)

    def __exit__(self, *exc: object) -> None:
        lib.vhu_unlock(self.word)


def ring_lock(port: NetmapAdapter, ring_index: int) -> WordLock:
    """The lock of TX ring ``ring_index`` of ``port`` (NetmapAdapter.tx_lock), held by whoever fills or
    txsyncs it while another datapath thread may too."""
    return WordLock(port.tx_lock(ring_index))


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
    if src.head >= src.num_slots or dst.head >= dst.num_slots:
        return 0  # a head the ring's user wrote past the ring: nothing moves (as nm_swap_slots)
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


def move_frames(src: RingView, dst: RingView, nbufs: int) -> tuple[int, int]:
    """Move the whole frames received in ``src`` (an RX ring, from head) that fit in ``dst`` (a TX ring,
    from head) by swapping buffers; both heads advance. Returns (frames moved, slots dropped): fragments that
    fill ``src`` without ending a frame, or a frame longer than ``dst`` can ever hold, are dropped."""
    n = src.num_slots
    count = (src.tail - src.head) % n
    if count == 0:
        return 0, 0
    si = (src.head + np.arange(count)) % n
    flags = src.slots["flags"][si]
    ends = np.flatnonzero((flags & NS_MOREFRAG) == 0) + 1
    if not ends.size:
        if count < n - 1:
            return 0, 0  # an unfinished frame: its last slot is still to come
        dropped = count  # fragments that fill the ring can never end a frame
    else:
        dropped = int(ends[0]) if int(ends[0]) >= dst.num_slots else 0  # a frame that can never fit
    if dropped:
        src.head = src.cur = (src.head + dropped) % n
        return 0, dropped
    free = tx_room(dst.slots, dst.head, (dst.tail - dst.head) % dst.num_slots, nbufs)
    k = int(np.searchsorted(ends, len(free), side="right"))  # whole frames that fit
    if k == 0:
        return 0, 0
    total = int(ends[k - 1])
    si = si[:total]
    di = (dst.head + np.arange(total)) % dst.num_slots
    s, d = src.slots, dst.slots
    d["buf_idx"][di] = s["buf_idx"][si]
    s["buf_idx"][si] = free[:total]
    d["len"][di] = s["len"][si]
    d["flags"][di] = (flags[:total] & (NS_MOREFRAG | NS_VNET_HDR)) | NS_BUF_CHANGED
    s["flags"][si] = NS_BUF_CHANGED
    src.head = src.cur = (src.head + total) % n
    dst.head = dst.cur = (dst.head + total) % dst.num_slots
    return k, 0


def tx_room(slots: npt.NDArray[np.void], head: int, space: int, nbufs: int) -> npt.NDArray[np.int64]:
    """Buffer indexes of the ``space`` free slots of a TX ring from ``head``, stopping early at the first slot
    without a usable buffer (buffer 0 after a ring reinit): where a writer may put frames."""
    n = len(slots)
    bufs = slots["buf_idx"][(head + np.arange(space)) % n].astype(np.int64)
    bad = np.flatnonzero((bufs < NM_RESERVED_BUFS) | (bufs >= nbufs))
    return bufs[: int(bad[0])] if bad.size else bufs
