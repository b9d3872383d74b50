"""Guest memory of a vhost-user front-end: its regions mapped into this process, address translation, and the
dirty log for live migration.

Follows docs/interop/vhost-user.rst: "Memory access" (guest-physical and user addresses both map through the
region table), SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG (CONFIGURE_MEM_SLOTS), and "Migration" (the dirty
bitmap of SET_LOG_BASE with LOG_SHMFD). Every address the guest or the front-end hands us goes through
``_locate_gpa`` or ``_locate_uva``: these two bounds checks are the security boundary between guest-controlled
numbers and this process's memory. A range must lie inside one region: a buffer that spans two regions, even
adjacent ones, is rejected rather than split (guest buffers are single allocations that never straddle the
memory blocks QEMU turns into regions; a chain of descriptors covers what is larger).

Not thread-safe: the caller keeps datapath threads away while the table changes. A view handed out stays
usable after its region is removed (the mapping lives until the last view is released), so a stale view
never faults, but it no longer is guest memory the front-end knows about.

A front-end may shrink the file behind a region or the log after we mapped it (QEMU seals its memfds against
that, DPDK's virtio-user and hugetlbfs-backed guests cannot): an access past the new end raises SIGBUS.
Mapping refuses a range beyond the end of its file; after that, every mapping is registered with the
SIGBUS guard (datapath/guard.cdef), which replaces a mapping that faulted with zero pages, wherever the access
came from (a compiled kernel or Python), and raises ``gone``: the batch kernels then return
VQ_ERR_MEMORY_GONE and the port marks that device broken (``gone_reason`` says which region). The process and
every other port go on.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import operator
import os
import stat
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, SupportsIndex

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import ffi, lib
from vhostmap.vhost_user.errors import GuestMemoryError
from vhostmap.vhost_user.messages import LogDescriptor, MemoryRegion, MemoryTable

log = logging.getLogger(__name__)

#: Regions one front-end may map (answer to GET_MAX_MEM_SLOTS): KVM's memslot limit on x86, as libvhost-user.
MAX_MEM_SLOTS = 509
#: Bytes of guest-physical memory per dirty log bit (declared in datapath/memory.cdef).
VHOST_LOG_PAGE: int = lib.VHOST_LOG_PAGE
#: Addresses, sizes and offsets of the protocol are u64: a range must end at or below this.
ADDRESS_LIMIT = 1 << 64

#: One row of ``GuestMemory.table``, the same layout as ``struct vm_region`` in datapath/memory.cdef.
# Why memory.c refused a guest range (struct vm_fault's reason), in the words GuestMemory's errors use; a
# range that crosses the end of its region has no entry here (the message names the region).
FAULT_REASONS = {
    lib.VM_FAULT_ADDRESS_SPACE: "range outside the 64-bit address space",
    lib.VM_FAULT_NO_REGIONS: "no memory regions",
    lib.VM_FAULT_NO_REGION: "guest address in no region",
}

REGION_DTYPE = np.dtype([("gpa", "=u8"), ("size", "=u8"), ("uva", "=u8"), ("host", "=u8")])


class _Guarded:
    """A mapping of a front-end's file, [start, start + extent) inside the reservation ``mm`` owns (see
    _map_fd), registered with the SIGBUS guard (datapath/guard.cdef) for as long as it is mapped: until
    ``release`` unmaps it, or, when views still hold it, until the mmap object goes."""

    def __init__(self, mm: mmap.mmap, start: int, extent: int, gone: Any) -> None:
        _install_guard()
        self.mm = mm
        self.slot = lib.vm_guard_add(start, extent, gone)
        if self.slot < 0:
            raise GuestMemoryError(0, extent, f"already {lib.VM_GUARD_MAX} guarded mappings (VM_GUARD_MAX)")
        # ``gone`` is an argument, kept alive with it: the handler may write it while the slot is registered,
        # which can be after the GuestMemory that owns it is gone (a view held the mapping).
        self._forget = weakref.finalize(mm, _unregister, self.slot, gone)

    @property
    def replaced(self) -> bool:
        """Whether the front-end shrank the file under this mapping and the guard replaced it."""
        return bool(lib.vm_guard_state(self.slot) != lib.VM_GUARD_INTACT)

    def release(self) -> bool:
        """Unmap; False when views still hold the mapping (it goes, and leaves the guard, with the last)."""
        try:
            self.mm.close()
        except BufferError:
            return False
        self._forget()
        return True


def _unregister(slot: int, gone: Any) -> None:
    """Take ``slot`` out of the SIGBUS guard (its mapping is unmapped); ``gone`` was kept alive until now."""
    lib.vm_guard_remove(slot)


_guard_installed = False


def _install_guard() -> None:
    """Make sure the SIGBUS handler is the process's (see guard.cdef): installed on the first mapping, and
    again if something (faulthandler.enable(), signal.signal) took SIGBUS over since."""
    global _guard_installed
    installed = lib.vm_guard_install()
    if installed < 0:
        raise OSError(ffi.errno, f"cannot install the SIGBUS handler: {os.strerror(ffi.errno)}")
    if installed and _guard_installed:
        log.warning("the SIGBUS handler for guest memory had been replaced; installed again (chained)")
    _guard_installed = True


@dataclass(eq=False)
class _Mapping:
    """One region mapped into this process. ``buf`` covers exactly the region's bytes."""

    region: MemoryRegion
    mm: mmap.mmap
    buf: memoryview
    host: int
    guard: _Guarded

    @property
    def gpa(self) -> int:
        return self.region.guest_phys_addr

    @property
    def uva(self) -> int:
        return self.region.userspace_addr

    @property
    def size(self) -> int:
        return self.region.memory_size

    def release(self) -> None:
        self.buf.release()
        if not self.guard.release():
            # Someone still holds a view: the mapping goes when the last view does, so nothing dangles.
            log.debug(
                "region %#x+%#x: views still held, unmapped when they are released", self.gpa, self.size
            )


