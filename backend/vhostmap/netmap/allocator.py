"""The netmap memory allocator: one shared region holding the netmap_if, netmap_ring and buffer pools.

Follows netmap's netmap_mem2.c. The region is a sealed memfd mapped MAP_SHARED, so its
fd can be handed to another process (a client, a guest) that maps the same bytes. Inside it three pools sit
back to back, each a whole number of page-multiple clusters::

    [ netmap_if pool ][ netmap_ring pool ][ buffer pool ...................... ]
    0                 if.memtotal         buffers_offset                    size

Per pool, as in the seed: objects are rounded up to 64 bytes; the objects per cluster are chosen by brute
force for the least waste before the next page boundary, with clusters of at most MAX_CLUSTSIZE bytes; the
number of objects is rounded up to whole clusters; a free bitmap (numpy bool, True = free) tracks objects and
an index -> offset table (the lut) locates them. Objects 0 and 1 of the buffer pool are reserved: never handed
out, never freed, so buf_idx 0 and 1 can mean "no buffer".

Ring users compute buffer addresses as ``ring + buf_ofs + buf_idx * nr_buf_size``, so the buffer pool must
be linear: its clusters must hold a whole number of buffers with no gap. A buffer size whose best cluster
leaves a gap is rejected (AllocatorConfigError names nearby sizes that work).

``create_if`` allocates an interface the way netmap_if_new does (the netmap_if, then each ring with one buffer
per slot) and, if any pool runs dry midway, gives everything back before raising AllocatorExhausted.

A ring user can overwrite a slot's buf_idx with nonsense, and the buffer it named is then in no ring: lost,
in netmap until the allocator is reset (netmap_ring_reinit leaves buffer 0 in the slot). Here ``restock``,
which a ring reinit calls, gives such a slot a lost buffer back when there is one (a buffer allocated for the
rings and held by no live ring and no registered holder, ``hold``), else a free one; so the buffers come back
to the pool when the ports close, however often a user wrote nonsense.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from vhostmap.netmap.abi import (
    IF_HEADER_SIZE,
    IFNAMSIZ,
    NETMAP_API,
    NM_RESERVED_BUFS,
    NR_RX,
    NR_TX,
    RING_HEADER_SIZE,
    RING_OFS_DTYPE,
    SLOT_DTYPE,
    SLOT_SIZE,
    NetmapIf,
    NetmapRing,
    Region,
    if_size,
    ring_size,
)
from vhostmap.netmap.errors import AllocatorConfigError, AllocatorExhausted, BufferIndexError
from vhostmap.system.memfd import sealed_memfd

PAGE_SIZE = mmap.PAGESIZE
# Objects are aligned (and sized) to a cache line (the seed's LINE_ROUND).
OBJ_ALIGN = 64
# Upper bound of a cluster, as in the seed: it bounds the brute-force search and the buffer sizes that tile.
MAX_CLUSTSIZE = 1 << 17

# Allowed tunables: netmap_mem2.c's objminsize/objmaxsize and nummin/nummax, except that one netmap_if
# is enough for an allocator that serves a single port.
LIMITS: dict[str, tuple[int, int]] = {
    "if_size": (IF_HEADER_SIZE, 4096),
    "if_num": (1, 10_000),
    "ring_size": (RING_HEADER_SIZE, 32 * 4096),
    "ring_num": (2, 1024),
    "buf_size": (64, 65536),
    "buf_num": (4, 1_000_000),
}


def _round_up(x: int, align: int) -> int:
    return -(-x // align) * align


@dataclass(frozen=True)
class ClusterGeometry:
    """How a pool is cut: ``clustentries`` objects of ``objsize`` bytes per cluster of ``clustsize``."""

    objsize: int
    clustentries: int
    clustsize: int

    @property
    def exact(self) -> bool:
        """Whether the objects fill their cluster with no gap (required of the buffer pool)."""
        return self.clustentries * self.objsize == self.clustsize


def cluster_geometry(objsize: int) -> ClusterGeometry:
    """Cluster layout for objects of ``objsize`` bytes, chosen as netmap_new_obj_allocator does.

    The size is rounded up to OBJ_ALIGN. Then, for 1, 2, ... objects while they fit in MAX_CLUSTSIZE, keep the
    count that leaves the least room before the next page boundary, stopping at the first count that ends
    exactly on one; the cluster is that many objects rounded up to whole pages.
    """
    objsize = _round_up(objsize, OBJ_ALIGN)
    if not 0 < objsize <= MAX_CLUSTSIZE:
        raise ValueError(f"object size {objsize} outside 1..{MAX_CLUSTSIZE}")
    clustentries = 0
    i = 1
    while i * objsize <= MAX_CLUSTSIZE:
        delta = (i * objsize) % PAGE_SIZE
        if delta == 0:
            clustentries = i
            break
        if delta > (clustentries * objsize) % PAGE_SIZE:
            clustentries = i
        i += 1
    return ClusterGeometry(objsize, clustentries, _round_up(clustentries * objsize, PAGE_SIZE))


def _nearby_linear_sizes(objsize: int) -> list[int]:
    lo, hi = LIMITS["buf_size"]
    below = next(
        (s for s in range(objsize - OBJ_ALIGN, lo - 1, -OBJ_ALIGN) if cluster_geometry(s).exact), None
    )
    above = next(
        (s for s in range(objsize + OBJ_ALIGN, hi + 1, OBJ_ALIGN) if cluster_geometry(s).exact), None
    )
    return [s for s in (below, above) if s is not None]


@dataclass(frozen=True)
class AllocatorParams:
    """Tunables of a NetmapMemory (the sysctls dev.netmap.{if,ring,buf}_{size,num} of netmap).

    Sizes are in bytes and rounded up to 64; counts are rounded up to whole clusters. ``ring_size`` bounds
    the slots per ring: (ring_size - 256) // 16. Defaults are netmap's. Raises AllocatorConfigError for a
    value out of range, or a ``buf_size`` whose buffers cannot tile a cluster exactly.
    """

    if_size: int = 1024
    if_num: int = 100
    ring_size: int = 9 * 4096
    ring_num: int = 200
    buf_size: int = 2048
    buf_num: int = 163_840

    def __post_init__(self) -> None:
        for name, (lo, hi) in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise AllocatorConfigError(name, value, f"{lo}..{hi}")
        geometry = cluster_geometry(self.buf_size)
        if not geometry.exact:
            nearby = " or ".join(str(s) for s in _nearby_linear_sizes(geometry.objsize))
            raise AllocatorConfigError(
                "buf_size",
                self.buf_size,
                nearby,
                f"{geometry.objsize}-byte buffers cannot fill a cluster of at most {MAX_CLUSTSIZE} bytes "
                "without a gap, and buffers must be contiguous",
            )


class ObjPool:
    """A pool of same-size objects in the region (netmap_obj_pool): geometry, lut, free bitmap, counters.

    ``offset`` is where the pool starts in the region; ``lut[i]`` is the region offset of object ``i``;
    ``free[i]`` is True when object ``i`` can be handed out. Not locked: NetmapMemory serialises access.
    """

    def __init__(self, name: str, objsize: int, num: int, offset: int, *, reserved: int = 0) -> None:
        g = cluster_geometry(objsize)
        self.name = name
        self.objsize = g.objsize
        self.clustentries = g.clustentries
        self.clustsize = g.clustsize
        self.numclusters = -(-num // g.clustentries)
        self.objtotal = self.numclusters * g.clustentries
        self.memtotal = self.numclusters * g.clustsize
        self.offset = offset
        self.reserved = reserved
        i = np.arange(self.objtotal, dtype=np.int64)
        self.lut: npt.NDArray[np.int64] = (
            offset + (i // g.clustentries) * g.clustsize + (i % g.clustentries) * g.objsize
        )
        self.free: npt.NDArray[np.bool_] = np.ones(self.objtotal, dtype=np.bool_)
        self.free[:reserved] = False
        self.objfree = self.objtotal - reserved

    def alloc(self, n: int) -> npt.NDArray[np.uint32]:
        """Take ``n`` free objects (lowest indexes first), all or none."""
        if n < 0:
            raise ValueError(f"{self.name}: cannot allocate {n} objects")
        if n > self.objfree:
            raise AllocatorExhausted(self.name, n, self.objfree)
        idx = np.flatnonzero(self.free)[:n]
        self.free[idx] = False
        self.objfree -= n
        return idx.astype(np.uint32)

    def check_release(self, idx: npt.NDArray[np.int64]) -> None:
        """Raise BufferIndexError for the first of ``idx`` that cannot be given back; changes nothing."""
        bad = np.flatnonzero((idx < self.reserved) | (idx >= self.objtotal))
        if bad.size:
            i = int(idx[bad[0]])
            what = "reserved" if 0 <= i < self.reserved else "out of range"
            raise BufferIndexError(i, f"{what} in {self.name} (valid: {self.reserved}..{self.objtotal - 1})")
        already = np.flatnonzero(self.free[idx])
        if already.size:
            raise BufferIndexError(int(idx[already[0]]), f"already free in {self.name}")
        uniq, counts = np.unique(idx, return_counts=True)
        if uniq.size != idx.size:
            raise BufferIndexError(int(uniq[counts > 1][0]), f"given twice to one free in {self.name}")

    def release(self, idx: npt.NDArray[np.int64]) -> None:
        """Give back objects that check_release accepted."""
        self.free[idx] = True
        self.objfree += int(idx.size)

    def stats(self) -> dict[str, int]:
        """Counters and geometry, as netmap reports them."""
        return {
            "objtotal": self.objtotal,
            "objfree": self.objfree,
            "objsize": self.objsize,
            "clustsize": self.clustsize,
            "clustentries": self.clustentries,
            "numclusters": self.numclusters,
            "memtotal": self.memtotal,
            "offset": self.offset,
        }


@dataclass(frozen=True)
class RingLayout:
    """Where create_if put one netmap_ring."""

    index: int  # object index in the ring pool
    offset: int  # offset of the netmap_ring in the region
    direction: int  # NR_TX or NR_RX
    ringid: int  # index within its direction; host rings follow the hardware ones
    num_slots: int
    host: bool


@dataclass(frozen=True)
class IfLayout:
    """What create_if allocated: the netmap_if and its rings (hardware then host, per direction)."""

    name: str
    index: int  # object index in the if pool
    offset: int  # offset of the netmap_if in the region (netmap's nr_offset)
    num_tx_rings: int
    num_rx_rings: int
    host_tx_rings: int
    host_rx_rings: int
    tx_rings: tuple[RingLayout, ...] = field(repr=False)
    rx_rings: tuple[RingLayout, ...] = field(repr=False)

    @property
    def rings(self) -> tuple[RingLayout, ...]:
        """Every ring, in ring_ofs[] order."""
        return self.tx_rings + self.rx_rings


def region_size(params: AllocatorParams, head_room: int = 0) -> int:
    """Bytes of the region a NetmapMemory with ``params`` (and ``head_room``) needs (the three pools, clusters
    rounded up, after the head room)."""
    total = head_room
    for objsize, num in (
        (params.if_size, params.if_num),
        (params.ring_size, params.ring_num),
        (params.buf_size, params.buf_num),
    ):
        g = cluster_geometry(objsize)
        total += -(-num // g.clustentries) * g.clustsize
    return total


class NetmapMemory:
    """One netmap memory region (netmap_mem_d) and its three pools.

    ``fd`` is the memfd (sealed against resizing, so a peer cannot make our accesses fault), ``size`` its
    length, ``region`` the mapping, ``array`` a numpy uint8 view of all of it. Buffer ``i`` lives at
    ``buffers_offset + i * buf_size``. All methods are thread-safe.

    Given ``fd``, the region lives in that file instead of a new memfd (a hugetlbfs file whose pages a device
    can DMA into, say): it must hold at least `region_size` bytes, is mapped whole, and this object owns it.

    ``head_room`` bytes (a multiple of the page size) at the start of the region come before the pools and are
    never handed out: a passthrough region's header and CSBs live there (netmap/passthrough.py).
    """

    def __init__(
        self,
        params: AllocatorParams | None = None,
        *,
        name: str = "vhostmap-netmap",
        fd: int | None = None,
        head_room: int = 0,
    ) -> None:
        self.params = params if params is not None else AllocatorParams()
        p = self.params
        if head_room < 0 or head_room % PAGE_SIZE:
            raise AllocatorConfigError("head_room", head_room, f"a multiple of {PAGE_SIZE}")
        self.head_room = head_room
        self.if_pool = ObjPool("netmap_if", p.if_size, p.if_num, head_room)
        self.ring_pool = ObjPool("netmap_ring", p.ring_size, p.ring_num, head_room + self.if_pool.memtotal)
        self.buf_pool = ObjPool(
            "netmap_buf",
            p.buf_size,
            p.buf_num,
            head_room + self.if_pool.memtotal + self.ring_pool.memtotal,
            reserved=NM_RESERVED_BUFS,
        )
        self.size = head_room + self.if_pool.memtotal + self.ring_pool.memtotal + self.buf_pool.memtotal
        if fd is None:
            fd = sealed_memfd(name, self.size)
            map_size = self.size
        else:
            # A file given by the caller (e.g. on hugetlbfs, for a device to DMA into) is mapped whole: the
            # kernel rounds a hugetlbfs mapping up to whole huge pages and could not unmap a shorter one.
            map_size = os.fstat(fd).st_size
            if map_size < self.size:
                os.close(fd)
                raise AllocatorConfigError("fd", map_size, f">= {self.size} bytes", "the file is too small")
        try:
            mm = mmap.mmap(fd, map_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.region = Region(mm)
        self._lock = threading.Lock()
        self._ifs: dict[int, IfLayout] = {}
        # Arrays of buffer indexes held outside the rings (stashes): their buffers are not lost.
        self._holders: dict[int, npt.NDArray[np.uint32]] = {}
        # Buffers alloc_buffers handed to a caller that did not register them (hold): never taken as lost.
        self._private: npt.NDArray[np.bool_] = np.zeros(self.buf_pool.objtotal, dtype=np.bool_)

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """numpy uint8 view of the whole region."""
        return self.region.array

    @property
    def buf_size(self) -> int:
        """Bytes per buffer (netmap_ring.nr_buf_size)."""
        return self.buf_pool.objsize

    @property
    def nbufs(self) -> int:
        """Buffers in the pool, the two reserved ones included: valid indexes are 2..nbufs-1."""
        return self.buf_pool.objtotal

    @property
    def buffers_offset(self) -> int:
        """Offset of buffer 0 in the region."""
        return self.buf_pool.offset

    @property
    def max_ring_slots(self) -> int:
        """The most slots a ring object can hold."""
        return (self.ring_pool.objsize - RING_HEADER_SIZE) // SLOT_SIZE

    @property
    def max_if_rings(self) -> int:
        """The most rings (all directions, host included) a netmap_if object can list."""
        return (self.if_pool.objsize - IF_HEADER_SIZE) // RING_OFS_DTYPE.itemsize

    def stats(self) -> dict[str, Any]:
        """Region size and per-pool counters."""
        return {
            "size": self.size,
            "buffers_offset": self.buffers_offset,
            **{p.name: p.stats() for p in (self.if_pool, self.ring_pool, self.buf_pool)},
        }

    # --- buffers --------------------------------------------------------------------------------------------
    def buf_offset(self, idx: int) -> int:
        """Region offset of buffer ``idx``; BufferIndexError unless 0 <= idx < nbufs."""
        if not 0 <= idx < self.nbufs:
            raise BufferIndexError(idx, f"out of range 0..{self.nbufs - 1}")
        return self.buffers_offset + idx * self.buf_size

    def buf_view(self, idx: int) -> npt.NDArray[np.uint8]:
        """The ``buf_size`` bytes of buffer ``idx``, bounds-checked (reserved buffers are valid scratch)."""
        start = self.buf_offset(int(idx))
        return self.region.array[start : start + self.buf_size]

    def buffer_rows(self) -> npt.NDArray[np.uint8]:
        """Every buffer as a (nbufs, buf_size) array, a view: row ``i`` is buffer ``i`` (for batch copies)."""
        start = self.buffers_offset
        return self.array[start : start + self.nbufs * self.buf_size].reshape(self.nbufs, self.buf_size)

    def alloc_buffers(self, n: int) -> npt.NDArray[np.uint32]:
        """Take ``n`` free buffers, all or none (AllocatorExhausted); never a reserved one. They are the
        caller's (never taken as lost by ``restock``) until freed, or registered with ``hold``."""
        with self._lock:
            idx = self.buf_pool.alloc(n)
            self._private[idx] = True
            return idx

    def hold(self, bufs: npt.NDArray[np.uint32]) -> None:
        """Register ``bufs``, an array of buffer indexes kept outside the rings (a stash), whose contents may
        change in place: what it holds at any time is not lost (``restock``), whatever ring it came from."""
        with self._lock:
            self._holders[id(bufs)] = bufs
            valid = bufs[bufs < self.nbufs]
            self._private[valid] = False

    def unhold(self, bufs: npt.NDArray[np.uint32]) -> None:
        """Forget an array registered with ``hold`` (give its buffers back first: release_held)."""
        with self._lock:
            self._holders.pop(id(bufs), None)

    def restock(self, slots: npt.NDArray[np.void], positions: npt.NDArray[np.int64]) -> int:
        """Give the slots of ``slots`` at ``positions`` (slots of a live ring whose buf_idx is unusable) a
        buffer each: lost ones first, then free ones; how many got one (fewer when the pool is dry, the rest
        keep theirs). A lost buffer is one allocated for the rings that no live ring, no holder and no caller
        of alloc_buffers has: the one a ring user overwrote. Writes buf_idx under the lock, so that two
        restocks never take the same lost buffer.

        A ring user moving a buffer between its slots at this very moment (it holds the index in a register)
        may see it taken as lost and end up sharing it; harmless to the daemon, whose every buffer access is
        bounds-checked, as is a user writing the same index into two slots.
        """
        want = len(positions)
        if not want:
            return 0
        with self._lock:
            lost = np.flatnonzero(self._lost())[:want].astype(np.uint32)
            fresh = min(want - len(lost), self.buf_pool.objfree)
            bufs = np.concatenate([lost, self.buf_pool.alloc(fresh)]) if fresh else lost
            slots["buf_idx"][positions[: len(bufs)]] = bufs
            return len(bufs)

    def _lost(self) -> npt.NDArray[np.bool_]:
        """Per buffer: allocated, yet in no live ring, no holder and not a caller's (under the lock)."""
        nbufs = self.nbufs
        held = [self._slots(r)["buf_idx"] for layout in self._ifs.values() for r in layout.rings]
        held += list(self._holders.values())
        lost = ~self.buf_pool.free & ~self._private
        lost[: self.buf_pool.reserved] = False
        if held:
            idx = np.concatenate(held)
            lost[idx[idx < nbufs]] = False
        return lost

    def free_buffers(self, idx: npt.ArrayLike) -> None:
        """Give buffers back. A reserved, out-of-range, already free or repeated index raises
        BufferIndexError and nothing is freed."""
        arr = np.asarray(idx).ravel()
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"buffer indexes must be integers, not {arr.dtype}")
        arr = arr.astype(np.int64)
        with self._lock:
            self.buf_pool.check_release(arr)
            self.buf_pool.release(arr)
            self._private[arr] = False

    # --- interfaces -----------------------------------------------------------------------------------------
    def create_if(
        self,
        name: str,
        num_tx_rings: int,
        num_rx_rings: int,
        num_tx_slots: int,
        num_rx_slots: int,
        host_tx_rings: int = 1,
        host_rx_rings: int = 1,
    ) -> IfLayout:
        """Allocate and fill a netmap_if, its rings and one buffer per slot (netmap_if_new).

        TX rings start with head = cur = 0 and tail = num_slots - 1 (one slot always stays empty), RX rings
        with head = cur = tail = 0; every slot holds a fresh buffer with len = buf_size. Raises
        AllocatorConfigError for a bad argument, AllocatorExhausted (naming the pool) when a pool runs out,
        in which case every object taken so far has been given back.
        """
        encoded = name.encode()
        if not 0 < len(encoded) < IFNAMSIZ:
            raise AllocatorConfigError("name", len(encoded), f"1..{IFNAMSIZ - 1} bytes", repr(name))
        for arg, value, lo in (
            ("num_tx_rings", num_tx_rings, 1),
            ("num_rx_rings", num_rx_rings, 1),
            ("host_tx_rings", host_tx_rings, 0),
            ("host_rx_rings", host_rx_rings, 0),
        ):
            if value < lo:
                raise AllocatorConfigError(arg, value, f">= {lo}")
        total = num_tx_rings + num_rx_rings + host_tx_rings + host_rx_rings
        if total > self.max_if_rings:
            raise AllocatorConfigError(
                "rings", total, f"1..{self.max_if_rings} in all (if_size {self.if_pool.objsize})"
            )
        for arg, value in (("num_tx_slots", num_tx_slots), ("num_rx_slots", num_rx_slots)):
            if not 2 <= value <= self.max_ring_slots:
                raise AllocatorConfigError(
                    arg, value, f"2..{self.max_ring_slots} (ring_size {self.ring_pool.objsize})"
                )

        plan = [(NR_TX, i, num_tx_slots, i >= num_tx_rings) for i in range(num_tx_rings + host_tx_rings)]
        plan += [(NR_RX, i, num_rx_slots, i >= num_rx_rings) for i in range(num_rx_rings + host_rx_rings)]
        with self._lock:
            taken: list[tuple[ObjPool, npt.NDArray[np.uint32]]] = []
            try:
                if_idx = self.if_pool.alloc(1)
                taken.append((self.if_pool, if_idx))
                rings: list[RingLayout] = []
                for direction, ringid, nslots, host in plan:
                    ring_idx = self.ring_pool.alloc(1)
                    taken.append((self.ring_pool, ring_idx))
                    bufs = self.buf_pool.alloc(nslots)
                    taken.append((self.buf_pool, bufs))
                    ring = RingLayout(
                        int(ring_idx[0]),
                        int(self.ring_pool.lut[ring_idx[0]]),
                        direction,
                        ringid,
                        nslots,
                        host,
                    )
                    self._init_ring(ring, bufs)
                    rings.append(ring)
            except BaseException:
                # Give back everything taken, so that every count and bitmap is exactly as before.
                for pool, idx in reversed(taken):
                    if pool is not self.buf_pool:
                        self._zero(pool, idx)
                    pool.release(idx.astype(np.int64))
                raise
            layout = IfLayout(
                name=name,
                index=int(if_idx[0]),
                offset=int(self.if_pool.lut[if_idx[0]]),
                num_tx_rings=num_tx_rings,
                num_rx_rings=num_rx_rings,
                host_tx_rings=host_tx_rings,
                host_rx_rings=host_rx_rings,
                tx_rings=tuple(r for r in rings if r.direction == NR_TX),
                rx_rings=tuple(r for r in rings if r.direction == NR_RX),
            )
            self._init_if(layout)
            self._ifs[layout.offset] = layout
            return layout

    def delete_if(self, layout: IfLayout) -> None:
        """Free an interface made by create_if: the buffers its slots hold now, its rings, its netmap_if.

        Buffers are taken from the slots as they are (users may have swapped them); a slot index that is
        reserved, out of range, already free or repeated is skipped, since user memory cannot be trusted.
        """
        with self._lock:
            if self._ifs.get(layout.offset) is not layout:
                raise ValueError(
                    f"netmap_if {layout.name!r} at {layout.offset} is not live in this allocator"
                )
            del self._ifs[layout.offset]
            held = [self._slots(r)["buf_idx"] for r in layout.rings]
            self._release_held(np.concatenate(held) if held else np.empty(0, dtype=np.int64))
            ring_idx = np.array([r.index for r in layout.rings], dtype=np.int64)
            self._zero(self.ring_pool, ring_idx)
            self.ring_pool.release(ring_idx)
            if_idx = np.array([layout.index], dtype=np.int64)
            self._zero(self.if_pool, if_idx)
            self.if_pool.release(if_idx)

    def release_held(self, idx: npt.ArrayLike) -> None:
        """Give back the buffers a ring or a stash holds now: indexes that are reserved, out of range, already
        free or repeated are skipped, since users may have swapped buffers around (and may lie)."""
        with self._lock:
            self._release_held(idx)

    def _release_held(self, idx: npt.ArrayLike) -> None:
        bufs = np.unique(np.asarray(idx).ravel().astype(np.int64))
        bufs = bufs[(bufs >= NM_RESERVED_BUFS) & (bufs < self.nbufs)]
        bufs = bufs[~self.buf_pool.free[bufs]]
        self.buf_pool.release(bufs)
        self._private[bufs] = False

    def live_ifs(self) -> list[IfLayout]:
        """Interfaces created and not yet deleted."""
        with self._lock:
            return list(self._ifs.values())

    # --- lifetime -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the fd and unmap (at once, or when the last view of the region goes away). Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.region.close()

    def __enter__(self) -> NetmapMemory:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- helpers --------------------------------------------------------------------------------------------
    def _slots(self, ring: RingLayout) -> npt.NDArray[np.void]:
        return np.frombuffer(
            self.region.mm, dtype=SLOT_DTYPE, count=ring.num_slots, offset=ring.offset + RING_HEADER_SIZE
        )

    def _zero(self, pool: ObjPool, idx: npt.NDArray[Any]) -> None:
        # A freed object is wiped so that a peer still mapping it sees an empty structure, not a stale ring.
        for off in pool.lut[idx]:
            self.region.array[off : off + pool.objsize] = 0

    def _init_ring(self, ring: RingLayout, bufs: npt.NDArray[np.uint32]) -> None:
        self.region.array[ring.offset : ring.offset + self.ring_pool.objsize] = 0
        h = NetmapRing.from_buffer(self.region.mm, ring.offset)
        h.buf_ofs = self.buffers_offset - ring.offset
        h.num_slots = ring.num_slots
        h.nr_buf_size = self.buf_size
        h.ringid = ring.ringid
        h.dir = ring.direction
        h.head = h.cur = 0
        # One TX slot always stays empty, so head == hwcur means "nothing new to send".
        h.tail = ring.num_slots - 1 if ring.direction == NR_TX else 0
        del h
        slots = self._slots(ring)
        slots["buf_idx"] = bufs
        slots["len"] = self.buf_size
        assert ring_size(ring.num_slots) <= self.ring_pool.objsize

    def _init_if(self, layout: IfLayout) -> None:
        self.region.array[layout.offset : layout.offset + self.if_pool.objsize] = 0
        h = NetmapIf.from_buffer(self.region.mm, layout.offset)
        h.ni_name = layout.name.encode()
        h.ni_version = NETMAP_API
        h.ni_tx_rings = layout.num_tx_rings
        h.ni_rx_rings = layout.num_rx_rings
        h.ni_host_tx_rings = layout.host_tx_rings
        h.ni_host_rx_rings = layout.host_rx_rings
        del h
        ring_ofs = np.frombuffer(
            self.region.mm,
            dtype=RING_OFS_DTYPE,
            count=len(layout.rings),
            offset=layout.offset + IF_HEADER_SIZE,
        )
        ring_ofs[:] = [r.offset - layout.offset for r in layout.rings]
        assert if_size(len(layout.rings)) <= self.if_pool.objsize
