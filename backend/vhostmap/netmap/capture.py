"""Live capture taps on krings: the daemon's half of `vhostmap capture` (the reader is vhostmap.apps.capture).

A sync is where a frame crosses a port's edge: an rxsync brings in what the port's peer sent (a guest's
transmit queue, a NIC, the host stack, an application through its pipe), a txsync delivers to it. A `Tap` on a
kring copies the frames its syncs move into a capture ring, a region shared with the capture application
(layout and rules in datapath/capture.cdef), and never waits for the reader: a frame that does not fit is
dropped and counted. The compiled syncs call the tap themselves (struct nm_kring.tap); the Python syncs
(NetmapAdapter.rxsync / txsync) call `Tap.capture` after an rxsync, and `Tap.stage` before a txsync with
`Tap.commit` after it, since a txsync hook may give the slots' buffers away (a pipe swaps them into its peer).

`Tap` runs the compiled kernel (nm_tap_stage / nm_tap_commit); `tap_stage_reference` and
`tap_commit_reference` are its pure-Python twin, compared by tests/unit/test_capture.py. `CaptureRings` is
one capture's memory: a sealed memfd holding a ring per tapped kring, which the application maps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vhostmap.datapath import ffi, lib
from vhostmap.netmap.abi import NS_MOREFRAG, NS_VNET_HDR, Region, map_region
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.kring import Kring
from vhostmap.system.memfd import sealed_memfd
from vhostmap.virtio.spec import VIRTIO_NET_HDR

#: Bytes from a capture ring's start to its records (struct nm_cap_ring and padding).
CAP_HEADER = int(lib.NM_CAP_HEADER)
#: Records start at multiples of this.
CAP_ALIGN = int(lib.NM_CAP_ALIGN)
#: caplen of a record that says "the next record is at offset 0".
CAP_WRAP = int(lib.NM_CAP_WRAP)

#: struct nm_cap_ring and struct nm_cap_record (datapath/capture.cdef), for numpy.
RING_HEADER_DTYPE = np.dtype(
    [
        ("head", "<u8"),
        ("tail", "<u8"),
        ("frames", "<u8"),
        ("dropped", "<u8"),
        ("size", "<u4"),
        ("snaplen", "<u4"),
    ]
)
RECORD_DTYPE = np.dtype([("ts_ns", "<u8"), ("caplen", "<u4"), ("len", "<u4")])
RECORD_SIZE = RECORD_DTYPE.itemsize
assert RING_HEADER_DTYPE.itemsize == ffi.sizeof("struct nm_cap_ring") <= CAP_HEADER
assert ffi.sizeof("struct nm_cap_record") == RECORD_SIZE

#: Record bytes per tapped kring by default (tcpdump's buffer is 2 MiB for a whole interface), and bounds.
DEFAULT_RING_BYTES = 1 << 20
MIN_RING_BYTES = 64 << 10
MAX_RING_BYTES = 64 << 20
#: Bytes of a frame kept by default and at most: a whole 64 KiB frame (tcpdump's default is 262144).
MAX_SNAPLEN = 65535


def cap_align(n: int) -> int:
    """``n`` rounded up to a record boundary."""
    return (n + CAP_ALIGN - 1) & ~(CAP_ALIGN - 1)


def check_ring_bytes(size: int, snaplen: int) -> None:
    """ValueError unless ``size`` is a power of two within bounds with room for four whole records."""
    if not 0 < snaplen <= MAX_SNAPLEN:
        raise ValueError(f"snaplen {snaplen}: 1..{MAX_SNAPLEN} bytes")
    if not MIN_RING_BYTES <= size <= MAX_RING_BYTES or size & (size - 1):
        raise ValueError(
            f"capture ring of {size} bytes: a power of two in {MIN_RING_BYTES}..{MAX_RING_BYTES}"
        )
    if size < 4 * (RECORD_SIZE + cap_align(snaplen)):
        raise ValueError(f"capture ring of {size} bytes is too small for frames of {snaplen} bytes")


@dataclass
class TapState:
    """What struct nm_tap keeps beside the shared ring, for the reference (names as in capture.cdef)."""

    head: int = 0
    published: int = 0
    frames: int = 0
    dropped: int = 0
    ends: list[int] = field(default_factory=list)
    slot_ends: list[int] = field(default_factory=list)


class Tap:
    """A tap on ``kring``: its syncs' frames go to the capture ring at ``offset`` of ``region`` (``size``
    bytes of records, frames cut at ``snaplen``). ``install`` and ``remove`` under the datapath lock."""

    def __init__(self, kring: Kring, region: Region, offset: int, size: int, snaplen: int) -> None:
        check_ring_bytes(size, snaplen)
        region.check(offset, CAP_HEADER + size, "capture ring")
        self.kring = kring
        self.region = region
        self.offset = offset
        self.header = np.frombuffer(region.mm, dtype=RING_HEADER_DTYPE, count=1, offset=offset)[0]
        self.header["size"], self.header["snaplen"] = size, snaplen
        base = ffi.cast("uint8_t *", ffi.from_buffer(region.array)) + offset
        c = self.c = ffi.new("struct nm_tap *")
        c.ring = ffi.cast("struct nm_cap_ring *", base)
        c.data = base + CAP_HEADER
        c.size, c.snaplen = size, snaplen
        c.cap = kring.nkr_num_slots
        self._ends = ffi.new("uint64_t[]", c.cap)
        self._slot_ends = ffi.new("uint32_t[]", c.cap)
        c.ends, c.slot_ends = self._ends, self._slot_ends

    @property
    def frames(self) -> int:
        """Frames written so far."""
        return int(self.c.frames)

    @property
    def dropped(self) -> int:
        """Frames not written for want of room (the reader was slow)."""
        return int(self.c.dropped)

    def install(self) -> None:
        """Start capturing: the kring's syncs, compiled and Python, call this tap from now on."""
        self.kring.tap = self
        self.kring.c.tap = self.c

    def remove(self) -> None:
        """Stop capturing."""
        if self.kring.tap is self:
            self.kring.tap = None
            self.kring.c.tap = ffi.NULL

    def stage(self, first: int, count: int, ts_ns: int | None = None, source: Kring | None = None) -> int:
        """nm_tap_stage over the slots of ``source`` (the tapped kring by default): records of the whole
        frames of [first, first + count), unpublished. The frames staged."""
        now = time.time_ns() if ts_ns is None else ts_ns
        bufs = ffi.addressof((source or self.kring).c.bufs)
        return int(lib.nm_tap_stage(self.c, bufs, first, count, ffi.NULL, now))

    def commit(self, slots: int) -> int:
        """nm_tap_commit: publish what ends within the first ``slots`` staged slots. The frames counted."""
        return int(lib.nm_tap_commit(self.c, slots))

    def capture(self, first: int, count: int, source: Kring | None = None) -> int:
        """Stage and publish the frames of slots [first, first + count) of ``source`` (the tapped kring by
        default), which a sync has just moved."""
        self.stage(first, count, source=source)
        return self.commit(count)


