"""Moving frames between a virtio-net device's virtqueues and netmap slots: the reference kernels.

``dequeue`` takes what the guest transmitted (its transmit queue) into free slots of a netmap ring;
``enqueue`` delivers the frames of netmap slots into the guest's receive queue. Both process a whole batch
per call; this pure-Python version is the reference the compiled kernels are tested against, byte for byte.

Frames larger than one netmap buffer span several slots, all but the last flagged NS_MOREFRAG (netmap's
convention). On the virtio side every buffer starts with the virtio-net header (spec 5.1.6); with
VIRTIO_NET_F_MRG_RXBUF a received frame may fill several receive chains, counted in ``num_buffers``.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import lib
from vhostmap.netmap.abi import NS_MOREFRAG, NS_VNET_HDR
from vhostmap.netmap.offload import HEAD_MAX, OffloadError, VnetHeader, check, complete, for_receiver, needs
from vhostmap.vhost_user.memory import GuestMemory
from vhostmap.vhost_user.virtqueue import Chain, VirtqueueError
from vhostmap.virtio.spec import VIRTIO_NET_HDR, VIRTIO_NET_HDR_LEGACY

# The largest frame a guest may hand us (a 64 KiB GSO frame; jumbo frames are 9 KiB).
MAX_FRAME = 65535
# What the compiled dequeue completes an offloaded frame into (datapath/virtio.c VQ_OFFLOAD_*): bytes and
# segments at most.
OFFLOAD_OUT = 256 << 10
OFFLOAD_SEGS = 4096


class Virtqueue(Protocol):
    """What the kernels take chains through and give them back with: a split ring (SplitVirtqueue, spec
    2.7), a packed one (PackedVirtqueue, spec 2.8: a chain's head is its buffer id), or the compiled twin of
    a packed one's operations (packed_kernels.CompiledPackedRing). Whoever runs a batch publishes it after."""

    @property
    def index(self) -> int: ...
    @property
    def host_offloads(self) -> bool: ...
    @property
    def pass_offloads(self) -> int: ...
    @property
    def guest_offloads(self) -> int: ...
    @property
    def log_dirty(self) -> bool: ...
    def pending(self) -> int: ...
    def pop(self, writable: bool) -> Chain: ...
    def unpop(self) -> None: ...
    def push_used(self, head: int, length: int) -> None: ...
    def retract_used(self, n: int) -> None: ...


@dataclass(frozen=True)
class Buffers:
    """Where netmap buffers live: buffer ``i`` is ``region[base + i * size : base + (i + 1) * size]``."""

    region: npt.NDArray[np.uint8]
    base: int
    size: int

    def view(self, idx: int, length: int) -> npt.NDArray[np.uint8]:
        """The first ``length`` bytes of buffer ``idx``, read as the kernels read a slot (nm_slot_buf and the
        enqueue's gather, datapath/virtio.c): an index past the pool names buffer 0, the scratch buffer, and a
        length past the buffer is 0. The kring checked the slots a sync takes, but whoever can write the ring
        (an application maps every ring of the allocator) may rewrite a slot afterwards, or one the sync fills
        without taking: then only that frame suffers, never the forwarder running the sync."""
        if not 0 <= idx < (len(self.region) - self.base) // self.size:
            idx = 0
        if length > self.size:
            length = 0
        start = self.base + idx * self.size
        return self.region[start : start + length]


@dataclass
class BatchResult:
    """What one kernel call did. ``slots`` is how far the ring position moved; ``bad_headers``, of the
    dropped frames, those whose offload header they did not bear out; ``offloaded``, the frames whose
    offloads were completed, as they came in or (enqueued) for a driver that did not negotiate them (their
    segments are in ``packets``); ``passed``, the frames that kept their offloads and header (NS_VNET_HDR)."""

    slots: int = 0
    packets: int = 0
    bytes: int = 0
    dropped: int = 0
    bad_headers: int = 0
    offloaded: int = 0
    passed: int = 0


def dequeue(
    vq: Virtqueue,
    mem: GuestMemory,
    hdr_len: int,
    slots: npt.NDArray[np.void],
    first: int,
    space: int,
    bufs: Buffers,
) -> BatchResult:
    """Copy chains of the guest's transmit queue into up to ``space`` slots starting at ``first``.

    Each chain becomes one frame (its virtio-net header stripped) in one or more slots. A chain that does
    not fit in the space left stays in the queue for the next call. With ``vq.host_offloads``, a frame whose
    header asks for a checksum or segmentation keeps header and offloads when it asks for no more than
    ``vq.pass_offloads`` and the header is VIRTIO_NET_HDR (its slots then hold header and frame, NS_VNET_HDR
    on the first); otherwise it is completed first (netmap/offload.py) and its frames fill the slots. One
    whose header it does not bear out, or with more segments than the ring holds, is dropped and counted in
    ``bad_headers`` too. Raises VirtqueueError on a driver fault.
    """
    num_slots = len(slots)
    res = BatchResult()
    pending = vq.pending()
    pos = first
    while pending and space:
        chain = vq.pop(writable=False)
        pending -= 1
        length = chain.length - hdr_len
        if length <= 0 or length > MAX_FRAME:
            if length < 0:
                raise VirtqueueError(
                    vq.index, f"chain {chain.head} of {chain.length} bytes is shorter than its header"
                )
            # An empty or oversized frame is the guest's business: complete it and count the drop.
            vq.push_used(chain.head, 0)
            res.dropped += 1
            continue
        data = _read(mem, chain) if vq.host_offloads else b""
        skip, mark = hdr_len, 0
        if len(data) >= VIRTIO_NET_HDR_LEGACY.size:
            h = VnetHeader.unpack(data)
            if h.asks_for_work and hdr_len == VIRTIO_NET_HDR.size and not needs(h) & ~vq.pass_offloads:
                try:
                    check(h, data[hdr_len : hdr_len + HEAD_MAX], length)
                except OffloadError:
                    vq.push_used(chain.head, 0)
                    res.dropped += 1
                    res.bad_headers += 1
                    continue
                skip, mark = 0, NS_VNET_HDR
            elif h.asks_for_work:
                frame = data[hdr_len:]
                try:
                    frames = complete(h, frame, OFFLOAD_SEGS, OFFLOAD_OUT)
                except OffloadError:
                    frames = None
                need = sum(-(-len(f) // bufs.size) for f in frames or ())
                if frames is not None and space < need < num_slots:
                    vq.unpop()
                    break
                vq.push_used(chain.head, 0)
                if frames is None or need >= num_slots:
                    res.dropped += 1
                    res.bad_headers += 1
                    continue
                for f in frames:
                    pos = _fill(slots, pos, f, bufs)
                    res.packets += 1
                    res.bytes += len(f)
                space -= need
                res.slots += need
                res.offloaded += 1
                continue
        need = -(-(length + hdr_len - skip) // bufs.size)
        if need > space:
            vq.unpop()
            break
        _gather(mem, chain, skip, slots, pos, need, bufs, length + hdr_len - skip)
        slots[pos]["flags"] |= mark
        res.passed += bool(mark)
        vq.push_used(chain.head, 0)
        pos = (pos + need) % num_slots
        space -= need
        res.slots += need
        res.packets += 1
        res.bytes += length
    return res


def _gather(
    mem: GuestMemory,
    chain: Chain,
    skip: int,
    slots: npt.NDArray[np.void],
    pos: int,
    nslots: int,
    bufs: Buffers,
    length: int,
) -> None:
    """Copy ``chain`` minus its first ``skip`` bytes into ``nslots`` consecutive slots from ``pos``."""
    num_slots = len(slots)
    slot = pos
    filled = 0  # bytes in the current slot's buffer
    left = length
    dst = bufs.view(int(slots[slot]["buf_idx"]), bufs.size)
    for gpa, seg_len in chain.segments:
        if skip >= seg_len:
            skip -= seg_len
            continue
        src = np.frombuffer(mem.view(gpa + skip, seg_len - skip), dtype=np.uint8)
        skip = 0
        off = 0
        while off < len(src):
            if filled == bufs.size:
                _close_slot(slots, slot, filled, more=True)
                slot = (slot + 1) % num_slots
                dst = bufs.view(int(slots[slot]["buf_idx"]), bufs.size)
                filled = 0
            n = min(len(src) - off, bufs.size - filled)
            dst[filled : filled + n] = src[off : off + n]
            filled += n
            off += n
            left -= n
    _close_slot(slots, slot, filled, more=False)
    assert left == 0 and (slot - pos) % num_slots == nslots - 1


def _read(mem: GuestMemory, chain: Chain) -> bytes:
    """The bytes of ``chain``, header included."""
    return b"".join(mem.read(gpa, n) for gpa, n in chain.segments)


def _fill(slots: npt.NDArray[np.void], pos: int, frame: bytes, bufs: Buffers) -> int:
    """Copy ``frame`` into the slots from ``pos``, a buffer each at most; the position after them."""
    for off in range(0, len(frame), bufs.size):
        piece = frame[off : off + bufs.size]
        bufs.view(int(slots[pos]["buf_idx"]), len(piece))[:] = np.frombuffer(piece, dtype=np.uint8)
        _close_slot(slots, pos, len(piece), more=off + bufs.size < len(frame))
        pos = (pos + 1) % len(slots)
    return pos


def _close_slot(slots: npt.NDArray[np.void], slot: int, length: int, more: bool) -> None:
    slots[slot]["len"] = length
    slots[slot]["flags"] = NS_MOREFRAG if more else 0


def enqueue(
    vq: Virtqueue,
    mem: GuestMemory,
    hdr_len: int,
    mergeable: bool,
    slots: npt.NDArray[np.void],
    first: int,
    count: int,
    bufs: Buffers,
) -> BatchResult:
    """Deliver the frames in ``count`` slots from ``first`` into the guest's receive queue.

    Stops early, leaving the rest for later, when the guest has no receive buffers left (backpressure) or
    the last frame's final slot is not among the ``count`` yet. A frame that cannot fit the guest's buffers
    (without mergeable buffers, a chain too small) is dropped and counted. A frame with its virtio-net header
    (NS_VNET_HDR) is delivered with it when the driver takes what it asks (``vq.guest_offloads``) and it
    passes the checks of a transmitted one; when the driver does not take it, its offloads are completed and
    its segments delivered, all or (no room) none (counted in ``offloaded``); a header it does not bear out
    drops it, counted in ``bad_headers`` too. ``slots`` of the result is how many slots were consumed.
    """
    num_slots = len(slots)
    res = BatchResult()
    done = 0
    while done < count:
        frame = _frame_at(slots, (first + done) % num_slots, count - done)
        if frame is None:
            break  # its last fragment has not been published yet
        nfrag, _ = frame
        pos = (first + done) % num_slots
        data = _frame_bytes(slots, pos, nfrag, bufs)
        out = _frames_for(vq, slots[pos], data)
        if out is None:
            res.dropped += 1
            res.bad_headers += 1
            done += nfrag
            continue
        if not _deliver(vq, mem, hdr_len, mergeable, out, res):
            break  # the guest has no room now; its next kick brings us back
        if out[0][0] is COMPLETED:
            res.offloaded += 1
        done += nfrag
    res.slots = done
    return res


def _deliver(
    vq: Virtqueue,
    mem: GuestMemory,
    hdr_len: int,
    mergeable: bool,
    frames: list[tuple[VnetHeader, npt.NDArray[np.uint8]]],
    res: BatchResult,
) -> bool:
    """Deliver ``frames`` (one slot frame: itself, or its segments) with their headers; False, with
    nothing of them left delivered or counted, when the guest runs out of receive chains before the last."""
    before = astuple(res)
    taken = 0  # chains taken, and used entries queued, for the frames so far
    for h, data in frames:
        try:
            chains = _reserve(vq, hdr_len, hdr_len + len(data), mergeable)
        except VirtqueueError:
            vq.retract_used(taken)  # the frame was not delivered: none of its entries is published
            raise
        if chains is None:
            # Segments go whole or not at all: give back what the earlier ones took (their bytes stay
            # written in buffers the guest still owns, as the compiled kernel leaves them).
            for _ in range(taken):
                vq.unpop()
            vq.retract_used(taken)
            for name, value in zip(BatchResult.__dataclass_fields__, before, strict=True):
                setattr(res, name, value)
            return False
        taken += len(chains)
        if sum(c.length for c in chains) < hdr_len + len(data):
            for c in chains:
                vq.push_used(c.head, 0)
            res.dropped += 1
        else:
            _scatter(vq, mem, chains, hdr_len, h, data)
            res.packets += 1
            res.bytes += len(data)
    return True


def _frame_bytes(slots: npt.NDArray[np.void], pos: int, nfrag: int, bufs: Buffers) -> npt.NDArray[np.uint8]:
    """The bytes of the frame of ``nfrag`` slots from ``pos``."""
    num_slots = len(slots)
    return np.concatenate(
        [
            bufs.view(int(slots[(pos + k) % num_slots]["buf_idx"]), int(slots[(pos + k) % num_slots]["len"]))
            for k in range(nfrag)
        ]
    )


# The header of a segment (or frame) whose offloads were completed for a driver that does not take them.
COMPLETED = VnetHeader()


def _frames_for(
    vq: Virtqueue, first: np.void, data: npt.NDArray[np.uint8]
) -> list[tuple[VnetHeader, npt.NDArray[np.uint8]]] | None:
    """What a frame whose first slot is ``first`` becomes for the driver, each with the offloads of the
    header to write before it: the frame with none; or, with its own header (NS_VNET_HDR), the frame with it
    when the driver takes what it asks and it passes `check`, else its offloads completed (the segments,
    each with COMPLETED), as netmap's VALE does for a port without them. None: it is to be dropped (a header
    it does not bear out)."""
    if not int(first["flags"]) & NS_VNET_HDR:
        return [(VnetHeader(), data)]
    if len(data) < VIRTIO_NET_HDR.size:
        return None
    raw, frame = data[: VIRTIO_NET_HDR.size].tobytes(), data[VIRTIO_NET_HDR.size :]
    try:
        return [(for_receiver(raw, frame[:HEAD_MAX].tobytes(), len(frame), vq.guest_offloads), frame)]
    except OffloadError as e:
        if e.status != lib.NM_OFF_NOT_TAKEN:
            return None
    if len(frame) > MAX_FRAME:
        return None  # larger than any guest sends (an application's?): not a frame to segment
    try:
        segments = complete(VnetHeader.unpack(raw), frame.tobytes(), OFFLOAD_SEGS, OFFLOAD_OUT)
    except OffloadError:
        return None
    return [(COMPLETED, np.frombuffer(seg, dtype=np.uint8)) for seg in segments]


def _frame_at(slots: npt.NDArray[np.void], pos: int, available: int) -> tuple[int, int] | None:
    """(fragments, bytes) of the frame starting at ``pos``, or None when it is not complete yet."""
    num_slots = len(slots)
    length = 0
    for i in range(available):
        s = slots[(pos + i) % num_slots]
        length += int(s["len"])
        if not int(s["flags"]) & NS_MOREFRAG:
            return i + 1, length
    return None


def _reserve(vq: Virtqueue, hdr_len: int, need: int, mergeable: bool) -> list[Chain] | None:
    """Receive chains holding ``need`` bytes (one chain without mergeable buffers), or None if too few.

    A chain that cannot hold the virtio-net header is a driver fault (spec 5.1.6.3.1: with MRG_RXBUF each
    buffer MUST hold the header, which must not be split; without it such a chain never carries a frame).
    """
    chains: list[Chain] = []
    got = 0
    pending = vq.pending()
    while got < need:
        if not pending:
            for _ in chains:
                vq.unpop()
            return None
        chain = vq.pop(writable=True)
        if chain.length < hdr_len:
            raise VirtqueueError(
                vq.index, f"receive chain {chain.head} of {chain.length} bytes is shorter than its header"
            )
        pending -= 1
        chains.append(chain)
        got += chain.length
        if not mergeable:
            break
    return chains


def _scatter(
    vq: Virtqueue,
    mem: GuestMemory,
    chains: list[Chain],
    hdr_len: int,
    h: VnetHeader,
    frame: npt.NDArray[np.uint8],
) -> None:
    """Write the virtio-net header (offloads ``h``) and ``frame`` across ``chains``."""
    header = VIRTIO_NET_HDR.pack(*astuple(h), len(chains))[:hdr_len]
    data = np.concatenate([np.frombuffer(header, dtype=np.uint8), frame]) if hdr_len else frame
    off = 0
    for chain in chains:
        written = 0
        for gpa, seg_len in chain.segments:
            if off == len(data):
                break
            n = min(seg_len, len(data) - off)
            mem.view(gpa, n)[:] = data[off : off + n].tobytes()
            if vq.log_dirty:
                mem.log_write(gpa, n)
            off += n
            written += n
        vq.push_used(chain.head, written)
    assert off == len(data)
