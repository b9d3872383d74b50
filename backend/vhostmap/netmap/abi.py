"""The netmap binary interface shared with ring users, and the views a ring user reads it through.

Layouts follow modern netmap.h (NETMAP_API 14, head/cur/tail rings); older netmap sources
show the cur/avail pair. Every layout is declared once as a ctypes.Structure; the numpy dtypes used for batch
access are derived from it, so the two cannot drift apart. Fields are little-endian with natural alignment.

``struct netmap_slot`` (16 bytes, SLOT_DTYPE; the same as ``struct nm_slot`` in datapath/netmap.cdef)::

     0  u32 buf_idx     index of the buffer in the buffer pool
     4  u16 len         bytes used in the buffer
     6  u16 flags       NS_*
     8  u64 ptr         user pointer for NS_INDIRECT (unused by vhostmap)

``struct netmap_ring`` (header of RING_HEADER_SIZE = 256 bytes, then ``num_slots`` slots)::

     0  i64 buf_ofs     buffer pool offset relative to this ring: buf(i) = ring + buf_ofs + i * nr_buf_size
     8  u32 num_slots
    12  u32 nr_buf_size
    16  u16 ringid      index of the ring within its direction (host rings follow the hardware ones)
    18  u16 dir         NR_TX or NR_RX
    20  u32 head        (user) first slot the user owns
    24  u32 cur         (user) wakeup point
    28  u32 tail        (kernel) first slot the kernel owns
    32  u32 flags       NR_*
    40  timeval ts      i64 tv_sec, i64 tv_usec: time of the last sync when NR_TIMESTAMP is set
    56  u64 offset_mask
    64  u64 buf_align
   128  u8 sem[128]     aligned to NM_CACHE_ALIGN (padding 72..128)
   256  slots

``struct netmap_if`` (header of IF_HEADER_SIZE = 56 bytes, then the ring offsets)::

     0  char ni_name[16]
    16  u32 ni_version       NETMAP_API
    20  u32 ni_flags
    24  u32 ni_tx_rings      hardware TX rings
    28  u32 ni_rx_rings      hardware RX rings
    32  u32 ni_bufs_head
    36  u32 ni_host_tx_rings
    40  u32 ni_host_rx_rings
    44  u32 ni_spare1[3]
    56  i64 ring_ofs[]       TX rings (hardware, then host), then RX rings (hardware, then host);
                             each the offset of the ring relative to this netmap_if

Ring positions are circular: ``nm_next``/``nm_prev`` step, ``nm_distance`` counts slots from one position to
another, ``nm_in_range`` tests a position against a closed circular interval. The user owns [head, tail); the
kernel owns [tail, head), and one slot always stays empty so that head == tail means "nothing for the user".
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from typing import cast

import numpy as np
import numpy.typing as npt

from vhostmap.netmap.errors import RegionError

NETMAP_API = 14
NM_CACHE_ALIGN = 128
IFNAMSIZ = 16

# Directions (netmap's enum txrx), also the value of netmap_ring.dir.
NR_TX = 0
NR_RX = 1

# Buffers 0 and 1 are never handed out: a slot pointing at them holds no packet (netmap_mem2.c).
NM_RESERVED_BUFS = 2

# --- slot flags (netmap_slot.flags) -------------------------------------------------------------------------
NS_BUF_CHANGED = 0x0001  # buf_idx changed: set whenever a slot gets another buffer
NS_REPORT = 0x0002  # ask for a completion report of this slot
NS_FORWARD = 0x0004  # on rings with NR_FORWARD: pass the slot on to the peer (host <-> NIC)
NS_NO_LEARN = 0x0008  # switch: do not learn the source of this frame
NS_INDIRECT = 0x0010  # data is in a user buffer at slot.ptr
NS_MOREFRAG = 0x0020  # more fragments of this frame follow in the next slot
# vhostmap's own: the frame starts with a virtio-net header (VIRTIO_NET_HDR, 12 bytes) whose offloads travel
# with it, as on a VALE port with NETMAP_BDG_VNET_HDR, but frame by frame (datapath/virtio.cdef).
NS_VNET_HDR = 0x0080
NS_PORT_SHIFT = 8
NS_PORT_MASK = 0xFF << NS_PORT_SHIFT  # switch: destination port override

# --- ring flags (netmap_ring.flags) -------------------------------------------------------------------------
NR_TIMESTAMP = 0x0002  # update ring.ts on every sync
NR_FORWARD = 0x0004  # honour NS_FORWARD on this ring

# --- registration (NIOCREGIF) -------------------------------------------------------------------------------
NR_REG_ALL_NIC = 1  # every hardware ring pair
NR_REG_SW = 2  # the host ring pair only
NR_REG_NIC_SW = 3  # hardware and host rings
NR_REG_ONE_NIC = 4  # hardware ring pair ``ring_id``
NETMAP_RING_MASK = 0x0FFF  # largest ring id
NETMAP_NO_TX_POLL = 0x1000  # poll does not txsync
NETMAP_DO_RX_POLL = 0x8000  # poll rxsyncs even without POLLIN


# --- layouts ------------------------------------------------------------------------------------------------
class Timeval(ctypes.Structure):
    """struct timeval as on LP64 Linux."""

    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_usec", ctypes.c_int64)]


class NetmapSlot(ctypes.Structure):
    """struct netmap_slot."""

    _fields_ = [
        ("buf_idx", ctypes.c_uint32),
        ("len", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("ptr", ctypes.c_uint64),
    ]


class NetmapRing(ctypes.Structure):
    """struct netmap_ring without its slots (they start at RING_HEADER_SIZE)."""

    _fields_ = [
        ("buf_ofs", ctypes.c_int64),
        ("num_slots", ctypes.c_uint32),
        ("nr_buf_size", ctypes.c_uint32),
        ("ringid", ctypes.c_uint16),
        ("dir", ctypes.c_uint16),
        ("head", ctypes.c_uint32),
        ("cur", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ts", Timeval),
        ("offset_mask", ctypes.c_uint64),
        ("buf_align", ctypes.c_uint64),
        # ctypes has no alignment attribute: the padding C inserts before the cache-aligned sem is explicit.
        ("_pad", ctypes.c_uint8 * (NM_CACHE_ALIGN - 72)),
        ("sem", ctypes.c_uint8 * 128),
    ]


class NetmapIf(ctypes.Structure):
    """struct netmap_if without its ring_ofs[] array (it starts at IF_HEADER_SIZE)."""

    _fields_ = [
        ("ni_name", ctypes.c_char * IFNAMSIZ),
        ("ni_version", ctypes.c_uint32),
        ("ni_flags", ctypes.c_uint32),
        ("ni_tx_rings", ctypes.c_uint32),
        ("ni_rx_rings", ctypes.c_uint32),
        ("ni_bufs_head", ctypes.c_uint32),
        ("ni_host_tx_rings", ctypes.c_uint32),
        ("ni_host_rx_rings", ctypes.c_uint32),
        ("ni_spare1", ctypes.c_uint32 * 3),
    ]


# numpy derives the structured dtypes (names, offsets, itemsize) from the ctypes declarations.
SLOT_DTYPE = cast("np.dtype[np.void]", np.dtype(NetmapSlot))
RING_DTYPE = cast("np.dtype[np.void]", np.dtype(NetmapRing))
IF_DTYPE = cast("np.dtype[np.void]", np.dtype(NetmapIf))
RING_OFS_DTYPE = np.dtype(np.int64)

SLOT_SIZE = ctypes.sizeof(NetmapSlot)
RING_HEADER_SIZE = ctypes.sizeof(NetmapRing)
IF_HEADER_SIZE = ctypes.sizeof(NetmapIf)

assert SLOT_SIZE == 16 and RING_HEADER_SIZE == 256 and IF_HEADER_SIZE == 56
assert NetmapRing.sem.offset == NM_CACHE_ALIGN


def ring_size(num_slots: int) -> int:
    """Bytes of a netmap_ring with ``num_slots`` slots."""
    return RING_HEADER_SIZE + num_slots * SLOT_SIZE


def if_size(num_rings: int) -> int:
    """Bytes of a netmap_if listing ``num_rings`` rings (all directions, host rings included)."""
    return IF_HEADER_SIZE + num_rings * RING_OFS_DTYPE.itemsize


# --- ring arithmetic ----------------------------------------------------------------------------------------
def nm_next(i: int, n: int) -> int:
    """The slot after ``i`` in a ring of ``n`` slots."""
    return 0 if i + 1 == n else i + 1


def nm_prev(i: int, n: int) -> int:
    """The slot before ``i`` in a ring of ``n`` slots."""
    return n - 1 if i == 0 else i - 1


def nm_distance(first: int, last: int, n: int) -> int:
    """Slots from ``first`` up to (not including) ``last``, going forward: the size of [first, last)."""
    return (last - first) % n


def nm_in_range(i: int, first: int, last: int, n: int) -> bool:
    """Whether ``i`` lies in the closed circular interval [first, last] of a ring of ``n`` slots."""
    return (i - first) % n <= (last - first) % n


# --- views --------------------------------------------------------------------------------------------------
class Region:
    """A shared memory region mapped in this process: the mmap and a numpy uint8 view over all of it."""

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.size = len(mm)
        self.array: npt.NDArray[np.uint8] = np.frombuffer(mm, dtype=np.uint8)

    def check(self, offset: int, length: int, what: str) -> None:
        """Raise RegionError unless [offset, offset + length) lies inside the region."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RegionError(
                f"{what} at [{offset}, {offset + length}) is outside the region of {self.size} bytes"
            )

    def close(self) -> None:
        """Unmap now if no view is left, otherwise when the last view is garbage collected."""
        self.array = np.empty(0, dtype=np.uint8)
        # Views (numpy arrays, ctypes structures) may still export the mapping; it then goes away with them.
        with contextlib.suppress(BufferError):
            self.mm.close()