def tap_stage_reference(
    state: TapState, ring: np.ndarray, data: np.ndarray, kring: Kring, first: int, count: int, ts_ns: int
) -> int:
    """Pure-Python nm_tap_stage: ``ring`` is the capture ring's header (a RING_HEADER_DTYPE record),
    ``data`` its records, ``kring`` the slots' ring; ``state`` the tap's private side."""
    state.head = state.published
    state.ends, state.slot_ends = [], []
    n, size, snaplen = kring.nkr_num_slots, len(data), int(ring["snaplen"])
    if first >= n or count > n or size < CAP_ALIGN or size & (size - 1):
        return 0
    tail = int(ring["tail"])
    slots = kring.ring.slots
    pieces: list[bytes] = []
    skip = 0
    for k in range(count):
        if len(state.ends) == n:
            break
        i = (first + k) % n
        length = int(slots["len"][i])
        idx = int(slots["buf_idx"][i])
        buf = kring.ring.buf(idx if idx < kring.nbufs else 0)
        flags = int(slots["flags"][i])
        if not pieces:
            skip = VIRTIO_NET_HDR.size if flags & NS_VNET_HDR else 0  # what is captured is the frame
        pieces.append(bytes(buf[:length]) if length <= kring.buf_size else b"")
        if flags & NS_MOREFRAG:
            continue
        _record_reference(state, data, b"".join(pieces)[skip:], snaplen, tail, ts_ns)
        state.ends.append(state.head)
        state.slot_ends.append(k + 1)
        pieces = []
    return len(state.ends)


