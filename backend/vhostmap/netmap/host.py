"""Host rings bound to a TAP device, and netmap's transparent mode between host and hardware rings.

Follows netmap.c (shared/seeds/netmap.c.txt): netmap_transmit (frames the host stack sends enter the host RX
kring at nr_hwtail, dropped when it is full), netmap_txsync_to_host with netmap_grab_packets/netmap_send_up
(what the user puts in the host TX kring goes to the stack, then the slots are reclaimed at once),
netmap_rxsync_from_host, and transparent mode (NR_FORWARD on a ring, NS_FORWARD on slots) re-expressed with
modern netmap's rules: on an rxsync of a hardware RX ring with NR_FORWARD, the slots the user releases with
NS_FORWARD go up to the stack (the seed's grab_packets before nm_rxsync); on an rxsync of the host RX ring
with NR_FORWARD, the released slots with NS_FORWARD go out through the hardware TX rings by swapping buffers
(netmap_sw_to_nic), and those rings are then txsynced, as netmap_poll's second tx flush does.

For vhostmap the host stack of a port is a TAP device: reading the TAP gives what the stack sends, writing it
injects frames into the stack. The TAP fd is non-blocking and is the host rings' wake-up fd; every host
rxsync drains it (importing what fits, dropping the rest), so a level-triggered poller never spins on it.

Until NetmapAdapter has a host-port hook, an adapter gets host rings on a TAP by mixing in
``HostRingsMixin`` before its concrete class (``class Port(HostRingsMixin, LoopbackAdapter)``) and creating
``HostStack(port, "tap0")``. Without a HostStack attached the mixin behaves exactly like the base adapter.

The slot <-> frame helpers (``SlotFrames``, ``RxFill``) are shared with the generic adapter. They read the
slots of a batch once into a snapshot, check every buffer index of it with numpy (the check buf_view makes,
done once per batch), and then copy through memoryview slices of the region at offsets computed from the
checked indexes only: a user rewriting a slot meanwhile can confuse itself, never reach outside a buffer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from vhostmap.netmap.abi import (
    NM_RESERVED_BUFS,
    NR_FORWARD,
    NS_BUF_CHANGED,
    NS_FORWARD,
    NS_MOREFRAG,
    nm_prev,
)
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import NetmapMemory
from vhostmap.netmap.kring import Kring
from vhostmap.netmap.tap import TapDevice

log = logging.getLogger(__name__)

# Reads of the TAP per host rxsync. Enough to drain a TAP queue (txqueuelen 1000) at once, and a bound on the
# time one sync may take while the stack keeps sending; what is left wakes the worker again.
HOST_RX_BUDGET = 1024
# Largest frame a TAP read can return (MTU 65535 plus Ethernet and VLAN headers), rounded up.
TAP_FRAME_MAX = 1 << 17
# Shortest frame passed to the stack (an Ethernet header), as netmap_grab_packets requires.
ETH_HLEN = 14
# slot.len is 16 bits: no slot carries more, whatever the buffer size.
SLOT_LEN_MAX = 0xFFFF

_CLEAR_FORWARD = np.uint16(0xFFFF ^ NS_FORWARD)


def slot_capacity(kring: Kring) -> int:
    """Bytes one slot of ``kring`` can carry."""
    return min(kring.buf_size, SLOT_LEN_MAX)


# --- slots <-> frames ---------------------------------------------------------------------------------------
class SlotFrames:
    """The complete frames among ``count`` slots of ``kring`` from ``first``, read once (a snapshot).

    A frame is a run of slots with NS_MOREFRAG on all but its last. Frame ``i`` covers the slots
    ``starts[i]..ends[i]-1`` relative to ``first``; ``slots`` counts the slots covered by complete frames, and
    ``count - slots`` trailing slots belong to an unfinished frame. ``valid[i]`` says whether every slot of
    frame ``i`` has a usable buffer and a length within 1..buf_size; ``first_flags[i]`` holds the flags of its
    first slot, ``lengths[i]`` its total length. All of it is computed with numpy over the whole range.
    """

    def __init__(self, kring: Kring, memory: NetmapMemory, first: int, count: int) -> None:
        n = kring.nkr_num_slots
        self.kring = kring
        self.memory = memory
        self.first = first
        self.count = count
        snap = kring.ring.slots[(first + np.arange(count)) % n]  # fancy indexing copies: our snapshot
        self.bufs = snap["buf_idx"].astype(np.int64)
        self.lens = snap["len"].astype(np.int64)
        flags = snap["flags"]
        ends = np.flatnonzero((flags & NS_MOREFRAG) == 0) + 1
        starts = np.concatenate((np.zeros(1, dtype=np.int64), ends[:-1]))
        self.ends: list[int] = ends.tolist()
        self.starts: list[int] = starts.tolist() if ends.size else []
        self.slots = int(ends[-1]) if ends.size else 0
        usable = (
            (self.bufs >= NM_RESERVED_BUFS)
            & (self.bufs < kring.nbufs)
            & (self.lens >= 1)
            & (self.lens <= slot_capacity(kring))
        )
        if ends.size:
            self.valid: list[bool] = np.logical_and.reduceat(usable[: self.slots], starts).tolist()
            self.lengths: list[int] = np.add.reduceat(self.lens[: self.slots], starts).tolist()
            self.first_flags: list[int] = flags[starts].tolist()
        else:
            self.valid, self.lengths, self.first_flags = [], [], []
        # Region offsets of the buffers; only those of valid frames are ever used, and those were checked.
        self._offsets: list[int] = (memory.buffers_offset + self.bufs * memory.buf_size).tolist()
        self._lens: list[int] = self.lens.tolist()

    def __len__(self) -> int:
        return len(self.ends)

    def payload(self, i: int) -> list[memoryview]:
        """The bytes of frame ``i``, one view per slot. Only for a valid frame."""
        if not self.valid[i]:
            raise ValueError(f"{self.kring.name}: frame {i} has an unusable slot")
        region = memoryview(self.memory.region.mm)
        offs, lens = self._offsets, self._lens
        return [region[offs[j] : offs[j] + lens[j]] for j in range(self.starts[i], self.ends[i])]

    def clear_flags(self, i: int, mask: int) -> None:
        """Clear ``mask`` in the live flags of the slots of frame ``i``."""
        n = self.kring.nkr_num_slots
        idx = (self.first + np.arange(self.starts[i], self.ends[i])) % n
        self.kring.ring.slots["flags"][idx] &= np.uint16(0xFFFF ^ mask)


class RxFill:
    """Puts frames into an RX kring from nr_hwtail, keeping one slot empty (the import half of an rxsync).

    The buffers of the free slots are read and checked once, when the filler is made: a slot holding buffer 0
    (what ring_reinit leaves) stops the fill there quietly; any other unusable index is nonsense and
    reinitialises the ring. Frames longer than a slot span several, NS_MOREFRAG on all but the last. Slot
    lengths and flags are written, and nr_hwtail advanced, once per batch by ``flush`` (``close`` and the
    context manager flush too), so use it as ``with RxFill(kring, memory) as fill:``.
    """

    def __init__(self, kring: Kring, memory: NetmapMemory) -> None:
        self.kring = kring
        self.cap = slot_capacity(kring)
        n = kring.nkr_num_slots
        space = kring.rx_space()
        bufs = kring.ring.slots["buf_idx"][(kring.nr_hwtail + np.arange(space)) % n].astype(np.int64)
        bad = np.flatnonzero((bufs < NM_RESERVED_BUFS) | (bufs >= kring.nbufs))
        if bad.size:
            i, idx = int(bad[0]), int(bufs[bad[0]])
            space = i
            if idx != 0:
                kring.ring_reinit(f"slot {(kring.nr_hwtail + i) % n} to fill holds buf_idx {idx}")
        # Checked indexes -> region offsets, so that copies are plain memoryview slices.
        self._offsets: list[int] = (memory.buffers_offset + bufs[:space] * memory.buf_size).tolist()
        self._region = memoryview(memory.region.mm)
        self._lens: list[int] = []
        self._flags: list[int] = []
        self._flushed = 0

    @property
    def room(self) -> int:
        """Slots still free."""
        return len(self._offsets) - self._flushed - len(self._lens)

    def slots_for(self, length: int) -> int:
        """Slots a frame of ``length`` bytes takes."""
        return max(1, -(-length // self.cap))

    def view(self, i: int = 0) -> memoryview:
        """The buffer (``cap`` bytes) of the ``i``-th free slot from here (i < room), writable."""
        o = self._offsets[self._flushed + len(self._lens) + i]
        return self._region[o : o + self.cap]

    def commit(self, length: int) -> None:
        """Account a frame of ``length`` bytes already written into the next free slots' buffers."""
        k = self.slots_for(length)
        self._lens.extend([self.cap] * (k - 1))
        self._lens.append(length - (k - 1) * self.cap)
        self._flags.extend([NS_MOREFRAG] * (k - 1))
        self._flags.append(0)

    def put(self, frame: bytes | memoryview) -> bool:
        """Copy ``frame`` in (one copy); False, and nothing changes, when it does not fit."""
        length = len(frame)
        cap = self.cap
        base = self._flushed + len(self._lens)
        if 0 < length <= cap:  # the common case, kept free of helper calls
            if base >= len(self._offsets):
                return False
            o = self._offsets[base]
            self._region[o : o + length] = frame
            self._lens.append(length)
            self._flags.append(0)
            return True
        k = self.slots_for(length)
        if length == 0 or k > self.room:
            return False
        for j in range(k):
            o = self._offsets[base + j]
            part = frame[j * cap : (j + 1) * cap]
            self._region[o : o + len(part)] = part
        self.commit(length)
        return True

    def flush(self) -> None:
        """Write the lengths and flags of the frames put so far and advance nr_hwtail past them."""
        k = len(self._lens)
        if not k:
            return
        kring = self.kring
        n = kring.nkr_num_slots
        idx = (kring.nr_hwtail + np.arange(k)) % n
        kring.ring.slots["len"][idx] = self._lens
        kring.ring.slots["flags"][idx] = self._flags
        kring.nr_hwtail = (kring.nr_hwtail + k) % n
        self._flushed += k
        self._lens, self._flags = [], []

    def close(self) -> None:
        """Flush, and let go of the region."""
        self.flush()
        # A view still held somewhere keeps the export alive until it is collected; that is harmless.
        with contextlib.suppress(BufferError):
            self._region.release()

    def __enter__(self) -> RxFill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the host stack -----------------------------------------------------------------------------------------