def map_region(fd: int, size: int) -> Region:
    """Map ``size`` bytes of a shared region received as ``fd`` (read-write, MAP_SHARED).

    The file must be at least ``size`` bytes long: touching a page past its end would kill us with SIGBUS.
    The caller keeps ownership of ``fd``.
    """
    st = os.fstat(fd)
    if size <= 0 or st.st_size < size:
        raise RegionError(f"fd {fd} holds {st.st_size} bytes, cannot map {size}")
    return Region(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))


class RingView:
    """One netmap_ring in a mapped region: header fields, numpy slot array, buffer access.

    ``num_slots``, ``buf_ofs`` and ``nr_buf_size`` are read once, when the view is made (or given by the
    owner, who must not trust what the ring says about itself); ``head``, ``cur``, ``tail`` and ``flags`` are
    live. ``slots`` is a structured array with SLOT_DTYPE fields ``buf_idx``, ``len``, ``flags``, ``ptr``.
    """

    def __init__(
        self,
        region: Region,
        offset: int,
        num_slots: int | None = None,
        *,
        buf_ofs: int | None = None,
        nr_buf_size: int | None = None,
    ) -> None:
        region.check(offset, RING_HEADER_SIZE, "netmap_ring")
        if offset % 8:
            raise RegionError(f"netmap_ring at {offset} is not 8-byte aligned")
        self.region = region
        self.offset = offset
        self.header = NetmapRing.from_buffer(region.mm, offset)
        self.num_slots = int(self.header.num_slots if num_slots is None else num_slots)
        if self.num_slots < 2:
            raise RegionError(f"netmap_ring at {offset} has {self.num_slots} slots")
        region.check(offset, ring_size(self.num_slots), "netmap_ring slots")
        self.buf_ofs = int(self.header.buf_ofs if buf_ofs is None else buf_ofs)
        self.nr_buf_size = int(self.header.nr_buf_size if nr_buf_size is None else nr_buf_size)
        self.slots: npt.NDArray[np.void] = np.frombuffer(
            region.mm, dtype=SLOT_DTYPE, count=self.num_slots, offset=offset + RING_HEADER_SIZE
        )

    @property
    def head(self) -> int:
        """First slot the user owns."""
        return int(self.header.head)

    @head.setter
    def head(self, value: int) -> None:
        self.header.head = value

    @property
    def cur(self) -> int:
        """Wakeup point: the user wants to hear when tail moves past it."""
        return int(self.header.cur)

    @cur.setter
    def cur(self, value: int) -> None:
        self.header.cur = value

    @property
    def tail(self) -> int:
        """First slot the kernel owns (written by the kernel side only)."""
        return int(self.header.tail)

    @tail.setter
    def tail(self, value: int) -> None:
        self.header.tail = value

    @property
    def flags(self) -> int:
        """NR_* flags."""
        return int(self.header.flags)

    @flags.setter
    def flags(self, value: int) -> None:
        self.header.flags = value

    @property
    def ringid(self) -> int:
        """Index of the ring within its direction."""
        return int(self.header.ringid)

    @property
    def dir(self) -> int:
        """NR_TX or NR_RX."""
        return int(self.header.dir)

    def buf(self, buf_idx: int) -> npt.NDArray[np.uint8]:
        """The whole buffer ``buf_idx`` (nr_buf_size bytes), found as netmap users do, from buf_ofs."""
        start = self.offset + self.buf_ofs + int(buf_idx) * self.nr_buf_size
        self.region.check(start, self.nr_buf_size, f"buffer {buf_idx}")
        return self.region.array[start : start + self.nr_buf_size]


