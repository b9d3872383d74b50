"""DMA memory for the guest driver, the allocator over a caller's file, and the guardian process.

The huge page tests run on the host itself (root, hugetlbfs at /dev/hugepages, as scripts/setup leaves it):
the same code runs in the guest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory, region_size
from vhostmap.netmap.errors import AllocatorConfigError
from vhostmap_guest.dma import DmaMemory, free_hugepages, hugetlbfs_mounted
from vhostmap_guest.driver import Guardian, allocator_params

PARAMS = AllocatorParams(if_num=1, ring_num=4, ring_size=256 + 16 * 512, buf_num=3000)
needs_hugepages = pytest.mark.skipif(
    os.geteuid() != 0 or not hugetlbfs_mounted() or free_hugepages() < 8,
    reason="needs root, hugetlbfs at /dev/hugepages and 8 free huge pages",
)


def test_region_size_is_what_the_allocator_maps() -> None:
    for params in (PARAMS, allocator_params(2, 512, 512), AllocatorParams()):
        with NetmapMemory(params) as mem:
            assert mem.size == region_size(params)


def test_the_allocator_lives_in_a_file_given_to_it() -> None:
    fd = os.memfd_create("t")
    os.ftruncate(fd, region_size(PARAMS) + 4096)
    other = os.dup(fd)
    try:
        with NetmapMemory(PARAMS, fd=fd) as mem:
            layout = mem.create_if("eth0", 1, 1, 512, 512)
            buf = int(mem.buf_view(2)[0])
            mem.buf_view(2)[0] = buf ^ 0x5A
            seen = os.pread(other, 1, mem.buf_offset(2))
            assert seen == bytes([buf ^ 0x5A])  # the same bytes, through the caller's file
            mem.delete_if(layout)
    finally:
        os.close(other)


def test_a_file_too_small_for_the_allocator_is_refused() -> None:
    fd = os.memfd_create("t")
    os.ftruncate(fd, 4096)
    with pytest.raises(AllocatorConfigError, match="too small"):
        NetmapMemory(PARAMS, fd=fd)


def test_fake_dma_memory_has_contiguous_made_up_addresses() -> None:
    with DmaMemory.fake(3 << 20, base=1 << 32) as dma:
        assert dma.size == 4 << 20  # whole 2 MiB pages
        assert dma.phys(0) == 1 << 32 and dma.phys((2 << 20) + 5) == (1 << 32) + (2 << 20) + 5
        offs = np.array([0, 4096, 3 << 20], dtype=np.int64)
        assert dma.phys_array(offs).tolist() == [(1 << 32) + int(o) for o in offs]
        with pytest.raises(ValueError):
            dma.phys(dma.size)


@needs_hugepages
def test_huge_pages_have_real_aligned_physical_addresses() -> None:
    size = region_size(PARAMS)
    pages = -(-size // (2 << 20))
    with DmaMemory.hugepages("vhm-test", size) as dma:
        assert dma.page_size == 2 << 20 and len(dma.pages) == pages
        assert all(int(p) and int(p) % (2 << 20) == 0 for p in dma.pages)
        assert len(set(dma.pages.tolist())) == pages
        assert dma.phys(4097) == int(dma.pages[0]) + 4097
        assert not list(Path("/dev/hugepages").glob(f"vhm-test.{os.getpid()}"))  # unlinked at once
        mem = NetmapMemory(PARAMS, fd=os.dup(dma.fd))
        mem.close()
    assert dma.fd == -1


def _wait_exit(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.01)  # polling a child's exit status, with a deadline
    raise AssertionError(f"guardian {pid} did not exit")


def test_the_guardian_restores_when_its_owner_dies(tmp_path: Path) -> None:
    flag = tmp_path / "restored"
    guardian = Guardian(flag.touch)
    os.close(guardian._w)  # what the kernel does when the owner dies, whatever killed it
    guardian._w = -1
    _wait_exit(guardian.pid)
    assert flag.exists()


def test_the_guardian_does_nothing_once_dismissed(tmp_path: Path) -> None:
    flag = tmp_path / "restored"
    guardian = Guardian(flag.touch)
    guardian.dismiss()
    assert not flag.exists()
    guardian.dismiss()  # idempotent