@dataclass
class HostStats:
    """Counters of a host stack, from the rings' point of view: ``rx_*`` are frames the stack sent into the
    host RX kring, ``tx_*`` frames written to the stack (host TX kring and forwarded_up). ``forwarded_up``
    counts frames passed from hardware RX rings to the stack, ``forwarded_down`` frames passed from the host
    RX ring to hardware TX rings, ``forward_drops`` NS_FORWARD frames that could not be passed on."""

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_drops: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_drops: int = 0
    forwarded_up: int = 0
    forwarded_down: int = 0
    forward_drops: int = 0


class HostStack:
    """The host rings of ``adapter`` bound to the TAP ``ifname``.

    ``create``: create the TAP if it does not exist (it is then deleted by ``close``; a TAP that existed is
    left in place). ``up``: bring it up (writes to a TAP that is down fail). ``adapter`` must mix in
    HostRingsMixin; the stack attaches itself to it and detaches on ``close``. Raises TapError when the TAP
    cannot be opened.
    """

    def __init__(
        self,
        adapter: NetmapAdapter,
        ifname: str,
        *,
        create: bool = True,
        up: bool = True,
        multi_queue: bool = False,
        rx_budget: int = HOST_RX_BUDGET,
    ) -> None:
        if not isinstance(adapter, HostRingsMixin):
            raise TypeError(
                f"{adapter.name}: {type(adapter).__name__} has no host-port hook; mix in HostRingsMixin"
            )
        if adapter.host_stack is not None:
            raise ValueError(f"{adapter.name}: host rings already bound to {adapter.host_stack.name}")
        self.adapter = adapter
        self.memory = adapter.memory
        self.rx_budget = rx_budget
        self.stats = HostStats()
        self.tap = TapDevice.open(ifname, create=create, multi_queue=multi_queue)
        try:
            if up:
                self.tap.set_up()
        except BaseException:
            self.tap.close()
            raise
        self._scratch = memoryview(bytearray(TAP_FRAME_MAX))
        self._reported: set[str] = set()
        adapter.host_stack = self

    @property
    def name(self) -> str:
        """The TAP's name."""
        return self.tap.name

    def wake_fds(self) -> list[int]:
        """The TAP fd: readable when the stack has sent something. Not an eventfd: host rxsync drains it."""
        return [] if self.tap.closed else [self.tap.fd]

    def counters(self) -> dict[str, int]:
        """The counters as a dict."""
        return asdict(self.stats)

    # --- host TX: ring -> stack -----------------------------------------------------------------------------
    def txsync(self, kring: Kring, flags: int) -> None:
        """Write the frames of [nr_hwcur, rhead) of the host TX kring to the TAP and reclaim their slots.

        A trailing frame whose last slot is not handed over yet is kept for the next sync, unless it alone
        takes every slot the user can hand over: it can never complete, and is dropped.
        """
        n = kring.nkr_num_slots
        count = kring.pending()
        if count:
            frames = SlotFrames(kring, self.memory, kring.nr_hwcur, count)
            consumed = frames.slots
            if consumed == 0 and count == n - 1:
                self._drop_tx(kring, "a frame spans the whole ring")
                consumed = count
            for i in range(len(frames)):
                if frames.valid[i]:
                    self._write(kring, frames.payload(i), frames.lengths[i])
                else:
                    self._drop_tx(kring, "frame with an unusable slot")
            kring.nr_hwcur = (kring.nr_hwcur + consumed) % n
        # Writes to a TAP complete at once: everything sent is reclaimed (netmap_txsync_to_host).
        kring.nr_hwtail = nm_prev(kring.nr_hwcur, n)

    def send_up(self, kring: Kring) -> int:
        """Transparent mode, NIC -> host: write to the TAP the frames released with NS_FORWARD among
        [nr_hwcur, rhead) of hardware RX ``kring`` (call before the adapter's hook releases them), clearing
        the flag as netmap_grab_packets does. Returns the frames forwarded."""
        frames = SlotFrames(kring, self.memory, kring.nr_hwcur, kring.pending())
        sent = 0
        for i in range(len(frames)):
            if not frames.first_flags[i] & NS_FORWARD:
                continue
            frames.clear_flags(i, NS_FORWARD)
            if frames.valid[i] and frames.lengths[i] >= ETH_HLEN:
                if self._write(kring, frames.payload(i), frames.lengths[i]):
                    sent += 1
            else:
                self.stats.forward_drops += 1
        self.stats.forwarded_up += sent
        return sent

    def _write(self, kring: Kring, payload: Sequence[memoryview], length: int) -> bool:
        try:
            os.writev(self.tap.fd, payload)
        except OSError as e:
            # EIO: the TAP is down; EAGAIN/ENOBUFS: no room in the stack. Counted, never retried.
            self._drop_tx(kring, f"write to {self.tap.name}: {errno.errorcode.get(e.errno or 0, e.errno)}")
            return False
        self.stats.tx_packets += 1
        self.stats.tx_bytes += length
        return True

    def _drop_tx(self, kring: Kring, reason: str) -> None:
        self.stats.tx_drops += 1
        kring.dropped += 1
        self._report(kring, reason)

    # --- host RX: stack -> ring -----------------------------------------------------------------------------
    def rxsync(self, kring: Kring, flags: int) -> None:
        """Host RX kring: pass released NS_FORWARD slots down (transparent mode), take back [nr_hwcur, rhead),
        then import what the stack sent at nr_hwtail. Frames that find no room are dropped and counted; the
        TAP is drained either way (at most ``rx_budget`` reads)."""
        if kring.ring.flags & NR_FORWARD and kring.pending():
            moved, dropped = sw_to_nic(self.adapter, kring)
            self.stats.forwarded_down += moved
            self.stats.forward_drops += dropped
        kring.nr_hwcur = kring.rhead
        self._read(kring)

    def _read(self, kring: Kring) -> None:
        with RxFill(kring, self.memory) as fill:
            self._read_into(kring, fill)

    def _read_into(self, kring: Kring, fill: RxFill) -> None:
        scratch = self._scratch
        for _ in range(self.rx_budget):
            # Read straight into the next free slot's buffer; only a frame longer than a slot spills into the
            # scratch buffer, and only the spill is copied again.
            iov = [fill.view(), scratch] if fill.room else [scratch]
            try:
                length = os.readv(self.tap.fd, iov)
            except BlockingIOError:
                return
            except OSError as e:
                self._report(
                    kring, f"read from {self.tap.name}: {errno.errorcode.get(e.errno or 0, e.errno)}"
                )
                return
            if length <= 0:
                return
            k = fill.slots_for(length)
            if k > fill.room:
                self._drop_rx(kring, "host RX ring full")
                continue
            spill = length - fill.cap
            for j in range(1, k):
                part = scratch[(j - 1) * fill.cap : min(j * fill.cap, spill)]
                fill.view(j)[: len(part)] = part
            fill.commit(length)
            self.stats.rx_packets += 1
            self.stats.rx_bytes += length

    def _drop_rx(self, kring: Kring, reason: str) -> None:
        self.stats.rx_drops += 1
        kring.dropped += 1
        log.debug("%s: dropped a frame from %s: %s", kring.name, self.tap.name, reason)

    def _report(self, kring: Kring, reason: str) -> None:
        # One line per kind of trouble; after that only the counters move, so a down TAP does not flood logs.
        if reason in self._reported:
            return
        self._reported.add(reason)
        log.warning(
            "%s: %s (further occurrences only counted)",
            kring.name,
            reason,
            extra={"port": self.adapter.name, "ring": kring.name, "reason": reason},
        )

    # --- lifetime -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Detach from the adapter (its host rings fall back to the default) and close the TAP, which goes
        away if this stack created it. Idempotent."""
        adapter = self.adapter
        if isinstance(adapter, HostRingsMixin) and adapter.host_stack is self:
            adapter.host_stack = None
        self.tap.close()


def _tx_room(kring: Kring, nslots: int, nbufs: int) -> bool:
    """Whether the user's view of TX ``kring`` has ``nslots`` free slots from head holding usable buffers."""
    ring = kring.ring
    n = kring.nkr_num_slots
    head, tail = ring.head, ring.tail
    if head >= n or (tail - head) % n < nslots:
        return False
    bufs = ring.slots["buf_idx"][(head + np.arange(nslots)) % n]
    return bool(np.all((bufs >= NM_RESERVED_BUFS) & (bufs < nbufs)))


