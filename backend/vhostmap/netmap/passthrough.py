"""Passthrough ports: a guest's own netmap rings in a region of their own, synced through a CSB (ptnetmap).

Follows netmap's ptnetmap (Maffione, Rizzo, Lettieri, ANCS 2015) and its sync-kloop with CSB (netmap_kloop.c),
in userspace: the guest maps a region holding one netmap_if, its rings and buffers and uses them as any netmap
application does; it tells the daemon where its head and cur are through a per-ring CSB entry (struct
nm_csb_atok, abi.py) instead of a system call, and reads hwcur/hwtail from the daemon's half (nm_csb_ktoa).
The region is the port's alone (``GuestRegion``: a NetmapMemory of its own, in a sealed memfd whose size is a
power of two, as a PCI BAR's must be), so a guest sees nothing of other ports; it begins with a header
(abi.PtHeader) saying where everything is. Each guest gets a fresh region and fresh eventfds; what it left
behind goes when it goes.

On the daemon's side a ``PassthroughPort`` is a NetmapAdapter like any other, in the daemon's allocator: a
link, a switch or an application consumes its krings. Its hooks are the kernel side of the guest's rings:

- ``nm_rxsync`` (RX ring i) takes what the guest handed over on its TX ring i: the guest ring's kring
  (``PassthroughKring``) runs the txsync prologue on head/cur read from the CSB (a guest that wrote nonsense
  gets its ring reinitialised and a log line, as netmap_ring_reinit, and nothing else is affected), then the
  slots are copied into the RX kring (nm_copy_slots: one compiled call per batch; buffers of two allocators
  cannot be swapped) and hwcur/hwtail published to the CSB;
- ``nm_txsync`` (TX ring i) delivers into the guest's RX ring i the same way, after the rxsync prologue took
  back what the guest released.

Notifications are suppressed as in netmap's CSB mode: the guest rings the doorbell (the port's ``kick``
eventfd, which wakes the datapath) only while ``kern_need_kick`` is set, and the daemon sets it only when a
sync found nothing to do (the worker keeps running a forwarder while it moves frames) or, on the guest's RX
ring, when frames wait for room; after setting it the daemon looks at head again and kicks itself if it moved
meanwhile (netmap's double check). The guest is interrupted (the ``irq`` eventfd, its ivshmem vector) only
when hwtail moved and its ``appl_need_kick`` says it sleeps on that ring.

A sync is one compiled call (pt_take / pt_give, datapath/passthrough.cdef: CSB read, prologue, copy, CSB
write, kick and interrupt decisions); the hooks' Python twins (``_take`` / ``_give``, with
``copy_slots_reference`` for the copy) are their reference, and run when the compiled prologue refuses, to say
why and reinitialise the ring.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vhostmap.datapath import eventfds, ffi, lib
from vhostmap.datapath.choice import reference_selected
from vhostmap.netmap.abi import (
    CSB_ENTRY_SIZE,
    NM_RESERVED_BUFS,
    NR_RX,
    NR_TX,
    NS_MOREFRAG,
    PT_GONE,
    PT_HEADER_SIZE,
    PT_MAGIC,
    PT_VERSION,
    CsbView,
    PtHeader,
    RingView,
    nm_prev,
    ring_size,
)
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory, region_size
from vhostmap.netmap.errors import PortBroken
from vhostmap.netmap.kring import Kring
from vhostmap.system.memfd import sealed_memfd

log = logging.getLogger(__name__)

# Buffers of a guest region beyond one per slot: what a ring reinit restocks slots from when the guest lost
# buffers (NetmapMemory.restock takes lost ones first).
SPARE_GUEST_BUFFERS = 64

# nm_copy_slots' *bad: which side's slot stopped a copy.
COPY_OK, COPY_BAD_SOURCE, COPY_BAD_DEST = 0, 1, 2


class PassthroughKring(Kring):
    """The kring of one of a guest's rings: its user's head and cur come from the ring's CSB entry (netmap's
    shadow ring in the sync-kloop), and a sync publishes hwcur/hwtail there, not in the ring's tail, which is
    the guest's own (its driver copies hwtail there). A reinit writes the ring as any reinit does, and the
    CSB too."""

    def __init__(self, ring: RingView, csb: CsbView, **kwargs: Any) -> None:
        super().__init__(ring, **kwargs)
        self.csb = csb
        # The compiled syncs' view of this ring (struct pt_ring: kring, CSB, frames and bytes copied).
        self.pt: Any = ffi.new("struct pt_ring *")
        self.pt.guest = self.c
        self.pt.atok = ffi.cast("uint32_t *", ctypes.addressof(csb.atok))
        self.pt.ktoa = ffi.cast("uint32_t *", ctypes.addressof(csb.ktoa))
        csb.write_hw(self.nr_hwcur, self.nr_hwtail)
        # Idle from the start: a TX ring's first frames need a kick; an RX ring wants one only once frames
        # wait for room in it.
        csb.ktoa.kern_need_kick = int(self.is_tx)

    def user_pointers(self) -> tuple[int, int]:
        """head and cur from the CSB (head first: netmap's order)."""
        return self.csb.read_head_cur()

    def _restore_tail(self) -> None:
        # In CSB mode the ring's tail is the guest's to write: hwtail reaches it through the CSB.
        return None

    def sync_finalize(self) -> None:
        """Publish hwcur/hwtail in the CSB (hwcur first); PortBroken if the hook left them outside."""
        n = self.nkr_num_slots
        if not (0 <= self.nr_hwcur < n and 0 <= self.nr_hwtail < n):
            raise PortBroken(
                self.port, f"{self.name}: sync left hwcur {self.nr_hwcur} hwtail {self.nr_hwtail}"
            )
        self.rtail = self.nr_hwtail
        self.csb.write_hw(self.nr_hwcur, self.nr_hwtail)

    def ring_reinit(self, reason: str) -> None:
        """netmap_ring_reinit on the guest's ring, and the CSB told where the ring stands."""
        super().ring_reinit(reason)
        self.csb.write_hw(self.nr_hwcur, self.nr_hwtail)

    # --- notifications (the CSB's two flags) ------------------------------------------------------------
    @property
    def wants_interrupt(self) -> bool:
        """The guest sleeps on this ring (appl_need_kick)."""
        return bool(self.csb.atok.appl_need_kick)

    def want_kicks(self, on: bool, *, double_check: bool = True) -> bool:
        """Set kern_need_kick; with ``on`` and ``double_check``, then look at head again (netmap's double
        check): True when it moved past what the last prologue took, so that the caller comes back instead
        of waiting for a kick the guest may have decided not to send. After a reinit there is no double
        check (as in netmap's kloop): the head still in the CSB is the nonsense, and coming back for it
        would spin; the guest kicks once it wrote something else."""
        self.csb.ktoa.kern_need_kick = int(on)
        if not on or not double_check:
            return False
        head, _ = self.csb.read_head_cur()
        return head != self.rhead


def _count(c: Any, kring: Kring, first: int, n: int) -> None:
    """pt_count's reference: frames and bytes of ``n`` slots of the port's ``kring`` from ``first``."""
    if not n:
        return
    s = kring.ring.slots[(first + np.arange(n)) % kring.nkr_num_slots]
    c.frames += int(np.count_nonzero((s["flags"] & NS_MOREFRAG) == 0))
    c.bytes += int(s["len"].sum(dtype=np.int64))


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class GuestRegion:
    """What one guest of a passthrough port is handed: a sealed memfd (``fd``, ``bar_size`` bytes) holding the
    header, one CSB entry per ring and a netmap_if with ``num_rings`` ring pairs of ``num_slots`` slots, and
    the krings (``tx``/``rx``: the guest's TX and RX rings) the daemon syncs them with."""

    def __init__(
        self,
        name: str,
        *,
        num_rings: int,
        num_slots: int,
        buf_size: int,
        doorbell: tuple[int, int],
        generation: int,
    ) -> None:
        head_room = -(-(PT_HEADER_SIZE + 2 * num_rings * CSB_ENTRY_SIZE) // mmap.PAGESIZE) * mmap.PAGESIZE
        params = AllocatorParams(
            if_size=1024,
            if_num=1,
            ring_size=ring_size(num_slots),
            ring_num=max(2, 2 * num_rings),
            buf_size=buf_size,
            buf_num=2 * num_rings * num_slots + SPARE_GUEST_BUFFERS,
        )
        self.size = region_size(params, head_room)
        # A PCI BAR is a power of two: the memfd is, and the header says how much of it is used.
        self.bar_size = _pow2(self.size)
        fd = sealed_memfd(f"vhostmap-pt-{name}", self.bar_size)
        self.memory = NetmapMemory(params, name=f"vhostmap-pt-{name}", fd=fd, head_room=head_room)
        try:
            self.nifp = self.memory.create_if(name[:15], num_rings, num_rings, num_slots, num_slots, 0, 0)
            self._write_header(num_rings, num_slots, doorbell, generation)
            self.tx = [self._kring(k, NR_TX) for k in range(num_rings)]
            self.rx = [self._kring(k, NR_RX) for k in range(num_rings)]
            # What the compiled syncs take: each guest ring's kring and CSB entry (struct pt_ring, ``pt``).
            self.c_tx = [g.pt for g in self.tx]
            self.c_rx = [g.pt for g in self.rx]
        except BaseException:
            self.memory.close()
            raise

    @property
    def fd(self) -> int:
        """The memfd to hand over (ours: send a copy)."""
        return self.memory.fd

    def csb(self, k: int) -> CsbView:
        """CSB entry ``k`` (TX rings first, then RX rings)."""
        return CsbView(self.memory.region, PT_HEADER_SIZE + k * CSB_ENTRY_SIZE)

    def _write_header(
        self, num_rings: int, num_slots: int, doorbell: tuple[int, int], generation: int
    ) -> None:
        m = self.memory
        h = PtHeader.from_buffer(m.region.mm, 0)
        h.magic = PT_MAGIC
        h.version = PT_VERSION
        h.header_size = PT_HEADER_SIZE
        h.region_size = self.size
        h.nifp_offset = self.nifp.offset
        h.csb_offset = PT_HEADER_SIZE
        h.csb_entry_size = CSB_ENTRY_SIZE
        h.num_csb = 2 * num_rings
        h.num_tx_rings = h.num_rx_rings = num_rings
        h.num_tx_slots = h.num_rx_slots = num_slots
        h.buf_size = m.buf_size
        h.nbufs = m.nbufs
        h.buffers_offset = m.buffers_offset
        h.doorbell_peer, h.doorbell_vector = doorbell
        h.generation = generation
        del h

    def _kring(self, k: int, direction: int) -> PassthroughKring:
        m = self.memory
        r = (self.nifp.tx_rings if direction == NR_TX else self.nifp.rx_rings)[k]
        # Geometry from our layout, never from the ring, which the guest may rewrite.
        view = RingView(
            m.region, r.offset, r.num_slots, buf_ofs=m.buffers_offset - r.offset, nr_buf_size=m.buf_size
        )
        csb = self.csb(k if direction == NR_TX else len(self.nifp.tx_rings) + k)
        return PassthroughKring(
            view,
            csb,
            direction=direction,
            ring_id=k,
            port=f"{self.nifp.name} guest",
            nbufs=m.nbufs,
            buf_size=m.buf_size,
            restock=m.restock,
        )

    def beat(self) -> None:
        """Advance the header's ``heartbeat`` (wrapping): the daemon still serves the region."""
        h = PtHeader.from_buffer(self.memory.region.mm, 0)
        h.heartbeat = (h.heartbeat + 1) & 0xFFFF_FFFF
        del h

    def mark_gone(self) -> None:
        """Tell the guest nobody serves the region any more (the header's ``gone``): its driver stops."""
        PtHeader.from_buffer(self.memory.region.mm, 0).gone = PT_GONE

    def close(self) -> None:
        """Close the memfd and unmap (once the krings' views are gone)."""
        self.memory.close()


def copy_slots_reference(src: Kring, sfirst: int, dst: Kring, dfirst: int, count: int) -> tuple[int, int]:
    """Pure-Python reference of nm_copy_slots over two krings' rings: (slots copied, COPY_* of the slot that
    stopped it)."""
    sn, dn = src.nkr_num_slots, dst.nkr_num_slots
    if sfirst >= sn or count > sn:
        return 0, COPY_BAD_SOURCE
    if dfirst >= dn or count > dn:
        return 0, COPY_BAD_DEST
    ss, ds = src.ring.slots, dst.ring.slots
    for k in range(count):
        i, j = (sfirst + k) % sn, (dfirst + k) % dn
        sb, length, flags = int(ss[i]["buf_idx"]), int(ss[i]["len"]), int(ss[i]["flags"])
        db = int(ds[j]["buf_idx"])
        if not NM_RESERVED_BUFS <= sb < src.nbufs or length > src.buf_size:
            return k, COPY_BAD_SOURCE
        if not NM_RESERVED_BUFS <= db < dst.nbufs or length > dst.buf_size:
            return k, COPY_BAD_DEST
        dst.ring.buf(db)[:length] = src.ring.buf(sb)[:length]
        ds[j]["len"] = length
        ds[j]["flags"] = flags & NS_MOREFRAG
    return count, COPY_OK


def copy_slots(
    src: Kring, sfirst: int, dst: Kring, dfirst: int, count: int, *, reference: bool | None = None
) -> tuple[int, int]:
    """nm_copy_slots over two krings' rings, or its reference (datapath.choice)."""
    if reference_selected(reference):
        return copy_slots_reference(src, sfirst, dst, dfirst, count)
    bad = ffi.new("int32_t *")
    copied = lib.nm_copy_slots(
        ffi.addressof(src.c, "bufs"), sfirst, ffi.addressof(dst.c, "bufs"), dfirst, count, bad
    )
    return int(copied), int(bad[0])


class PortBusy(Exception):
    """A passthrough port already has a guest."""


class PassthroughPort(NetmapAdapter):
    """A port whose far side is a guest using netmap rings in a region of the port's own (module docstring).

    ``attach`` hands the port to a new guest (a fresh GuestRegion, kick and irq eventfds) and ``release``
    takes it back; both run on the control thread and swap the guest under ``lock`` (the datapath's), and
    ``refresh`` tells the datapath its wake-up fds changed. ``doorbell`` is (ivshmem peer ID, vector) the
    guest rings to kick the daemon, written into the header. Without a guest, what is sent to the port is
    dropped (counted) and nothing arrives.
    """

    def __init__(
        self,
        name: str,
        memory: NetmapMemory,
        lock: threading.RLock | Any,
        refresh: Callable[[], None] | None = None,
        *,
        num_rings: int = 1,
        num_desc: int = 1024,
        guest_slots: int = 1024,
        doorbell: tuple[int, int] = (0, 0),
        reference: bool | None = None,
    ) -> None:
        super().__init__(
            name,
            memory,
            num_tx_rings=num_rings,
            num_rx_rings=num_rings,
            num_tx_desc=num_desc,
            num_rx_desc=num_desc,
        )
        self.lock = lock
        self.refresh = refresh
        self.guest_slots = guest_slots
        self.doorbell = doorbell
        self.guest: GuestRegion | None = None
        self.kick = -1
        self.irq = -1
        self.generation = 0
        self.interrupts = 0  # irq eventfd writes
        self.self_kicks = 0  # double checks that found head moved
        self.guest_reinits = 0  # reinits of the rings of guests gone since
        # Per ring pair, what guests gone since copied: [rx frames, rx bytes, tx frames, tx bytes, reinits].
        self._gone = [[0] * 5 for _ in range(num_rings)]
        # The compiled syncs (pt_take, pt_give) or their Python references (datapath.choice).
        self.reference = reference_selected(reference)
        self._notify = ffi.new("uint32_t *")

    # --- the guest's arrival and departure ------------------------------------------------------------------
    def attach(self) -> GuestRegion:
        """Hand the port to a new guest: a fresh region and eventfds (``kick``, ``irq``); the caller sends
        copies of ``region.fd``, ``kick`` and ``irq``. PortBusy if a guest holds it."""
        if self.guest is not None:
            raise PortBusy(f"{self.name}: a guest holds the port")
        region = GuestRegion(
            self.name,
            num_rings=self.num_rx_rings,
            num_slots=self.guest_slots,
            buf_size=self.memory.buf_size,
            doorbell=self.doorbell,
            generation=self.generation + 1,
        )
        kick = irq = -1
        try:
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            for fd in (kick, irq):
                if fd >= 0:
                    os.close(fd)
            region.close()
            raise
        with self.lock:
            self.guest, self.kick, self.irq = region, kick, irq
            self.generation += 1
        log.info(
            "%s: passthrough region of %d bytes (BAR %d) handed to a guest (generation %d)",
            self.name,
            region.size,
            region.bar_size,
            self.generation,
            extra={"port": self.name},
        )
        self._changed()
        return region

    def release(self) -> None:
        """The guest went away: its region and eventfds go, and the frames waiting for it in the TX krings
        with them (the next sync may come only after the next guest arrived, and they were not meant for
        that one). Idempotent."""
        with self.lock:
            region, kick, irq = self.guest, self.kick, self.irq
            self.guest, self.kick, self.irq = None, -1, -1
            for kring in self.tx_rings:
                self._drop_waiting(kring)
            if region is not None:
                self.guest_reinits += sum(k.reinits for k in region.tx + region.rx)
                for gone, t, r in zip(self._gone, region.tx, region.rx, strict=True):
                    for k, value in enumerate(self._ring_counts(t, r)):
                        gone[k] += value
        if region is None:
            return
        # QEMU keeps the memory, and its guest may still be using it (the daemon stops, say).
        region.mark_gone()
        for fd in (kick, irq):
            os.close(fd)
        region.close()
        log.info("%s: passthrough guest released", self.name, extra={"port": self.name})
        self._changed()

    # --- as the ivshmem server's handler (vhostmap.ivshmem.server) ----------------------------------------
    def connected(self) -> tuple[int, list[int], list[int]]:
        """A guest connected: ``attach``; the region's fd, the eventfd the guest kicks us through (our one
        doorbell vector) and the one we interrupt it through (its vector 0). The fds stay ours."""
        region = self.attach()
        return region.fd, [self.kick], [self.irq]

    def disconnected(self) -> None:
        """The guest's connection ended: ``release``."""
        self.release()

    def heartbeat(self) -> None:
        """Advance the guest's heartbeat word, if a guest holds the port (the control loop's timer: see
        PT_HEARTBEAT_INTERVAL). On the control thread, as ``attach`` and ``release``: the region cannot go
        meanwhile."""
        if self.guest is not None:
            self.guest.beat()

    def _changed(self) -> None:
        if self.refresh is not None:
            self.refresh()

    def close(self) -> None:
        """Release the guest, then free the rings and buffers."""
        self.release()
        super().close()

    # --- the datapath -------------------------------------------------------------------------------------
    def wake_fds(self) -> Sequence[int]:
        """The guest's doorbell (the kick eventfd) and the host port's fds."""
        return [self.kick, *super().wake_fds()] if self.kick >= 0 else list(super().wake_fds())

    def carrier(self, ring_index: int) -> bool:
        """Whether a guest takes what TX ring ``ring_index`` sends."""
        return self.guest is not None

    def nm_rxsync(self, kring: Kring, flags: int) -> None:
        """Take back what the consumer released, then copy what the guest sent on its TX ring i."""
        kring.nr_hwcur = kring.rhead
        guest = self.guest
        if guest is None:
            return
        i = kring.ring_id
        if not self.reference:
            status = lib.pt_take(guest.c_tx[i], kring.c, self._notify)
            if status == lib.PT_OK:
                self._notified(int(self._notify[0]))
                return
            if status != lib.PT_REFUSED:
                self._take_stopped(guest.tx[i], kring, guest_at_fault=status == lib.PT_BAD_GUEST)
                return
            # Refused: the Python sync says why, and reinitialises the ring.
        self._take(guest.tx[i], kring)

    def _take(self, g: PassthroughKring, kring: Kring) -> None:
        """The reference of pt_take (datapath/passthrough.cdef): guest TX ring -> our RX kring."""
        if not g.txsync_prologue():
            g.want_kicks(True, double_check=False)
            return
        n = min(g.pending(), kring.rx_space())
        copied, bad = copy_slots(g, g.nr_hwcur, kring, kring.nr_hwtail, n) if n else (0, COPY_OK)
        _count(g.pt, kring, kring.nr_hwtail, copied)
        g.nr_hwcur = (g.nr_hwcur + copied) % g.nkr_num_slots
        kring.nr_hwtail = (kring.nr_hwtail + copied) % kring.nkr_num_slots
        # Copied slots are complete at once: the guest may reuse them.
        g.nr_hwtail = nm_prev(g.nr_hwcur, g.nkr_num_slots)
        if bad != COPY_OK:
            self._take_stopped(g, kring, guest_at_fault=bad == COPY_BAD_SOURCE)
            return
        self._publish(g)
        # Busy (frames moved: the worker runs this forwarder again) or backlogged (our RX ring is full: the
        # consumer comes back when it drained it): no kicks. Idle: kicks, and the double check.
        self._kicks(g, on=copied == 0 and g.pending() == 0)

    def _take_stopped(self, g: PassthroughKring, kring: Kring, *, guest_at_fault: bool) -> None:
        """A take whose copy stopped at a slot: what was copied stands, the ring at fault is reinitialised."""
        if guest_at_fault:
            # The guest rewrote a slot after the prologue checked it.
            g.ring_reinit(f"slot {g.nr_hwcur} rewritten while it was sent ({self._slot(g, g.nr_hwcur)})")
        else:
            # Our consumer (an application, maybe) wrote a slot it did not own: its ring, not the guest's.
            kring.ring_reinit(
                f"slot {kring.nr_hwtail} has no usable buffer ({self._slot(kring, kring.nr_hwtail)})"
            )
        self._publish(g)
        g.want_kicks(True, double_check=False)

    def nm_txsync(self, kring: Kring, flags: int) -> None:
        """Copy what the consumer sent on TX ring i into the guest's RX ring i; reclaim at once."""
        guest = self.guest
        if guest is None:
            self._drop_waiting(kring)
            return
        i = kring.ring_id
        if not self.reference:
            status = lib.pt_give(guest.c_rx[i], kring.c, self._notify)
            if status == lib.PT_OK:
                self._notified(int(self._notify[0]))
                return
            if status != lib.PT_REFUSED:
                self._give_stopped(guest.rx[i], kring, guest_at_fault=status == lib.PT_BAD_GUEST)
                return
        self._give(guest.rx[i], kring)

    @staticmethod
    def _drop_waiting(kring: Kring) -> None:
        """Drop (and count) the frames TX kring ``kring`` holds for a guest that is not there."""
        n = kring.pending()
        if n:
            idx = (kring.nr_hwcur + np.arange(n)) % kring.nkr_num_slots
            kring.dropped += int(np.count_nonzero((kring.ring.slots["flags"][idx] & NS_MOREFRAG) == 0))
            kring.nr_hwcur = kring.rhead
        kring.nr_hwtail = nm_prev(kring.nr_hwcur, kring.nkr_num_slots)

    def _give(self, g: PassthroughKring, kring: Kring) -> None:
        """The reference of pt_give (datapath/passthrough.cdef): our TX kring -> guest RX ring."""
        if not g.rxsync_prologue():
            kring.nr_hwtail = nm_prev(kring.nr_hwcur, kring.nkr_num_slots)
            g.want_kicks(kring.pending() > 0, double_check=False)
            return
        g.nr_hwcur = g.rhead  # the slots the guest released
        n = min(kring.pending(), g.rx_space())
        copied, bad = copy_slots(kring, kring.nr_hwcur, g, g.nr_hwtail, n) if n else (0, COPY_OK)
        _count(g.pt, kring, kring.nr_hwcur, copied)
        kring.nr_hwcur = (kring.nr_hwcur + copied) % kring.nkr_num_slots
        g.nr_hwtail = (g.nr_hwtail + copied) % g.nkr_num_slots
        if bad != COPY_OK:
            self._give_stopped(g, kring, guest_at_fault=bad == COPY_BAD_DEST)
            return
        self._publish(g)
        kring.nr_hwtail = nm_prev(kring.nr_hwcur, kring.nkr_num_slots)
        # Frames wait for room in the guest's ring: ask for a kick when it releases slots.
        self._kicks(g, on=kring.pending() > 0)

    def _give_stopped(self, g: PassthroughKring, kring: Kring, *, guest_at_fault: bool) -> None:
        """A give whose copy stopped at a slot: what was copied stands; a guest slot without a usable buffer
        gets its ring reinitialised, a bad slot of ours (our consumer's doing) is dropped."""
        if guest_at_fault:
            g.ring_reinit(f"slot {g.nr_hwtail} has no usable buffer ({self._slot(g, g.nr_hwtail)})")
        else:
            kring.dropped += 1
            kring.nr_hwcur = (kring.nr_hwcur + 1) % kring.nkr_num_slots
        self._publish(g)
        kring.nr_hwtail = nm_prev(kring.nr_hwcur, kring.nkr_num_slots)
        g.want_kicks(kring.pending() > 0, double_check=False)

    def _notified(self, bits: int) -> None:
        """What a compiled sync asked for (PT_INTERRUPT, PT_KICK)."""
        if bits & lib.PT_INTERRUPT and self.irq >= 0:
            eventfds.signal(self.irq)
            self.interrupts += 1
        if bits & lib.PT_KICK and self.kick >= 0:
            eventfds.signal(self.kick)
            self.self_kicks += 1

    def _publish(self, g: PassthroughKring) -> None:
        moved = g.nr_hwtail != g.rtail
        g.sync_finalize()
        if moved and g.wants_interrupt and self.irq >= 0:
            eventfds.signal(self.irq)
            self.interrupts += 1

    def _kicks(self, g: PassthroughKring, *, on: bool) -> None:
        if g.want_kicks(on) and self.kick >= 0:
            # head moved after the last look: come back rather than wait for a kick that may never come.
            eventfds.signal(self.kick)
            self.self_kicks += 1

    @staticmethod
    def _slot(g: Kring, i: int) -> str:
        s = g.ring.slots[i]
        return f"buf_idx {int(s['buf_idx'])} len {int(s['len'])}"

    @staticmethod
    def _ring_counts(t: PassthroughKring, r: PassthroughKring) -> tuple[int, int, int, int, int]:
        return int(t.pt.frames), int(t.pt.bytes), int(r.pt.frames), int(r.pt.bytes), t.reinits + r.reinits

    def queue_counters(self) -> list[dict[str, Any]]:
        """Per ring pair, since the port was made: frames and bytes from the guest (``rx_*``, its TX ring i)
        and to it (``tx_*``, its RX ring i), frames dropped (``rx_dropped``: by this port's consumer;
        ``tx_dropped``: sent while no guest held the port) and the guest's ring reinits (``errors``)."""
        guest = self.guest
        out = []
        for i, gone in enumerate(self._gone):
            live = self._ring_counts(guest.tx[i], guest.rx[i]) if guest is not None else (0,) * 5
            rx_frames, rx_bytes, tx_frames, tx_bytes, reinits = (
                a + b for a, b in zip(gone, live, strict=True)
            )
            out.append(
                {
                    "queue": i,
                    "rx_packets": rx_frames,
                    "rx_bytes": rx_bytes,
                    "tx_packets": tx_frames,
                    "tx_bytes": tx_bytes,
                    "rx_dropped": self.rx_rings[i].dropped,
                    "tx_dropped": self.tx_rings[i].dropped,
                    "errors": reinits,
                }
            )
        return out

    def counters(self) -> dict[str, Any]:
        """What ``vhostmap stats`` shows of the port's guest side."""
        guest = self.guest
        rings = (guest.tx + guest.rx) if guest is not None else []
        return {
            "attached": guest is not None,
            "generation": self.generation,
            "interrupts": self.interrupts,
            "self_kicks": self.self_kicks,
            "guest_reinits": self.guest_reinits + sum(k.reinits for k in rings),
            "region_bytes": guest.size if guest is not None else 0,
        }