def _record_reference(
    state: TapState, data: np.ndarray, frame: bytes, snaplen: int, tail: int, ts: int
) -> None:
    size = len(data)
    used = (state.head - tail) % (1 << 64)
    caplen = min(len(frame), snaplen)
    need = RECORD_SIZE + cap_align(caplen)
    pos = state.head % size
    skip = size - pos if need > size - pos else 0
    if used > size or skip + need > size - used:
        return
    if skip:
        data[pos : pos + RECORD_SIZE] = np.array([(ts, CAP_WRAP, 0)], dtype=RECORD_DTYPE).view(np.uint8)
        pos = 0
    record = np.array([(ts, caplen, min(len(frame), 0xFFFFFFFF))], dtype=RECORD_DTYPE).view(np.uint8)
    data[pos : pos + RECORD_SIZE] = record
    body = frame[:caplen] + bytes(cap_align(caplen) - caplen)
    data[pos + RECORD_SIZE : pos + need] = np.frombuffer(body, dtype=np.uint8)
    state.head += skip + need


def tap_commit_reference(state: TapState, ring: np.ndarray, slots: int) -> int:
    """Pure-Python nm_tap_commit."""
    head = state.published
    k = 0
    while k < len(state.ends) and state.slot_ends[k] <= slots:
        if state.ends[k] != head:
            state.frames += 1
        else:
            state.dropped += 1
        head = state.ends[k]
        k += 1
    state.published = state.head = head
    state.ends, state.slot_ends = [], []
    if k:
        ring["frames"], ring["dropped"], ring["head"] = state.frames, state.dropped, head
    return k


def port_krings(adapter: NetmapAdapter, spec: str, direction: str) -> list[tuple[Kring, str, str]]:
    """The krings a capture of ``spec`` taps on ``adapter``, with their interface name and direction:
    ``NAME`` its hardware rings, ``NAME^`` its host rings, ``NAME*`` both (netmap's port name suffixes);
    ``direction`` ``in`` (RX krings: what the port's peer sent), ``out`` (TX krings) or ``both``."""
    if direction not in ("in", "out", "both"):
        raise ValueError(f"direction {direction!r}: in, out or both")
    host, hardware = spec.endswith(("^", "*")), not spec.endswith("^")
    if host and not adapter.has_host_rings:
        raise ValueError(f"port {adapter.name!r} has no host rings")
    picked: list[tuple[Kring, str, str]] = []
    for rings, way, count in (
        (adapter.rx_rings, "in", adapter.num_rx_rings),
        (adapter.tx_rings, "out", adapter.num_tx_rings),
    ):
        if direction not in (way, "both"):
            continue
        if hardware:
            picked += [(k, adapter.name, way) for k in rings[:count]]
        if host:
            picked.append((rings[count], f"{adapter.name}^", way))
    return picked


@dataclass(frozen=True)
class TappedKring:
    """One kring a capture taps, as the application is told: the interface its frames belong to (the port,
    ``PORT^`` for host rings), their direction (``in``: the port's peer sent it; ``out``: delivered to the
    peer), and where its capture ring is in the shared memory."""

    iface: str
    direction: str
    kring: str
    offset: int
    size: int


class CaptureRings:
    """One capture's shared memory and taps: a ring of ``size`` bytes for each of ``krings`` (kring,
    interface name, direction), in one sealed memfd (``fd``) the application maps. Install and remove the
    taps under the datapath lock; ``close`` after removing."""

    def __init__(self, krings: list[tuple[Kring, str, str]], size: int, snaplen: int) -> None:
        check_ring_bytes(size, snaplen)
        if not krings:
            raise ValueError("nothing to capture")
        stride = CAP_HEADER + size
        self.memsize = len(krings) * stride
        self.fd = sealed_memfd("vhostmap-capture", self.memsize)
        try:
            self.region = map_region(self.fd, self.memsize)
        except BaseException:
            os.close(self.fd)
            raise
        self.taps = [Tap(k, self.region, j * stride, size, snaplen) for j, (k, _, _) in enumerate(krings)]
        self.rings = [
            TappedKring(iface, direction, k.name, j * stride, size)
            for j, (k, iface, direction) in enumerate(krings)
        ]

    def install(self) -> None:
        """Start every tap (under the datapath lock); ValueError if another capture taps one of the krings."""
        busy = [t.kring.name for t in self.taps if t.kring.tap is not None]
        if busy:
            raise ValueError(f"another capture runs on {', '.join(busy)}")
        for tap in self.taps:
            tap.install()

    def remove(self) -> None:
        """Stop every tap (under the datapath lock)."""
        for tap in self.taps:
            tap.remove()

    def counts(self) -> dict[str, Any]:
        """Frames written and dropped, over all taps."""
        return {"frames": sum(t.frames for t in self.taps), "dropped": sum(t.dropped for t in self.taps)}

    def close(self) -> None:
        """Unmap and close the memfd (the application's mapping stays valid). Idempotent."""
        if self.fd >= 0:
            self.taps = []
            self.region.close()
            os.close(self.fd)
            self.fd = -1
