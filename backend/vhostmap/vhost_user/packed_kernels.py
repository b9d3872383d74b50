"""The compiled twin of PackedVirtqueue's ring operations (datapath/packed.c), behind the same calls.

``CompiledPackedRing`` wraps a PackedVirtqueue and offers what rxtx.py takes chains through (``pending``,
``pop``, ``unpop``, ``push_used``, ``retract_used``), each done by the C kernel on the queue's own C state
(struct vq_packed), plus ``complete``: flush_used, call and enable_kicks in one C call, as kernels.finish
completes a split batch. A driver fault raises the VirtqueueError the reference raises, word for word.

rxtx.dequeue / rxtx.enqueue run over either (tests/unit/test_packed_differential.py); kernels.Datapath runs
a packed port's batches in one C call each (vqp_dequeue, vqp_enqueue), with this class's ``out`` and
``scratch``.
"""

from __future__ import annotations

from typing import Any

from vhostmap.datapath import eventfds, ffi, lib
from vhostmap.vhost_user.errors import GuestMemoryError
from vhostmap.vhost_user.memory import FAULT_REASONS, GuestMemory
from vhostmap.vhost_user.packed import PackedVirtqueue
from vhostmap.vhost_user.virtqueue import MAX_CHAIN_LENGTH, CallRefused, Chain, VirtqueueError


def packed_fault(vq: PackedVirtqueue, out: Any, status: int, writable: bool) -> VirtqueueError:
    """The VirtqueueError PackedVirtqueue.pop raises for the fault in ``out`` (struct vq_batch), word for
    word (``writable``: the queue's chains are device-writable, a receive queue)."""
    pos, entry = out.err_desc, out.err_slot
    # A fault in entry e of an indirect table names the entry (err_slot = e + 1), else the ring descriptor.
    where = f"entry {entry - 1} of the indirect table of descriptor {pos}" if entry else f"descriptor {pos}"
    cause: GuestMemoryError | None = None
    if status == lib.VQP_ERR_NOT_AVAIL:
        reason = f"descriptor {pos} of the chain at descriptor {out.err_head} is not available"
    elif status == lib.VQP_ERR_CHAIN_LONG:
        reason = f"chain at descriptor {out.err_head} is longer than {out.err_size} descriptors (a loop?)"
    elif status == lib.VQP_ERR_ID:
        reason = f"buffer id {out.err_value} of the chain at descriptor {out.err_head} >= {vq.num}"
    elif status == lib.VQP_ERR_ID_IN_USE:
        reason = (
            f"buffer id {out.err_value} of the chain at descriptor {out.err_head} is already in use"
            " (made available twice)"
        )
    elif status == lib.VQ_ERR_INDIRECT_OFF:
        reason = f"indirect descriptor {pos} but INDIRECT_DESC not negotiated"
    elif status == lib.VQP_ERR_INDIRECT_CHAIN:
        reason = f"indirect descriptor {pos} inside a chain"
    elif status == lib.VQ_ERR_INDIRECT_NEXT:
        reason = f"descriptor {pos} has both INDIRECT and NEXT"
    elif status == lib.VQ_ERR_INDIRECT_LEN:
        reason = f"indirect table at descriptor {pos} has bad length {out.err_value}"
    elif status == lib.VQ_ERR_NESTED_INDIRECT:
        reason = f"nested indirect table in entry {entry - 1} of descriptor {pos}"
    elif status == lib.VQ_ERR_DIRECTION:
        kind = "read-only" if writable else "device-writable"
        reason = f"{kind} {where} in a chain that must not have one"
    elif status in (lib.VQ_ERR_INDIRECT_MEM, lib.VQ_ERR_BUFFER_MEM):
        f = out.fault
        why = FAULT_REASONS.get(f.reason) or (
            f"crosses the end of the region at {f.region_gpa:#x}+{f.region_size:#x}"
        )
        cause = GuestMemoryError(f.addr, f.len, why)
        if status == lib.VQ_ERR_INDIRECT_MEM:
            reason = f"indirect table of descriptor {pos}: {cause}"
        elif entry:
            reason = f"buffer of entry {entry - 1} of descriptor {pos}: {cause}"
        else:
            reason = f"buffer of descriptor {pos}: {cause}"
    else:
        reason = f"kernel status {status}"
    err = VirtqueueError(vq.index, reason)
    err.__cause__ = cause
    return err


