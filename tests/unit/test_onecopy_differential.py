"""The one-copy dequeue (vq_dequeue_refs, vq_refs_settle, vq_publish: what the link and switch passes run on a
source guest's transmit queue) against the reference dequeue (rxtx.dequeue), on the drivers of
test_kernels_differential.py, honest and hostile.

A frame may take more slots when its slots refer to guest memory (one per piece of a descriptor) than when it
is copied, so a batch may take fewer frames; the rest stay in the queue for the next. Both sides therefore
drain the queue batch after batch into an emptied ring and must end the same: the same frames byte for byte,
counters, fault (same message), indexes, used entries (published or left pending), and guest memory.
"""

from __future__ import annotations

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
from vhostmap.netmap.abi import NS_INDIRECT, NS_MOREFRAG
from vhostmap.vhost_user import kernels
from vhostmap.vhost_user.kernels import REFERENCE
from vhostmap.vhost_user.rxtx import Buffers
from vhostmap.vhost_user.virtqueue import VirtqueueError


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


def one_copy_batch(inst: Instance, case: Case, space: int, refs: OneCopy) -> tuple[Any, ...]:
    """A batch as a one-copy pass runs it on its source, everything it refers to settled at once."""
    vq, mem = inst.vq, inst.mem
    ring = kernels._ring(inst.slots, inst.bufs)
    try:
        q = kernels._start(vq)
        status = lib.vq_dequeue_refs(q, mem.c, ring, case.hdr_len, 0, space, refs.c, vq.scratch, vq.out)
        if status == lib.VQ_OK:
            lib.vq_refs_settle(refs.c, ring, 0, vq.out.slots)
            assert not (inst.slots["flags"][: vq.out.slots] & NS_INDIRECT).any()
            status = lib.vq_publish(q, mem.c, vq.scratch, vq.out)
        lib.vq_refs_reset(refs.c)
        res = kernels.finish(vq, mem, status, False)
    except VirtqueueError as e:
        cause = e.__cause__
        return ("fault", e.queue, e.reason, type(cause).__name__, str(cause) if cause else None)
    return ("ok", res.slots, res.packets, res.bytes, res.dropped)


def drain(inst: Instance, case: Case, one_copy: bool, min_head: int) -> tuple[list[bytes], list[Any]]:
    """Batches into the emptied ring until one takes nothing or faults: the frames, and the totals (or the
    fault)."""
    space = case.ring.num_slots - 1
    refs = OneCopy(case.ring.num_slots, min_head)
    frames: list[bytes] = []
    totals = [0, 0, 0]
    while True:
        r = one_copy_batch(inst, case, space, refs) if one_copy else inst.run(REFERENCE, case, 0, space)
        if r[0] == "fault":
            return frames, [*totals, r]
        _, slots, packets, nbytes, dropped = r
        frames += frames_in(inst.slots, inst.bufs, slots)
        totals = [totals[0] + packets, totals[1] + nbytes, totals[2] + dropped]
        if slots == 0 and dropped == 0:
            return frames, totals


def used_entries(inst: Instance, case: Case) -> list[tuple[int, int]]:
    """Every used entry since the start: published in the used ring, then left pending."""
    idx = struct.unpack("<H", inst.read(USED_GPA + 2, 2))[0]
    out = []
    for k in range((idx - case.used_idx) & 0xFFFF):
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
        assert_same_bytes(ref.log(), got.log(), "dirty log")
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
