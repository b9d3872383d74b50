"""The one-copy dequeue over a packed ring (vqp_dequeue_refs, vq_refs_settle, vqp_publish: what the link and
switch passes run on a packed source guest's transmit queue) against the reference dequeue (rxtx.dequeue over
PackedVirtqueue), on the drivers of test_packed_differential.py, honest and hostile.

As test_onecopy_differential.py does for split rings: a frame may take more slots when its slots refer to
guest memory, so both sides drain the queue batch after batch into an emptied ring and must end the same: the
same frames byte for byte, counters, fault (same message), positions and ids in flight, and guest memory.
Where the batches end differs, so what the device wrote into the descriptor ring may differ where batching
decides it: with VIRTIO_F_IN_ORDER (one used descriptor per batch), and after a fault (one side may have
published what the other left pending); there the ring and its device area are compared through the used
positions and the entries left pending instead of byte for byte. A driver that makes a buffer id available
again before the device used it is caught only while the first chain of that id is in flight, which is
batching's business too: such a driver's end is left to test_packed_differential, whose sides run the same
batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, reject
from test_kernels_differential import assert_same_bytes, file_offset
from test_onecopy_differential import UNFILLED, counted, filled, frames_in
from test_packed_differential import (
    DESC_GPA,
    DEVICE_GPA,
    FUZZ,
    HDR,
    Case,
    Instance,
    cases,
    make_case,
    plain_run,
    where_in_guest,
)

from vhostmap.datapath import lib
from vhostmap.forwarding.passes import OneCopy
from vhostmap.netmap.abi import NS_INDIRECT
from vhostmap.vhost_user import kernels
from vhostmap.vhost_user.memory import VHOST_LOG_PAGE
from vhostmap.vhost_user.packed import PackedVirtqueue
from vhostmap.vhost_user.virtqueue import VirtqueueError
from vhostmap.virtio.spec import VRING_PACKED_EVENT


def one_copy_batch(inst: Instance, case: Case, space: int, refs: OneCopy) -> tuple[Any, ...]:
    """A batch as a one-copy pass runs it on a packed source, everything it refers to settled at once, with
    the out and scratch the port's passes use (kernels.packed_ring)."""
    vq, mem = inst.vq, inst.mem
    ring = kernels._ring(inst.slots, inst.bufs)
    compiled = kernels.packed_ring(vq, mem)
    pending, out = compiled.scratch(), compiled.out
    try:
        status = lib.vqp_dequeue_refs(vq.c, mem.c, ring, case.hdr_len, 0, space, refs.c, pending, out)
        # Settled after a fault too (a pass drops those slots): the drain reads what the batch took.
        lib.vq_refs_settle(refs.c, ring, 0, out.slots)
        assert not (inst.slots["flags"][: out.slots] & NS_INDIRECT).any()
        if status == lib.VQ_OK:
            status = lib.vqp_publish(vq.c, mem.c, pending, out)
        lib.vq_refs_reset(refs.c)
        res = kernels.finish(vq, mem, status, False)
    except VirtqueueError as e:
        cause = e.__cause__
        return ("fault", e.queue, e.reason, type(cause).__name__, str(cause) if cause else None)
    return ("ok", *dataclasses.astuple(res))


def drain(inst: Instance, case: Case, one_copy: bool, min_head: int) -> tuple[list[bytes], list[Any]]:
    """Batches into the emptied ring until one takes nothing or faults: the frames, and the totals (then the
    fault), the faulting batch's included (see test_onecopy_differential.drain)."""
    space = case.ring.num_slots - 1
    refs = OneCopy(case.ring.num_slots, min_head)
    frames: list[bytes] = []
    totals = [0, 0, 0]
    while True:
        inst.slots["len"] = UNFILLED
        left = len(inst.vq._pending_used)
        r = one_copy_batch(inst, case, space, refs) if one_copy else inst.run(case, 0, space)
        if r[0] == "fault":
            n = filled(inst.slots)
            if one_copy:
                assert n == kernels.packed_ring(inst.vq, inst.mem).out.slots
            taken = frames_in(inst.slots, inst.bufs, n)
            entries = len(inst.vq._pending_used) - left
            assert entries >= len(taken)
            frames += taken
            totals = [
                totals[0] + len(taken),
                totals[1] + counted(inst.slots, taken, case.hdr_len),
                totals[2] + entries - len(taken),
            ]
            return frames, [*totals, r]
        _, slots, packets, nbytes, dropped, *_ = r
        batch = frames_in(inst.slots, inst.bufs, slots)
        assert (packets, nbytes) == (len(batch), counted(inst.slots, batch, case.hdr_len))
        frames += batch
        totals = [totals[0] + packets, totals[1] + nbytes, totals[2] + dropped]
        if slots == 0 and dropped == 0:
            return frames, totals


def used_position(inst: Instance, case: Case) -> int:
    """Descriptors the device moved past since the start: published (the used position), then left pending
    (each entry's chain)."""
    vq = inst.vq
    lap = (vq.used_wrap_counter ^ case.guest.wrap) * case.num  # at most one lap: num descriptors in all
    published = (vq.used_idx + lap - case.guest.start) % (2 * case.num) if case.num else 0
    return published + sum(ndesc for _, _, ndesc in vq._pending_used)