def _alignment(fd: int) -> int:
    """The offset granularity mmap needs for ``fd``: the page size, or the huge page size on hugetlbfs (whose
    st_blksize is the huge page size, and which refuses offsets not aligned to it)."""
    granularity = mmap.ALLOCATIONGRANULARITY
    blksize = os.fstat(fd).st_blksize
    if blksize > granularity and blksize % granularity == 0 and blksize & (blksize - 1) == 0:
        return blksize
    return granularity


# libc's mmap, to map a front-end's fd over a reservation Python's mmap module owns (see _map_fd).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_c_int = ctypes.c_int
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, _c_int, _c_int, _c_int, ctypes.c_long)
MAP_FIXED = 0x10  # <sys/mman.h> (Python's mmap module does not export it)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map_fd(fd: int, offset: int, size: int, what: str, gone: Any) -> tuple[_Guarded, int]:
    """Map ``size`` bytes at ``offset`` of ``fd``, shared and writable, registered with the SIGBUS guard
    (setting ``gone`` if it ever faults). The offset need not be aligned (the spec allows any mmap_offset):
    the mapping starts at the aligned-down offset; returns it and the distance from the start of its mmap
    to ``offset``. A range beyond the end of the file is refused: its first touch would raise SIGBUS.

    ``mmap.mmap(fd, ...)`` keeps a duplicate of ``fd`` open as long as the mapping lives (for its size() and
    resize(), which nothing here uses): one fd per region per front-end, for nothing. So Python's mmap
    reserves the address range anonymously (no fd) and owns it (views, close), and libc's mmap puts the
    front-end's file there with MAP_FIXED; the caller closes ``fd`` at once. The reservation has room to
    align the start to a huge page (hugetlbfs refuses anything else); closing it unmaps everything.
    """
    align = _alignment(fd)
    delta = offset % align
    length = -(-(delta + size) // align) * align
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
            # Pages beyond the end of the file would SIGBUS on first touch.
            raise ValueError(f"length is greater than file size ({st.st_size:#x} bytes)")
        mm = mmap.mmap(-1, length + align - mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, OverflowError) as e:
        raise GuestMemoryError(offset, size, f"cannot map {what}: {e}") from e
    base = _host_address(mm)
    start = -(-base // align) * align
    try:
        got = _libc.mmap(
            start, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | MAP_FIXED, fd, offset - delta
        )
    except (ctypes.ArgumentError, OverflowError) as e:
        mm.close()
        raise GuestMemoryError(offset, size, f"cannot map {what}: {e}") from e
    if got is None or got == _MAP_FAILED:
        err = ctypes.get_errno()
        mm.close()
        raise GuestMemoryError(offset, size, f"cannot map {what}: {os.strerror(err)}")
    try:
        # The file's whole extent, as the kernel mapped it: on hugetlbfs whole huge pages, and the guard can
        # only replace it whole.
        return _Guarded(mm, start, length, gone), start - base + delta
    except BaseException:
        mm.close()
        raise


def _host_address(mm: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(anchor)
    del anchor  # release the export at once, or the mapping could never be closed
    return address


def _check_region(region: MemoryRegion) -> None:
    """The region's own sanity: not empty, and every range it names inside the 64-bit space."""
    g, n, u, o = region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset
    if n <= 0:
        raise GuestMemoryError(g, n, "empty region")
    for name, start in (("guest address", g), ("user address", u), ("mmap offset", o)):
        if start < 0 or start + n > ADDRESS_LIMIT:
            raise GuestMemoryError(g, n, f"{name} range {start:#x}+{n:#x} wraps past 2^64")


def _overlap(mappings: Sequence[_Mapping], region: MemoryRegion) -> _Mapping | None:
    """The mapping among ``mappings`` (sorted by gpa) whose guest-physical range meets ``region``'s."""
    starts = [m.gpa for m in mappings]
    i = bisect.bisect_left(starts, region.guest_phys_addr)
    for m in mappings[max(i - 1, 0) : i + 1]:
        if m.gpa < region.guest_phys_addr + region.memory_size and region.guest_phys_addr < m.gpa + m.size:
            return m
    return None


def _map_region(region: MemoryRegion, fd: int, gone: Any) -> _Mapping:
    guard, delta = _map_fd(
        fd, region.mmap_offset, region.memory_size, f"region at gpa {region.guest_phys_addr:#x}", gone
    )
    mm = guard.mm
    buf = memoryview(mm)[delta : delta + region.memory_size]
    return _Mapping(region, mm, buf, _host_address(mm) + delta, guard)


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


@dataclass(eq=False)
class _Log:
    """The mapped dirty bitmap; ``ptr`` points at the bit of guest-physical page 0 and pins the mapping."""

    guard: _Guarded
    anchor: Any  # cffi buffer of the whole mapping
    ptr: Any  # uint8_t * into it
    size: int

    def release(self) -> None:
        ffi.release(self.anchor)
        self.guard.release()


def log_dirty_reference(bitmap: bytearray, gpa: int, length: int) -> int:
    """Pure-Python reference of the ``vm_log_dirty`` kernel: set the bit of every VHOST_LOG_PAGE page of
    [gpa, gpa + length) in ``bitmap``; return how many of those pages lie beyond it."""
    if length == 0:
        return 0
    first = gpa // VHOST_LOG_PAGE
    last = (min(gpa + length, ADDRESS_LIMIT) - 1) // VHOST_LOG_PAGE
    npages = len(bitmap) * 8
    for page in range(first, min(last, npages - 1) + 1):
        bitmap[page // 8] |= 1 << (page % 8)
    return max(0, last - max(first, npages) + 1)


class GuestMemory:
    """The front-end's memory regions mapped into this process, and the dirty log.

    ``table`` is the region table in gpa order as a numpy array of REGION_DTYPE, for compiled kernels; it is
    replaced (not modified) whenever the regions change. Region fds passed in are always closed, whether the
    call succeeds or not: the mapping is all that is kept.
    """

    def __init__(self) -> None:
        self._mappings: list[_Mapping] = []  # sorted by gpa, disjoint in gpa
        self._starts: list[int] = []  # gpa of each mapping, for bisect
        # How many times each mapped region was added: (gpa, size, uva, mmap_offset) -> count.
        self._refs: dict[tuple[int, int, int, int], int] = {}
        self.table: npt.NDArray[np.void] = np.zeros(0, dtype=REGION_DTYPE)
        self._log: _Log | None = None
        self._log_warned = False
        # What the compiled kernels see: the table and the log (struct vm_memory), kept current with them.
        self.c = ffi.new("struct vm_memory *")
        self.c.regions = ffi.NULL
        self.c.log = ffi.NULL
        # Set by the SIGBUS guard when it replaced one of our mappings (the front-end shrank its file);
        # recomputed for the mappings in use whenever they change.
        self._gone = ffi.new("uint32_t *")
        self.c.gone = self._gone

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The mapped regions in gpa order."""
        return tuple(m.region for m in self._mappings)

    # --- the region table --------------------------------------------------------------------------------

    def add_region(self, region: MemoryRegion, fd: int) -> None:
        """Map one more region (ADD_MEM_REG) from ``fd``, which is closed. Raises GuestMemoryError when the
        region is empty, wraps, overlaps a mapped one in guest-physical space, would exceed MAX_MEM_SLOTS,
        or cannot be mapped (e.g. extends beyond the end of the fd).

        Adding a region identical to a mapped one only counts a reference: QEMU runs one vhost device per
        queue pair over the same connection, and each of them adds (and later removes) every region.
        """
        key = _region_key(region)
        if key in self._refs:
            os.close(fd)
            self._refs[key] += 1
            return
        try:
            _check_region(region)
            if len(self._mappings) >= MAX_MEM_SLOTS:
                raise GuestMemoryError(
                    region.guest_phys_addr,
                    region.memory_size,
                    f"already {MAX_MEM_SLOTS} regions (MAX_MEM_SLOTS)",
                )
            clash = _overlap(self._mappings, region)
            if clash is not None:
                raise GuestMemoryError(
                    region.guest_phys_addr,
                    region.memory_size,
                    f"overlaps the region at {clash.gpa:#x}+{clash.size:#x}",
                )
            mapping = _map_region(region, fd, self._gone)
        finally:
            os.close(fd)
        i = bisect.bisect_left(self._starts, mapping.gpa)
        self._mappings.insert(i, mapping)
        self._starts.insert(i, mapping.gpa)
        self._refs[key] = 1
        self._rebuild_table()

    def remove_region(self, region: MemoryRegion) -> None:
        """Unmap the region (REM_MEM_REG) with the same guest address, size and user address; the mmap
        offset is ignored, as the spec says. Raises GuestMemoryError if there is none. A region added more
        than once stays mapped until it has been removed as many times."""
        for key, refs in self._refs.items():
            if key[:3] == (region.guest_phys_addr, region.memory_size, region.userspace_addr) and refs > 1:
                self._refs[key] = refs - 1
                return
        for i, m in enumerate(self._mappings):
            if (m.gpa, m.size, m.uva) == (region.guest_phys_addr, region.memory_size, region.userspace_addr):
                self._refs = {k: r for k, r in self._refs.items() if k[:3] != (m.gpa, m.size, m.uva)}
                del self._mappings[i]
                del self._starts[i]
                self._rebuild_table()
                m.release()
                return
        raise GuestMemoryError(
            region.guest_phys_addr,
            region.memory_size,
            f"no region with user address {region.userspace_addr:#x} to remove",
        )

    def set_table(self, table: MemoryTable, fds: Sequence[int]) -> None:
        """Replace every region (SET_MEM_TABLE), region i mapped from ``fds[i]``; every fd is closed. On
        error the previous table stays as it was."""
        new: list[_Mapping] = []
        try:
            if len(fds) != len(table.regions):
                raise GuestMemoryError(0, 0, f"{len(fds)} fds for {len(table.regions)} regions")
            for region, fd in zip(table.regions, fds, strict=True):
                _check_region(region)
                clash = _overlap(new, region)
                if clash is not None:
                    raise GuestMemoryError(
                        region.guest_phys_addr,
                        region.memory_size,
                        f"overlaps the region at {clash.gpa:#x}+{clash.size:#x}",
                    )
                mapping = _map_region(region, fd, self._gone)
                new.insert(bisect.bisect_left([m.gpa for m in new], mapping.gpa), mapping)
        except BaseException:
            for m in new:
                m.release()
            raise
        finally:
            _close_fds(fds)
        old, self._mappings = self._mappings, new
        self._starts = [m.gpa for m in new]
        self._refs = {_region_key(r): 1 for r in table.regions}
        self._rebuild_table()
        for m in old:
            m.release()

    def _rebuild_table(self) -> None:
        table = np.array([(m.gpa, m.size, m.uva, m.host) for m in self._mappings], dtype=REGION_DTYPE)
        c = self.c
        c.nregions = 0  # never a count with the old pointer
        c.regions = ffi.cast("struct vm_region *", table.ctypes.data) if len(table) else ffi.NULL
        c.nregions = len(table)
        self.table = table
        self._update_gone()

    # --- memory the front-end took away -----------------------------------------------------------------

    def _update_gone(self) -> None:
        """``gone`` for the mappings in use now (a replaced region that was removed no longer counts)."""
        log_gone = self._log is not None and self._log.guard.replaced
        self._gone[0] = int(log_gone or any(m.guard.replaced for m in self._mappings))

    @property
    def gone(self) -> bool:
        """Whether the front-end shrank the file behind a region or the log since it was mapped (the SIGBUS
        guard replaced it with zero pages): nothing read from this memory since means anything."""
        return bool(self._gone[0])

    def gone_reason(self) -> str | None:
        """Why this memory is ``gone``, naming the region or the log; None if it is not."""
        if not self._gone[0]:
            return None
        for i, m in enumerate(self._mappings):
            if m.guard.replaced:
                return (
                    f"guest memory region {i} (gpa {m.gpa:#x}+{m.size:#x}) shrank under the backend (SIGBUS)"
                )
        if self._log is not None and self._log.guard.replaced:
            return f"the dirty log ({self._log.size:#x} bytes) shrank under the backend (SIGBUS)"
        return "guest memory shrank under the backend (SIGBUS)"

    # --- translation: the security boundary -------------------------------------------------------------

    def _locate_gpa(self, address: SupportsIndex, size: SupportsIndex) -> tuple[_Mapping, int]:
        """The mapping holding all of guest-physical [gpa, gpa + length) and the offset of gpa in it."""
        gpa, length = operator.index(address), operator.index(size)
        if not 0 <= gpa < ADDRESS_LIMIT or length < 0 or gpa + length > ADDRESS_LIMIT:
            raise GuestMemoryError(gpa, length, "range outside the 64-bit address space")
        if not self._mappings:
            raise GuestMemoryError(gpa, length, "no memory regions")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa - self._starts[i] >= self._mappings[i].size:
            raise GuestMemoryError(gpa, length, "guest address in no region")
        m = self._mappings[i]
        offset = gpa - m.gpa
        if offset + length > m.size:
            raise GuestMemoryError(gpa, length, f"crosses the end of the region at {m.gpa:#x}+{m.size:#x}")
        return m, offset

    def _locate_uva(self, address: SupportsIndex, size: SupportsIndex) -> tuple[_Mapping, int]:
        """The mapping holding all of front-end virtual [uva, uva + length) and the offset of uva in it.

        User address ranges of regions may overlap (aliases of the same memory), so this looks at every
        region; it only runs when ring addresses are set."""
        uva, length = operator.index(address), operator.index(size)
        if not 0 <= uva < ADDRESS_LIMIT or length < 0 or uva + length > ADDRESS_LIMIT:
            raise GuestMemoryError(uva, length, "range outside the 64-bit address space")
        if not self._mappings:
            raise GuestMemoryError(uva, length, "no memory regions")
        crossed: _Mapping | None = None
        for m in self._mappings:
            offset = uva - m.uva
            if 0 <= offset < m.size:
                if offset + length <= m.size:
                    return m, offset
                crossed = m
        if crossed is not None:
            raise GuestMemoryError(
                uva,
                length,
                f"crosses the end of the region at user address {crossed.uva:#x}+{crossed.size:#x}",
            )
        raise GuestMemoryError(uva, length, "user address in no region")

    def gpa_to_host(self, gpa: SupportsIndex, length: SupportsIndex) -> int:
        """Host address of guest-physical ``gpa``, once [gpa, gpa + length) is known to lie in one region."""
        m, offset = self._locate_gpa(gpa, length)
        return m.host + offset

    def uva_to_host(self, uva: SupportsIndex, length: SupportsIndex) -> int:
        """Host address of front-end virtual ``uva``, once [uva, uva + length) is known to lie in one
        region."""
        m, offset = self._locate_uva(uva, length)
        return m.host + offset

    def uva_to_gpa(self, uva: SupportsIndex, length: SupportsIndex) -> int:
        """Guest-physical address of front-end virtual ``uva``, once [uva, uva + length) is known to lie in
        one region (where a packed ring's writes are logged: vhost_user.packed)."""
        m, offset = self._locate_uva(uva, length)
        return m.gpa + offset

    def view(self, gpa: SupportsIndex, length: SupportsIndex) -> memoryview:
        """Writable view of guest-physical [gpa, gpa + length) (same checks as gpa_to_host)."""
        m, offset = self._locate_gpa(gpa, length)
        return m.buf[offset : offset + operator.index(length)]

    def uva_view(self, uva: SupportsIndex, length: SupportsIndex) -> memoryview:
        """Writable view of front-end virtual [uva, uva + length) (same checks as uva_to_host)."""
        m, offset = self._locate_uva(uva, length)
        return m.buf[offset : offset + operator.index(length)]

    def read(self, gpa: SupportsIndex, n: SupportsIndex) -> bytes:
        """A copy of ``n`` bytes of guest memory at ``gpa``."""
        return bytes(self.view(gpa, n))

    def write(self, gpa: SupportsIndex, data: bytes) -> None:
        """Copy ``data`` into guest memory at ``gpa`` (not logged: call log_write when logging is on)."""
        self.view(gpa, len(data))[:] = data

    # --- dirty log --------------------------------------------------------------------------------------

    @property
    def logging(self) -> bool:
        """Whether a dirty log is mapped (SET_LOG_BASE was received)."""
        return self._log is not None

    def set_log(self, fd: int, desc: LogDescriptor) -> None:
        """Map the dirty bitmap (SET_LOG_BASE with LOG_SHMFD) from ``fd``, which is closed; replaces any
        previous log."""
        try:
            if (
                desc.mmap_size <= 0
                or desc.mmap_offset < 0
                or desc.mmap_offset + desc.mmap_size > ADDRESS_LIMIT
            ):
                raise GuestMemoryError(desc.mmap_offset, desc.mmap_size, "empty or wrapping dirty log")
            guard, delta = _map_fd(fd, desc.mmap_offset, desc.mmap_size, "the dirty log", self._gone)
        finally:
            os.close(fd)
        anchor = ffi.from_buffer("uint8_t[]", guard.mm, require_writable=True)
        new = _Log(guard, anchor, anchor + delta, desc.mmap_size)
        old, self._log = self._log, new
        self._log_warned = False
        self.c.log, self.c.log_size = new.ptr, new.size
        if old is not None:
            old.release()
        self._update_gone()

    def log_write(self, address: SupportsIndex, size: SupportsIndex) -> None:
        """Mark the pages of guest-physical [gpa, gpa + length) dirty. Pages beyond the log are skipped, with
        one warning per log; so is everything when no log is mapped."""
        gpa, length = operator.index(address), operator.index(size)
        if not (0 <= gpa < ADDRESS_LIMIT and 0 <= length < ADDRESS_LIMIT):
            raise GuestMemoryError(gpa, length, "range outside the 64-bit address space")
        current = self._log
        if current is None:
            missed = 1 if length else 0
        else:
            missed = lib.vm_log_dirty(current.ptr, current.size, gpa, length)
        if missed and not self._log_warned:
            self._log_warned = True
            log.warning(
                "dirty log: %d page(s) at gpa %#x+%#x beyond the %s; not logged (warned once)",
                missed,
                gpa,
                length,
                f"{current.size}-byte log" if current is not None else "log (no SET_LOG_BASE yet)",
            )

    # --- teardown ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap every region and the log."""
        old, self._mappings, self._starts = self._mappings, [], []
        self._refs = {}
        self._rebuild_table()
        for m in old:
            m.release()
        current, self._log = self._log, None
        self.c.log, self.c.log_size = ffi.NULL, 0
        if current is not None:
            current.release()
        self._update_gone()


def _region_key(region: MemoryRegion) -> tuple[int, int, int, int]:
    return (region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset)
