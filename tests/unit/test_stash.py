"""The buffer stash (netmap/stash.py): the compiled nm_stash_take / nm_stash_give against their reference,
last in first out, nothing lost or duplicated, invalid slots left alone; its buffers come from and go back to
the allocator."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given
from hypothesis import strategies as st

from vhostmap.datapath import ffi, lib
from vhostmap.netmap.abi import SLOT_DTYPE
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.stash import BufferStash

NBUFS = 64


def slots_of(bufs: list[int]) -> npt.NDArray[np.void]:
    slots = np.zeros(len(bufs), dtype=SLOT_DTYPE)
    slots["buf_idx"] = bufs
    return slots


def c_bufs(slots: npt.NDArray[np.void]) -> Any:
    nm = ffi.new("struct nm_bufs *")
    nm.slots = ffi.cast("struct nm_slot *", ffi.from_buffer(slots))
    nm.num_slots = len(slots)
    nm.buf_size = 2048
    nm.nbufs = NBUFS
    return nm


def valid(bufs: npt.ArrayLike) -> Counter[int]:
    return Counter(int(b) for b in np.asarray(bufs) if 2 <= b < NBUFS)


# A ring user may have written anything into a slot: reserved and out-of-range indexes too.
slot_bufs = st.lists(st.one_of(st.integers(2, NBUFS - 1), st.integers(0, 1), st.integers(NBUFS, 2**32 - 1)))


@given(
    ring=slot_bufs.filter(len),
    stash=st.lists(st.integers(2, NBUFS - 1), max_size=12),
    cursor=st.integers(0, 11),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(0, 40)), max_size=6),
)
def test_compiled_stash_moves_exactly_as_the_reference(
    ring: list[int], stash: list[int], cursor: int, ops: list[tuple[bool, int, int]]
) -> None:
    ref_slots, got_slots = slots_of(ring), slots_of(ring)
    ref, got = BufferStash(stash), BufferStash(stash)
    ref.cursor = got.cursor = cursor % len(stash) if stash else 0
    before = valid(ring) + valid(stash)
    nm = c_bufs(got_slots)
    for take, first, count in ops:
        count = min(count, len(ring))  # callers never pass more than a ring
        if take:
            ref.take(ref_slots, NBUFS, first, count)
            lib.nm_stash_take(got.c, nm, first, count)
        else:
            ref.give(ref_slots, NBUFS, first, count)
            lib.nm_stash_give(got.c, nm, first, count)
        assert got_slots.tobytes() == ref_slots.tobytes()
        assert got.bufs.tolist() == ref.bufs.tolist()
        assert got.cursor == ref.cursor
    # Only swaps: every buffer is still somewhere, once; invalid slot indexes stayed where they were.
    assert valid(got_slots["buf_idx"]) + valid(got.bufs) == before
    invalid = [i for i, b in enumerate(ring) if not 2 <= b < NBUFS]
    assert got_slots["buf_idx"][invalid].tolist() == [ring[i] for i in invalid]


def test_the_newest_given_buffer_is_taken_first() -> None:
    stash = BufferStash([40, 41, 42, 43])
    tx = slots_of([10, 11, 12])  # three slots whose buffers were just read
    lib.nm_stash_give(stash.c, c_bufs(tx), 0, 3)
    assert sorted(tx["buf_idx"].tolist()) == [40, 41, 42]  # they got the stash's oldest
    rx = slots_of([20, 21, 22, 23])
    lib.nm_stash_take(stash.c, c_bufs(rx), 1, 3)  # slots 1..3 are about to be filled
    assert rx["buf_idx"].tolist() == [20, 12, 11, 10]


def test_a_take_wraps_around_the_ring_and_skips_reserved_slots() -> None:
    stash = BufferStash([50, 51])
    rx = slots_of([30, 1, 31, 32])
    lib.nm_stash_take(stash.c, c_bufs(rx), 3, 3)  # slots 3, 0, 1 (1 holds a reserved index)
    assert rx["buf_idx"].tolist() == [50, 1, 31, 51]
    assert sorted(stash.bufs.tolist()) == [30, 32]


def test_an_empty_stash_does_nothing() -> None:
    stash = BufferStash([])
    rx = slots_of([5, 6])
    lib.nm_stash_take(stash.c, c_bufs(rx), 0, 2)
    lib.nm_stash_give(stash.c, c_bufs(rx), 0, 2)
    assert rx["buf_idx"].tolist() == [5, 6]


def test_buffers_come_from_the_allocator_and_go_back_even_after_swaps() -> None:
    with NetmapMemory(AllocatorParams(if_num=2, ring_num=2, buf_num=64)) as mem:
        free = mem.stats()["netmap_buf"]["objfree"]
        stash = BufferStash.allocate(mem, 16)
        assert stash.size == 16 and mem.stats()["netmap_buf"]["objfree"] == free - 16
        layout = mem.create_if("p", 1, 1, 8, 8, 0, 0)
        ring = mem.stats()["netmap_buf"]["objfree"]
        slots = mem._slots(layout.rx_rings[0])
        nm = c_bufs(slots)
        nm.nbufs = mem.nbufs
        lib.nm_stash_take(stash.c, nm, 0, 8)  # the ring now holds stash buffers, the stash the ring's
        mem.delete_if(layout)
        stash.close()
        assert stash.size == 0
        assert mem.stats()["netmap_buf"]["objfree"] == free
        assert ring == free - 16 - 16


def test_an_exhausted_allocator_gives_an_empty_stash() -> None:
    with NetmapMemory(AllocatorParams(if_num=2, ring_num=2, buf_num=8)) as mem:
        assert BufferStash.allocate(mem, 64).size == 0
