"""The one-copy dequeue (vq_dequeue_refs, vq_refs_settle, vq_publish: what the link and switch passes run on a
source guest's transmit queue) against the reference dequeue (rxtx.dequeue), on the drivers of
test_kernels_differential.py, honest and hostile.

A frame may take more slots when its slots refer to guest memory (one per piece of a descriptor) than when it
is copied, so a batch may take fewer frames; the rest stay in the queue for the next. Both sides therefore
drain the queue batch after batch into an emptied ring and must end the same: the same frames byte for byte,
counters, fault (same message), indexes, used entries (published or left pending), and guest memory.

Where the batches end differs, so a driver fault lands in different batches: the frames a faulting batch took
are completed (left pending) but never handed on, on either side, and which frames share the batch with the
fault depends on how many slots the frames before it took. The reference may take a frame and fault in the
same batch where one copy, out of slots, takes it in one batch and faults in the next (or the other way
round). The drain therefore counts the frames of the faulting batch too, read from the slots it filled: the
frames of every chain taken, delivered or not, which no batching changes.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from test_kernels_differential import (
    FUZZ,
    HDR,
    USED_GPA,
    Case,
    Instance,
    assert_same_bytes,
    cases,
    file_offset,
    instances,
    make_case,
    where_in_guest,
)

from vhostmap.datapath import lib
from vhostmap.forwarding.passes import OneCopy
from vhostmap.netmap.abi import NS_INDIRECT, NS_MOREFRAG, NS_VNET_HDR
from vhostmap.vhost_user import kernels
from vhostmap.vhost_user.kernels import REFERENCE
from vhostmap.vhost_user.memory import VHOST_LOG_PAGE
from vhostmap.vhost_user.rxtx import Buffers
from vhostmap.vhost_user.virtqueue import VirtqueueError

UNFILLED = 0xFFFF  # a slot length no batch writes (buf_size <= 2048): where a batch stopped filling slots


def filled(slots: npt.NDArray[np.void]) -> int:
    """The slots from 0 up to the first one still UNFILLED."""
    unfilled = np.flatnonzero(slots["len"] == UNFILLED)
    return int(unfilled[0]) if len(unfilled) else len(slots)


def frames_in(slots: npt.NDArray[np.void], bufs: Buffers, n: int) -> list[bytes]:
    """The frames of slots [0, n)."""
    out: list[bytes] = []
    part = b""
    for s in slots[:n]:
        part += bufs.view(int(s["buf_idx"]), int(s["len"])).tobytes()
        if not int(s["flags"]) & NS_MOREFRAG:
            out.append(part)
            part = b""
    assert part == b""
    return out


def counted(slots: npt.NDArray[np.void], frames: list[bytes], hdr_len: int) -> int:
    """The bytes the counters count of ``frames``, those of the first slots [0, n): a frame that keeps its
    offloads (NS_VNET_HDR on its first slot) carries its virtio-net header, which they do not count."""
    total, k = 0, 0
    for f in frames:
        total += len(f) - (hdr_len if int(slots["flags"][k]) & NS_VNET_HDR else 0)
        while int(slots["flags"][k]) & NS_MOREFRAG:
            k += 1
        k += 1
    return total


def one_copy_batch(inst: Instance, case: Case, space: int, refs: OneCopy) -> tuple[Any, ...]:
    """A batch as a one-copy pass runs it on its source, everything it refers to settled at once."""
    vq, mem = inst.vq, inst.mem
    ring = kernels._ring(inst.slots, inst.bufs)
    try:
        q = kernels._start(vq)
        status = lib.vq_dequeue_refs(q, mem.c, ring, case.hdr_len, 0, space, refs.c, vq.scratch, vq.out)
        # Settled after a fault too (a pass drops those slots): the drain reads what the batch took.
        lib.vq_refs_settle(refs.c, ring, 0, vq.out.slots)
        assert not (inst.slots["flags"][: vq.out.slots] & NS_INDIRECT).any()
        if status == lib.VQ_OK:
            status = lib.vq_publish(q, mem.c, vq.scratch, vq.out)
        lib.vq_refs_reset(refs.c)
        res = kernels.finish(vq, mem, status, False)
    except VirtqueueError as e:
        cause = e.__cause__
        return ("fault", e.queue, e.reason, type(cause).__name__, str(cause) if cause else None)
    return ("ok", *dataclasses.astuple(res))


def drain(inst: Instance, case: Case, one_copy: bool, min_head: int) -> tuple[list[bytes], list[Any]]:
    """Batches into the emptied ring until one takes nothing or faults: the frames, and the totals (then the
    fault), the faulting batch's included (see the module's docstring)."""
    space = case.ring.num_slots - 1
    refs = OneCopy(case.ring.num_slots, min_head)
    frames: list[bytes] = []
    totals = [0, 0, 0]
    while True:
        inst.slots["len"] = UNFILLED
        left = len(inst.vq._pending_used)
        r = one_copy_batch(inst, case, space, refs) if one_copy else inst.run(REFERENCE, case, 0, space)
        if r[0] == "fault":
            # Its chains taken before the fault: completed, left pending; the frames among them in the slots.
            n = filled(inst.slots)
            if one_copy:
                assert n == inst.vq.out.slots
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


def published(inst: Instance, case: Case) -> int:
    """Used entries published since the start."""
    return (struct.unpack("<H", inst.read(USED_GPA + 2, 2))[0] - case.used_idx) & 0xFFFF


def used_entries(inst: Instance, case: Case) -> list[tuple[int, int]]:
    """Every used entry since the start: published in the used ring, then left pending."""
    out = []
    for k in range(published(inst, case)):
        slot = (case.used_idx + k) % case.num
        out.append(struct.unpack("<II", inst.read(USED_GPA + 4 + 8 * slot, 8)))
    return out + list(inst.vq._pending_used)


def same_end(case: Case, min_head: int = 0) -> tuple[list[bytes], list[Any]]:
    with instances(case) as (ref, got):
        expected = drain(ref, case, False, min_head)
        assert drain(got, case, True, min_head) == expected
        assert got.vq.last_avail_idx == ref.vq.last_avail_idx
        assert used_entries(got, case) == used_entries(ref, case)
        # The used ring's header and avail_event depend on how many batches ran; the rest must not differ.
        used = file_offset(USED_GPA)
        a, b = bytearray(ref.memory()), bytearray(got.memory())
        a[used : used + 0x1000] = b[used : used + 0x1000] = bytes(0x1000)
        assert_same_bytes(bytes(a), bytes(b), "guest memory", where_in_guest)
        # Whether the used ring's page is logged depends on whether a batch published anything: after a
        # fault, one side may have published what the other left pending.
        logs = bytearray(ref.log()), bytearray(got.log())
        page = USED_GPA // VHOST_LOG_PAGE
        if (published(ref, case) > 0) != (published(got, case) > 0) and len(logs[0]) > page // 8:
            for log in logs:
                log[page // 8] &= ~(1 << page % 8)
        assert_same_bytes(bytes(logs[0]), bytes(logs[1]), "dirty log")
    return expected


@FUZZ
@given(cases(writable=False))
def test_one_copy_dequeue_ends_as_the_reference(case: Case) -> None:
    same_end(case, min_head=14 if case.ring.buf_size > 64 else 0)


@pytest.mark.parametrize("min_head", [0, 14])
def test_chains_of_many_pieces_refer_or_are_copied_and_arrive_the_same(min_head: int) -> None:
    case = make_case(False, num=32, num_slots=16, buf_size=512)
    case.chains(
        [
            [HDR + 1, *[40] * 20],  # 21 pieces: more than the ring has: copied
            [5, 7, 8, 600],  # the header split; the first piece of 8 bytes: copied for the switch
            [HDR, 1000, 30],  # 1000 bytes over two slots
            [HDR + 60],
        ]
    )
    frames, totals = same_end(case, min_head)
    assert totals == [4, 801 + 608 + 1030 + 60, 0]
    assert [len(f) for f in frames] == [801, 608, 1030, 60]


# The second frame: of one slot, the reference takes both frames and faults in its first batch, one copy
# (the first frame referred to in three slots) in its second; of three slots, one copy, out of slots, takes
# it in the batch that faults, the reference in the one before.
@pytest.mark.parametrize("second", [[HDR + 40], [HDR + 300]])
def test_a_fault_after_frames_that_refer_in_more_slots_counts_the_same_frames(second: list[int]) -> None:
    # 4 slots a batch; the dirty log on, which marks the used ring's page on a side that published.
    case = make_case(False, num=8, num_slots=5, buf_size=128, log_dirty=True, log_size=64)
    case.chains([[HDR, 60, 60, 8], second])  # the first: one slot copied, three referred to
    case.heads.append(case.num)  # then an available entry that names no descriptor: a driver fault
    frames, totals = same_end(case, min_head=14)
    assert [len(f) for f in frames] == [128, second[0] - HDR]
    assert totals[:3] == [2, 128 + second[0] - HDR, 0]
    assert totals[3][:3] == ("fault", 1, f"available ring entry 2 names descriptor {case.num} >= {case.num}")
