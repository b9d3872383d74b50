"""The datapath of a vhost-user port: the compiled split-virtqueue kernels (datapath/virtio.c) behind the
calls of the reference in rxtx.py (docs/architecture.md: "Per-packet work lives in compiled kernels").

A port runs a ``Datapath``: one ``dequeue`` and one ``enqueue`` with the arguments of rxtx.dequeue and
rxtx.enqueue, returning the same BatchResult, each finishing its batch as the port used to after the
reference: used entries published (``flush_used``), the interrupt decided and sent (``call``), kicks re-armed
(``enable_kicks``). ``COMPILED`` runs the whole batch in one C call, and lets a port run whole kring syncs and
forwarding rounds in one call too (vhost_sync.cdef, VhostUserPort.fast_queues); ``REFERENCE`` runs the
pure-Python code. ``select_datapath`` picks one as datapath/choice.py decides.

The kernels work on the C state the objects keep for them: the SplitVirtqueue's struct vq_split (its indexes
and ring addresses), the GuestMemory's struct vm_memory (its table and log), the Kring's struct nm_kring, so a
batch copies nothing in or out. A driver fault raises the VirtqueueError the reference raises, with
the same message, and leaves the same state: the chains completed before the fault stay unpublished in the
queue's pending used list.

A packed virtqueue (PackedVirtqueue, VIRTIO_F_RING_PACKED) runs its batches in one C call too (vqp_dequeue,
vqp_enqueue: the same batch logic as the split ring's, datapath/ring_batch.h, over packed_ring.h), on its
struct vq_packed and the scratch of its packed_kernels.CompiledPackedRing; or, with REFERENCE, rxtx.dequeue /
rxtx.enqueue over the queue itself. The compiled syncs and passes (VhostUserPort.fast_queues) run over it as
over a split queue, with the same out and scratch (``packed_ring``).

Guest memory the front-end shrank under us (GuestMemory.gone: the SIGBUS guard replaced it with zero pages)
is a driver fault too, in both datapaths: the batch that saw it counts for nothing and raises a
VirtqueueError naming the region, so the port marks that device broken and nothing else stops.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import eventfds, ffi, lib
from vhostmap.datapath.choice import reference_selected
from vhostmap.vhost_user import rxtx
from vhostmap.vhost_user.errors import GuestMemoryError
from vhostmap.vhost_user.memory import FAULT_REASONS, GuestMemory
from vhostmap.vhost_user.packed import PackedVirtqueue
from vhostmap.vhost_user.packed_kernels import CompiledPackedRing, packed_fault
from vhostmap.vhost_user.rxtx import BatchResult, Buffers
from vhostmap.vhost_user.virtqueue import MAX_CHAIN_LENGTH, CallRefused, SplitVirtqueue, VirtqueueError

# What a compiled sync returns when the batch went through but the call eventfd refused its interrupt.
_CALL_STATUSES = frozenset(s.value for s in eventfds.Signal if s != eventfds.Signal.OK)

_FAULT_REASONS = FAULT_REASONS


# --- the compiled kernels -----------------------------------------------------------------------------------


def _address(buf: Any) -> int:
    """Where ``buf``'s bytes are. The export is released at once: the address stays valid as long as ``buf``
    lives, which _Ring checks before every use."""
    anchor = ffi.from_buffer(buf)
    try:
        return int(ffi.cast("uintptr_t", anchor))
    finally:
        ffi.release(anchor)


class _Ring:
    """struct nm_bufs for a slot array and the buffers it names, for the slot-level calls (``dequeue``,
    ``enqueue``; a kring has its own). Made on first use and kept while both objects live: it holds them
    through weak references, and a new array makes a new one."""

    __slots__ = ("c", "refs")

    def __init__(self, slots: npt.NDArray[np.void], bufs: Buffers) -> None:
        assert slots.dtype.itemsize == ffi.sizeof("struct nm_slot") and slots.flags.c_contiguous
        self.refs = (weakref.ref(slots), weakref.ref(bufs))
        r = self.c = ffi.new("struct nm_bufs *")
        r.slots = ffi.cast("struct nm_slot *", _address(slots))
        r.num_slots = len(slots)
        r.buf_size = bufs.size
        r.base = ffi.cast("uint8_t *", _address(bufs.region) + bufs.base)
        # Every buffer index the kernel accepts names bytes inside the region.
        r.nbufs = min(max((bufs.region.nbytes - bufs.base) // bufs.size, 0), 0xFFFF_FFFF)


_rings: dict[int, _Ring] = {}


def _ring(slots: npt.NDArray[np.void], bufs: Buffers) -> Any:
    r = _rings.get(id(slots))
    if r is None or r.refs[0]() is not slots or r.refs[1]() is not bufs:
        r = _Ring(slots, bufs)
        if id(slots) not in _rings:
            weakref.finalize(slots, _rings.pop, id(slots), None)
        _rings[id(slots)] = r
    return r.c


def _start(vq: SplitVirtqueue) -> Any:
    """The queue's C state, ready for a batch: checked mapped, entries queued outside a batch published."""
    if vq._desc is None or vq._avail is None or vq._used is None:
        raise VirtqueueError(vq.index, "ring not mapped")
    if vq._pending_used:
        vq.flush_used()  # entries someone queued outside a batch go first, as the reference would send them
    return vq.c