class NetmapIfView:
    """A netmap_if in a mapped region and the rings it lists, found from its offset alone.

    ``tx_rings`` holds the hardware TX rings then the host ones, ``rx_rings`` likewise, as in ring_ofs[].
    """

    def __init__(self, region: Region, offset: int) -> None:
        region.check(offset, IF_HEADER_SIZE, "netmap_if")
        self.region = region
        self.offset = offset
        self.header = NetmapIf.from_buffer(region.mm, offset)
        h = self.header
        self.num_tx_rings = int(h.ni_tx_rings)
        self.num_rx_rings = int(h.ni_rx_rings)
        self.host_tx_rings = int(h.ni_host_tx_rings)
        self.host_rx_rings = int(h.ni_host_rx_rings)
        ntx = self.num_tx_rings + self.host_tx_rings
        nrx = self.num_rx_rings + self.host_rx_rings
        region.check(offset, if_size(ntx + nrx), "netmap_if ring_ofs")
        ring_ofs = np.frombuffer(
            region.mm, dtype=RING_OFS_DTYPE, count=ntx + nrx, offset=offset + IF_HEADER_SIZE
        )
        self.tx_rings = [RingView(region, offset + int(o)) for o in ring_ofs[:ntx]]
        self.rx_rings = [RingView(region, offset + int(o)) for o in ring_ofs[ntx:]]

    @property
    def name(self) -> str:
        """ni_name."""
        return bytes(self.header.ni_name).decode(errors="replace")

    @property
    def version(self) -> int:
        """ni_version (NETMAP_API of the writer)."""
        return int(self.header.ni_version)


