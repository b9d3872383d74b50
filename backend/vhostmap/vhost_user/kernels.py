"""The datapath of a vhost-user port: the compiled split-virtqueue kernels (datapath/virtio.c) behind the
calls of the reference in rxtx.py, and the choice between the two (ARCHITECTURE.md: "Per-packet work lives
in compiled kernels").

A port runs a ``Datapath``: a ``dequeue`` and an ``enqueue`` with the arguments of rxtx.dequeue and
rxtx.enqueue, returning the same BatchResult, each finishing its batch as the port used to after the
reference: used entries published (``flush_used``), the interrupt decided and sent (``call``), kicks re-armed
(``enable_kicks``). ``COMPILED`` runs the whole batch in one C call; ``REFERENCE`` is the pure-Python code.

The SplitVirtqueue stays the owner of the ring state: last_avail_idx, used_idx and signalled_used go into the
kernel and come back after every batch. A driver fault raises the VirtqueueError the reference raises, with
the same message, and leaves the same state: the chains completed before the fault stay unpublished in the
queue's pending used list.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import ffi, lib
from vhostmap.netmap.kring import Kring
from vhostmap.vhost_user import rxtx
from vhostmap.vhost_user.errors import GuestMemoryError
from vhostmap.vhost_user.memory import GuestMemory
from vhostmap.vhost_user.rxtx import BatchResult, Buffers
from vhostmap.vhost_user.virtqueue import MAX_CHAIN_LENGTH, SplitVirtqueue, VirtqueueError
from vhostmap.virtio.spec import vring_avail_size, vring_desc_size, vring_used_size

#: Set to 1 to run the pure-Python reference datapath in every port.
REFERENCE_ENV = "VHOSTMAP_REFERENCE_DATAPATH"

DequeueFn = Callable[[SplitVirtqueue, GuestMemory, int, npt.NDArray[np.void], int, int, Buffers], BatchResult]
EnqueueFn = Callable[
    [SplitVirtqueue, GuestMemory, int, bool, npt.NDArray[np.void], int, int, Buffers], BatchResult
]

_FAULT_REASONS = {
    lib.VM_FAULT_ADDRESS_SPACE: "range outside the 64-bit address space",
    lib.VM_FAULT_NO_REGIONS: "no memory regions",
    lib.VM_FAULT_NO_REGION: "guest address in no region",
}


RxsyncFn = Callable[[Kring, SplitVirtqueue, GuestMemory, int, Buffers], BatchResult | None]
TxsyncFn = Callable[[Kring, SplitVirtqueue, GuestMemory, int, bool, Buffers], BatchResult | None]


class Datapath(NamedTuple):
    """The batch functions a port runs; each finishes its batch (publish, notify, re-arm kicks).

    ``rxsync``/``txsync``, when there, run a whole kring sync (prologue, dequeue or enqueue, finalize) in one
    call, returning None when the prologue refused the ring (then nothing was done); without them the port
    runs NetmapAdapter's Python sync around ``dequeue``/``enqueue``.
    """

    name: str
    dequeue: DequeueFn
    enqueue: EnqueueFn
    rxsync: RxsyncFn | None = None
    txsync: TxsyncFn | None = None


# --- the compiled kernels -----------------------------------------------------------------------------------


def _address(buf: Any) -> int:
    """Where ``buf``'s bytes are. The export is released at once: the address stays valid as long as ``buf``
    lives, which _Binding checks before every use."""
    anchor = ffi.from_buffer(buf)
    try:
        return int(ffi.cast("uintptr_t", anchor))
    finally:
        ffi.release(anchor)


class _Binding:
    """The C structs describing one queue, its guest memory and the netmap ring it is synced with.

    Made on the first batch and kept while the objects behind its addresses stay the same: the ring views of
    the queue, the memory table and the netmap slots and buffers. It holds them through weak references only,
    so that it never keeps guest memory mapped after the front-end took it back, and an address is only used
    after its object was found alive and still in use (a remap or a new table makes a new binding).
    """

    __slots__ = ("log", "memory", "num", "out", "pending", "queue", "refs", "ring")

    def __init__(
        self, vq: SplitVirtqueue, mem: GuestMemory, slots: npt.NDArray[np.void], bufs: Buffers
    ) -> None:
        desc, avail, used = vq._desc, vq._avail, vq._used
        if desc is None or avail is None or used is None:
            raise VirtqueueError(vq.index, "ring not mapped")
        num = vq.num
        # SplitVirtqueue.map made the views for `num` entries; the kernel relies on it, so say it once more.
        if (
            len(desc) < vring_desc_size(num)
            or len(avail) < vring_avail_size(num)
            or len(used) < vring_used_size(num)
        ):
            raise VirtqueueError(vq.index, f"ring views do not cover {num} entries")
        table = mem.table
        assert table.dtype.itemsize == ffi.sizeof("struct vm_region")
        assert slots.dtype.itemsize == ffi.sizeof("struct nm_slot") and slots.flags.c_contiguous
        self.refs = tuple(weakref.ref(obj) for obj in (vq, desc, avail, used, table, slots, bufs))
        self.num = num

        self.queue = ffi.new("struct vq_split *")
        q = self.queue
        q.desc = ffi.cast("uint8_t *", _address(desc))
        q.avail = ffi.cast("uint8_t *", _address(avail))
        q.used = ffi.cast("uint8_t *", _address(used))
        q.num = num

        self.memory = ffi.new("struct vm_memory *")
        self.memory.regions = ffi.cast("struct vm_region *", _address(table)) if len(table) else ffi.NULL
        self.memory.nregions = len(table)
        self.memory.log = ffi.NULL
        self.log: object = None

        self.ring = ffi.new("struct nm_bufs *")
        r = self.ring
        r.slots = ffi.cast("struct nm_slot *", _address(slots))
        r.num_slots = len(slots)
        r.buf_size = bufs.size
        r.base = ffi.cast("uint8_t *", _address(bufs.region) + bufs.base)
        # Every buffer index the kernel accepts names bytes inside the region.
        r.nbufs = min(max((bufs.region.nbytes - bufs.base) // bufs.size, 0), 0xFFFF_FFFF)

        self.out = ffi.new("struct vq_batch *")
        self.pending = ffi.new("struct vq_used_elem[]", num)

    def matches(
        self, vq: SplitVirtqueue, mem: GuestMemory, slots: npt.NDArray[np.void], bufs: Buffers
    ) -> bool:
        """Whether every address here still means what it meant when the binding was made."""
        r = self.refs
        return (
            r[0]() is vq
            and vq.num == self.num
            and r[1]() is vq._desc
            and r[2]() is vq._avail
            and r[3]() is vq._used
            and r[4]() is mem.table
            and r[5]() is slots
            and r[6]() is bufs
        )


# One binding per queue and netmap ring (a receive queue may be fed by several TX krings), dropped with the
# queue.
_bindings: dict[tuple[int, int], _Binding] = {}


def _bind(vq: SplitVirtqueue, mem: GuestMemory, slots: npt.NDArray[np.void], bufs: Buffers) -> _Binding:
    key = (id(vq), id(slots))
    b = _bindings.get(key)
    if b is None or not b.matches(vq, mem, slots, bufs):
        b = _Binding(vq, mem, slots, bufs)
        if key not in _bindings:
            weakref.finalize(vq, _bindings.pop, key, None)
        _bindings[key] = b
    return b


def _load(b: _Binding, vq: SplitVirtqueue, mem: GuestMemory) -> Any:
    """Copy the queue's state into the binding's struct; returns the struct."""
    if vq._pending_used:
        vq.flush_used()  # entries someone queued outside a batch go first, as the reference would send them
    q = b.queue
    q.last_avail_idx = vq.last_avail_idx
    q.used_idx = vq.used_idx
    q.signalled_used = vq.signalled_used
    q.event_idx = vq.event_idx
    q.indirect = vq.indirect
    q.log_dirty = vq.log_dirty
    q.kicks = vq.kicks
    log = mem._log if vq.log_dirty else None
    if log is not b.log:
        b.memory.log = log.ptr if log is not None else ffi.NULL
        b.memory.log_size = log.size if log is not None else 0
        b.log = log
    if vq.log_dirty:
        a = vq.addresses
        q.log_used = a is not None and a.log_used
        q.log_used_addr = a.log_guest_addr if a is not None else 0
    return q


def _finish(b: _Binding, vq: SplitVirtqueue, mem: GuestMemory, status: int, writable: bool) -> BatchResult:
    """Copy the state back, raise the fault if there was one, notify, and count."""
    q, out = b.queue, b.out
    vq.last_avail_idx = q.last_avail_idx
    if out.log_missed:
        # The pages were skipped already; this only lets GuestMemory warn about them, once per log.
        mem.log_write(out.log_missed_addr, out.log_missed_len)
    if status != lib.VQ_OK:
        if status == lib.VQ_ERR_ARGUMENT:
            raise ValueError(f"virtqueue {vq.index}: kernel refused the ring or position it was given")
        for k in range(out.used):
            vq.push_used(b.pending[k].id, b.pending[k].len)
        raise _fault(vq, out, status, writable)
    vq.used_idx = q.used_idx
    vq.signalled_used = q.signalled_used
    if out.notify and vq.call_fd is not None:
        os.eventfd_write(vq.call_fd, 1)
    return BatchResult(out.slots, out.packets, out.bytes, out.dropped)


def _fault(vq: SplitVirtqueue, out: Any, status: int, writable: bool) -> VirtqueueError:
    """The VirtqueueError the reference raises for the fault in ``out``, word for word (``writable``: the
    queue's chains are device-writable, a receive queue)."""
    i = out.err_desc
    cause: GuestMemoryError | None = None
    if status == lib.VQ_ERR_AVAIL_IDX:
        reason = f"available index moved {out.err_value} entries ahead of the device, beyond size {vq.num}"
    elif status == lib.VQ_ERR_HEAD:
        reason = f"available ring entry {out.err_slot} names descriptor {i} >= {vq.num}"
    elif status == lib.VQ_ERR_INDIRECT_OFF:
        reason = f"indirect descriptor {i} but INDIRECT_DESC not negotiated"
    elif status == lib.VQ_ERR_NESTED_INDIRECT:
        reason = f"nested indirect table at descriptor {i}"
    elif status == lib.VQ_ERR_INDIRECT_NEXT:
        reason = f"descriptor {i} has both INDIRECT and NEXT"
    elif status == lib.VQ_ERR_INDIRECT_LEN:
        reason = f"indirect table at descriptor {i} has bad length {out.err_value}"
    elif status in (lib.VQ_ERR_INDIRECT_MEM, lib.VQ_ERR_BUFFER_MEM):
        f = out.fault
        why = _FAULT_REASONS.get(f.reason) or (
            f"crosses the end of the region at {f.region_gpa:#x}+{f.region_size:#x}"
        )
        cause = GuestMemoryError(f.addr, f.len, why)
        what = "indirect table" if status == lib.VQ_ERR_INDIRECT_MEM else "buffer"
        reason = f"{what} of descriptor {i}: {cause}"
    elif status == lib.VQ_ERR_DIRECTION:
        kind = "read-only" if writable else "device-writable"
        reason = f"{kind} descriptor {i} in a chain that must not have one"
    elif status == lib.VQ_ERR_NEXT:
        reason = f"descriptor {i} links to {out.err_value}, beyond the table of {out.err_size}"
    elif status == lib.VQ_ERR_LOOP:
        reason = f"chain from head {out.err_head} is longer than {MAX_CHAIN_LENGTH} (a loop?)"
    elif status == lib.VQ_ERR_SHORT_TX:
        reason = f"chain {out.err_head} of {out.err_value} bytes is shorter than its header"
    elif status == lib.VQ_ERR_SHORT_RX:
        reason = f"receive chain {out.err_head} of {out.err_value} bytes is shorter than its header"
    else:
        reason = f"kernel status {status}"
    err = VirtqueueError(vq.index, reason)
    err.__cause__ = cause
    return err


def dequeue(
    vq: SplitVirtqueue,
    mem: GuestMemory,
    hdr_len: int,
    slots: npt.NDArray[np.void],
    first: int,
    space: int,
    bufs: Buffers,
) -> BatchResult:
    """rxtx.dequeue, then flush_used, call and enable_kicks, in one compiled call (vq_dequeue)."""
    b = _bind(vq, mem, slots, bufs)
    q = _load(b, vq, mem)
    status = lib.vq_dequeue(q, b.memory, b.ring, hdr_len, first, space, b.pending, b.out)
    return _finish(b, vq, mem, status, False)


def enqueue(
    vq: SplitVirtqueue,
    mem: GuestMemory,
    hdr_len: int,
    mergeable: bool,
    slots: npt.NDArray[np.void],
    first: int,
    count: int,
    bufs: Buffers,
) -> BatchResult:
    """rxtx.enqueue, then flush_used, call and enable_kicks, in one compiled call (vq_enqueue)."""
    b = _bind(vq, mem, slots, bufs)
    q = _load(b, vq, mem)
    status = lib.vq_enqueue(q, b.memory, b.ring, hdr_len, mergeable, first, count, b.pending, b.out)
    return _finish(b, vq, mem, status, True)


def rxsync(
    kring: Kring, vq: SplitVirtqueue, mem: GuestMemory, hdr_len: int, bufs: Buffers
) -> BatchResult | None:
    """The RX sync of a vhost-user port's kring in one compiled call (vhu_rxsync): prologue, rxtx.dequeue into
    the free slots, flush_used, call, enable_kicks, finalize. None if the prologue refused the ring."""
    b = _bind(vq, mem, kring.ring.slots, bufs)
    q = _load(b, vq, mem)
    status = lib.vhu_rxsync(kring.c, q, b.memory, hdr_len, b.pending, b.out)
    if status == lib.VHU_REJECT:
        return None
    return _finish(b, vq, mem, status, False)


def txsync(
    kring: Kring, vq: SplitVirtqueue, mem: GuestMemory, hdr_len: int, mergeable: bool, bufs: Buffers
) -> BatchResult | None:
    """The TX sync of a vhost-user port's kring in one compiled call (vhu_txsync): prologue, rxtx.enqueue of
    [hwcur, head), flush_used, call, enable_kicks, finalize. None if the prologue refused the ring."""
    b = _bind(vq, mem, kring.ring.slots, bufs)
    q = _load(b, vq, mem)
    status = lib.vhu_txsync(kring.c, q, b.memory, hdr_len, mergeable, b.pending, b.out)
    if status == lib.VHU_REJECT:
        return None
    return _finish(b, vq, mem, status, True)


# --- the reference, finished the same way -------------------------------------------------------------------


def _complete(vq: SplitVirtqueue) -> None:
    vq.flush_used()
    vq.call()
    vq.enable_kicks()


def reference_dequeue(
    vq: SplitVirtqueue,
    mem: GuestMemory,
    hdr_len: int,
    slots: npt.NDArray[np.void],
    first: int,
    space: int,
    bufs: Buffers,
) -> BatchResult:
    """rxtx.dequeue, then flush_used, call and enable_kicks."""
    res = rxtx.dequeue(vq, mem, hdr_len, slots, first, space, bufs)
    _complete(vq)
    return res


def reference_enqueue(
    vq: SplitVirtqueue,
    mem: GuestMemory,
    hdr_len: int,
    mergeable: bool,
    slots: npt.NDArray[np.void],
    first: int,
    count: int,
    bufs: Buffers,
) -> BatchResult:
    """rxtx.enqueue, then flush_used, call and enable_kicks."""
    res = rxtx.enqueue(vq, mem, hdr_len, mergeable, slots, first, count, bufs)
    _complete(vq)
    return res


COMPILED = Datapath("compiled", dequeue, enqueue, rxsync, txsync)
REFERENCE = Datapath("reference", reference_dequeue, reference_enqueue)


def select_datapath(reference: bool | None = None) -> Datapath:
    """REFERENCE if asked for (``reference``, else the VHOSTMAP_REFERENCE_DATAPATH environment variable set to
    anything but 0), COMPILED otherwise."""
    if reference is None:
        reference = os.environ.get(REFERENCE_ENV, "0").strip() not in ("", "0")
    return REFERENCE if reference else COMPILED
