"""Slots <-> frames: reading the frames a user handed over in a ring, and filling an RX ring with frames.

Shared by the host rings (host.py) and the generic adapter (generic.py). A frame is a run of slots with
NS_MOREFRAG on all but its last (netmap.h). ``SlotFrames`` reads the slots of a batch once into a snapshot,
checks every buffer index of it with numpy (the check buf_view makes, done once per batch), and then copies
through memoryview slices of the region at offsets computed from the checked indexes only: a user rewriting a
slot meanwhile can confuse itself, never reach outside a buffer. ``RxFill`` is the import half of an rxsync;
``send_frames`` is the export half of a txsync whose sends complete at once, and ``DropReport`` counts and
logs what either side drops.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np

from vhostmap.datapath import lib
from vhostmap.netmap.abi import NM_RESERVED_BUFS, NS_MOREFRAG, NS_VNET_HDR, nm_prev
from vhostmap.netmap.allocator import NetmapMemory
from vhostmap.netmap.kring import Kring
from vhostmap.netmap.offload import HEAD_MAX, NO_OFFLOADS, OffloadError, for_receiver
from vhostmap.virtio.spec import VIRTIO_NET_HDR

# slot.len is 16 bits: no slot carries more, whatever the buffer size.
SLOT_LEN_MAX = 0xFFFF


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
    (what ring_reinit leaves when the pool is dry) stops the fill there quietly; any other unusable index is
    nonsense and reinitialises the ring. Frames longer than a slot span several, NS_MOREFRAG on all but the
    last. Slot lengths and flags are written, and nr_hwtail advanced, once per batch by ``flush`` (``close``
    and the context manager flush too), so use it as ``with RxFill(kring, memory) as fill:``.
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

    def commit(self, length: int, flags: int = 0) -> None:
        """Account a frame of ``length`` bytes already written into the next free slots' buffers, ``flags``
        (NS_VNET_HDR) on its first slot."""
        k = self.slots_for(length)
        self._lens.extend([self.cap] * (k - 1))
        self._lens.append(length - (k - 1) * self.cap)
        self._flags.extend([NS_MOREFRAG] * (k - 1))
        self._flags.append(0)
        self._flags[-k] |= flags

    def put(self, frame: bytes | memoryview, flags: int = 0) -> bool:
        """Copy ``frame`` in (one copy), ``flags`` (NS_VNET_HDR) on its first slot; False, and nothing
        changes, when it does not fit."""
        length = len(frame)
        cap = self.cap
        base = self._flushed + len(self._lens)
        if 0 < length <= cap:  # the common case, kept free of helper calls
            if base >= len(self._offsets):
                return False
            o = self._offsets[base]
            self._region[o : o + length] = frame
            self._lens.append(length)
            self._flags.append(flags)
            return True
        k = self.slots_for(length)
        if length == 0 or k > self.room:
            return False
        for j in range(k):
            o = self._offsets[base + j]
            part = frame[j * cap : (j + 1) * cap]
            self._region[o : o + len(part)] = part
        self.commit(length, flags)
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


# --- txsync: frames out, drops reported ---------------------------------------------------------------------
class TxStats(Protocol):
    """Counters with a count of frames that could not be sent (GenericStats, HostStats)."""

    tx_drops: int


class DropReport:
    """Counts a port's drops and logs one warning per kind of reason to ``log``; after that only the counters
    move, so that a down interface or a misbehaving user does not flood the logs.

    ``stats`` are the port's counters (transmit drops are counted in them); ``port`` names the port in the
    records; ``ifname``, for a port over an interface, goes in the message and the records too. The port
    itself is not kept: a reference to it would make a cycle, and a port dropped without ``close`` would
    keep its socket open until the garbage collector runs.
    """

    def __init__(self, log: logging.Logger, stats: TxStats, port: str, ifname: str | None = None) -> None:
        self.log = log
        self.stats = stats
        self._where = "" if ifname is None else f" on {ifname}"
        self._extra = {"port": port} if ifname is None else {"port": port, "ifname": ifname}
        self._reported: set[str] = set()

    def tx(self, kring: Kring, reason: str) -> None:
        """Count a frame of TX ``kring`` that is not sent, and report why."""
        self.stats.tx_drops += 1
        kring.dropped += 1
        self.report(kring, reason)

    def report(self, kring: Kring, reason: str) -> None:
        """Log ``reason`` on ``kring`` the first time it happens."""
        if reason in self._reported:
            return
        self._reported.add(reason)
        self.log.warning(
            "%s: %s%s (further occurrences only counted)",
            kring.name,
            reason,
            self._where,
            extra={**self._extra, "ring": kring.name, "reason": reason},
        )


# send(kring, payload, length): True when the frame is done with (sent, or dropped and counted by the sender),
# False when the interface has no room for it now (nothing sent, nothing counted). ``payload`` is the legacy
# virtio-net header to write before the frame (NO_OFFLOADS, or the offloads it keeps), then the frame's
# pieces; ``length`` counts the frame.
SendFrame = Callable[[Kring, list[bytes | memoryview], int], bool]


def split_header(payload: list[memoryview], offloads: int) -> tuple[bytes, list[memoryview]]:
    """The frame of ``payload`` that starts with its virtio-net header (NS_VNET_HDR): the header as the
    legacy struct virtio_net_hdr to write before it, and the frame's pieces. OffloadError when the header asks
    for what is not in ``offloads`` (NEEDS_*) or fails `check`: the frame is to be dropped."""
    size = VIRTIO_NET_HDR.size
    head = bytearray()
    for piece in payload:
        head += piece[: size + HEAD_MAX - len(head)]
        if len(head) == size + HEAD_MAX:
            break
    if len(head) < size:
        raise OffloadError(int(lib.NM_OFF_BAD_SIZE))
    frame, skip = [], size
    for piece in payload:
        if skip >= len(piece):
            skip -= len(piece)
            continue
        frame.append(piece[skip:])
        skip = 0
    h = for_receiver(bytes(head), bytes(head[size:]), sum(len(p) for p in frame), offloads)
    return h.legacy(), frame


def frame_out(frames: SlotFrames, i: int, offloads: int) -> tuple[list[bytes | memoryview], int]:
    """Frame ``i`` of ``frames`` as it is written to the stack with a virtio-net header each: the header
    (NO_OFFLOADS, or the frame's own, NS_VNET_HDR: `split_header`) and the frame's pieces; and the frame's
    length. OffloadError as split_header."""
    payload = frames.payload(i)
    if not frames.first_flags[i] & NS_VNET_HDR:
        return [NO_OFFLOADS, *payload], frames.lengths[i]
    header, rest = split_header(payload, offloads)
    return [header, *rest], frames.lengths[i] - VIRTIO_NET_HDR.size


def send_frames(
    kring: Kring,
    memory: NetmapMemory,
    send: SendFrame,
    drops: DropReport,
    *,
    backpressure: bool = False,
    offloads: int = 0,
) -> None:
    """txsync of a TX ``kring`` whose sends complete at once: ``send`` the frames of [nr_hwcur, rhead) and
    reclaim every slot consumed (nr_hwcur and nr_hwtail advance past them).

    Frames with an unusable slot are dropped. A trailing frame whose last slot is not handed over yet waits
    for the next txsync, unless it alone takes every slot the user can hand over (it can never complete, and
    is dropped). Once ``send`` finds no room, that frame and the rest of the batch stay in the ring for the
    next txsync with ``backpressure``, and are dropped without it. A frame with its virtio-net header
    (NS_VNET_HDR) goes with it when the interface takes what it asks (``offloads``, NEEDS_*) and it passes the
    checks of `split_header`; otherwise it is dropped, with the reason.
    """
    n = kring.nkr_num_slots
    count = kring.pending()
    if count:
        frames = SlotFrames(kring, memory, kring.nr_hwcur, count)
        consumed = frames.slots
        if consumed == 0 and count == n - 1:
            drops.tx(kring, "a frame spans the whole ring")
            consumed = count
        full = False
        for i in range(len(frames)):
            if full or not frames.valid[i]:
                drops.tx(kring, "interface full" if full else "frame with an unusable slot")
                continue
            try:
                payload, length = frame_out(frames, i, offloads)
            except OffloadError as e:
                drops.tx(kring, f"offload header: {e}")
                continue
            full = not send(kring, payload, length)
            if full and backpressure:
                consumed = frames.starts[i]  # this frame and the rest stay for the next txsync
                break
            if full:
                drops.tx(kring, "interface full")
        kring.nr_hwcur = (kring.nr_hwcur + consumed) % n
    kring.nr_hwtail = nm_prev(kring.nr_hwcur, n)