def finish(
    vq: SplitVirtqueue | PackedVirtqueue, mem: GuestMemory, status: int, writable: bool
) -> BatchResult:
    """After a kernel call on ``vq`` that returned ``status``: raise the fault if there was one (its used
    entries queued for publication), notify, and count (``writable``: a receive queue). A packed queue's
    kernels wrote into the out and scratch of its ``packed_ring``."""
    if isinstance(vq, PackedVirtqueue):
        ring = packed_ring(vq, mem)
        return _finish(vq, mem, status, writable, ring.out, ring.scratch(), _fault)
    return _finish(vq, mem, status, writable, vq.out, vq.scratch, _fault)


def packed_ring(vq: PackedVirtqueue, mem: GuestMemory) -> CompiledPackedRing:
    """The CompiledPackedRing of ``vq`` over ``mem`` (made on first use and for new memory): its ``out`` and
    ``scratch`` are where the batch kernels and the passes (VhostUserPort.fast_queues) leave a batch."""
    ring = vq.compiled_ring
    if ring is None or ring.mem is not mem:
        ring = vq.compiled_ring = CompiledPackedRing(vq, mem)
    return ring


def _finish(
    vq: SplitVirtqueue | PackedVirtqueue,
    mem: GuestMemory,
    status: int,
    writable: bool,
    out: Any,
    pending: Any,
    fault: Callable[[Any, Any, int, bool], VirtqueueError],
) -> BatchResult:
    """finish, for either layout: ``out`` and ``pending`` are the batch's struct vq_batch and used entries,
    ``fault`` makes the VirtqueueError of a fault in ``out``."""
    if out.log_missed:
        # The pages were skipped already; this only lets GuestMemory warn about them, once per log.
        mem.log_write(out.log_missed_addr, out.log_missed_len)
    if status in _CALL_STATUSES:
        # The batch went through (published and counted); only its interrupt was refused.
        raise CallRefused(vq.index, eventfds.Signal(status))
    if status != lib.VQ_OK:
        if status == lib.VQ_ERR_MEMORY_GONE:
            # Nothing of the batch counts (it read zero pages): no used entries to queue.
            raise memory_gone(vq, mem)
        if status == lib.VQ_ERR_ARGUMENT:
            raise ValueError(f"virtqueue {vq.index}: kernel refused the ring or position it was given")
        for k in range(out.used):
            vq.push_used(pending[k].id, pending[k].len)
        raise fault(vq, out, status, writable)
    res = BatchResult(
        out.slots, out.packets, out.bytes, out.dropped, out.bad_headers, out.offloaded, out.passed
    )
    if out.notify and vq.call_fd is not None:
        result = eventfds.signal(vq.call_fd)
        if result != eventfds.Signal.OK:
            refused = CallRefused(vq.index, result)
            refused.batch = res
            raise refused
        vq.c.calls += 1
    return res


def memory_gone(vq: SplitVirtqueue | PackedVirtqueue, mem: GuestMemory) -> VirtqueueError:
    """The fault of a batch on ``vq`` that ran while (or after) the front-end shrank ``mem`` under us."""
    return VirtqueueError(vq.index, mem.gone_reason() or "guest memory shrank under the backend (SIGBUS)")


def _fault(vq: Any, out: Any, status: int, writable: bool) -> VirtqueueError:
    """The VirtqueueError the reference raises for the fault in ``out``, word for word (``writable``: the
    queue's chains are device-writable, a receive queue; a packed ring's walk faults are packed_fault's)."""
    if isinstance(vq, PackedVirtqueue) and status not in (lib.VQ_ERR_SHORT_TX, lib.VQ_ERR_SHORT_RX):
        return packed_fault(vq, out, status, writable)
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


# --- the datapath a port runs: one piece of code for the compiled kernels and the reference -----------------