# --- passthrough: the CSB and the region header ------------------------------------------------------------
# A passthrough port (netmap/passthrough.py) hands a guest a region of its own: this header at offset 0, one
# CSB entry per ring, then the netmap_if, rings and buffers of that port alone. The CSB is netmap's
# (netmap.h: struct nm_csb_atok / nm_csb_ktoa, the sync-kloop's Communication Status Block): the guest writes
# head/cur and whether it wants interrupts, the daemon writes hwcur/hwtail and whether it wants kicks.
#
# ``struct nm_csb_atok`` (application to kernel, 64 bytes, written by the guest)::
#
#      0  u32 head            the guest ring's head
#      4  u32 cur             the guest ring's cur
#      8  u32 appl_need_kick  1: interrupt the guest when hwtail moves (it sleeps on this ring)
#     12  u32 sync_flags      NAF_* of the guest's sync
#     16  u32 pad[12]
#
# ``struct nm_csb_ktoa`` (kernel to application, 64 bytes, written by the daemon)::
#
#      0  u32 hwcur           the kring's nr_hwcur
#      4  u32 hwtail          the kring's nr_hwtail
#      8  u32 kern_need_kick  1: ring the doorbell after moving head (the daemon is idle on this ring)
#     12  u32 pad[13]
#
# Ordering, as netmap's: the guest stores cur, then head; the daemon loads head, then cur. The daemon stores
# hwcur, then hwtail; the guest loads hwtail, then hwcur. One CSB entry is an atok then a ktoa (CSB_ENTRY_SIZE
# bytes, each half on its own cache line), entries for the TX rings first, then the RX rings.
#
# ``struct vhostmap_pt_header`` (PT_HEADER_SIZE = 128 bytes at offset 0 of the region)::
#
#      0  char magic[8]       PT_MAGIC
#      8  u32 version         PT_VERSION
#     12  u32 header_size     PT_HEADER_SIZE
#     16  u64 region_size     bytes the header describes (BAR 2 may be larger: rounded to a power of two)
#     24  u64 nifp_offset     the netmap_if, from offset 0
#     32  u64 csb_offset      CSB entry 0, from offset 0
#     40  u32 csb_entry_size  CSB_ENTRY_SIZE
#     44  u32 num_csb         entries: num_tx_rings + num_rx_rings
#     48  u32 num_tx_rings
#     52  u32 num_rx_rings
#     56  u32 num_tx_slots
#     60  u32 num_rx_slots
#     64  u32 buf_size
#     68  u32 nbufs
#     72  u64 buffers_offset  buffer 0, from offset 0
#     80  u16 doorbell_peer   the ivshmem peer ID to ring (BAR 0 Doorbell = peer << 16 | doorbell_vector)
#     82  u16 doorbell_vector
#     84  u32 generation      counts the guests the port was handed to (a new attach, a fresh region)
#     88  u32 gone            0 while the daemon serves the region; PT_GONE once it let go of it (it stopped,
#                             or released this guest): nobody syncs these rings any more
#     92  u32 heartbeat       advanced (wrapping) every PT_HEARTBEAT_INTERVAL seconds while the daemon runs
#     96  u8  reserved[32]
#
# The daemon writes the header before it hands the region over and never again, but for ``gone`` and
# ``heartbeat``; a guest checks magic, version and that every offset lies within the region before using
# anything, and ``gone`` on every sync. A daemon killed outright (SIGKILL) or hung cannot write ``gone``: its
# guest's rings just stop moving, and so does ``heartbeat``, which is how the guest tells a daemon that
# stopped answering from one with nothing to say. The beat comes from the daemon's control loop, not from
# the datapath, so that it keeps going while no frame moves; a guest waiting without progress declares the
# daemon gone once ``heartbeat`` stood still for its timeout (PT_HEARTBEAT_TIMEOUT by default: many beats,
# for a control loop delayed by a loaded host).
PT_MAGIC = b"VHMAP-PT"
PT_VERSION = 2  # 2: the heartbeat word
PT_GONE = 1
PT_HEARTBEAT_INTERVAL = 0.2  # seconds between the daemon's beats
PT_HEARTBEAT_TIMEOUT = 5.0  # seconds a guest waits on a still heartbeat before it gives the daemon up