class CompiledPackedRing:
    """``vq``'s ring operations done by datapath/packed.c; the state they change is ``vq``'s own (its C
    struct, its ids in flight, its queued used entries), so the reference and the kernels may take turns."""

    def __init__(self, vq: PackedVirtqueue, mem: GuestMemory) -> None:
        self.vq = vq
        self.mem = mem
        self.index = vq.index
        self.out = ffi.new("struct vq_batch *")
        self._segs = ffi.new("struct vq_seg[]", MAX_CHAIN_LENGTH)
        self._chain = ffi.new("struct vqp_chain *")
        # The chains popped since the last complete, for unpop.
        self._popped: list[tuple[int, int, int]] = []
        # struct vqp_used_elem[num]: where a batch kernel (vqp_dequeue, vqp_enqueue) puts its used entries.
        self._scratch: Any = None

    def scratch(self) -> Any:
        """The batch kernels' used entries, ``num`` of them (made again when the queue's size changed)."""
        num = max(self.vq.num, 1)
        if self._scratch is None or len(self._scratch) != num:
            self._scratch = ffi.new("struct vqp_used_elem[]", num)
        return self._scratch

    # What rxtx reads of a queue besides its operations.
    @property
    def host_offloads(self) -> bool:
        """The queue's host_offloads."""
        return self.vq.host_offloads

    @property
    def pass_offloads(self) -> int:
        """The queue's pass_offloads."""
        return self.vq.pass_offloads

    @property
    def guest_offloads(self) -> int:
        """The queue's guest_offloads."""
        return self.vq.guest_offloads

    @property
    def log_dirty(self) -> bool:
        """The queue's log_dirty."""
        return self.vq.log_dirty

    def _mapped(self) -> None:
        if self.vq._desc is None:
            raise VirtqueueError(self.index, "ring not mapped")

    def begin(self) -> None:
        """A batch starts: forget the chains an earlier batch popped and, stopped by a fault, never
        completed (they are in the queue's own state until its reset; ``unpop`` gives back this batch's)."""
        self._popped.clear()

    def pending(self) -> int:
        """PackedVirtqueue.pending (vqp_pending)."""
        return int(lib.vqp_pending(self.vq.c))

    def pop(self, writable: bool) -> Chain:
        """PackedVirtqueue.pop (vqp_pop)."""
        self._mapped()
        out, chain = self.out, self._chain
        status = lib.vqp_pop(self.vq.c, self.mem.c, writable, self._segs, MAX_CHAIN_LENGTH, chain, out)
        if status == lib.VQ_ERR_ARGUMENT:
            raise ValueError(f"virtqueue {self.index}: position {self.vq.last_avail_idx} outside the ring")
        if status != lib.VQ_OK:
            raise packed_fault(self.vq, out, status, writable)
        # A chain's segments all fit: its ring part is at most MAX_CHAIN_LENGTH descriptors, and a table
        # alone in the ring has at most MAX_CHAIN_LENGTH entries.
        assert chain.nseg <= MAX_CHAIN_LENGTH
        segs = self._segs
        segments = tuple((int(segs[k].gpa), int(segs[k].len)) for k in range(chain.nseg))
        self._popped.append((chain.pos, chain.wrap, chain.id))
        return Chain(int(chain.id), segments, int(chain.len))

    def unpop(self) -> None:
        """PackedVirtqueue.unpop (vqp_unpop)."""
        pos, wrap, buffer_id = self._popped.pop()
        c = ffi.new("struct vqp_chain *", {"pos": pos, "wrap": wrap, "id": buffer_id})
        lib.vqp_unpop(self.vq.c, c)

    def push_used(self, head: int, length: int) -> None:
        """PackedVirtqueue.push_used (the queue's own list: vqp_complete publishes it)."""
        self.vq.push_used(head, length)

    def retract_used(self, n: int) -> None:
        """PackedVirtqueue.retract_used."""
        self.vq.retract_used(n)

    def complete(self) -> bool:
        """flush_used, call and enable_kicks in one call (vqp_complete); whether the driver was signalled."""
        self._mapped()
        vq, out = self.vq, self.out
        entries = vq._pending_used
        pending = ffi.new("struct vqp_used_elem[]", max(len(entries), 1))
        for k, (buffer_id, length, ndesc) in enumerate(entries):
            pending[k] = {"id": buffer_id, "len": length, "ndesc": ndesc}
        ffi.buffer(out)[:] = bytes(ffi.sizeof("struct vq_batch"))
        lib.vqp_complete(vq.c, self.mem.c, pending, len(entries), out)
        if out.status == lib.VQ_ERR_ARGUMENT:
            raise ValueError(f"virtqueue {self.index}: position {vq.used_idx} outside the ring")
        entries.clear()
        self._popped.clear()
        if out.log_missed:
            self.mem.log_write(out.log_missed_addr, out.log_missed_len)
        if not out.notify or vq.call_fd is None:
            return False
        result = eventfds.signal(vq.call_fd)
        if result != eventfds.Signal.OK:
            raise CallRefused(self.index, result)
        vq.c.calls += 1
        return True