def sw_to_nic(adapter: NetmapAdapter, kring: Kring) -> tuple[int, int]:
    """Transparent mode, host -> NIC (netmap_sw_to_nic): move the frames released with NS_FORWARD among
    [nr_hwcur, rhead) of the host RX ``kring`` to the hardware TX rings, zero copy, then txsync the rings
    that got some.

    Each frame goes, whole, to the first TX ring (in order) whose user side has room: the slot at the ring's
    head swaps buffers with the host slot and head/cur advance, exactly as a user would. Call before the
    host rxsync releases the slots. Returns (frames moved, NS_FORWARD frames dropped for lack of room or
    for being malformed).
    """
    frames = SlotFrames(kring, adapter.memory, kring.nr_hwcur, kring.pending())
    src = kring.ring.slots
    n = kring.nkr_num_slots
    moved = dropped = 0
    t = 0
    touched: list[int] = []
    for i in range(len(frames)):
        if not frames.first_flags[i] & NS_FORWARD:
            continue
        if not frames.valid[i]:
            dropped += 1
            continue
        nslots = frames.ends[i] - frames.starts[i]
        while t < adapter.num_tx_rings and not _tx_room(adapter.tx_rings[t], nslots, kring.nbufs):
            t += 1
        if t == adapter.num_tx_rings:
            dropped += 1
            continue
        dst_kring = adapter.tx_rings[t]
        dst = dst_kring.ring
        dn = dst_kring.nkr_num_slots
        head = dst.head
        for j in range(frames.starts[i], frames.ends[i]):
            s = (frames.first + j) % n
            spare = int(dst.slots["buf_idx"][head])
            dst.slots["buf_idx"][head] = frames.bufs[j]
            dst.slots["len"][head] = frames.lens[j]
            dst.slots["flags"][head] = (src["flags"][s] & NS_MOREFRAG) | NS_BUF_CHANGED
            src["buf_idx"][s] = spare
            src["flags"][s] = NS_BUF_CHANGED
            head = (head + 1) % dn
        dst.head = dst.cur = head
        if t not in touched:
            touched.append(t)
        moved += 1
    for t in touched:
        adapter.txsync(t)
    return moved, dropped