@dataclass(frozen=True, slots=True)
class Datapath:
    """The batch functions a port runs, compiled or reference; each finishes its batch (publish, notify,
    re-arm kicks), so a port calls them the same way whichever it runs.

    ``compiled``: each batch is one C call (vq_dequeue, vq_enqueue), and the port may also run whole kring
    syncs and forwarding rounds in C (vhost_sync.cdef, through VhostUserPort.fast_queues); otherwise the
    reference in rxtx.py runs, and the port runs NetmapAdapter's Python sync around ``dequeue``/``enqueue``.
    """

    compiled: bool

    @property
    def name(self) -> str:
        """Which one this is, "compiled" or "reference" (for logs)."""
        return "compiled" if self.compiled else "reference"

    def dequeue(
        self,
        vq: SplitVirtqueue | PackedVirtqueue,
        mem: GuestMemory,
        hdr_len: int,
        slots: npt.NDArray[np.void],
        first: int,
        space: int,
        bufs: Buffers,
    ) -> BatchResult:
        """rxtx.dequeue, then flush_used, call and enable_kicks (compiled: all in one call, vq_dequeue, or
        vqp_dequeue for a packed ring)."""
        if isinstance(vq, PackedVirtqueue):
            if self.compiled:
                return _packed(
                    vq,
                    mem,
                    False,
                    lambda r, p, o: lib.vqp_dequeue(
                        vq.c, mem.c, _ring(slots, bufs), hdr_len, first, space, p, o
                    ),
                )
            return _reference(vq, mem, lambda: rxtx.dequeue(vq, mem, hdr_len, slots, first, space, bufs))
        if not self.compiled:
            return _reference(vq, mem, lambda: rxtx.dequeue(vq, mem, hdr_len, slots, first, space, bufs))
        q = _start(vq)
        status = lib.vq_dequeue(q, mem.c, _ring(slots, bufs), hdr_len, first, space, vq.scratch, vq.out)
        return finish(vq, mem, status, False)

    def enqueue(
        self,
        vq: SplitVirtqueue | PackedVirtqueue,
        mem: GuestMemory,
        hdr_len: int,
        mergeable: bool,
        slots: npt.NDArray[np.void],
        first: int,
        count: int,
        bufs: Buffers,
    ) -> BatchResult:
        """rxtx.enqueue, then flush_used, call and enable_kicks (compiled: all in one call, vq_enqueue, or
        vqp_enqueue for a packed ring)."""
        if isinstance(vq, PackedVirtqueue):
            if self.compiled:
                return _packed(
                    vq,
                    mem,
                    True,
                    lambda r, p, o: lib.vqp_enqueue(
                        vq.c, mem.c, _ring(slots, bufs), hdr_len, mergeable, first, count, p, o
                    ),
                )
            return _reference(
                vq, mem, lambda: rxtx.enqueue(vq, mem, hdr_len, mergeable, slots, first, count, bufs)
            )
        if not self.compiled:
            return _reference(
                vq, mem, lambda: rxtx.enqueue(vq, mem, hdr_len, mergeable, slots, first, count, bufs)
            )
        q = _start(vq)
        status = lib.vq_enqueue(
            q, mem.c, _ring(slots, bufs), hdr_len, mergeable, first, count, vq.scratch, vq.out
        )
        return finish(vq, mem, status, True)


def _packed(
    vq: PackedVirtqueue, mem: GuestMemory, writable: bool, kernel: Callable[[Any, Any, Any], int]
) -> BatchResult:
    """Run a packed batch kernel (``kernel(ring, pending, out)``: vqp_dequeue or vqp_enqueue) on ``vq`` and
    finish it as a split batch is finished. Used entries someone queued outside a batch are published first,
    as _start does for a split ring."""
    ring = packed_ring(vq, mem)
    if vq._desc is None:
        raise VirtqueueError(vq.index, "ring not mapped")
    if vq._pending_used:
        vq.flush_used()
    pending = ring.scratch()
    status = kernel(ring, pending, ring.out)
    return _finish(vq, mem, status, writable, ring.out, pending, _fault)


def _reference(
    vq: SplitVirtqueue | PackedVirtqueue, mem: GuestMemory, batch: Callable[[], BatchResult]
) -> BatchResult:
    """Run a reference batch and finish it (``_complete``), unless the memory is or went ``gone``: the
    Python code cannot catch SIGBUS, but the guard let its accesses complete on zero pages, so this looks
    at ``gone`` before and after, and whatever the batch did or raised on that memory is replaced by the
    fault that says why (as VQ_ERR_MEMORY_GONE does for the kernels)."""
    return _guarded(vq, mem, lambda: _complete(vq, batch()))


def _guarded(
    vq: SplitVirtqueue | PackedVirtqueue, mem: GuestMemory, batch: Callable[[], BatchResult]
) -> BatchResult:
    """``batch``, finished, unless the memory is or went ``gone`` (see _reference)."""
    if mem.gone:
        raise memory_gone(vq, mem)
    try:
        res = batch()
    except Exception as e:
        if mem.gone:
            raise memory_gone(vq, mem) from e
        raise
    if mem.gone:
        raise memory_gone(vq, mem)
    return res


def _complete(vq: SplitVirtqueue | PackedVirtqueue, res: BatchResult) -> BatchResult:
    """Finish a reference batch as the kernels finish theirs: publish, notify, re-arm kicks."""
    vq.flush_used()
    try:
        vq.call()
    except CallRefused as e:
        e.batch = res
        raise
    finally:
        vq.enable_kicks()
    return res


COMPILED = Datapath(compiled=True)
REFERENCE = Datapath(compiled=False)


def select_datapath(reference: bool | None = None) -> Datapath:
    """REFERENCE if asked for (``reference``, else as datapath/choice.py reads the environment), COMPILED
    otherwise."""
    return REFERENCE if reference_selected(reference) else COMPILED
