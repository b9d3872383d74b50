"""The netmap ABI: layouts as netmap.h declares them, flag values, ring arithmetic, region views."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostmap.datapath import ffi
from vhostmap.netmap import abi
from vhostmap.netmap.abi import (
    IF_DTYPE,
    RING_DTYPE,
    SLOT_DTYPE,
    NetmapIf,
    NetmapRing,
    NetmapSlot,
    Region,
    RingView,
    map_region,
    nm_distance,
    nm_in_range,
    nm_next,
    nm_prev,
)
from vhostmap.netmap.errors import RegionError


def field_offset(dtype: np.dtype[np.void], name: str) -> int:
    fields = dtype.fields
    assert fields is not None
    return int(fields[name][1])


def test_slot_layout_matches_netmap_h_and_the_c_kernels() -> None:
    expected = {"buf_idx": 0, "len": 4, "flags": 6, "ptr": 8}
    assert SLOT_DTYPE.itemsize == ffi.sizeof("struct nm_slot") == 16
    for name, offset in expected.items():
        assert field_offset(SLOT_DTYPE, name) == offset
        assert ffi.offsetof("struct nm_slot", name) == offset
        assert getattr(NetmapSlot, name).offset == offset
    assert [SLOT_DTYPE[n].itemsize for n in expected] == [4, 2, 2, 8]


def test_ring_layout_matches_netmap_h() -> None:
    expected = {
        "buf_ofs": 0,
        "num_slots": 8,
        "nr_buf_size": 12,
        "ringid": 16,
        "dir": 18,
        "head": 20,
        "cur": 24,
        "tail": 28,
        "flags": 32,
        "ts": 40,
        "offset_mask": 56,
        "buf_align": 64,
        "sem": 128,
    }
    for name, offset in expected.items():
        assert getattr(NetmapRing, name).offset == offset, name
        assert field_offset(RING_DTYPE, name) == offset, name
    assert RING_DTYPE.itemsize == abi.RING_HEADER_SIZE == 256
    assert NetmapRing.sem.offset % abi.NM_CACHE_ALIGN == 0
    assert RING_DTYPE["buf_ofs"] == np.dtype("<i8")
    assert RING_DTYPE["ringid"] == RING_DTYPE["dir"] == np.dtype("<u2")


def test_if_layout_matches_netmap_h() -> None:
    expected = {
        "ni_name": 0,
        "ni_version": 16,
        "ni_flags": 20,
        "ni_tx_rings": 24,
        "ni_rx_rings": 28,
        "ni_bufs_head": 32,
        "ni_host_tx_rings": 36,
        "ni_host_rx_rings": 40,
        "ni_spare1": 44,
    }
    for name, offset in expected.items():
        assert getattr(NetmapIf, name).offset == offset, name
        assert field_offset(IF_DTYPE, name) == offset, name
    assert IF_DTYPE.itemsize == abi.IF_HEADER_SIZE == 56
    assert abi.if_size(4) == 56 + 4 * 8
    assert abi.ring_size(1024) == 256 + 1024 * 16


def test_constants_have_the_values_of_modern_netmap_h() -> None:
    assert abi.NETMAP_API == 14
    assert abi.NM_CACHE_ALIGN == 128
    slot_flags = [abi.NS_BUF_CHANGED, abi.NS_REPORT, abi.NS_FORWARD, abi.NS_NO_LEARN, abi.NS_INDIRECT]
    assert [*slot_flags, abi.NS_MOREFRAG] == [1, 2, 4, 8, 0x10, 0x20]
    assert (abi.NS_PORT_SHIFT, abi.NS_PORT_MASK) == (8, 0xFF00)
    assert (abi.NR_TIMESTAMP, abi.NR_FORWARD) == (2, 4)
    assert (abi.NR_REG_ALL_NIC, abi.NR_REG_SW, abi.NR_REG_NIC_SW, abi.NR_REG_ONE_NIC) == (1, 2, 3, 4)
    assert (abi.NETMAP_NO_TX_POLL, abi.NETMAP_DO_RX_POLL, abi.NETMAP_RING_MASK) == (0x1000, 0x8000, 0xFFF)
    assert (abi.NR_TX, abi.NR_RX) == (0, 1)


# --- ring arithmetic ----------------------------------------------------------------------------------------
ring_and_positions = st.integers(2, 4096).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(0, n - 1), st.integers(0, n - 1), st.integers(0, n - 1))
)


@given(ring_and_positions)
def test_next_and_prev_step_around_the_ring(args: tuple[int, int, int, int]) -> None:
    n, i, _, _ = args
    assert nm_next(i, n) == (i + 1) % n
    assert nm_prev(i, n) == (i - 1) % n
    assert nm_prev(nm_next(i, n), n) == i == nm_next(nm_prev(i, n), n)
    assert nm_next(n - 1, n) == 0 and nm_prev(0, n) == n - 1


@given(ring_and_positions)
def test_distance_counts_forward_steps_across_the_wrap(args: tuple[int, int, int, int]) -> None:
    n, a, b, _ = args
    d = nm_distance(a, b, n)
    assert 0 <= d < n
    pos = a
    for _ in range(d):
        pos = nm_next(pos, n)
    assert pos == b
    assert (d + nm_distance(b, a, n)) % n == 0


def netmap_two_case_range(i: int, first: int, last: int) -> bool:
    """The interval test as nm_txsync_prologue writes it: one case per wrap state."""
    if last >= first:
        return first <= i <= last
    return i >= first or i <= last


@given(ring_and_positions)
def test_in_range_is_the_closed_circular_interval(args: tuple[int, int, int, int]) -> None:
    n, i, first, last = args
    walked = {(first + k) % n for k in range(nm_distance(first, last, n) + 1)}
    assert nm_in_range(i, first, last, n) == (i in walked) == netmap_two_case_range(i, first, last)


# --- views --------------------------------------------------------------------------------------------------
@pytest.fixture
def region() -> Iterator[Region]:
    fd = os.memfd_create("abi-test")
    try:
        os.ftruncate(fd, 4 * mmap.PAGESIZE)
        r = map_region(fd, 4 * mmap.PAGESIZE)
    finally:
        os.close(fd)
    yield r
    r.close()


def test_ring_view_reads_and_writes_the_shared_header(region: Region) -> None:
    h = NetmapRing.from_buffer(region.mm, 0)
    h.num_slots, h.nr_buf_size, h.buf_ofs, h.tail = 8, 512, 2048, 7
    view = RingView(region, 0)
    assert (view.num_slots, view.nr_buf_size, view.buf_ofs, view.tail) == (8, 512, 2048, 7)
    view.head = view.cur = 3
    assert (h.head, h.cur) == (3, 3)
    view.slots["buf_idx"][1] = 5
    assert region.array[256 + 16] == 5
    region.array[2048 + 5 * 512] = 0xAB
    assert view.buf(5)[0] == 0xAB
    del h


def test_views_refuse_what_lies_outside_the_region(region: Region) -> None:
    with pytest.raises(RegionError):
        RingView(region, region.size - 100)
    with pytest.raises(RegionError):
        RingView(region, 0, num_slots=10_000)
    view = RingView(region, 0, num_slots=8, buf_ofs=0, nr_buf_size=512)
    with pytest.raises(RegionError):
        view.buf(region.size // 512)
    with pytest.raises(RegionError):
        abi.NetmapIfView(region, region.size)


def test_map_region_refuses_a_file_shorter_than_asked() -> None:
    fd = os.memfd_create("short")
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        with pytest.raises(RegionError):
            map_region(fd, 2 * mmap.PAGESIZE)
    finally:
        os.close(fd)