class HostRingsMixin(NetmapAdapter):
    """Gives an adapter host rings on a TAP: mix in before the concrete adapter class, then attach a
    HostStack. While ``host_stack`` is None every hook behaves as the base class's.

    Hooks: host TX/RX krings go to the stack; a hardware RX rxsync with NR_FORWARD first passes the released
    NS_FORWARD slots up; ``wake_fds`` adds the TAP fd; ``close`` closes the stack first.
    """

    host_stack: HostStack | None = None

    def host_txsync(self, kring: Kring, flags: int) -> None:
        """Host TX kring -> the TAP (or the base behaviour without a stack)."""
        if self.host_stack is None:
            super().host_txsync(kring, flags)
        else:
            self.host_stack.txsync(kring, flags)

    def host_rxsync(self, kring: Kring, flags: int) -> None:
        """The TAP -> host RX kring (or the base behaviour without a stack)."""
        if self.host_stack is None:
            super().host_rxsync(kring, flags)
        else:
            self.host_stack.rxsync(kring, flags)

    def nm_rxsync(self, kring: Kring, flags: int) -> None:
        """Transparent mode first (NS_FORWARD slots being released go up), then the concrete hook."""
        if self.host_stack is not None and kring.ring.flags & NR_FORWARD and kring.pending():
            self.host_stack.send_up(kring)
        # The mixin always precedes a concrete adapter in the MRO, which implements nm_rxsync.
        super().nm_rxsync(kring, flags)  # type: ignore[safe-super]

    def wake_fds(self) -> Sequence[int]:
        """The adapter's own fds plus the TAP fd."""
        extra = self.host_stack.wake_fds() if self.host_stack is not None else []
        return [*super().wake_fds(), *extra]

    def close(self) -> None:
        """Close the host stack, then the adapter."""
        if self.host_stack is not None:
            self.host_stack.close()
        super().close()
