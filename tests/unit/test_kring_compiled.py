"""The compiled kring operations (datapath/kring.c) against their Python references, on the same random and
hostile rings: the sync prologues (Kring.txsync_prologue / rxsync_prologue), the forwarders' buffer swap
(forward.swap_slots), the sink's release (forward.Sink) and the rxsync timestamp."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from vhostmap.datapath import ffi, lib
from vhostmap.forwarding.rings import SWAP_ALL, count_frames, swap_slots
from vhostmap.netmap.abi import NR_RX, NR_TIMESTAMP, NR_TX, NS_MOREFRAG, SLOT_DTYPE, NetmapRing, RingView
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.kring import Kring

N = 16


@dataclass
class Krings:
    """One TX and one RX kring for the reference, the same for the kernel."""

    ref_tx: Kring
    ref_rx: Kring
    got_tx: Kring
    got_rx: Kring


@pytest.fixture(scope="module")
def krings() -> Iterator[Krings]:
    with NetmapMemory(AllocatorParams(if_num=4, ring_num=8, ring_size=1024, buf_num=128)) as mem:
        made: list[Kring] = []
        for name in ("ref", "got"):
            layout = mem.create_if(name, 1, 1, N, N, 0, 0)
            for r, d in ((layout.tx_rings[0], NR_TX), (layout.rx_rings[0], NR_RX)):
                view = RingView(mem.region, r.offset, r.num_slots, buf_ofs=mem.buffers_offset - r.offset)
                made.append(Kring(view, direction=d, ring_id=0, port=name, nbufs=mem.nbufs, buf_size=2048))
        yield Krings(made[0], made[1], made[2], made[3])


index = st.integers(0, N - 1)
# Mostly sensible values, sometimes nonsense: a ring user may write anything.
user_index = st.one_of(index, index, st.integers(N, N + 3), st.just(0xFFFF_FFFF))
slot_arrays = st.lists(
    st.tuples(
        st.one_of(st.integers(2, 127), st.integers(0, 1), st.integers(128, 200)),
        st.one_of(st.integers(1, 2048), st.just(0), st.integers(2049, 0xFFFF)),
        st.sampled_from([0, 0, NS_MOREFRAG, 1, NS_MOREFRAG | 1]),
    ),
    min_size=N,
    max_size=N,
)


def setup(
    k: Kring, state: tuple[int, ...], user: tuple[int, int, int], slots: list[tuple[int, int, int]]
) -> None:
    k.nr_hwcur, k.nr_hwtail, k.rhead, k.rcur, k.rtail = state
    k.ring.header.head, k.ring.header.cur, k.ring.header.tail = user
    arr = np.zeros(N, dtype=SLOT_DTYPE)
    arr["buf_idx"], arr["len"], arr["flags"] = zip(*slots, strict=True)
    k.ring.slots[:] = arr


def snapshot(k: Kring) -> tuple[object, ...]:
    h = k.ring.header
    return (k.nr_hwcur, k.nr_hwtail, k.rhead, k.rcur, k.rtail, h.head, h.cur, h.tail, k.ring.slots.tobytes())


VALID_SLOTS = [(2 + i, 60, 0) for i in range(N)]


# Rings the prologues accept, besides whatever hypothesis finds: a TX user handing over [2, 5), an RX user
# giving back [3, 5) of [3, 9).
@example(tx=True, state=(2, 1, 2, 2, 1), user=(5, 5, 1), slots=VALID_SLOTS)
@example(tx=False, state=(3, 9, 3, 3, 9), user=(5, 6, 9), slots=VALID_SLOTS)
@given(
    tx=st.booleans(),
    state=st.tuples(index, index, index, index, index),
    user=st.tuples(user_index, user_index, index),
    slots=slot_arrays,
)
def test_compiled_prologue_agrees_with_the_reference(
    krings: Krings,
    tx: bool,
    state: tuple[int, ...],
    user: tuple[int, int, int],
    slots: list[tuple[int, int, int]],
) -> None:
    ref, got = (krings.ref_tx, krings.got_tx) if tx else (krings.ref_rx, krings.got_rx)
    setup(ref, state, user, slots)
    setup(got, state, user, slots)
    before = snapshot(got)
    logging.disable(logging.WARNING)  # the reference logs every reinit
    try:
        accepted = ref.txsync_prologue() if tx else ref.rxsync_prologue()
    finally:
        logging.disable(logging.NOTSET)
    status = lib.nm_sync_prologue(got.c)
    assert (status == 0) == accepted
    if state in ((2, 1, 2, 2, 1), (3, 9, 3, 3, 9)) and slots == VALID_SLOTS:
        assert accepted  # the examples above
    if accepted:
        assert snapshot(got) == snapshot(ref)
    else:
        assert snapshot(got) == before  # refused: nothing touched; the Python sync reinitialises


ring_ends = st.tuples(index, index)


@given(
    rx_ends=ring_ends, tx_ends=ring_ends, rx_slots=slot_arrays, tx_slots=slot_arrays, limit=st.integers(0, N)
)
def test_compiled_swap_agrees_with_the_reference(
    krings: Krings,
    rx_ends: tuple[int, int],
    tx_ends: tuple[int, int],
    rx_slots: list[tuple[int, int, int]],
    tx_slots: list[tuple[int, int, int]],
    limit: int,
) -> None:
    for rx, tx in ((krings.ref_rx, krings.ref_tx), (krings.got_rx, krings.got_tx)):
        setup(rx, (0, 0, 0, 0, 0), (rx_ends[0], rx_ends[0], rx_ends[1]), rx_slots)
        setup(tx, (0, 0, 0, 0, 0), (tx_ends[0], tx_ends[0], tx_ends[1]), tx_slots)
    lim = limit if limit < N else None
    moved = swap_slots(krings.ref_rx.ring, krings.ref_tx.ring, lim)
    assert lib.nm_swap_slots(krings.got_rx.c, krings.got_tx.c, SWAP_ALL if lim is None else lim) == moved
    assert snapshot(krings.got_rx) == snapshot(krings.ref_rx)
    assert snapshot(krings.got_tx) == snapshot(krings.ref_tx)


@given(ends=ring_ends, slots=slot_arrays)
def test_compiled_release_agrees_with_the_sink(
    krings: Krings, ends: tuple[int, int], slots: list[tuple[int, int, int]]
) -> None:
    ring = krings.ref_rx.ring
    setup(krings.ref_rx, (0, 0, 0, 0, 0), (ends[0], ends[0], ends[1]), slots)
    setup(krings.got_rx, (0, 0, 0, 0, 0), (ends[0], ends[0], ends[1]), slots)
    frames = count_frames(ring, ring.head, (ring.tail - ring.head) % N)
    ring.head = ring.cur = ring.tail
    assert lib.nm_release_received(krings.got_rx.c, ffi.NULL) == frames
    assert snapshot(krings.got_rx)[5:] == snapshot(krings.ref_rx)[5:]


def test_finalize_refuses_a_state_outside_the_ring(krings: Krings) -> None:
    k = krings.got_rx
    setup(k, (3, 5, 3, 3, 2), (3, 3, 2), [(2, 60, 0)] * N)
    assert lib.nm_sync_finalize(k.c) == 0
    assert (k.rtail, k.ring.tail) == (5, 5)
    k.nr_hwtail = N
    assert lib.nm_sync_finalize(k.c) == -1
    assert (k.rtail, k.ring.tail) == (5, 5)


def test_c_ring_offsets_and_flags_are_those_of_the_abi() -> None:
    assert (
        NetmapRing.head.offset,
        NetmapRing.cur.offset,
        NetmapRing.tail.offset,
    ) == (lib.NM_RING_HEAD, lib.NM_RING_CUR, lib.NM_RING_TAIL)
    assert (NetmapRing.flags.offset, NetmapRing.ts.offset) == (lib.NM_RING_FLAGS, lib.NM_RING_TS)
    assert lib.NR_TIMESTAMP == NR_TIMESTAMP


def test_timestamp_only_when_the_user_asks_for_it(krings: Krings) -> None:
    k, ts = krings.got_rx, krings.got_rx.ring.header.ts
    ts.tv_sec = ts.tv_usec = 0
    k.ring.flags = 0
    lib.nm_sync_timestamp(k.c)
    assert (ts.tv_sec, ts.tv_usec) == (0, 0)
    k.ring.flags = NR_TIMESTAMP
    before = time.time_ns() // 1000
    lib.nm_sync_timestamp(k.c)
    after = time.time_ns() // 1000
    assert before <= ts.tv_sec * 1_000_000 + ts.tv_usec <= after
    assert 0 <= ts.tv_usec < 1_000_000
    k.ring.flags = 0
