"""Split virtqueues as the driver sees them (virtio 1.x spec 2.7), with netmap slots behind the descriptors.

The mirror image of vhostmap.vhost_user.virtqueue (the device side): the same layouts (VRING_DESC_DTYPE,
VRING_USED_ELEM_DTYPE, the ring sizes of vhostmap.virtio.spec), but here the driver owns the descriptor
table and the available ring, and the device — trusted less than nothing — writes the used ring. Every used
entry is checked before it is believed: its id must be a chain this driver made available and has not had
back yet, its length must fit the chain. Anything else raises `DeviceFault`, which the adapter turns into
"port broken".

Zero copy, as netmap's own virtio driver (virtio_netmap.h): the descriptors point at the netmap buffers of
the ring's slots. Slot ``j`` of a ring always uses the descriptor pair ``2j`` (the virtio-net header) ->
``2j + 1`` (the slot's buffer), so a queue of ``size`` descriptors backs a ring of ``size // 2`` slots and a
used id names its slot directly. A TX frame spanning several slots (NS_MOREFRAG) is one chain: its first
slot's header, then the buffers of all its slots. On RX each slot has its own header area; a frame merged
from several chains (MRG_RXBUF, num_buffers > 1) becomes a run of NS_MOREFRAG slots.

Indexes shared with the device are read and written as single 16-bit numpy loads and stores, never torn.
x86 keeps stores in order and loads in order, but lets a load pass an earlier store: where the spec asks for
a full barrier (publishing an index, then reading the device's event index), `full_barrier` makes one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vhostmap.netmap.abi import NM_RESERVED_BUFS, NS_MOREFRAG, nm_distance, nm_next, nm_prev
from vhostmap.netmap.kring import Kring
from vhostmap.virtio.spec import (
    VIRTIO_NET_HDR_DTYPE,
    VIRTIO_NET_HDR_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_AVAIL_HEADER,
    VRING_DESC_DTYPE,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_ELEM_DTYPE,
    VRING_USED_F_NO_NOTIFY,
    VRING_USED_HEADER,
    vring_avail_size,
    vring_desc_size,
    vring_need_event,
    vring_used_size,
)
from vhostmap_guest.dma import DmaArea, DmaMemory

# An uncontended lock round trip is a locked read-modify-write: a full barrier on x86 (mfence's effect).
_FENCE = threading.Lock()
# Half the 16-bit index space: an event index this far from the driver's position is never crossed, since
# the device can never be more than a queue size ahead of it.
_FAR = 0x8000


def full_barrier() -> None:
    """Order every earlier load and store before every later one (the spec's "memory barrier")."""
    _FENCE.acquire()
    _FENCE.release()


class DeviceFault(Exception):
    """The device wrote something a driver must not believe (a used id or length); the port is broken."""

    def __init__(self, queue: int, reason: str) -> None:
        super().__init__(f"virtqueue {queue}: {reason}")
        self.queue = queue
        self.reason = reason


class BufferAddresses:
    """Physical addresses of netmap buffers: buffer ``i`` is at ``offset + i * size`` of ``dma``.

    ``table[i]`` is buffer ``i``'s address, computed once: a batch's addresses are then one numpy gather.
    """

    def __init__(self, dma: DmaMemory, offset: int, size: int, nbufs: int) -> None:
        self.dma, self.offset, self.size, self.nbufs = dma, offset, size, nbufs
        self.table: npt.NDArray[np.uint64] = dma.phys_array(offset + np.arange(nbufs, dtype=np.int64) * size)

    def phys(self, bufs: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
        """Physical addresses of buffers ``bufs`` (indexes the caller has checked)."""
        return self.table[bufs]


def segments(first: int, n: int, size: int) -> list[tuple[int, int]]:
    """``n`` consecutive positions of a ring of ``size`` from ``first`` as at most two [a, b) slices."""
    end = first + n
    return [(first, end)] if end <= size else [(first, size), (0, end - size)]


class DriverQueue:
    """One split virtqueue in DMA memory: descriptor table, available ring, used ring, and their indexes.

    ``avail_idx`` is the driver's free-running available index, ``last_used`` the next used entry to read.
    Interrupts start suppressed (see `enable_interrupts`).
    """

    def __init__(
        self,
        index: int,
        size: int,
        dma: DmaMemory,
        area: DmaArea,
        *,
        event_idx: bool,
        notify: Callable[[int], None],
    ) -> None:
        if size < 2 or size & (size - 1):
            raise ValueError(f"virtqueue {index}: size {size} is not a power of two >= 2")
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self._notify = notify
        self.desc_off = area.alloc(vring_desc_size(size), 16)
        self.avail_off = area.alloc(vring_avail_size(size), 2)
        self.used_off = area.alloc(vring_used_size(size), 4)
        mm = dma.mm
        self.desc: npt.NDArray[np.void] = np.frombuffer(mm, VRING_DESC_DTYPE, size, self.desc_off)
        # [flags, idx, ring[size], used_event]
        self.avail: npt.NDArray[np.uint16] = np.frombuffer(mm, "<u2", size + 3, self.avail_off)
        # [flags, idx, elems as 4 words each..., avail_event]
        self.used16: npt.NDArray[np.uint16] = np.frombuffer(
            mm, "<u2", vring_used_size(size) // 2, self.used_off
        )
        self.used_ring: npt.NDArray[np.void] = np.frombuffer(
            mm, VRING_USED_ELEM_DTYPE, size, self.used_off + VRING_USED_HEADER
        )
        self._used_event = VRING_AVAIL_HEADER // 2 + size
        self._avail_event = (VRING_USED_HEADER + VRING_USED_ELEM_DTYPE.itemsize * size) // 2
        self.desc_phys = dma.phys(self.desc_off)
        self.avail_phys = dma.phys(self.avail_off)
        self.used_phys = dma.phys(self.used_off)
        self.avail_idx = 0
        self.last_used = 0
        self.kicks = 0
        self.interrupts_enabled = True
        self.disable_interrupts()

    # --- available ring ---------------------------------------------------------------------------------
    def publish(self, heads: npt.NDArray[np.int64]) -> None:
        """Make chains ``heads`` available (entries first, then idx) and notify the device if it asked."""
        n = len(heads)
        if n == 0:
            return
        old = self.avail_idx
        done = 0
        for a, b in segments(old % self.size, n, self.size):
            self.avail[2 + a : 2 + b] = heads[done : done + b - a]
            done += b - a
        new = (old + n) & 0xFFFF
        self.avail[1] = new  # one 16-bit store: the device sees all the entries or none
        self.avail_idx = new
        full_barrier()  # the index store must be visible before we read whether the device sleeps
        if self.event_idx:
            kick = vring_need_event(int(self.used16[self._avail_event]), new, old)
        else:
            kick = not int(self.used16[0]) & VRING_USED_F_NO_NOTIFY
        if kick:
            self.kicks += 1
            self._notify(self.index)

    # --- used ring --------------------------------------------------------------------------------------
    def used_pending(self) -> int:
        """Used entries published and not read yet; DeviceFault if the device claims more than the queue."""
        n = (int(self.used16[1]) - self.last_used) & 0xFFFF
        if n > self.size:
            raise DeviceFault(self.index, f"used index moved {n} entries, beyond the queue size {self.size}")
        return n

    def take_used(self, n: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Read the next ``n`` used entries (ids, lens) and consume them (x86: after the idx load).

        They are copied out first: the device cannot change what is checked after it was checked.
        """
        parts = [self.used_ring[a:b] for a, b in segments(self.last_used % self.size, n, self.size)]
        elems = parts[0] if len(parts) == 1 else np.concatenate(parts)
        ids, lens = elems["id"].astype(np.int64), elems["len"].astype(np.int64)
        self.last_used = (self.last_used + n) & 0xFFFF
        if not self.interrupts_enabled and self.event_idx:
            self.avail[self._used_event] = (self.last_used + _FAR) & 0xFFFF
        return ids, lens

    # --- interrupts -------------------------------------------------------------------------------------
    def enable_interrupts(self) -> None:
        """Ask for an interrupt at the next used entry (then check `used_pending` again before sleeping)."""
        self.interrupts_enabled = True
        if self.event_idx:
            self.avail[self._used_event] = self.last_used
        else:
            self.avail[0] = 0

    def disable_interrupts(self) -> None:
        """Ask for no interrupts (a hint the device may ignore; they are harmless)."""
        if not self.interrupts_enabled:
            return
        self.interrupts_enabled = False
        if self.event_idx:
            self.avail[self._used_event] = (self.last_used + _FAR) & 0xFFFF
        else:
            self.avail[0] = VRING_AVAIL_F_NO_INTERRUPT


@dataclass
class QueueCounters:
    """Per-queue counters: frames and bytes through the queue."""

    packets: int = 0
    bytes: int = 0


class TxQueue:
    """A transmit virtqueue behind a TX kring: slot ``j`` <-> descriptors ``2j`` (header), ``2j + 1``.

    The common batch (single-slot frames, no wrap, completions in order) is a handful of numpy slice
    operations; frames spanning slots and out-of-order completions take a general path.
    """

    def __init__(self, vq: DriverQueue, slots: int, bufs: BufferAddresses, area: DmaArea) -> None:
        if slots * 2 > vq.size:
            raise ValueError(f"virtqueue {vq.index}: {slots} slots need {2 * slots} descriptors")
        self.vq = vq
        self.slots = slots
        self.bufs = bufs
        self.counters = QueueCounters()
        # One all-zero header for every frame: no offloads, and the device only reads it.
        hdr = area.alloc(VIRTIO_NET_HDR_SIZE, 16)
        j = np.arange(slots)
        d = vq.desc
        d["addr"][2 * j] = area.memory.phys(hdr)
        d["len"][2 * j] = VIRTIO_NET_HDR_SIZE
        d["flags"][2 * j] = VRING_DESC_F_NEXT
        d["next"][2 * j] = 2 * j + 1
        # Field views of the buffer descriptors (2j + 1), made once.
        self.buf_addr = d["addr"][1::2]
        self.buf_len = d["len"][1::2]
        self.buf_flags = d["flags"][1::2]
        self.buf_next = d["next"][1::2]
        # heads[j] = 2 * (j mod slots), long enough to slice any run of a queue's worth from any slot.
        self.heads = (2 * (np.arange(3 * slots + vq.size) % slots)).astype(np.int64)
        # Slots of the chain of each in-flight frame, by its first slot (0: not an in-flight head).
        self.frame_slots = np.zeros(slots, dtype=np.int64)
        self.done = np.zeros(slots, dtype=np.bool_)
        self.done_waiting = 0  # slots completed out of order, not handed back yet
        self.chained = False  # some buffer descriptor may still link to another

    def transmit(self, kring: Kring) -> None:
        """Make the complete frames of [nr_hwcur, rhead) available and advance nr_hwcur past them."""
        n = kring.pending()
        if n == 0:
            return
        S, h = self.slots, kring.nr_hwcur
        slots = kring.ring.slots
        segs = segments(h, n, S)
        for a, b in segs:
            flags = slots["flags"][a:b]
            # Flags are almost always all zero: one reduction decides, the precise test is for the rest.
            if flags.any() and (flags & NS_MOREFRAG).any():
                self._transmit_frames(kring, n)
                return
        size, nbufs = self.bufs.size, self.bufs.nbufs
        total = 0
        for a, b in segs:
            # Copies of the user's slots, checked, then used: the user cannot change them in between.
            bufs = slots["buf_idx"][a:b].astype(np.int64)
            lens = slots["len"][a:b].astype(np.int64)
            if bufs.min() < NM_RESERVED_BUFS or bufs.max() >= nbufs or lens.min() < 1 or lens.max() > size:
                kring.ring_reinit("a slot changed between the prologue and the sync")
                return
            self.buf_addr[a:b] = self.bufs.table[bufs]
            self.buf_len[a:b] = lens
            total += int(lens.sum())
        if self.chained:
            for a, b in segs:
                self.buf_flags[a:b] = 0
        for a, b in segs:
            self.frame_slots[a:b] = 1
        self.counters.packets += n
        self.counters.bytes += total
        self.vq.publish(self.heads[h : h + n])
        kring.nr_hwcur = (h + n) % S

    def _transmit_frames(self, kring: Kring, n: int) -> None:
        """The general path: frames of several slots (NS_MOREFRAG) become one chain each."""
        S = self.slots
        j = (kring.nr_hwcur + np.arange(n)) % S
        snap = kring.ring.slots[j]  # one read of the user's slots, then only the snapshot is used
        bufs = snap["buf_idx"].astype(np.int64)
        lens = snap["len"].astype(np.int64)
        more = (snap["flags"] & NS_MOREFRAG) != 0
        if np.any(
            (bufs < NM_RESERVED_BUFS) | (bufs >= self.bufs.nbufs) | (lens < 1) | (lens > self.bufs.size)
        ):
            kring.ring_reinit("a slot changed between the prologue and the sync")
            return
        ends = np.flatnonzero(~more) + 1  # one past the last slot of each complete frame
        used = int(ends[-1]) if ends.size else 0
        if used == 0:
            if n == S - 1:  # a frame longer than the ring can never complete: drop it
                kring.ring_reinit("a frame spans the whole TX ring")
            return
        starts = np.concatenate(([0], ends[:-1]))
        heads = j[starts]
        ju = j[:used]
        self.buf_addr[ju] = self.bufs.phys(bufs[:used])
        self.buf_len[ju] = lens[:used]
        # Every buffer descriptor but a frame's last links to the next slot's buffer descriptor (skipping
        # that slot's header descriptor).
        link = more[:used]
        self.buf_flags[ju] = np.where(link, VRING_DESC_F_NEXT, 0)
        self.buf_next[ju] = np.where(link, 2 * ((ju + 1) % S) + 1, 0)
        self.chained = True
        self.frame_slots[heads] = ends - starts
        self.counters.packets += len(heads)
        self.counters.bytes += int(lens[:used].sum())
        self.vq.publish(2 * heads)
        kring.nr_hwcur = (kring.nr_hwcur + used) % S

    def reclaim(self, kring: Kring) -> None:
        """Read used entries, check them, and hand completed slots back (nr_hwtail), in ring order."""
        vq, S = self.vq, self.slots
        n = vq.used_pending()
        if n == 0:
            return
        ids, _lens = vq.take_used(n)
        first = nm_next(kring.nr_hwtail, S)
        if not self.done_waiting and np.array_equal(ids, self.heads[first : first + n]):
            # In order: the first n slots in flight, if each is a single-slot frame in flight.
            k = self.frame_slots[ids >> 1]
            if (k == 1).all():
                self.frame_slots[ids >> 1] = 0
                kring.nr_hwtail = (kring.nr_hwtail + n) % S
                return
        self._reclaim_any(kring, ids)

    def _reclaim_any(self, kring: Kring, ids: npt.NDArray[np.int64]) -> None:
        """The general path: completions in any order, frames of any number of slots."""
        vq, S = self.vq, self.slots
        n = len(ids)
        heads = ids >> 1
        bad = (ids & 1) | (ids >= 2 * S)
        if bad.any():
            raise DeviceFault(vq.index, f"used id {int(ids[np.flatnonzero(bad)[0]])} is not a chain head")
        k = self.frame_slots[heads]
        if not k.all() or len(np.unique(heads)) != n:
            i = int(heads[np.flatnonzero(k == 0)[0]]) if not k.all() else -1
            what = f"chain {2 * i}, which is not in flight" if i >= 0 else "the same chain twice"
            raise DeviceFault(vq.index, f"used ring returns {what}")
        self.frame_slots[heads] = 0
        for h, cnt in zip(heads.tolist(), k.tolist(), strict=True):
            self.done[(h + np.arange(cnt)) % S] = True
        self.done_waiting += int(k.sum())
        # Slots in flight are [nm_next(hwtail), hwcur): give back the completed ones from the front.
        first = nm_next(kring.nr_hwtail, S)
        inflight = nm_distance(first, kring.nr_hwcur, S)
        idx = (first + np.arange(inflight)) % S
        d = self.done[idx]
        m = inflight if d.all() else int(np.argmin(d))
        if m:
            self.done[idx[:m]] = False
            self.done_waiting -= m
            kring.nr_hwtail = (kring.nr_hwtail + m) % S

    def in_flight(self, kring: Kring) -> int:
        """Slots handed to the device and not completed yet."""
        return nm_distance(nm_next(kring.nr_hwtail, self.slots), kring.nr_hwcur, self.slots)


class RxQueue:
    """A receive virtqueue behind an RX kring: slot ``j`` <-> descriptors ``2j`` (its header), ``2j + 1``.

    Chains are posted for the slots the kring owns and keeps empty: [nr_hwtail, posted_end), where
    posted_end trails nr_hwcur by the one slot netmap always leaves empty. ``mergeable``: frames may span
    several chains (VIRTIO_NET_F_MRG_RXBUF); they become runs of NS_MOREFRAG slots.
    """

    def __init__(
        self, vq: DriverQueue, slots: int, bufs: BufferAddresses, area: DmaArea, *, mergeable: bool
    ) -> None:
        if slots * 2 > vq.size:
            raise ValueError(f"virtqueue {vq.index}: {slots} slots need {2 * slots} descriptors")
        self.vq = vq
        self.slots = slots
        self.bufs = bufs
        self.mergeable = mergeable
        self.counters = QueueCounters()
        hdr_off = area.alloc(VIRTIO_NET_HDR_SIZE * slots, 16)
        self.headers: npt.NDArray[np.void] = np.frombuffer(
            area.memory.mm, VIRTIO_NET_HDR_DTYPE, slots, hdr_off
        )
        self.header_bytes: npt.NDArray[np.uint8] = area.memory.array[
            hdr_off : hdr_off + VIRTIO_NET_HDR_SIZE * slots
        ].reshape(slots, VIRTIO_NET_HDR_SIZE)
        # A chain is the slot's 12-byte header area, then its buffer less 12 bytes: a frame's first chain
        # holds the header and up to buf_size - 12 bytes of frame; a continuation chain of a merged frame
        # (no header) holds buf_size bytes of frame, its first 12 in the header area, which `_merge` moves
        # back in front. Either way a slot ends up with at most buf_size bytes.
        self.capacity = bufs.size
        j = np.arange(slots)
        d = vq.desc
        d["addr"][2 * j] = area.memory.phys(hdr_off) + VIRTIO_NET_HDR_SIZE * j.astype(np.uint64)
        d["len"][2 * j] = VIRTIO_NET_HDR_SIZE
        d["flags"][2 * j] = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT
        d["next"][2 * j] = 2 * j + 1
        d["len"][2 * j + 1] = bufs.size - VIRTIO_NET_HDR_SIZE
        d["flags"][2 * j + 1] = VRING_DESC_F_WRITE
        self.buf_addr = d["addr"][1::2]
        self.heads = (2 * (np.arange(3 * slots + vq.size) % slots)).astype(np.int64)
        self.posted = np.zeros(slots, dtype=np.bool_)
        self.filled = np.zeros(slots, dtype=np.bool_)
        self.filled_waiting = 0  # slots filled but not delivered yet (out of order, or part of a frame)
        self.used_len = np.zeros(slots, dtype=np.int64)
        self.posted_end = 0

    def post(self, kring: Kring) -> None:
        """Post a chain for every slot from posted_end up to the empty slot before nr_hwcur."""
        S = self.slots
        stop = nm_prev(kring.nr_hwcur, S)
        n = nm_distance(self.posted_end, stop, S)
        if n == 0:
            return
        first, posted = self.posted_end, 0
        for a, b in segments(first, n, S):
            bufs = kring.ring.slots["buf_idx"][a:b].astype(np.int64)
            bad = np.flatnonzero((bufs < NM_RESERVED_BUFS) | (bufs >= self.bufs.nbufs))
            if bad.size:
                # Post what is valid up to the first bad slot; the user must put a buffer there again.
                k = int(bad[0])
                kring.ring_reinit(f"slot {a + k} to receive into holds buf_idx {int(bufs[k])}")
                b, bufs = a + k, bufs[:k]
            self.buf_addr[a:b] = self.bufs.table[bufs]
            self.posted[a:b] = True
            posted += b - a
            if bad.size:
                break
        self.vq.publish(self.heads[first : first + posted])
        self.posted_end = (first + posted) % S

    def receive(self, kring: Kring, memory_array: npt.NDArray[np.uint8], buffers_offset: int) -> None:
        """Check used entries, then hand the received frames to the user from nr_hwtail (in ring order)."""
        vq, S = self.vq, self.slots
        n = vq.used_pending()
        if n == 0 and not self.filled_waiting:
            return
        if n:
            ids, lens = vq.take_used(n)
            h = kring.nr_hwtail
            if (
                not self.filled_waiting
                and n <= nm_distance(h, self.posted_end, S)
                and np.array_equal(ids, self.heads[h : h + n])
                and self._deliver_in_order(kring, lens)
            ):
                return
            self._mark_filled(ids, lens)
        self._deliver(kring, memory_array, buffers_offset)

    def _deliver_in_order(self, kring: Kring, lens: npt.NDArray[np.int64]) -> bool:
        """The common batch: the next posted chains came back in order, each a whole frame. False (and
        nothing changed) when it is not that simple."""
        if lens.min() < VIRTIO_NET_HDR_SIZE or lens.max() > self.capacity:
            return False
        h, n, S = kring.nr_hwtail, len(lens), self.slots
        segs = segments(h, n, S)
        if self.mergeable and any((self.headers["num_buffers"][a:b] != 1).any() for a, b in segs):
            return False
        slots, done = kring.ring.slots, 0
        for a, b in segs:
            slots["len"][a:b] = lens[done : done + b - a] - VIRTIO_NET_HDR_SIZE
            slots["flags"][a:b] = 0
            self.posted[a:b] = False
            done += b - a
        self.counters.packets += n
        self.counters.bytes += int(lens.sum()) - n * VIRTIO_NET_HDR_SIZE
        kring.nr_hwtail = (h + n) % S
        return True

    def _mark_filled(self, ids: npt.NDArray[np.int64], lens: npt.NDArray[np.int64]) -> None:
        """The general path: check used entries in any order and remember which slots they filled."""
        vq, S, n = self.vq, self.slots, len(ids)
        heads = ids >> 1
        bad = (ids & 1) | (ids >= 2 * S)
        if bad.any():
            raise DeviceFault(vq.index, f"used id {int(ids[np.flatnonzero(bad)[0]])} is not a chain head")
        if not self.posted[heads].all() or len(np.unique(heads)) != n:
            raise DeviceFault(vq.index, "used ring returns a receive chain that is not posted")
        if np.any(lens > self.capacity):
            i = int(np.flatnonzero(lens > self.capacity)[0])
            raise DeviceFault(
                vq.index,
                f"used length {int(lens[i])} of chain {int(ids[i])} exceeds its {self.capacity} bytes",
            )
        self.posted[heads] = False
        self.filled[heads] = True
        self.used_len[heads] = lens
        self.filled_waiting += n

    def _deliver(self, kring: Kring, memory_array: npt.NDArray[np.uint8], buffers_offset: int) -> None:
        """Hand the filled run from nr_hwtail to the user, whole frames only."""
        S = self.slots
        count = nm_distance(kring.nr_hwtail, self.posted_end, S)
        if count == 0:
            return
        idx = (kring.nr_hwtail + np.arange(count)) % S
        f = self.filled[idx]
        m = count if f.all() else int(np.argmin(f))
        if m == 0:
            return
        js = idx[:m]
        L = self.used_len[js]
        nb = self.headers["num_buffers"][js] if self.mergeable else None
        slots = kring.ring.slots
        if nb is None or (nb == 1).all():
            short = L < VIRTIO_NET_HDR_SIZE
            if short.any():
                raise DeviceFault(
                    self.vq.index, f"used length {int(L[np.flatnonzero(short)[0]])} < the header"
                )
            slots["len"][js] = L - VIRTIO_NET_HDR_SIZE
            slots["flags"][js] = 0
            delivered = m
            self.counters.packets += m
            self.counters.bytes += int(L.sum()) - m * VIRTIO_NET_HDR_SIZE
        else:
            delivered = self._merge(kring, js, L, memory_array, buffers_offset)
        self.filled[js[:delivered]] = False
        self.filled_waiting -= delivered
        kring.nr_hwtail = (kring.nr_hwtail + delivered) % S

    def _merge(
        self,
        kring: Kring,
        js: npt.NDArray[np.int64],
        L: npt.NDArray[np.int64],
        memory_array: npt.NDArray[np.uint8],
        buffers_offset: int,
    ) -> int:
        """Deliver frames of one or more chains (MRG_RXBUF); the slots delivered, whole frames only.

        A continuation chain has no header: its first 12 bytes went into the header area, the rest into the
        buffer. Its slot gets them back in order (a copy of at most a buffer, for such frames only).
        """
        slots = kring.ring.slots
        size = self.bufs.size
        delivered = 0
        i = 0
        m = len(js)
        while i < m:
            j = int(js[i])
            if int(L[i]) < VIRTIO_NET_HDR_SIZE:
                raise DeviceFault(self.vq.index, f"used length {int(L[i])} of chain {2 * j} < the header")
            nb = int(self.headers["num_buffers"][j])
            if nb < 1 or nb >= self.slots:
                raise DeviceFault(self.vq.index, f"frame in chain {2 * j} claims {nb} buffers")
            if i + nb > m:
                break  # the rest of the frame has not arrived yet
            total = int(L[i]) - VIRTIO_NET_HDR_SIZE
            slots["len"][j] = total
            slots["flags"][j] = NS_MOREFRAG if nb > 1 else 0
            for k in range(1, nb):
                c = int(js[i + k])
                length = int(L[i + k])
                buf = int(slots["buf_idx"][c])
                if not NM_RESERVED_BUFS <= buf < self.bufs.nbufs:
                    raise DeviceFault(self.vq.index, f"slot {c} lost its buffer while the device filled it")
                base = buffers_offset + buf * size
                data = memory_array[base : base + size]
                head = min(length, VIRTIO_NET_HDR_SIZE)
                if length > VIRTIO_NET_HDR_SIZE:
                    data[VIRTIO_NET_HDR_SIZE:length] = data[: length - VIRTIO_NET_HDR_SIZE].copy()
                data[:head] = self.header_bytes[c, :head]
                slots["len"][c] = length
                slots["flags"][c] = NS_MOREFRAG if k < nb - 1 else 0
                total += length
            self.counters.packets += 1
            self.counters.bytes += total
            i += nb
            delivered = i
        return delivered