class NmCsbAtok(ctypes.Structure):
    """struct nm_csb_atok (netmap.h): what a passthrough guest tells the daemon about one ring."""

    _fields_ = [
        ("head", ctypes.c_uint32),
        ("cur", ctypes.c_uint32),
        ("appl_need_kick", ctypes.c_uint32),
        ("sync_flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32 * 12),
    ]


class NmCsbKtoa(ctypes.Structure):
    """struct nm_csb_ktoa (netmap.h): what the daemon tells a passthrough guest about one ring."""

    _fields_ = [
        ("hwcur", ctypes.c_uint32),
        ("hwtail", ctypes.c_uint32),
        ("kern_need_kick", ctypes.c_uint32),
        ("pad", ctypes.c_uint32 * 13),
    ]


class PtHeader(ctypes.Structure):
    """The header at offset 0 of a passthrough region (layout above)."""

    _fields_ = [
        ("magic", ctypes.c_char * 8),
        ("version", ctypes.c_uint32),
        ("header_size", ctypes.c_uint32),
        ("region_size", ctypes.c_uint64),
        ("nifp_offset", ctypes.c_uint64),
        ("csb_offset", ctypes.c_uint64),
        ("csb_entry_size", ctypes.c_uint32),
        ("num_csb", ctypes.c_uint32),
        ("num_tx_rings", ctypes.c_uint32),
        ("num_rx_rings", ctypes.c_uint32),
        ("num_tx_slots", ctypes.c_uint32),
        ("num_rx_slots", ctypes.c_uint32),
        ("buf_size", ctypes.c_uint32),
        ("nbufs", ctypes.c_uint32),
        ("buffers_offset", ctypes.c_uint64),
        ("doorbell_peer", ctypes.c_uint16),
        ("doorbell_vector", ctypes.c_uint16),
        ("generation", ctypes.c_uint32),
        ("gone", ctypes.c_uint32),
        ("heartbeat", ctypes.c_uint32),
        ("reserved", ctypes.c_uint8 * 32),
    ]


CSB_HALF_SIZE = ctypes.sizeof(NmCsbAtok)
CSB_ENTRY_SIZE = 2 * CSB_HALF_SIZE
PT_HEADER_SIZE = ctypes.sizeof(PtHeader)

assert CSB_HALF_SIZE == ctypes.sizeof(NmCsbKtoa) == 64 and PT_HEADER_SIZE == 128
assert PtHeader.doorbell_peer.offset == 80 and PtHeader.generation.offset == 84 and PtHeader.gone.offset == 88
assert PtHeader.heartbeat.offset == 92


class CsbView:
    """One ring's CSB entry in a mapped region: ``atok`` (the guest's half) and ``ktoa`` (the daemon's).

    The writer's order is the protocol's (see above); on x86 stores are not reordered with stores nor loads
    with loads, so field order in Python is enough for the single-copy reads and writes done here.
    """

    def __init__(self, region: Region, offset: int) -> None:
        region.check(offset, CSB_ENTRY_SIZE, "CSB entry")
        self.offset = offset
        self.atok = NmCsbAtok.from_buffer(region.mm, offset)
        self.ktoa = NmCsbKtoa.from_buffer(region.mm, offset + CSB_HALF_SIZE)

    # --- the daemon's side ----------------------------------------------------------------------------------
    def read_head_cur(self) -> tuple[int, int]:
        """head, then cur: a cur read after head is never behind it on a ring the guest moves forward."""
        head = int(self.atok.head)
        return head, int(self.atok.cur)

    def write_hw(self, hwcur: int, hwtail: int) -> None:
        """hwcur, then hwtail (netmap's order): a guest reading hwtail then hwcur sees a consistent ring."""
        self.ktoa.hwcur = hwcur
        self.ktoa.hwtail = hwtail

    # --- the guest's side -----------------------------------------------------------------------------------
    def write_head_cur(self, head: int, cur: int) -> None:
        """cur, then head (netmap's nm_sync_kloop_appl_write order)."""
        self.atok.cur = cur
        self.atok.head = head

    def read_hw(self) -> tuple[int, int]:
        """hwtail, then hwcur."""
        hwtail = int(self.ktoa.hwtail)
        return int(self.ktoa.hwcur), hwtail


class PtRegionView:
    """A passthrough region as a guest finds it: the header checked, the netmap_if and one CsbView per ring.

    ``tx_csb[i]`` / ``rx_csb[i]`` go with ``nifp.tx_rings[i]`` / ``nifp.rx_rings[i]``. Raises RegionError for
    a header that is not one (magic, version) or that points outside the region.
    """

    def __init__(self, region: Region) -> None:
        region.check(0, PT_HEADER_SIZE, "passthrough header")
        h = self.header = PtHeader.from_buffer(region.mm, 0)
        if bytes(h.magic) != PT_MAGIC:
            raise RegionError(f"passthrough header magic {bytes(h.magic)!r}, expected {PT_MAGIC!r}")
        if h.version != PT_VERSION:
            raise RegionError(f"passthrough header version {h.version}, this code reads {PT_VERSION}")
        if h.csb_entry_size != CSB_ENTRY_SIZE or h.num_csb != h.num_tx_rings + h.num_rx_rings:
            raise RegionError(
                f"passthrough header: {h.num_csb} CSB entries of {h.csb_entry_size} bytes for "
                f"{h.num_tx_rings} + {h.num_rx_rings} rings"
            )
        if h.region_size > region.size:
            raise RegionError(f"passthrough region of {h.region_size} bytes in a mapping of {region.size}")
        region.check(int(h.csb_offset), int(h.num_csb) * CSB_ENTRY_SIZE, "CSB")
        self.region = region
        self.nifp = NetmapIfView(region, int(h.nifp_offset))
        if len(self.nifp.tx_rings) != h.num_tx_rings or len(self.nifp.rx_rings) != h.num_rx_rings:
            raise RegionError("passthrough header and netmap_if disagree on the number of rings")
        csbs = [CsbView(region, int(h.csb_offset) + k * CSB_ENTRY_SIZE) for k in range(int(h.num_csb))]
        self.tx_csb = csbs[: h.num_tx_rings]
        self.rx_csb = csbs[h.num_tx_rings :]

    @property
    def buffers(self) -> npt.NDArray[np.uint8]:
        """Every buffer of the region as a (nbufs, buf_size) array (row i is buffer i)."""
        h = self.header
        start, n, size = int(h.buffers_offset), int(h.nbufs), int(h.buf_size)
        self.region.check(start, n * size, "buffers")
        return self.region.array[start : start + n * size].reshape(n, size)
