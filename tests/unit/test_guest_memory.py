"""Guest memory over real memfds: translation at every edge, every out-of-range case rejected, region add and
remove at scale, and a dirty log whose bits match the Python reference exactly."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostmap.datapath import ffi, lib
from vhostmap.vhost_user.errors import GuestMemoryError
from vhostmap.vhost_user.memory import (
    MAX_MEM_SLOTS,
    REGION_DTYPE,
    VHOST_LOG_PAGE,
    GuestMemory,
    log_dirty_reference,
)
from vhostmap.vhost_user.messages import LogDescriptor, MemoryRegion, MemoryTable

PAGE = mmap.PAGESIZE
KB64 = 0x1_0000
UVA = 0x7F00_0000_0000


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() == before


def memfd(size: int, pattern: bool = True) -> int:
    """A memfd of ``size`` bytes; with ``pattern``, byte i holds a function of i (to tell offsets apart)."""
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    if pattern:
        os.pwrite(fd, bytes((i * 7 + i // 251) & 0xFF for i in range(size)), 0)
    return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def two_regions() -> Iterator[tuple[GuestMemory, int]]:
    """Low region gpa [0x1000, 0x11000) from file offset 0, high region gpa [0x100000, 0x110000) from file
    offset 64 KiB of the same memfd; user addresses at UVA + gpa. Yields the memory and a dup of the memfd."""
    fd = memfd(2 * KB64)
    mem = GuestMemory()
    mem.add_region(MemoryRegion(0x1000, KB64, UVA + 0x1000, 0), os.dup(fd))
    mem.add_region(MemoryRegion(0x10_0000, KB64, UVA + 0x10_0000, KB64), os.dup(fd))
    yield mem, fd
    mem.close()
    os.close(fd)


# --- translation --------------------------------------------------------------------------------------------


def test_gpa_translation_at_region_edges(two_regions: tuple[GuestMemory, int]) -> None:
    mem, fd = two_regions
    assert mem.read(0x1000, 4) == os.pread(fd, 4, 0)
    assert mem.read(0x1000 + KB64 - 16, 16) == os.pread(fd, 16, KB64 - 16)
    assert mem.read(0x10_0000, 8) == os.pread(fd, 8, KB64)
    assert mem.read(0x10_0000 + KB64 - 1, 1) == os.pread(fd, 1, 2 * KB64 - 1)
    assert mem.read(0x1000, KB64) == os.pread(fd, KB64, 0)
    assert mem.gpa_to_host(0x1000 + 100, 1) == mem.gpa_to_host(0x1000, KB64) + 100
    assert len(mem.view(0x1000 + KB64 - 1, 0)) == 0


def test_uva_translation_at_region_edges(two_regions: tuple[GuestMemory, int]) -> None:
    mem, fd = two_regions
    assert bytes(mem.uva_view(UVA + 0x1000, 8)) == os.pread(fd, 8, 0)
    assert bytes(mem.uva_view(UVA + 0x10_0000 + KB64 - 8, 8)) == os.pread(fd, 8, 2 * KB64 - 8)
    assert mem.uva_to_host(UVA + 0x10_0000, 8) == mem.gpa_to_host(0x10_0000, 8)
    with pytest.raises(GuestMemoryError, match="crosses the end"):
        mem.uva_view(UVA + 0x1000 + KB64 - 8, 9)
    with pytest.raises(GuestMemoryError, match="user address in no region"):
        mem.uva_view(UVA, 1)
    with pytest.raises(GuestMemoryError, match="user address in no region"):
        mem.uva_view(0x1000, 1)  # a guest-physical address is not a user address


@pytest.mark.parametrize(
    ("gpa", "length", "reason"),
    [
        (0x0, 1, "in no region"),  # below the first region
        (0xFFF, 2, "in no region"),  # starts just below it
        (0x1000 + KB64, 1, "in no region"),  # just past its end
        (0x8_0000, 16, "in no region"),  # the hole between the regions
        (0x10_0000 + KB64, 0, "in no region"),  # the end itself, even with length 0
        (0x1000 + KB64 - 8, 9, "crosses the end"),
        (0x10_0000, KB64 + 1, "crosses the end"),
        (0x1000, 2**63, "crosses the end"),
        (2**64 - 8, 16, "outside the 64-bit"),  # gpa + len wraps
        (0x1000, 2**64, "outside the 64-bit"),
        (2**64, 0, "outside the 64-bit"),
        (-1, 1, "outside the 64-bit"),
        (0x1000, -1, "outside the 64-bit"),
    ],
)
def test_every_bad_gpa_range_is_rejected(
    two_regions: tuple[GuestMemory, int], gpa: int, length: int, reason: str
) -> None:
    mem, _ = two_regions
    for translate in (mem.view, mem.gpa_to_host, mem.read):
        with pytest.raises(GuestMemoryError, match=reason) as info:
            translate(gpa, length)
        assert (info.value.address, info.value.length) == (gpa, length)


@pytest.mark.parametrize(("uva", "length"), [(2**64 - 8, 16), (UVA + 0x1000, 2**64), (-8, 8)])
def test_wrapping_uva_ranges_are_rejected(
    two_regions: tuple[GuestMemory, int], uva: int, length: int
) -> None:
    mem, _ = two_regions
    with pytest.raises(GuestMemoryError, match="outside the 64-bit"):
        mem.uva_to_host(uva, length)


def test_no_regions_means_no_translation() -> None:
    mem = GuestMemory()
    for translate in (mem.view, mem.uva_view, mem.gpa_to_host, mem.uva_to_host):
        with pytest.raises(GuestMemoryError, match="no memory regions"):
            translate(0, 1)


def test_a_range_spanning_two_adjacent_regions_is_rejected() -> None:
    with no_fd_leak(), GuestMemory() as mem:
        mem.add_region(MemoryRegion(0, KB64, UVA, 0), memfd(KB64))
        mem.add_region(MemoryRegion(KB64, KB64, UVA + KB64, 0), memfd(KB64))
        assert len(mem.view(KB64 - 8, 8)) == len(mem.view(KB64, 8)) == 8
        with pytest.raises(GuestMemoryError, match=f"crosses the end of the region at 0x0\\+{KB64:#x}"):
            mem.view(KB64 - 8, 16)


def test_numpy_integers_translate_like_python_ones(two_regions: tuple[GuestMemory, int]) -> None:
    import numpy as np

    mem, _ = two_regions
    assert mem.gpa_to_host(np.uint64(0x1000), np.uint32(8)) == mem.gpa_to_host(0x1000, 8)
    with pytest.raises(GuestMemoryError):
        mem.view(np.uint64(2**64 - 8), np.uint64(16))


# --- reading and writing ------------------------------------------------------------------------------------


def test_writes_are_visible_through_another_mapping_of_the_memfd(
    two_regions: tuple[GuestMemory, int],
) -> None:
    mem, fd = two_regions
    other = mmap.mmap(fd, 2 * KB64)
    try:
        mem.write(0x10_0000 + 10, b"hello guest")
        assert other[KB64 + 10 : KB64 + 21] == b"hello guest"
        other[20:25] = b"howdy"
        assert mem.read(0x1000 + 20, 5) == b"howdy"
        view = mem.view(0x1000 + 30, 4)
        view[:] = b"\x01\x02\x03\x04"
        assert other[30:34] == b"\x01\x02\x03\x04"
        assert ctypes.string_at(mem.gpa_to_host(0x1000 + 30, 4), 4) == b"\x01\x02\x03\x04"
        view.release()
    finally:
        other.close()


@pytest.mark.parametrize("mmap_offset", [100, PAGE + 123, 3 * PAGE - 1])
def test_mmap_offset_need_not_be_page_aligned(mmap_offset: int) -> None:
    with no_fd_leak():
        fd = memfd(4 * PAGE)
        expected = os.pread(fd, PAGE, mmap_offset)
        with GuestMemory() as mem:
            mem.add_region(MemoryRegion(0x4000, PAGE, UVA, mmap_offset), os.dup(fd))
            assert mem.read(0x4000, PAGE) == expected
            mem.write(0x4000, b"xyz")
            assert os.pread(fd, 3, mmap_offset) == b"xyz"
        os.close(fd)


def test_close_leaves_outstanding_views_usable() -> None:
    mem = GuestMemory()
    mem.add_region(MemoryRegion(0, PAGE, UVA, 0), memfd(PAGE))
    view = mem.view(0, 8)
    mem.close()
    view[:] = b"12345678"  # still mapped: the view keeps it alive, nothing dangles
    assert bytes(view) == b"12345678"
    view.release()
    with pytest.raises(GuestMemoryError, match="no memory regions"):
        mem.view(0, 8)


# --- the region table ---------------------------------------------------------------------------------------


def test_add_and_remove_many_regions() -> None:
    n = 150
    with no_fd_leak():
        fd = memfd(n * PAGE, pattern=False)
        for i in range(n):
            os.pwrite(fd, i.to_bytes(4, "little"), i * PAGE)
        regions = [MemoryRegion(i * 0x10_0000, PAGE, UVA + i * 0x20_0000, i * PAGE) for i in range(n)]
        with GuestMemory() as mem:
            for r in reversed(regions):  # out of order on purpose
                mem.add_region(r, os.dup(fd))
            assert mem.regions == tuple(regions)
            for i, r in enumerate(regions):
                assert mem.read(r.guest_phys_addr, 4) == i.to_bytes(4, "little")
                assert bytes(mem.uva_view(r.userspace_addr, 4)) == i.to_bytes(4, "little")
            for r in regions[::2]:
                # REM_MEM_REG identifies the region by gpa, size and user address; the offset is ignored.
                mem.remove_region(MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, 12345))
            for i, r in enumerate(regions):
                if i % 2:
                    assert mem.read(r.guest_phys_addr + PAGE - 1, 1) == b"\0"
                else:
                    with pytest.raises(GuestMemoryError, match="in no region"):
                        mem.view(r.guest_phys_addr, 1)
            assert len(mem.table) == n // 2
            assert list(mem.table["gpa"]) == [r.guest_phys_addr for r in regions[1::2]]
        os.close(fd)


def test_region_slots_are_limited_to_max_mem_slots() -> None:
    with no_fd_leak():
        fd = memfd(PAGE, pattern=False)
        with GuestMemory() as mem:
            for i in range(MAX_MEM_SLOTS):
                mem.add_region(MemoryRegion(i * PAGE, PAGE, UVA + i * PAGE, 0), os.dup(fd))
            extra = os.dup(fd)
            with pytest.raises(GuestMemoryError, match="MAX_MEM_SLOTS"):
                mem.add_region(MemoryRegion(MAX_MEM_SLOTS * PAGE, PAGE, UVA, 0), extra)
            assert not is_open(extra)
            assert len(mem.regions) == MAX_MEM_SLOTS == 509
        os.close(fd)


@pytest.mark.parametrize(
    ("region", "reason"),
    [
        (MemoryRegion(0x2000, 0, UVA, 0), "empty region"),
        (MemoryRegion(2**64 - PAGE, 2 * PAGE, UVA, 0), "guest address range .* wraps"),
        (MemoryRegion(0x20_0000, PAGE, 2**64 - 1, 0), "user address range .* wraps"),
        (MemoryRegion(0x20_0000, PAGE, UVA, 2**64 - 1), "mmap offset range .* wraps"),
        (MemoryRegion(0x1000 + KB64 - PAGE, 2 * PAGE, UVA, 0), "overlaps the region at 0x1000"),
        (MemoryRegion(0x0, 0x1001, UVA, 0), "overlaps the region at 0x1000"),
        (MemoryRegion(0x4000, PAGE, UVA, 0), "overlaps the region at 0x1000"),
        (MemoryRegion(0x20_0000, 4 * KB64, UVA, 0), "cannot map .* length is greater than file size"),
        (MemoryRegion(0x20_0000, PAGE, UVA, 4 * KB64), "cannot map"),
    ],
)
def test_bad_regions_are_rejected_and_their_fd_closed(
    two_regions: tuple[GuestMemory, int], region: MemoryRegion, reason: str
) -> None:
    mem, fd = two_regions
    before = mem.regions
    dup = os.dup(fd)
    with pytest.raises(GuestMemoryError, match=reason):
        mem.add_region(region, dup)
    assert not is_open(dup)
    assert mem.regions == before


def test_remove_of_an_unknown_region_is_refused(two_regions: tuple[GuestMemory, int]) -> None:
    mem, _ = two_regions
    with pytest.raises(GuestMemoryError, match="no region with user address"):
        mem.remove_region(MemoryRegion(0x1000, KB64, UVA, 0))  # right gpa and size, wrong user address
    assert len(mem.regions) == 2


def test_set_table_replaces_every_region() -> None:
    with no_fd_leak(), GuestMemory() as mem:
        mem.add_region(MemoryRegion(0, PAGE, UVA, 0), memfd(PAGE))
        a, b = memfd(KB64), memfd(KB64)
        expected = os.pread(b, 16, 0)
        table = MemoryTable((MemoryRegion(0x10_0000, KB64, UVA, 0), MemoryRegion(0, KB64, UVA + KB64, 0)))
        mem.set_table(table, [a, b])
        assert not is_open(a) and not is_open(b)
        assert mem.regions == (table.regions[1], table.regions[0])
        assert mem.read(0, 16) == expected


def test_failed_set_table_keeps_the_old_table_and_closes_every_fd(
    two_regions: tuple[GuestMemory, int],
) -> None:
    mem, _ = two_regions
    before = mem.regions
    fds = [memfd(KB64), memfd(KB64), memfd(KB64)]
    table = MemoryTable(
        (
            MemoryRegion(0, KB64, UVA, 0),
            MemoryRegion(KB64, KB64, UVA + KB64, 0),
            MemoryRegion(KB64 + PAGE, KB64, UVA, 0),  # overlaps the second
        )
    )
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.set_table(table, fds)
    assert not any(is_open(fd) for fd in fds)
    assert mem.regions == before
    assert mem.read(0x1000, 1) is not None
    wrong_count = [memfd(KB64)]
    with pytest.raises(GuestMemoryError, match="1 fds for 3 regions"):
        mem.set_table(table, wrong_count)
    assert not is_open(wrong_count[0])


def test_region_table_matches_the_c_layout(two_regions: tuple[GuestMemory, int]) -> None:
    mem, _ = two_regions
    assert ffi.sizeof("struct vm_region") == REGION_DTYPE.itemsize == 32
    fields = REGION_DTYPE.fields
    assert fields is not None
    for name in ("gpa", "size", "uva", "host"):
        assert ffi.offsetof("struct vm_region", name) == fields[name][1]
    rows = [tuple(int(x) for x in row) for row in mem.table]
    assert rows == [
        (r.guest_phys_addr, r.memory_size, r.userspace_addr, mem.gpa_to_host(r.guest_phys_addr, 0))
        for r in mem.regions
    ]


def test_close_unmaps_everything_and_leaks_no_fd() -> None:
    with no_fd_leak():
        mem = GuestMemory()
        mem.add_region(MemoryRegion(0, KB64, UVA, 0), memfd(KB64))
        mem.set_log(memfd(PAGE, pattern=False), LogDescriptor(PAGE, 0))
        maps = Path("/proc/self/maps")
        before = maps.read_text().count("memfd:guest")
        mem.close()
        assert maps.read_text().count("memfd:guest") == before - 2
        assert len(mem.table) == 0 and not mem.logging


# --- dirty log ----------------------------------------------------------------------------------------------

LOG_BYTES = 64  # 512 pages: 2 MiB of guest-physical memory
ADDRESSES = st.one_of(
    st.integers(0, LOG_BYTES * 8 * VHOST_LOG_PAGE + 3 * VHOST_LOG_PAGE),
    st.integers(2**64 - 4 * VHOST_LOG_PAGE, 2**64 - 1),
)
LENGTHS = st.one_of(st.integers(0, 40 * VHOST_LOG_PAGE), st.integers(0, 2**64 - 1))


@given(st.lists(st.tuples(ADDRESSES, LENGTHS), max_size=6))
def test_log_kernel_matches_the_reference(writes: list[tuple[int, int]]) -> None:
    compiled, reference = bytearray(LOG_BYTES), bytearray(LOG_BYTES)
    for gpa, length in writes:
        missed = lib.vm_log_dirty(ffi.from_buffer(compiled), LOG_BYTES, gpa, length)
        assert missed == log_dirty_reference(reference, gpa, length)
    assert compiled == reference


@given(st.integers(0, LOG_BYTES * 8 * VHOST_LOG_PAGE - 1), st.integers(1, 20 * VHOST_LOG_PAGE))
def test_reference_marks_exactly_the_pages_touched(gpa: int, length: int) -> None:
    bitmap = bytearray(LOG_BYTES)
    log_dirty_reference(bitmap, gpa, length)
    marked = {i for i in range(LOG_BYTES * 8) if bitmap[i // 8] >> (i % 8) & 1}
    touched = {a // VHOST_LOG_PAGE for a in (gpa, gpa + length - 1)}
    assert marked == set(range(min(touched), min(max(touched), LOG_BYTES * 8 - 1) + 1))


def log_bits(fd: int, offset: int) -> set[int]:
    data = os.pread(fd, LOG_BYTES, offset)
    return {i for i in range(LOG_BYTES * 8) if data[i // 8] >> (i % 8) & 1}


@pytest.mark.parametrize("log_offset", [0, 100, PAGE + 7])
def test_log_write_sets_the_bits_the_front_end_reads(log_offset: int) -> None:
    with no_fd_leak(), GuestMemory() as mem:
        fd = memfd(2 * PAGE, pattern=False)
        mem.set_log(os.dup(fd), LogDescriptor(LOG_BYTES, log_offset))
        assert mem.logging
        mem.log_write(0, 1)  # page 0
        mem.log_write(5 * VHOST_LOG_PAGE - 1, 2)  # pages 4 and 5
        mem.log_write(16 * VHOST_LOG_PAGE, 9 * VHOST_LOG_PAGE)  # pages 16..24
        mem.log_write(100 * VHOST_LOG_PAGE, 0)  # nothing
        assert log_bits(fd, log_offset) == {0, 4, 5, *range(16, 25)}
        os.close(fd)


def test_log_write_beyond_the_log_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with no_fd_leak(), GuestMemory() as mem:
        fd = memfd(PAGE, pattern=False)
        mem.set_log(os.dup(fd), LogDescriptor(LOG_BYTES, 0))
        last_page = LOG_BYTES * 8 - 1
        with caplog.at_level(logging.WARNING, logger="vhostmap.vhost_user.memory"):
            mem.log_write(last_page * VHOST_LOG_PAGE, 3 * VHOST_LOG_PAGE)  # last page in, two beyond
            mem.log_write(10**9 * VHOST_LOG_PAGE, 1)
        assert log_bits(fd, 0) == {last_page}
        assert len(caplog.records) == 1
        assert "2 page(s)" in caplog.records[0].getMessage()
        os.close(fd)


def test_log_write_without_a_log_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    mem = GuestMemory()
    with caplog.at_level(logging.WARNING, logger="vhostmap.vhost_user.memory"):
        mem.log_write(0, 1)
        mem.log_write(0, 1)
    assert len(caplog.records) == 1
    assert "no SET_LOG_BASE" in caplog.records[0].getMessage()


def test_set_log_replaces_the_previous_log_and_rejects_nonsense() -> None:
    with no_fd_leak(), GuestMemory() as mem:
        first, second = memfd(PAGE, pattern=False), memfd(PAGE, pattern=False)
        mem.set_log(os.dup(first), LogDescriptor(LOG_BYTES, 0))
        mem.set_log(os.dup(second), LogDescriptor(LOG_BYTES, 0))
        mem.log_write(0, 1)
        assert (log_bits(first, 0), log_bits(second, 0)) == (set(), {0})
        for desc in (LogDescriptor(0, 0), LogDescriptor(2 * PAGE, 0), LogDescriptor(1, 2**64 - 1)):
            dup = os.dup(second)
            with pytest.raises(GuestMemoryError):
                mem.set_log(dup, desc)
            assert not is_open(dup)
        os.close(first)
        os.close(second)


def test_a_region_added_twice_is_mapped_once_and_removed_after_two_removals() -> None:
    """QEMU adds every region once per queue pair (one vhost device each) on the same connection."""
    fd = os.memfd_create("twice")
    os.ftruncate(fd, 1 << 20)
    region = MemoryRegion(0x10000, 1 << 20, 0x7F0000000000, 0)
    with GuestMemory() as mem:
        mem.add_region(region, os.dup(fd))
        mem.add_region(region, os.dup(fd))
        assert len(mem.regions) == 1
        mem.write(0x10000, b"still here")
        mem.remove_region(region)
        assert mem.read(0x10000, 10) == b"still here"
        mem.remove_region(region)
        with pytest.raises(GuestMemoryError):
            mem.read(0x10000, 1)
    os.close(fd)