def in_flight_unpublished(vq: PackedVirtqueue) -> bytes:
    """The ids in flight whose chains are neither used nor left pending for publication."""
    flying = vq.inflight.copy()
    for buffer_id, _, _ in vq._pending_used:
        flying[buffer_id] = 0
    return flying.tobytes()


@contextlib.contextmanager
def both(case: Case) -> Iterator[tuple[Instance, Instance]]:
    with contextlib.ExitStack() as stack:
        ref, got = Instance(case, False), Instance(case, True, batch=True)
        stack.callback(ref.close)
        stack.callback(got.close)
        yield ref, got


def id_in_use(end: tuple[list[bytes], list[Any]]) -> bool:
    """Whether a drain ended on a buffer id made available twice (see the module's docstring)."""
    return len(end[1]) == 4 and "already in use" in str(end[1][3][2])


def same_end(case: Case, min_head: int = 0) -> tuple[list[bytes], list[Any]]:
    with both(case) as (ref, got):
        expected = drain(ref, case, False, min_head)
        end = drain(got, case, True, min_head)
        if id_in_use(expected) or id_in_use(end):
            reject()
        assert end == expected
        a, b = ref.vq, got.vq
        assert (b.last_avail_idx, b.avail_wrap_counter) == (a.last_avail_idx, a.avail_wrap_counter)
        # Ids in flight: after a fault, those whose entries one side left pending the other may have used.
        assert in_flight_unpublished(b) == in_flight_unpublished(a), "buffer ids in flight"
        assert used_position(got, case) == used_position(ref, case)
        faulted = len(expected[1]) == 4
        mem_a, mem_b = bytearray(ref.memory()), bytearray(got.memory())
        log_a, log_b = bytearray(ref.log()), bytearray(got.log())
        if faulted or case.in_order:
            # Where batching decides what the device wrote: the descriptor ring and its device area.
            for lo, size in ((DESC_GPA, 16 * case.num), (DEVICE_GPA, VRING_PACKED_EVENT.size)):
                off = file_offset(lo)
                mem_a[off : off + size] = mem_b[off : off + size] = bytes(size)
                for page in range(lo // VHOST_LOG_PAGE, (lo + size - 1) // VHOST_LOG_PAGE + 1):
                    for log in (log_a, log_b):
                        if len(log) > page // 8:
                            log[page // 8] &= ~(1 << page % 8)
        else:
            assert list(b._pending_used) == list(a._pending_used)
        assert_same_bytes(bytes(mem_a), bytes(mem_b), "guest memory", where_in_guest)
        assert_same_bytes(bytes(log_a), bytes(log_b), "dirty log")
    return expected


@FUZZ
@given(cases(writable=False))
def test_one_copy_dequeue_over_a_packed_ring_ends_as_the_reference(case: Case) -> None:
    same_end(case, min_head=14 if case.ring.buf_size > 64 else 0)


@pytest.mark.parametrize("min_head", [0, 14])
@pytest.mark.parametrize("indirect", [False, True])
def test_packed_chains_of_many_pieces_refer_or_are_copied_and_arrive_the_same(
    min_head: int, indirect: bool
) -> None:
    case = make_case(False, num=32, start=30, num_slots=16, buf_size=512)  # the chains wrap round the ring
    case.many(
        [
            [5, 7, 8, 600],  # the header split; the first piece of 8 bytes: copied for the switch
            [HDR, 1000, 30],  # 1000 bytes over two slots
            [HDR + 60],
        ],
        indirect=indirect,
    )
    frames, totals = same_end(case, min_head)
    assert totals == [3, 608 + 1030 + 60, 0]
    assert [len(f) for f in frames] == [608, 1030, 60]


@pytest.mark.parametrize("at", [0, 5, 9])
@pytest.mark.parametrize("breakage", ["none", "header_only", "long", "offload", "tiny"])
def test_groups_of_plain_frames_refer_until_one_is_not(at: int, breakage: str) -> None:
    """vqp_take_groups with refs: groups of PVQ_BATCH plain frames referred to straight from the ring; a
    frame that is not plain, or shorter than min_head, leaves its group to the chain-by-chain path."""
    frames, totals = same_end(plain_run(False, at, breakage), min_head=14)
    if breakage == "none":
        assert totals == [12, 12 * 60, 0] and all(len(f) == 60 for f in frames)
    # Which slots refer and which hold a copy: every frame of a group refers, the tiny one is copied.
    case = plain_run(False, at, breakage)
    with contextlib.closing(Instance(case, True, batch=True)) as inst:
        compiled = kernels.packed_ring(inst.vq, inst.mem)
        refs = OneCopy(case.ring.num_slots, 14)
        ring = kernels._ring(inst.slots, inst.bufs)
        status = lib.vqp_dequeue_refs(
            inst.vq.c, inst.mem.c, ring, HDR, 0, 31, refs.c, compiled.scratch(), compiled.out
        )
        assert status == lib.VQ_OK
        referred = [bool(f & NS_INDIRECT) for f in inst.slots["flags"][: compiled.out.slots]]
        lib.vq_refs_settle(refs.c, ring, 0, compiled.out.slots)
    if breakage in ("none", "tiny"):
        assert referred == [breakage == "none" or k != at for k in range(12)]
