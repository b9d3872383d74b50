"""Memory a device can DMA into, from guest userspace: files on hugetlbfs and their physical addresses.

A virtio device reads and writes guest-physical addresses. Without an IOMMU (uio_pci_generic gives none), a
userspace driver must hand it the physical address of memory it has mapped, and that memory must not move:
hugetlbfs pages are neither swapped nor migrated, and a 2 MiB huge page is physically contiguous. The
physical address of a mapped page comes from /proc/self/pagemap (its PFN is visible to root only).

`DmaMemory` is one such file mapped shared, with the physical address of each of its pages, so that
``phys(offset)`` turns a file offset into a device address (vectorised over numpy arrays of offsets, for a
whole batch of buffers). `DmaArea` hands out pieces of one that never straddle a page, for rings and headers.
For tests on the host, `DmaMemory.fake` gives a memfd with made-up, contiguous physical addresses.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import numpy.typing as npt

HUGETLBFS_MOUNT = Path("/dev/hugepages")
HUGETLBFS_MAGIC = 0x958458F6
PAGEMAP = "/proc/self/pagemap"
# /proc/self/pagemap: one u64 per 4 KiB virtual page; bits 0-54 are the PFN, bit 63 says the page is present.
PAGEMAP_ENTRY = struct.Struct("<Q")
PAGEMAP_PFN_MASK = (1 << 55) - 1
PAGEMAP_PRESENT = 1 << 63
PAGE_SHIFT = 12


class DmaError(OSError):
    """DMA memory cannot be set up (no huge pages, not root, no hugetlbfs); the message says what to do."""


def hugepage_size(mount: Path = HUGETLBFS_MOUNT) -> int:
    """The huge page size of the hugetlbfs mounted at ``mount`` (its block size)."""
    st = os.statvfs(mount)
    return st.f_bsize


def hugetlbfs_mounted(mount: Path = HUGETLBFS_MOUNT) -> bool:
    """Whether a hugetlbfs is mounted at ``mount``."""
    try:
        with open("/proc/mounts") as f:
            return any(
                line.split()[1] == str(mount) and line.split()[2] == "hugetlbfs" for line in f if line.strip()
            )
    except OSError:
        return False


def free_hugepages() -> int:
    """Free huge pages of the default size (HugePages_Free in /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


def reserve_hugepages(pages: int, mount: Path = HUGETLBFS_MOUNT) -> None:
    """Make sure ``pages`` more huge pages are free and hugetlbfs is mounted at ``mount`` (as root).

    Adds to /proc/sys/vm/nr_hugepages what is missing; raises DmaError when the kernel cannot find them.
    """
    free = free_hugepages()
    if free < pages:
        path = Path("/proc/sys/vm/nr_hugepages")
        try:
            total = int(path.read_text())
            path.write_text(f"{total + pages - free}\n")
        except OSError as e:
            raise DmaError(e.errno, f"cannot reserve {pages} huge pages ({free} free): {e}") from None
        if free_hugepages() < pages:
            raise DmaError(0, f"the kernel found only {free_hugepages()} of {pages} huge pages")
    if not hugetlbfs_mounted(mount):
        mount.mkdir(parents=True, exist_ok=True)
        rc = os.system(f"mount -t hugetlbfs nodev {mount}")
        if rc != 0:
            raise DmaError(0, f"cannot mount hugetlbfs at {mount}")


class DmaMemory:
    """A shared mapping of ``fd`` and the physical address of each of its ``page_size`` pages.

    ``array`` is a uint8 view of all of it and ``address`` its virtual address; ``phys(offset)`` is the
    device address of byte ``offset``. The object owns ``fd`` and the mapping; ``close`` releases both.
    """

    def __init__(
        self, fd: int, size: int, page_size: int, mm: mmap.mmap, pages: npt.NDArray[np.uint64]
    ) -> None:
        self.fd = fd
        self.size = size
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.mm = mm
        self.array: npt.NDArray[np.uint8] = np.frombuffer(mm, dtype=np.uint8)
        self.pages = pages
        anchor = ctypes.c_char.from_buffer(mm)
        self.address = ctypes.addressof(anchor)
        del anchor

    @classmethod
    def hugepages(cls, name: str, size: int, mount: Path = HUGETLBFS_MOUNT) -> Self:
        """``size`` bytes (rounded up to whole huge pages) of a new, already unlinked, file on hugetlbfs.

        The pages are reserved and touched at once and their physical addresses read from pagemap. Raises
        DmaError when hugetlbfs is missing, huge pages run short, or pagemap hides the addresses.
        """
        try:
            page = hugepage_size(mount)
        except OSError as e:
            raise DmaError(e.errno, f"no hugetlbfs at {mount}: {e}") from None
        size = -(-size // page) * page
        path = mount / f"{name}.{os.getpid()}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DmaError(e.errno, f"cannot create {path}: {e}") from None
        # Unlinked at once: the pages go back to the pool when the last fd and mapping do, even after a crash.
        os.unlink(path)
        try:
            os.ftruncate(fd, size)
            # hugetlbfs reserves the pages at mmap time: too few free pages fail here (ENOMEM), not later with
            # a SIGBUS on first touch.
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            raise DmaError(
                e.errno, f"cannot map {size >> 20} MiB of huge pages ({free_hugepages()} free): {e}"
            ) from None
        try:
            array = np.frombuffer(mm, dtype=np.uint8)
            array[::page] = 0  # fault every page in (MAP_POPULATE did; this makes sure)
            del array
            pages = _physical_pages(mm, size, page)
        except BaseException:
            mm.close()
            os.close(fd)
            raise
        return cls(fd, size, page, mm, pages)

    @classmethod
    def fake(cls, size: int, base: int, page_size: int = 1 << 21) -> Self:
        """A memfd whose "physical" address is ``base + offset`` (tests: a fake device maps the same fd)."""
        size = -(-size // page_size) * page_size
        fd = os.memfd_create("vhostmap-dma", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        pages = (base + np.arange(size // page_size, dtype=np.uint64) * page_size).astype(np.uint64)
        return cls(fd, size, page_size, mm, pages)

    def phys(self, offset: int) -> int:
        """The physical address of byte ``offset`` of the file."""
        if not 0 <= offset < self.size:
            raise ValueError(f"offset {offset} outside DMA memory of {self.size} bytes")
        return int(self.pages[offset >> self.page_shift]) + (offset & (self.page_size - 1))

    def phys_array(self, offsets: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
        """Physical addresses of many offsets at once (the caller checked they are inside)."""
        return self.pages[offsets >> self.page_shift] + (offsets & (self.page_size - 1)).astype(np.uint64)

    def close(self) -> None:
        """Unmap (now, or when the last view goes) and close the file. Idempotent."""
        if self.fd < 0:
            return
        self.array = np.empty(0, dtype=np.uint8)
        with contextlib.suppress(BufferError):  # views still exported: unmapped when they go
            self.mm.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _physical_pages(mm: mmap.mmap, size: int, page: int) -> npt.NDArray[np.uint64]:
    """The physical address of each ``page``-sized page of mapping ``mm`` (from pagemap)."""
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor
    pages = np.zeros(size // page, dtype=np.uint64)
    try:
        fd = os.open(PAGEMAP, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise DmaError(e.errno, f"cannot read {PAGEMAP}: {e}") from None
    try:
        for i in range(len(pages)):
            vpage = (base + i * page) >> PAGE_SHIFT
            (entry,) = PAGEMAP_ENTRY.unpack(os.pread(fd, PAGEMAP_ENTRY.size, vpage * PAGEMAP_ENTRY.size))
            pfn = entry & PAGEMAP_PFN_MASK
            if not entry & PAGEMAP_PRESENT or pfn == 0:
                raise DmaError(0, f"{PAGEMAP} shows no physical page for huge page {i} (run as root)")
            pages[i] = pfn << PAGE_SHIFT
    finally:
        os.close(fd)
    if np.any(pages & np.uint64(page - 1)):
        raise DmaError(0, "a huge page is not aligned to its size in physical memory")
    return pages


class DmaArea:
    """Bump allocation of small pieces (rings, headers) from a DmaMemory, none straddling a page.

    A piece must be physically contiguous and only a page is; pieces are never freed one by one (the whole
    area goes with its DmaMemory).
    """

    def __init__(self, memory: DmaMemory) -> None:
        self.memory = memory
        self.used = 0

    def alloc(self, size: int, align: int = 64) -> int:
        """Offset of ``size`` fresh zeroed bytes aligned to ``align``; MemoryError when the area is full."""
        page = self.memory.page_size
        if not 0 < size <= page:
            raise ValueError(f"a DMA piece of {size} bytes cannot fit one {page}-byte page")
        off = -(-self.used // align) * align
        if off // page != (off + size - 1) // page:
            off = -(-off // page) * page
        if off + size > self.memory.size:
            raise MemoryError(f"DMA area of {self.memory.size} bytes is full")
        self.used = off + size
        self.memory.array[off : off + size] = 0
        return off

    @staticmethod
    def need(sizes: list[int], page_size: int, align: int = 64) -> int:
        """An upper bound of the bytes ``alloc`` of each of ``sizes`` in turn takes."""
        total = 0
        for size in sizes:
            total = -(-total // align) * align
            if total // page_size != (total + size - 1) // page_size:
                total = -(-total // page_size) * page_size
            total += size
        return total
