"""krings: the sync prologues reject every kind of nonsense with one ring reinit and leave a usable ring."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostmap.datapath import ffi, lib
from vhostmap.netmap.abi import NM_RESERVED_BUFS, NR_RX, NR_TX, SLOT_DTYPE, RingView, nm_in_range
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.kring import RX_MAX_LEN, Kring, slots_check_reference

N = 16  # slots per ring in these tests


@pytest.fixture
def mem() -> Iterator[NetmapMemory]:
    with NetmapMemory(AllocatorParams(if_num=2, ring_num=4, ring_size=1024, buf_num=128)) as m:
        yield m


def make_kring(mem: NetmapMemory, direction: int) -> Kring:
    layout = mem.create_if("p0", 1, 1, N, N, host_tx_rings=0, host_rx_rings=0)
    r = (layout.tx_rings if direction == NR_TX else layout.rx_rings)[0]
    view = RingView(
        mem.region, r.offset, r.num_slots, buf_ofs=mem.buffers_offset - r.offset, nr_buf_size=2048
    )
    return Kring(view, direction=direction, ring_id=0, port="p0", nbufs=mem.nbufs, buf_size=mem.buf_size)


def user_sends(k: Kring, count: int, length: int = 60) -> None:
    """The user fills ``count`` slots from head and hands them over."""
    ring = k.ring
    for _ in range(count):
        ring.slots["len"][ring.head] = length
        ring.head = ring.cur = (ring.head + 1) % N


def tx_in_flight(mem: NetmapMemory) -> Kring:
    """A TX kring with hwcur 8 and hwtail 3: slots 3..7 sent but not yet completed, the user owns [8, 3)."""
    k = make_kring(mem, NR_TX)
    user_sends(k, 4)
    assert k.txsync_prologue()
    k.nr_hwcur, k.nr_hwtail = 4, 3  # sent 0..3, completed them all
    k.sync_finalize()
    user_sends(k, 4)
    assert k.txsync_prologue()
    k.nr_hwcur = 8  # sent 4..7, nothing completed yet
    k.sync_finalize()
    assert (k.ring.head, k.ring.tail, k.nr_hwcur, k.nr_hwtail) == (8, 3, 8, 3)
    return k


def rx_holding(mem: NetmapMemory) -> Kring:
    """An RX kring with hwcur 3 and hwtail 9: the user holds received slots [3, 9)."""
    k = make_kring(mem, NR_RX)
    assert k.rxsync_prologue()
    k.nr_hwtail = 9  # nine frames arrived
    k.sync_finalize()
    k.ring.head = k.ring.cur = 3  # the user consumed three
    assert k.rxsync_prologue()
    k.nr_hwcur = 3
    k.sync_finalize()
    assert (k.ring.head, k.ring.tail, k.nr_hwcur, k.nr_hwtail) == (3, 9, 3, 9)
    return k


def assert_consistent(k: Kring, mem: NetmapMemory) -> None:
    ring = k.ring
    assert ring.head == ring.cur == k.rhead == k.rcur == k.nr_hwcur
    assert ring.tail == k.rtail == k.nr_hwtail
    idx, length = ring.slots["buf_idx"], ring.slots["len"]
    assert np.all((idx == 0) | ((idx >= 2) & (idx < mem.nbufs)))
    assert np.all(length[idx == 0] == 0) and np.all(length <= mem.buf_size)


def restore_buffers(k: Kring, mem: NetmapMemory) -> None:
    """What a user does after a reinit put buffer 0 in its slots: give them real buffers again."""
    empty = np.flatnonzero(k.ring.slots["buf_idx"] == 0)
    k.ring.slots["buf_idx"][empty] = mem.alloc_buffers(len(empty))


Corruption = Callable[[Kring], None]


def set_slot(i: int, field: str, value: Callable[[Kring], int]) -> Corruption:
    def corrupt(k: Kring) -> None:
        k.ring.slots[field][i] = value(k)

    return corrupt


def set_ring(**fields: int) -> Corruption:
    def corrupt(k: Kring) -> None:
        for name, value in fields.items():
            setattr(k.ring, name, value)

    return corrupt


TX_CORRUPTIONS = {
    "head beyond tail": ([set_ring(head=5, cur=5)], "head 5"),
    "head behind hwcur": ([set_ring(head=7, cur=7)], "head 7"),
    "cur out of range": ([set_ring(head=10, cur=5)], "cur 5"),
    "head >= num_slots": ([set_ring(head=N, cur=N)], f"head {N} >= num_slots"),
    "cur >= num_slots": ([set_ring(head=9, cur=99)], "cur 99 >= num_slots"),
    "reserved buf_idx": ([set_slot(9, "buf_idx", lambda k: 1), set_ring(head=11, cur=11)], "buf_idx 1 "),
    "buf_idx out of range": (
        [set_slot(8, "buf_idx", lambda k: k.nbufs), set_ring(head=11, cur=11)],
        "buf_idx {nbufs} >= nbufs",
    ),
    "len 0": ([set_slot(10, "len", lambda k: 0), set_ring(head=11, cur=11)], "slot 10 len 0"),
    "len > buf size": ([set_slot(8, "len", lambda k: k.buf_size + 1), set_ring(head=9, cur=9)], "len 2049"),
}

RX_CORRUPTIONS = {
    "head beyond tail": ([set_ring(head=11, cur=11)], "head 11"),
    "head behind hwcur": ([set_ring(head=1, cur=1)], "head 1"),
    "cur out of range": ([set_ring(head=5, cur=12)], "cur 12"),
    "head >= num_slots": ([set_ring(head=40, cur=40)], "head 40 >= num_slots"),
    "reserved buf_idx": ([set_slot(4, "buf_idx", lambda k: 0), set_ring(head=6, cur=6)], "buf_idx 0 "),
    "buf_idx out of range": (
        [set_slot(3, "buf_idx", lambda k: 2**32 - 1), set_ring(head=6, cur=6)],
        "buf_idx 4294967295",
    ),
    "len > buf size": ([set_slot(5, "len", lambda k: 60000), set_ring(head=10, cur=10)], "head 10"),
}


@pytest.mark.parametrize("case", TX_CORRUPTIONS)
def test_txsync_prologue_reinits_on_nonsense_then_syncs_normally(
    mem: NetmapMemory, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    k = tx_in_flight(mem)
    saved = k.ring.slots.copy()
    corruptions, field = TX_CORRUPTIONS[case]
    for corrupt in corruptions:
        corrupt(k)
    with caplog.at_level(logging.WARNING, logger="vhostmap.netmap.kring"):
        assert not k.txsync_prologue()
    [record] = caplog.records
    assert field.format(nbufs=mem.nbufs) in record.getMessage() and "p0 TX0" in record.getMessage()
    extra = record.__dict__  # the structured fields of the log line
    assert (extra["port"], extra["ring"]) == ("p0", "p0 TX0")
    assert field.format(nbufs=mem.nbufs) in extra["reason"]
    assert k.reinits == 1
    assert_consistent(k, mem)
    assert (k.ring.head, k.ring.tail) == (8, 3)

    # The user repairs its slots and carries on: the next sync goes through.
    k.ring.slots["buf_idx"] = saved["buf_idx"]
    k.ring.slots["len"] = saved["len"]
    user_sends(k, 3)
    caplog.clear()
    assert k.txsync_prologue()
    assert (k.rhead, k.reinits, caplog.records) == (11, 1, [])


@pytest.mark.parametrize("case", RX_CORRUPTIONS)
def test_rxsync_prologue_reinits_on_nonsense_then_syncs_normally(
    mem: NetmapMemory, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    k = rx_holding(mem)
    corruptions, field = RX_CORRUPTIONS[case]
    for corrupt in corruptions:
        corrupt(k)
    with caplog.at_level(logging.WARNING, logger="vhostmap.netmap.kring"):
        assert not k.rxsync_prologue()
    [record] = caplog.records
    assert field in record.getMessage() and "p0 RX0" in record.getMessage()
    assert k.reinits == 1
    assert_consistent(k, mem)
    assert (k.ring.head, k.ring.tail) == (3, 9)

    restore_buffers(k, mem)
    k.ring.head = k.ring.cur = 7
    caplog.clear()
    assert k.rxsync_prologue()
    assert (k.rhead, k.reinits, caplog.records) == (7, 1, [])


def test_reinit_repairs_every_bad_slot_in_the_ring(mem: NetmapMemory) -> None:
    k = rx_holding(mem)
    k.ring.slots["buf_idx"][12] = (
        1  # in the kernel's part: not checked by the prologue, repaired by the reinit
    )
    k.ring.slots["len"][13] = mem.buf_size + 100
    k.ring_reinit("test")
    assert (int(k.ring.slots["buf_idx"][12]), int(k.ring.slots["len"][12])) == (0, 0)
    assert int(k.ring.slots["len"][13]) == 0
    assert (k.errors, k.reinits) == (2, 1)


def test_reinit_restocks_bad_slots_and_logs_at_most_one_line_per_interval(
    mem: NetmapMemory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = make_kring(mem, NR_TX)
    k.restock = mem.restock
    clock = [100.0]
    monkeypatch.setattr("vhostmap.netmap.kring.time.monotonic", lambda: clock[0])
    for i in range(10):  # a user that makes every sync fail
        k.ring.slots["buf_idx"][i] = 0xFFFF_FFFF
        k.ring_reinit(f"try {i}")
        assert (k.ring.slots["buf_idx"] >= NM_RESERVED_BUFS).all()
    assert k.reinits == 10 and len(set(k.ring.slots["buf_idx"].tolist())) == N
    assert [r.getMessage() for r in caplog.records] == [
        "p0 TX0: ring reinit: try 0; 1 slot(s) repaired, 1 given a new buffer, 0 left without; "
        f"head=cur=0 tail={N - 1}"
    ]
    clock[0] += k.REINIT_LOG_INTERVAL
    k.ring_reinit("later")
    assert (
        len(caplog.records) == 2
        and "(9 more reinit(s) since the last line)" in caplog.records[1].getMessage()
    )


def test_overwritten_tail_is_restored_without_a_reinit(
    mem: NetmapMemory, caplog: pytest.LogCaptureFixture
) -> None:
    k = tx_in_flight(mem)
    k.ring.tail = 6
    with caplog.at_level(logging.WARNING):
        assert k.txsync_prologue()
    assert (k.ring.tail, k.reinits, caplog.records) == (3, 0, [])


@given(
    st.integers(2, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1), st.integers(0, n - 1)))
)
def test_tx_prologue_accepts_exactly_heads_between_rhead_and_rtail(args: tuple[int, int, int]) -> None:
    n, hwcur, head = args
    with NetmapMemory(AllocatorParams(if_num=1, ring_num=2, ring_size=2048, buf_num=160)) as m:
        layout = m.create_if("p", 1, 1, n, n, host_tx_rings=0, host_rx_rings=0)
        r = layout.tx_rings[0]
        view = RingView(m.region, r.offset, n)
        k = Kring(view, direction=NR_TX, ring_id=0, port="p", nbufs=m.nbufs, buf_size=m.buf_size)
        view.slots["len"] = 60
        # The state after a sync that sent everything and reclaimed all but two slots.
        k.nr_hwcur = k.rhead = k.rcur = hwcur
        k.nr_hwtail = k.rtail = (hwcur - 3) % n  # two slots still in flight
        view.tail = k.rtail
        view.head = view.cur = head
        assert k.txsync_prologue() == nm_in_range(head, hwcur, k.rtail, n)


# --- the compiled slot check --------------------------------------------------------------------------------
def c_check(slots: np.ndarray, first: int, count: int, nbufs: int, min_len: int, max_len: int) -> int:
    ptr = ffi.cast("const struct nm_slot *", ffi.from_buffer(slots))
    return int(lib.nm_slots_check(ptr, len(slots), first, count, nbufs, min_len, max_len))


# Edge values (the reserved buffers, the length bounds) come up often, not by luck.
buf_indexes = st.one_of(st.sampled_from([0, 1, 2, 69, 70]), st.integers(0, 70))
lengths = st.one_of(st.sampled_from([0, 1, 59, 60, 1514, 1515, 2048, 2049]), st.integers(0, 2100))
slot_batches = st.integers(1, 48).flatmap(
    lambda n: st.tuples(
        st.lists(st.tuples(buf_indexes, lengths), min_size=n, max_size=n),
        st.integers(0, n - 1),
        st.integers(0, n),
        st.sampled_from([(1, 2048), (0, RX_MAX_LEN), (60, 1514)]),
    )
)


@given(slot_batches, st.integers(2, 70))
def test_compiled_slot_check_agrees_with_the_reference(
    batch: tuple[list[tuple[int, int]], int, int, tuple[int, int]], nbufs: int
) -> None:
    fields, first, count, (min_len, max_len) = batch
    slots = np.zeros(len(fields), dtype=SLOT_DTYPE)
    slots["buf_idx"] = [f[0] for f in fields]
    slots["len"] = [f[1] for f in fields]
    want = slots_check_reference(slots, first, count, nbufs, min_len, max_len)
    assert c_check(slots, first, count, nbufs, min_len, max_len) == want
    if want >= 0:  # the reported slot is bad and every slot before it is good
        assert slots_check_reference(slots, first, want, nbufs, min_len, max_len) == -1


@pytest.mark.parametrize(
    ("buf_idx", "length", "valid"),
    [(0, 60, 0), (1, 60, 0), (2, 60, 1), (99, 60, 1), (100, 60, 0), (5, 0, 0), (5, 2048, 1), (5, 2049, 0)],
)
def test_each_slot_check_bound(buf_idx: int, length: int, valid: int) -> None:
    slots = np.zeros(4, dtype=SLOT_DTYPE)
    slots["buf_idx"], slots["len"] = 10, 60
    slots[1] = (buf_idx, length, 0, 0)
    # From slot 3 the walk is 3, 0, 1, 2: slot 1 is the third one looked at.
    expected = -1 if valid else 2
    assert c_check(slots, 3, 4, 100, 1, 2048) == slots_check_reference(slots, 3, 4, 100, 1, 2048) == expected


def test_compiled_slot_check_refuses_arguments_outside_the_ring() -> None:
    slots = np.zeros(8, dtype=SLOT_DTYPE)
    assert c_check(slots, 8, 1, 100, 0, 100) == -2
    assert c_check(slots, 0, 9, 100, 0, 100) == -2
    assert slots_check_reference(slots, 8, 1, 100, 0, 100) == -2
