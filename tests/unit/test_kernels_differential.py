"""The compiled split-virtqueue kernels against the Python reference, byte for byte.

Every test builds one guest memory image (two regions of a memfd with a hole between them, a split virtqueue,
chains of buffers, indirect tables) and one netmap ring image (slots and buffers), makes two identical
instances of them, runs the reference datapath (rxtx plus flush_used, call and enable_kicks) on one and the
compiled one on the other, and compares everything either could have touched: the result or the fault (same
message, same cause), the queue's indexes and unpublished used entries, every byte of guest memory, the slots,
the netmap buffers, the dirty log and the call eventfd.

Hypothesis draws honest drivers (chains of 1..N segments, headers split across descriptors, indirect tables,
jumbo frames, mergeable buffers or not, indexes about to wrap, EVENT_IDX or not) and hostile ones (each check
of the descriptor walk violated in turn); the named tests pin each case down once more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vhostmap.datapath import choice, ffi, lib
from vhostmap.netmap.abi import NS_MOREFRAG, NS_VNET_HDR, SLOT_DTYPE
from vhostmap.netmap.offload import ALL_NEEDS, NEEDS_CSUM
from vhostmap.vhost_user import kernels
from vhostmap.vhost_user.errors import GuestMemoryError
from vhostmap.vhost_user.kernels import COMPILED, REFERENCE, Datapath
from vhostmap.vhost_user.memory import GuestMemory
from vhostmap.vhost_user.messages import LogDescriptor, MemoryRegion
from vhostmap.vhost_user.rxtx import MAX_FRAME, Buffers
from vhostmap.vhost_user.virtqueue import MAX_CHAIN_LENGTH, SplitVirtqueue, VirtqueueError, VringAddresses
from vhostmap.virtio.spec import (
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_ELEM,
)

UVA = 0x7F00_0000_0000
# (guest-physical start, size, memfd offset): two regions with a hole in guest-physical space between them.
REGIONS = ((0x1000, 0x1F000, 0), (0x30000, 0x30000, 0x1F000))
FILE_SIZE = 0x4F000
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000  # room for 256 entries each
TABLES = (0x4000, 0x8000)  # indirect tables: 1024 descriptors
BUFFER_AREAS = ((0x8000, 0x20000), (0x30000, 0x60000))
RX_QUEUE, TX_QUEUE = 0, 1
HDR = VIRTIO_NET_HDR_SIZE

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def file_offset(gpa: int) -> int:
    for start, size, offset in REGIONS:
        if start <= gpa < start + size:
            return offset + gpa - start
    raise ValueError(f"gpa {gpa:#x} is in no region")


def uva(gpa: int) -> int:
    return UVA + file_offset(gpa)


# --- the images both instances start from ------------------------------------------------------------------


class GuestImage:
    """The bytes of guest memory: random everywhere but the rings, which start zeroed."""

    def __init__(self, num: int, rnd: random.Random) -> None:
        self.num = num
        self.rnd = rnd
        self.image = bytearray(rnd.randbytes(FILE_SIZE))
        for gpa in (DESC_GPA, AVAIL_GPA, USED_GPA):
            self.write(gpa, bytes(0x1000))
        self.next_table = TABLES[0]

    def write(self, gpa: int, data: bytes) -> None:
        off = file_offset(gpa)
        self.image[off : off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = file_offset(gpa)
        return bytes(self.image[off : off + n])

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int = DESC_GPA) -> None:
        self.write(table + VRING_DESC.size * i, VRING_DESC.pack(addr, length, flags, nxt))

    def read_desc(self, i: int, table: int = DESC_GPA) -> tuple[int, int, int, int]:
        addr, length, flags, nxt = VRING_DESC.unpack(self.read(table + VRING_DESC.size * i, VRING_DESC.size))
        return addr, length, flags, nxt

    def patch_desc(self, i: int, table: int = DESC_GPA, **changes: int) -> None:
        addr, length, flags, nxt = self.read_desc(i, table)
        self.desc(
            i,
            changes.get("addr", addr),
            changes.get("length", length),
            changes.get("flags", flags),
            changes.get("nxt", nxt),
            table,
        )

    def avail(self, first: int, heads: list[int], idx: int, flags: int, used_event: int) -> None:
        ring = bytearray(4 + 2 * self.num + 2)
        struct.pack_into("<HH", ring, 0, flags, idx & 0xFFFF)
        for k, head in enumerate(heads):
            struct.pack_into("<H", ring, 4 + 2 * ((first + k) % self.num), head)
        struct.pack_into("<H", ring, 4 + 2 * self.num, used_event & 0xFFFF)
        self.write(AVAIL_GPA, bytes(ring))

    def used_header(self, flags: int, idx: int, avail_event: int) -> None:
        self.write(USED_GPA, struct.pack("<HH", flags, idx & 0xFFFF))
        self.write(USED_GPA + 4 + VRING_USED_ELEM.size * self.num, struct.pack("<H", avail_event))

    def table(self, entries: int) -> int:
        """A place for an indirect table of ``entries`` descriptors (a new table may cover an old one)."""
        size = VRING_DESC.size * entries
        if self.next_table + size > TABLES[1]:
            self.next_table = TABLES[0]
        gpa = self.next_table
        self.next_table += size + self.rnd.choice((0, 8, 16))  # sometimes misaligned
        return gpa

    def buffer(self, length: int) -> int:
        """A guest-physical address where ``length`` bytes fit inside one region's buffer area."""
        areas = [(lo, hi) for lo, hi in BUFFER_AREAS if hi - lo >= length]
        lo, hi = self.rnd.choice(areas)
        return self.rnd.randrange(lo, hi - length + 1)


@dataclass
class RingImage:
    """A netmap ring: its slots and the region holding its buffers (buffer i at base + i * buf_size)."""

    slots: npt.NDArray[np.void]
    region: npt.NDArray[np.uint8]
    base: int
    buf_size: int

    @classmethod
    def make(cls, num_slots: int, buf_size: int, rnd: random.Random, base: int = 64) -> RingImage:
        nbufs = num_slots + 4
        region = np.frombuffer(bytearray(rnd.randbytes(base + nbufs * buf_size)), dtype=np.uint8)
        slots = np.zeros(num_slots, dtype=SLOT_DTYPE)
        slots["buf_idx"] = rnd.sample(range(2, nbufs), num_slots)
        # Garbage where the kernels must write what the reference writes.
        slots["len"] = [rnd.randrange(0x10000) for _ in range(num_slots)]
        slots["flags"] = [rnd.randrange(0x10000) for _ in range(num_slots)]
        slots["ptr"] = [rnd.randrange(1 << 64) for _ in range(num_slots)]
        return cls(slots, region, base, buf_size)

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    def fragments(self, first: int, lens: list[int], more: list[bool], other_flags: int = 0) -> None:
        """Fragments of ``lens`` bytes in the slots from ``first``, NS_MOREFRAG where ``more``."""
        for k, (length, m) in enumerate(zip(lens, more, strict=True)):
            s = (first + k) % self.num_slots
            self.slots[s]["len"] = length
            self.slots[s]["flags"] = (NS_MOREFRAG if m else 0) | other_flags

    def frames(self, first: int, sizes: list[int]) -> None:
        """Whole frames of ``sizes`` bytes from ``first``, each over as many slots as it needs."""
        lens: list[int] = []
        more: list[bool] = []
        for size in sizes:
            parts = [self.buf_size] * (size // self.buf_size) + (
                [size % self.buf_size] if size % self.buf_size else []
            )
            parts = parts or [0]
            lens += parts
            more += [True] * (len(parts) - 1) + [False]
        self.fragments(first, lens, more)


@dataclass
class Case:
    """One scenario: a guest image with one queue, a netmap ring, and the batches to run on them.

    A batch is (first slot, space for dequeue or count for enqueue); a first slot of -1 continues where the
    previous batch stopped.
    """

    guest: GuestImage
    ring: RingImage
    writable: bool  # a receive queue (enqueue) rather than a transmit queue (dequeue)
    heads: list[int] = field(default_factory=list)  # the available entries from last_avail
    hdr_len: int = HDR
    mergeable: bool = True
    event_idx: bool = False
    indirect: bool = True
    kicks: bool = True  # False: a polling device asks the driver not to kick
    log_dirty: bool = False
    host_offloads: bool = False  # the guest's headers may ask for offloads (mostly nonsense ones here)
    pass_offloads: int = 0  # of those, what may travel with the frame (NS_VNET_HDR) instead of being done
    guest_offloads: int = 0  # what a receive queue's driver takes with a frame's header
    log_size: int | None = None  # bytes of dirty bitmap; None: no SET_LOG_BASE
    log_used: bool = True
    last_avail: int = 0
    used_idx: int = 0
    signalled_used: int = 0
    avail_idx: int | None = None  # default: last_avail + len(heads)
    avail_flags: int = 0
    used_event: int = 0
    batches: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num(self) -> int:
        return self.guest.num

    def finish(self) -> None:
        """Write the available ring and the used ring header."""
        idx = self.last_avail + len(self.heads) if self.avail_idx is None else self.avail_idx
        self.guest.avail(self.last_avail, self.heads, idx, self.avail_flags, self.used_event)
        # Flags and avail_event start as garbage that the completion overwrites the same way.
        self.guest.used_header(1, self.used_idx, 0xABCD)

    def chain(self, ids: list[int], lens: list[int], *, indirect: bool = False) -> int:
        """A chain of buffers of ``lens`` bytes through descriptors ``ids`` (one id, the indirect descriptor,
        when ``indirect``), made available. Returns its head."""
        flag = VRING_DESC_F_WRITE if self.writable else 0
        g, n = self.guest, len(lens)
        if indirect:
            table = g.table(n)
            order = [0, *g.rnd.sample(range(1, n), n - 1)]  # the walk starts at entry 0, then follows links
            for k, entry in enumerate(order):
                more = k + 1 < n
                nxt = order[k + 1] if more else g.rnd.randrange(0x10000)
                g.desc(
                    entry, g.buffer(lens[k]), lens[k], flag | (VRING_DESC_F_NEXT if more else 0), nxt, table
                )
            g.desc(ids[0], table, VRING_DESC.size * n, VRING_DESC_F_INDIRECT | flag, g.rnd.randrange(0x10000))
        else:
            assert len(ids) == n
            for k, i in enumerate(ids):
                more = k + 1 < n
                nxt = ids[k + 1] if more else g.rnd.randrange(0x10000)
                g.desc(i, g.buffer(lens[k]), lens[k], flag | (VRING_DESC_F_NEXT if more else 0), nxt)
        self.heads.append(ids[0])
        return ids[0]

    def chains(self, lens_list: list[list[int]], *, indirect: bool = False) -> list[int]:
        """Several chains, descriptors handed out in order from 0."""
        heads, next_id = [], 0
        for lens in lens_list:
            n = 1 if indirect else len(lens)
            heads.append(self.chain([(next_id + k) % self.num for k in range(n)], lens, indirect=indirect))
            next_id += n
        return heads


def make_case(
    writable: bool, num: int = 8, num_slots: int = 16, buf_size: int = 2048, seed: int = 1, **kw: Any
) -> Case:
    rnd = random.Random(seed)
    ring = RingImage.make(num_slots, buf_size, rnd)
    if writable:  # every slot a valid one-slot frame, until the test puts its own
        ring.fragments(0, [rnd.randint(1, buf_size) for _ in range(num_slots)], [False] * num_slots)
    return Case(GuestImage(num, rnd), ring, writable, **kw)


# --- running both ------------------------------------------------------------------------------------------


def fault_outcome(e: VirtqueueError) -> tuple[Any, ...]:
    """What a run that faulted is compared by: queue, reason and cause, message included."""
    cause = e.__cause__
    return ("fault", e.queue, e.reason, type(cause).__name__, str(cause) if cause else None)


class GuestInstance:
    """One copy of a case's guest memory (mapped as the device maps it), dirty log and netmap ring, and what
    a test observes of them after a run; subclasses add the queue (``vq``, its ``call_fd`` an eventfd)."""

    vq: Any

    def __init__(self, image: bytearray, log_size: int | None, ring: RingImage) -> None:
        self.fd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.pwrite(self.fd, bytes(image), 0)
        self.mem = GuestMemory()
        for gpa, size, offset in REGIONS:
            self.mem.add_region(MemoryRegion(gpa, size, UVA + offset, offset), os.dup(self.fd))
        self.log_fd: int | None = None
        if log_size is not None:
            self.log_fd = os.memfd_create("log", os.MFD_CLOEXEC)
            os.ftruncate(self.log_fd, log_size)
            self.mem.set_log(os.dup(self.log_fd), LogDescriptor(log_size, 0))
        self.slots = ring.slots.copy()
        self.region = ring.region.copy()
        self.bufs = Buffers(self.region, ring.base, ring.buf_size)

    def batch(self, datapath: Datapath, case: Any, first: int, n: int) -> tuple[Any, ...]:
        """A whole batch of ``case`` (its ``writable``, ``hdr_len``, ``mergeable``) through ``datapath``, as a
        port runs it: its result, or its fault (`fault_outcome`)."""
        try:
            if case.writable:
                res = datapath.enqueue(
                    self.vq, self.mem, case.hdr_len, case.mergeable, self.slots, first, n, self.bufs
                )
            else:
                res = datapath.dequeue(self.vq, self.mem, case.hdr_len, self.slots, first, n, self.bufs)
        except VirtqueueError as e:
            return fault_outcome(e)
        return ("ok", *dataclasses.astuple(res))

    def calls(self) -> int:
        assert self.vq.call_fd is not None
        try:
            return os.eventfd_read(self.vq.call_fd)
        except BlockingIOError:
            return 0

    def memory(self) -> bytes:
        return os.pread(self.fd, FILE_SIZE, 0)

    def read(self, gpa: int, n: int) -> bytes:
        return os.pread(self.fd, n, file_offset(gpa))

    def log(self) -> bytes:
        return b"" if self.log_fd is None else os.pread(self.log_fd, 1 << 20, 0)

    def close(self) -> None:
        self.vq.unmap()
        self.mem.close()
        for fd in (self.fd, self.log_fd, self.vq.call_fd):
            if fd is not None:
                os.close(fd)


class Instance(GuestInstance):
    """One copy of a Case, its split ring mapped as the device maps it."""

    def __init__(self, case: Case) -> None:
        super().__init__(case.guest.image, case.log_size, case.ring)
        vq = SplitVirtqueue(RX_QUEUE if case.writable else TX_QUEUE)
        vq.set_num(case.num)
        vq.addresses = VringAddresses(uva(DESC_GPA), uva(AVAIL_GPA), uva(USED_GPA), USED_GPA, case.log_used)
        vq.map(self.mem)
        vq.event_idx, vq.indirect, vq.log_dirty = case.event_idx, case.indirect, case.log_dirty
        vq.host_offloads = case.host_offloads
        vq.pass_offloads, vq.guest_offloads = case.pass_offloads, case.guest_offloads
        vq.kicks = case.kicks
        vq.last_avail_idx, vq.used_idx = case.last_avail & 0xFFFF, case.used_idx & 0xFFFF
        vq.signalled_used = case.signalled_used & 0xFFFF
        vq.started = vq.enabled = True
        vq.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.vq = vq

    def run(self, datapath: Datapath, case: Case, first: int, n: int) -> tuple[Any, ...]:
        return self.batch(datapath, case, first, n)

    def state(self) -> tuple[int, int, int, list[tuple[int, int]]]:
        vq = self.vq
        return vq.last_avail_idx, vq.used_idx, vq.signalled_used, list(vq._pending_used)


def assert_same_bytes(ref: bytes, got: bytes, what: str, where: Callable[[int], str] = hex) -> None:
    if ref != got:
        diff = np.flatnonzero(np.frombuffer(ref, np.uint8) != np.frombuffer(got, np.uint8))
        off = int(diff[0])
        raise AssertionError(
            f"{what}: {len(diff)} byte(s) differ, the first at {where(off)}: "
            f"reference {ref[off]:#x}, kernel {got[off]:#x}"
        )


def where_in_guest(offset: int) -> str:
    for start, size, base in REGIONS:
        if base <= offset < base + size:
            return f"gpa {start + offset - base:#x}"
    return f"file offset {offset:#x}"


@dataclass
class Outcome:
    """What the reference did (the kernel did the same, or run_both would have failed)."""

    results: list[tuple[Any, ...]]
    instance: Instance  # the reference's, still open inside run_both's callback only
    calls: int


@contextlib.contextmanager
def instances(case: Case) -> Iterator[tuple[Instance, Instance]]:
    case.finish()
    ref = Instance(case)
    try:
        got = Instance(case)
        try:
            yield ref, got
        finally:
            got.close()
    finally:
        ref.close()


def run_both(case: Case, check: Callable[[Outcome], None] | None = None) -> list[tuple[Any, ...]]:
    """Run every batch of ``case`` on both datapaths and assert, after each, that they did exactly the same;
    then let ``check`` look at what the reference did. Returns the outcomes (no batch runs after a fault)."""
    results: list[tuple[Any, ...]] = []
    calls = 0
    with instances(case) as (ref, got):
        first = 0
        for start, n in case.batches or [(0, 0)]:
            if start >= 0:
                first = start
            a = ref.run(REFERENCE, case, first, n)
            b = got.run(COMPILED, case, first, n)
            where = f"batch ({first}, {n})"
            assert b == a, where
            assert got.state() == ref.state(), f"queue state after {where}"
            signalled = ref.calls()
            assert got.calls() == signalled, f"call eventfd after {where}"
            calls += signalled
            assert_same_bytes(ref.memory(), got.memory(), f"guest memory after {where}", where_in_guest)
            assert_same_bytes(
                ref.slots.tobytes(),
                got.slots.tobytes(),
                f"netmap slots after {where}",
                lambda o: f"slot {o // 16}",
            )
            assert_same_bytes(ref.region.tobytes(), got.region.tobytes(), f"netmap buffers after {where}")
            assert_same_bytes(ref.log(), got.log(), f"dirty log after {where}")
            results.append(a)
            if a[0] == "fault":
                break
            first = (first + a[1]) % case.ring.num_slots
        if check is not None:
            check(Outcome(results, ref, calls))
    return results


# --- hypothesis: honest and hostile drivers ----------------------------------------------------------------

HOSTILE = (
    "avail_idx",  # the available index runs more than num entries ahead
    "head",  # an available entry names a descriptor >= num
    "next",  # a link beyond the table
    "loop",  # a chain that links back to its head
    "direction",  # a descriptor of the wrong direction
    "addr",  # a buffer outside guest memory, across a region end, in the hole, or wrapping 2^64
    "indirect_off",  # an indirect descriptor without INDIRECT_DESC
    "indirect_len",  # an indirect table of a bad length
    "indirect_next",  # INDIRECT and NEXT
    "nested",  # an indirect descriptor inside an indirect table
    "indirect_addr",  # an indirect table outside guest memory
    "indirect_loop",  # a loop inside an indirect table
    "short",  # a chain shorter than the virtio-net header
    "flags",  # random flags and link on a random descriptor
)

BAD_RANGES = (
    (0x0, 16),  # below the first region
    (0x20000 - 8, 16),  # across the end of the first region, into the hole
    (0x20000, 16),  # in the hole
    (0x5FFF0, 32),  # across the end of the last region
    (0x60000, 1),  # just past the last region
    (0xFFFF_FFFF_FFFF_FFF0, 0x20),  # wrapping past 2^64
    (0xFFFF_FFFF_FFFF_FFF0, 0x10),  # ending at 2^64 exactly, in no region
)


def split(total: int, parts: int, rnd: random.Random) -> list[int]:
    """``total`` bytes cut into ``parts`` segments, some of which may be empty."""
    cuts = sorted(rnd.randrange(total + 1) for _ in range(parts - 1))
    bounds = [0, *cuts, total]
    return [bounds[k + 1] - bounds[k] for k in range(parts)]


TX_SIZES = {  # frame sizes past the header, by kind
    "empty": (0, 0),
    "small": (1, 100),
    "normal": (60, 1600),
    "jumbo": (1600, 9100),
    "oversize": (MAX_FRAME + 1, MAX_FRAME + 3000),
}
RX_SIZES = {"small": (0, 100), "normal": (60, 2000), "big": (2000, 9100)}  # chain sizes past the header


@st.composite
def cases(draw: st.DrawFn, writable: bool) -> Case:
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    num = draw(st.sampled_from([8, 16, 2, 4, 32, 256, 1]))
    num_slots = draw(st.sampled_from([16, 48, 256, 1024, 2, 5]))
    buf_size = draw(st.sampled_from([64, 128, 512, 2048]))
    ring = RingImage.make(num_slots, buf_size, rnd, base=draw(st.sampled_from([0, 64, 4096])))
    near_wrap = st.one_of(st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF), st.just(0))
    case = Case(
        GuestImage(num, rnd),
        ring,
        writable,
        hdr_len=draw(st.sampled_from([HDR, HDR, 10, 0])),
        mergeable=draw(st.booleans()),
        event_idx=draw(st.booleans()),
        indirect=draw(st.booleans()),
        kicks=draw(st.booleans()),
        log_dirty=draw(st.booleans()),
        host_offloads=draw(st.booleans()),
        pass_offloads=draw(st.sampled_from([0, ALL_NEEDS, NEEDS_CSUM]) | st.integers(0, 0xFF)),
        guest_offloads=draw(st.sampled_from([0, ALL_NEEDS, NEEDS_CSUM]) | st.integers(0, 0xFF)),
        log_size=draw(st.sampled_from([None, 2, 64])),  # none, the first 64 KiB only, everything
        log_used=draw(st.booleans()),
        last_avail=draw(near_wrap),
        used_idx=draw(near_wrap),
        avail_flags=draw(st.sampled_from([0, VRING_AVAIL_F_NO_INTERRUPT])),
    )
    case.signalled_used = case.used_idx - draw(st.integers(0, 3))
    case.used_event = case.used_idx + draw(st.integers(-3, num + 3))

    # Honest chains: descriptors handed out from a shuffled free list, as long as it lasts.
    free = list(range(num))
    rnd.shuffle(free)
    hdr = case.hdr_len
    rarely_zero = st.integers(0, 9).map(bool)
    # Often the layout Linux's and DPDK's drivers make: every chain one descriptor, which the batch kernels
    # take up to VQ_BATCH at a time (and a hostile change below then lands in such a batch).
    single = draw(st.booleans())
    for _ in range(draw(st.integers(1, num)) if draw(rarely_zero) else 0):
        if not free:
            break
        if writable:
            lo, hi = RX_SIZES[draw(st.sampled_from(["small", "normal", "normal", "big"]))]
            kind = "rx"
        else:
            kind = draw(st.sampled_from(["empty", "small", "normal", "normal", "jumbo", "oversize"]))
            lo, hi = TX_SIZES[kind]
        total = hdr + rnd.randint(lo, hi)
        use_indirect = not single and case.indirect and draw(st.booleans())
        most = 8 if use_indirect else 1 if single else min(6, len(free))
        least = 2 if kind == "oversize" else 1  # no buffer area holds an oversized frame in one piece
        if least > most:
            continue
        parts = draw(st.integers(least, most))
        lens = split(total, parts, rnd)
        if hdr > 1 and parts > 1 and draw(st.booleans()):
            # The header split across the first two descriptors.
            cut = rnd.randrange(1, hdr)
            if lens[0] + lens[1] >= cut:
                lens[0], lens[1] = cut, lens[0] + lens[1] - cut
        ids = [free.pop()] if use_indirect else [free.pop() for _ in range(parts)]
        case.chain(ids, lens, indirect=use_indirect)

    hostile = draw(st.one_of(st.none(), st.none(), st.sampled_from(HOSTILE)))
    if hostile is not None:
        make_hostile(case, hostile, Pick(draw), rnd)

    if writable:
        # Every slot holds a fragment (so that any window is valid), some of them continued.
        lens = [
            draw(st.sampled_from([0, 1, 60, buf_size // 2, buf_size, rnd.randint(0, buf_size)]))
            for _ in range(num_slots)
        ]
        more = [draw(st.integers(0, 9 if single else 3)) == 0 for _ in range(num_slots)]
        flags = [0, 0x0001, 0x0104, NS_VNET_HDR, NS_VNET_HDR | 0x0001]
        ring.fragments(0, lens, more, other_flags=draw(st.sampled_from(flags)))
    first = draw(st.integers(0, num_slots - 1))
    case.batches = [(first, draw(st.integers(1, num_slots - 1)) if draw(rarely_zero) else 0)]
    if draw(st.booleans()):
        case.batches.append((-1, draw(st.integers(0, num_slots - 1))))
    return case


class Pick:
    """Choices for make_hostile: drawn by hypothesis, or by a seeded generator in the named tests."""

    def __init__(self, draw: st.DrawFn | None = None, rnd: random.Random | None = None) -> None:
        self.draw, self.rnd = draw, rnd or random.Random(0)

    def one(self, options: Sequence[Any]) -> Any:
        return self.draw(st.sampled_from(options)) if self.draw else self.rnd.choice(options)

    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi)) if self.draw else self.rnd.randint(lo, hi)


def make_hostile(case: Case, hostile: str, pick: Pick, rnd: random.Random) -> None:
    """Break one thing the way ``hostile`` says (HOSTILE)."""
    g, num, heads = case.guest, case.num, case.heads
    flag = VRING_DESC_F_WRITE if case.writable else 0
    if hostile == "avail_idx":
        case.avail_idx = case.last_avail + num + 1 + pick.int(0, 0x7FFF)
        return
    if hostile == "head":
        bad = pick.int(num, 0xFFFF)
        if heads:
            heads[rnd.randrange(len(heads))] = bad
        else:
            heads.append(bad)
        return
    if hostile == "flags":
        g.patch_desc(rnd.randrange(num), flags=pick.int(0, 7), nxt=pick.int(0, num))
        return
    if not heads:
        heads.append(0)
        g.desc(0, g.buffer(100), 100, flag)
    head = heads[rnd.randrange(len(heads))]
    addr, _, flags, _ = g.read_desc(head)
    if hostile == "next":
        g.patch_desc(head, flags=flag | VRING_DESC_F_NEXT, nxt=pick.int(num, 0xFFFF))
    elif hostile == "loop":
        last, seen = head, {head}
        while True:
            _, _, f, nxt = g.read_desc(last)
            if not f & VRING_DESC_F_NEXT or nxt >= num or nxt in seen:
                break
            seen.add(nxt)
            last = nxt
        g.patch_desc(last, flags=flag | VRING_DESC_F_NEXT, nxt=head)
    elif hostile == "direction":
        if flags & VRING_DESC_F_INDIRECT:  # its own WRITE flag means nothing: flip the table's first entry
            g.patch_desc(0, table=addr, flags=g.read_desc(0, addr)[2] ^ VRING_DESC_F_WRITE)
        else:
            g.patch_desc(head, flags=flags ^ VRING_DESC_F_WRITE)
    elif hostile == "addr":
        bad, bad_len = pick.one(BAD_RANGES)
        if flags & VRING_DESC_F_INDIRECT:
            g.patch_desc(0, table=addr, addr=bad, length=bad_len)  # the first buffer of the table
        else:
            g.patch_desc(head, addr=bad, length=bad_len)
    elif hostile == "indirect_off":
        case.indirect = False
        if not flags & VRING_DESC_F_INDIRECT:
            g.patch_desc(head, flags=VRING_DESC_F_INDIRECT, length=16, addr=g.table(1))
    elif hostile == "indirect_len":
        case.indirect = True
        bad_len = pick.one([0, 8, 17, 24, 16 * (MAX_CHAIN_LENGTH + 1)])
        g.patch_desc(head, flags=VRING_DESC_F_INDIRECT, length=bad_len, addr=g.table(1))
    elif hostile == "indirect_next":
        case.indirect = True
        g.patch_desc(head, flags=VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, length=16, addr=g.table(1))
    elif hostile == "nested":
        case.indirect = True
        table = g.table(2)
        g.desc(0, g.table(1), 16, VRING_DESC_F_INDIRECT, 0, table)
        g.patch_desc(head, flags=VRING_DESC_F_INDIRECT, length=32, addr=table)
    elif hostile == "indirect_addr":
        case.indirect = True
        bad, _ = pick.one(BAD_RANGES)
        g.patch_desc(head, flags=VRING_DESC_F_INDIRECT, length=64, addr=bad)
    elif hostile == "indirect_loop":
        case.indirect = True
        n = pick.one([1, 3, MAX_CHAIN_LENGTH])
        for e in range(n):
            g.desc(e, g.buffer(8), 8, flag | VRING_DESC_F_NEXT, (e + 1) % n, TABLES[0])
        g.patch_desc(head, flags=VRING_DESC_F_INDIRECT, length=16 * n, addr=TABLES[0])
    elif hostile == "short":
        g.patch_desc(head, flags=flag, length=pick.int(0, max(case.hdr_len - 1, 0)))


@FUZZ
@given(cases(writable=False))
def test_dequeue_matches_reference(case: Case) -> None:
    note_outcomes(run_both(case))


@FUZZ
@given(cases(writable=True))
def test_enqueue_matches_reference(case: Case) -> None:
    note_outcomes(run_both(case))


def note_outcomes(results: list[tuple[Any, ...]]) -> None:
    """What the examples exercised (pytest --hypothesis-show-statistics)."""
    for k, r in enumerate(results):
        batch = "first" if k == 0 else "second"
        if r[0] == "fault":
            event(f"{batch} fault: " + re.sub(r"\b(0x[0-9a-f]+|[0-9]+)\b", "N", str(r[2]).split(":")[0]))
        else:
            _, slots, packets, _, dropped, *_ = r
            what = ["packets" if packets else "no packet"]
            what += ["drops"] * bool(dropped) + ["multi-slot"] * (slots > packets)
            event(f"{batch} ok: {', '.join(what)}")


# --- named cases: honest drivers ---------------------------------------------------------------------------


def ok(results: list[tuple[Any, ...]]) -> list[tuple[int, int, int, int]]:
    """(slots, packets, bytes, dropped) of each batch; every batch must have succeeded (and no frame asked
    for offloads: test_offload_ingress.py is about those)."""
    assert all(r[0] == "ok" and r[5:] == (0, 0, 0) for r in results), results
    return [r[1:5] for r in results]


@pytest.mark.parametrize("segments", [1, 2, 3, 6, 8])
@pytest.mark.parametrize("indirect", [False, True])
def test_dequeue_chains_of_several_segments(segments: int, indirect: bool) -> None:
    case = make_case(False, num=32, batches=[(3, 15)])
    lens = [HDR + 40] + [100] * (segments - 1) if segments > 1 else [HDR + 300]
    case.chains([lens, lens, [HDR + 60]], indirect=indirect)
    frame = sum(lens) - HDR
    assert ok(run_both(case)) == [(3, 3, 2 * frame + 60, 0)]


def test_dequeue_header_split_across_descriptors() -> None:
    case = make_case(False, num=16, batches=[(0, 15)])
    case.chains([[5, 7, 100], [1, 1, 1, 9, 50], [12, 0, 30], [3, 20]])
    assert ok(run_both(case)) == [(4, 4, 100 + 50 + 30 + 11, 0)]


def test_dequeue_jumbo_frame_spans_slots_with_morefrag() -> None:
    case = make_case(False, num_slots=16, buf_size=2048, batches=[(14, 15)])

    def check(o: Outcome) -> None:
        slots = o.instance.slots
        picked = [(14 + k) % 16 for k in range(5)]  # wraps around the netmap ring
        assert [int(slots[s]["len"]) for s in picked] == [2048] * 4 + [9000 - 4 * 2048]
        assert [int(slots[s]["flags"]) for s in picked] == [NS_MOREFRAG] * 4 + [0]

    case.chains([[HDR, 4000, 5000]])
    assert ok(run_both(case, check)) == [(5, 1, 9000, 0)]


def test_dequeue_empty_and_oversized_frames_are_completed_and_dropped() -> None:
    case = make_case(False, num=8, batches=[(0, 15)])
    case.chains([[HDR], [HDR, 40000, MAX_FRAME - 40000 + 1], [HDR + 64], [HDR, 0, 0]])
    assert ok(run_both(case)) == [(1, 1, 64, 3)]


def test_dequeue_frame_of_exactly_max_frame_is_taken_one_more_byte_is_not() -> None:
    case = make_case(False, num=8, num_slots=64, buf_size=2048, batches=[(0, 63)])
    case.chains([[HDR, 40000, MAX_FRAME - 40000], [HDR, 40000, MAX_FRAME - 40000 + 1]])
    assert ok(run_both(case)) == [(32, 1, MAX_FRAME, 1)]


def test_dequeue_chain_that_does_not_fit_waits_for_space() -> None:
    case = make_case(False, buf_size=512, batches=[(0, 4), (-1, 2), (-1, 15)])
    case.chains([[HDR + 1000], [HDR + 1500], [HDR + 100]])  # 2 slots, then 3 slots, then 1
    assert ok(run_both(case)) == [(2, 1, 1000, 0), (0, 0, 0, 0), (4, 2, 1600, 0)]


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize("at", [0, 3, 5])
@pytest.mark.parametrize(
    "breakage", ["none", "direction", "head", "addr", "empty", "short", "next", "indirect"]
)
def test_batch_of_single_descriptor_chains(writable: bool, at: int, breakage: str) -> None:
    """Chains of one descriptor each, which the kernels take up to VQ_BATCH at a time, one of them (the first,
    the fourth, the sixth) broken: the batch stops before it and the chain meets every check of its own,
    exactly as in the reference."""
    case = make_case(writable, num=16, batches=[(0, 15), (-1, 15)], indirect=breakage != "indirect")
    heads = case.chains([[HDR + 60]] * 8)
    if writable:
        case.ring.frames(0, [60] * 8)
    flag = VRING_DESC_F_WRITE if writable else 0
    g, head = case.guest, heads[at]
    if breakage == "direction":
        g.patch_desc(head, flags=flag ^ VRING_DESC_F_WRITE)
    elif breakage == "head":
        case.heads[at] = case.num + at
    elif breakage == "addr":
        g.patch_desc(head, addr=BAD_RANGES[1][0], length=BAD_RANGES[1][1])
    elif breakage in ("empty", "short"):
        g.patch_desc(head, length=0 if breakage == "empty" else HDR - 1)
    elif breakage == "next":
        g.patch_desc(head, flags=flag | VRING_DESC_F_NEXT, nxt=heads[(at + 1) % 8])
    elif breakage == "indirect":  # without INDIRECT_DESC
        g.patch_desc(head, flags=VRING_DESC_F_INDIRECT, length=16, addr=g.table(1))
    results = run_both(case)
    if breakage == "none":
        assert [r[:3] for r in results] == [("ok", 8, 8), ("ok", 0, 0)], results  # every frame through


def test_enqueue_mergeable_frame_spans_chains() -> None:
    case = make_case(True, num=16, batches=[(0, 15)])
    case.chains([[1500]] * 5 + [[HDR + 100]])
    case.ring.frames(0, [5000, 60])

    def check(o: Outcome) -> None:
        used = o.instance.read(USED_GPA + 4, 8 * 5)
        assert [VRING_USED_ELEM.unpack_from(used, 8 * k)[1] for k in range(5)] == [1500, 1500, 1500, 512, 72]
        addr = case.guest.read_desc(0)[0]
        assert VIRTIO_NET_HDR.unpack(o.instance.read(addr, HDR))[6] == 4  # num_buffers

    assert ok(run_both(case, check)) == [(4, 2, 5060, 0)]


def test_enqueue_header_split_across_descriptors() -> None:
    case = make_case(True, batches=[(0, 15)])
    case.chains([[4, 4, 4, 2000], [1, 11, 0, 100]])
    case.ring.frames(0, [1000, 50])
    assert ok(run_both(case)) == [(2, 2, 1050, 0)]


@pytest.mark.parametrize("hdr_len", [12, 10, 0])
def test_enqueue_without_mergeable_drops_what_does_not_fit(hdr_len: int) -> None:
    case = make_case(True, hdr_len=hdr_len, mergeable=False, batches=[(0, 15)])
    case.chains([[hdr_len + 100], [hdr_len + 2000, 3000], [hdr_len + 59]])
    case.ring.frames(0, [101, 4000, 60])
    assert ok(run_both(case)) == [(4, 1, 4000, 2)]


@pytest.mark.parametrize("indirect", [False, True])
def test_enqueue_into_indirect_tables(indirect: bool) -> None:
    case = make_case(True, num=8, batches=[(0, 15)])
    case.chains([[HDR, 100, 100, 100], [6, 6, 3000]], indirect=indirect)
    case.ring.frames(0, [300, 2500])
    assert ok(run_both(case)) == [(3, 2, 2800, 0)]


def test_enqueue_without_receive_buffers_waits() -> None:
    case = make_case(True, batches=[(0, 4), (-1, 4)])
    case.chains([[HDR + 1000]])
    case.ring.frames(0, [500, 500, 500])
    assert ok(run_both(case)) == [(1, 1, 500, 0), (0, 0, 0, 0)]


def test_enqueue_mergeable_frame_waits_for_enough_buffers() -> None:
    case = make_case(True, batches=[(0, 15)])
    case.chains([[HDR + 100], [1000], [1000]])
    case.ring.frames(0, [100, 3000])  # 3012 bytes need 4 chains: none of the last 2 is taken

    def check(o: Outcome) -> None:
        assert o.instance.vq.last_avail_idx == 1

    assert ok(run_both(case, check)) == [(1, 1, 100, 0)]


def test_enqueue_frame_without_its_last_fragment_waits() -> None:
    case = make_case(True, batches=[(0, 3), (-1, 2)])
    case.chains([[2000]] * 4)
    case.ring.fragments(0, [100, 200, 300, 400, 500], [False, True, True, False, False])
    assert ok(run_both(case)) == [(1, 1, 100, 0), (0, 0, 0, 0)]


@pytest.mark.parametrize("writable", [False, True])
def test_indexes_wrap_around(writable: bool) -> None:
    case = make_case(writable, num=4, num_slots=8, last_avail=0xFFFE, used_idx=0xFFFD, signalled_used=0xFFFD)
    case.chains([[HDR + 100], [HDR + 200], [HDR + 300], [HDR + 400]])
    case.batches = [(6, 7)]
    if writable:
        case.ring.frames(6, [100, 200, 300, 400])

    def check(o: Outcome) -> None:
        assert o.instance.vq.last_avail_idx == 2 and o.instance.vq.used_idx == 1

    assert ok(run_both(case, check)) == [(4, 4, 1000, 0)]


# EVENT_IDX: (used_idx at the start, signalled_used, used_event) -> interrupt after 2 used entries.
EVENT_IDX_CASES = [
    (10, 10, 10, True),  # the driver wants one at the first entry
    (10, 10, 11, True),  # ... at the second
    (10, 10, 12, False),  # ... at the third: not yet
    (10, 10, 9, False),  # already past it
    (0xFFFF, 0xFFFF, 0, True),  # across the wrap
    (0xFFFE, 0xFFFE, 0xFFFD, False),
    (10, 8, 8, True),  # an earlier batch not signalled yet
]


@pytest.mark.parametrize(("used", "signalled", "event", "wanted"), EVENT_IDX_CASES)
@pytest.mark.parametrize("writable", [False, True])
def test_event_idx_decides_the_interrupt(
    used: int, signalled: int, event: int, wanted: bool, writable: bool
) -> None:
    case = make_case(writable, event_idx=True, used_idx=used, signalled_used=signalled, used_event=event)
    case.chains([[HDR + 100], [HDR + 100]])
    case.batches = [(0, 15)]
    if writable:
        case.ring.frames(0, [100, 100])

    def check(o: Outcome) -> None:
        assert o.calls == int(wanted)
        avail_event = o.instance.read(USED_GPA + 4 + 8 * case.num, 2)
        assert struct.unpack("<H", avail_event)[0] == 2  # kicks wanted from the next entry on

    run_both(case, check)


@pytest.mark.parametrize(("flags", "wanted"), [(0, True), (VRING_AVAIL_F_NO_INTERRUPT, False)])
def test_no_interrupt_flag_without_event_idx(flags: int, wanted: bool) -> None:
    case = make_case(False, avail_flags=flags, batches=[(0, 15), (-1, 15)])
    case.chains([[HDR + 100]])

    def check(o: Outcome) -> None:
        assert o.calls == int(wanted)  # and none for the second, empty batch
        assert o.instance.read(USED_GPA, 2) == b"\0\0"  # used flags: notify us

    run_both(case, check)


@pytest.mark.parametrize("log_size", [None, 2, 64])
def test_dirty_log_of_receive_buffers_and_used_ring(log_size: int | None) -> None:
    case = make_case(True, log_dirty=True, log_size=log_size, batches=[(0, 15)])
    case.chains([[HDR + 3000], [HDR, 200, 200]])
    case.ring.frames(0, [2500, 300])

    def check(o: Outcome) -> None:
        if log_size == 64:
            assert o.instance.log() != bytes(64)

    run_both(case, check)


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize(("event_idx", "kicks"), [(True, True), (False, True), (False, False)])
def test_kick_rearm_without_used_entries_is_logged(writable: bool, event_idx: bool, kicks: bool) -> None:
    """A batch that publishes nothing still writes avail_event (or the used flags): that page is logged."""
    case = make_case(writable, num=256, event_idx=event_idx, kicks=kicks, log_dirty=True, log_size=64)
    case.batches = [(0, 15)]  # nothing available: nothing used

    def check(o: Outcome) -> None:
        assert o.results[0][1] == 0
        written = USED_GPA + (4 + 8 * case.num if event_idx else 0)
        log = bytearray(64)
        log[written // 4096 // 8] |= 1 << (written // 4096 % 8)
        assert o.instance.log() == bytes(log)

    run_both(case, check)


def test_enqueue_frame_over_more_segments_than_the_kernel_keeps() -> None:
    """More than VQ_MAX_CHAIN_LENGTH segments reserved for one frame: the kernel walks the last chains again
    when it writes them (38 chains through one shared indirect table of 32 one-byte buffers)."""
    case = make_case(True, num=64, batches=[(0, 15)])
    for e in range(32):
        case.guest.desc(
            e, 0x9000 + 3 * e, 1, VRING_DESC_F_WRITE | (VRING_DESC_F_NEXT if e < 31 else 0), e + 1, TABLES[0]
        )
    for i in range(40):
        case.guest.desc(i, TABLES[0], 16 * 32, VRING_DESC_F_INDIRECT)
        case.heads.append(i)
    case.ring.frames(0, [1200])

    def check(o: Outcome) -> None:
        used = o.instance.read(USED_GPA + 4, 8 * 38)
        assert [VRING_USED_ELEM.unpack_from(used, 8 * k)[1] for k in range(38)] == [32] * 37 + [28]

    assert ok(run_both(case, check)) == [(1, 1, 1200, 0)]


# --- named cases: hostile drivers --------------------------------------------------------------------------


def fault(results: list[tuple[Any, ...]]) -> str:
    assert results[-1][0] == "fault", results
    return str(results[-1][2])


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize(
    ("hostile", "reason"),
    [
        ("avail_idx", "entries ahead of the device, beyond size 8"),
        ("head", "names descriptor"),
        ("next", "beyond the table of 8"),
        ("loop", "(a loop?)"),
        ("direction", "in a chain that must not have one"),
        ("indirect_off", "but INDIRECT_DESC not negotiated"),
        ("indirect_len", "has bad length"),
        ("indirect_next", "has both INDIRECT and NEXT"),
        ("nested", "nested indirect table at descriptor 0"),
        ("indirect_addr", "indirect table of descriptor"),
        ("indirect_loop", "(a loop?)"),
        ("short", "shorter than its header"),
    ],
)
def test_hostile_driver_gets_the_same_fault(writable: bool, hostile: str, reason: str) -> None:
    for seed in range(4):
        case = make_case(writable, seed=seed, batches=[(0, 15)])
        case.chains([[HDR + 100], [HDR + 50, 50], [HDR + 70]], indirect=seed % 2 == 1)
        if writable:
            case.ring.frames(0, [100, 100, 100])
        make_hostile(case, hostile, Pick(rnd=random.Random(seed)), random.Random(seed))
        assert reason in fault(run_both(case))


@pytest.mark.parametrize("bad", BAD_RANGES)
@pytest.mark.parametrize("writable", [False, True])
def test_buffer_outside_guest_memory_is_the_same_fault(bad: tuple[int, int], writable: bool) -> None:
    case = make_case(writable, batches=[(0, 15)])
    case.chains([[HDR + 100], [HDR + 100]])
    if writable:
        case.ring.frames(0, [100, 100])
    case.guest.patch_desc(1, addr=bad[0], length=bad[1])
    assert "buffer of descriptor 1: " in fault(run_both(case))


def test_faults_leave_completed_chains_unpublished() -> None:
    case = make_case(False, batches=[(0, 15)])
    case.chains([[HDR + 100], [HDR + 100], [HDR + 100]])
    case.guest.patch_desc(2, flags=VRING_DESC_F_WRITE)

    def check(o: Outcome) -> None:
        assert o.instance.vq._pending_used == [(0, 0), (1, 0)]
        assert o.instance.read(USED_GPA + 2, 2) == b"\0\0"  # used->idx never moved

    assert fault(run_both(case, check)) == "device-writable descriptor 2 in a chain that must not have one"


# --- the security boundary: one translation ----------------------------------------------------------------


def c_translate(mem: GuestMemory, gpa: int, length: int) -> int | str:
    """vm_translate's answer: a host address, or the GuestMemoryError message the kernels would raise."""
    table = mem.table
    m = ffi.new("struct vm_memory *")
    anchor = ffi.from_buffer(table) if len(table) else None
    m.regions = ffi.cast("struct vm_region *", anchor) if anchor is not None else ffi.NULL
    m.nregions = len(table)
    f = ffi.new("struct vm_fault *")
    host = lib.vm_translate(m, gpa, length, f)
    if host != ffi.NULL:
        return int(ffi.cast("uintptr_t", host))
    why = kernels._FAULT_REASONS.get(f.reason) or (
        f"crosses the end of the region at {f.region_gpa:#x}+{f.region_size:#x}"
    )
    return str(GuestMemoryError(f.addr, f.len, why))


def py_translate(mem: GuestMemory, gpa: int, length: int) -> int | str:
    try:
        return mem.gpa_to_host(gpa, length)
    except GuestMemoryError as e:
        return str(e)


@pytest.fixture(scope="module")
def three_regions() -> Iterator[GuestMemory]:
    """Two adjacent regions (a range may not span them) and one far away, near the top of the space."""
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x3000)
    mem = GuestMemory()
    mem.add_region(MemoryRegion(0x1000, 0x1000, UVA, 0), os.dup(fd))
    mem.add_region(MemoryRegion(0x2000, 0x1000, UVA + 0x1000, 0x1000), os.dup(fd))
    mem.add_region(MemoryRegion(0xFFFF_FFFF_FFFF_F000, 0x1000, UVA + 0x2000, 0x2000), os.dup(fd))
    os.close(fd)
    yield mem
    mem.close()


EDGES = [0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2FFF, 0x3000, 1 << 63, 2**64 - 0x1001, 2**64 - 0x1000]
EDGES += [2**64 - 2, 2**64 - 1]


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(st.sampled_from(EDGES), st.integers(0, 2**64 - 1)),
    st.one_of(
        st.sampled_from([0, 1, 0xFFF, 0x1000, 0x1001, 0x2000, 2**32 - 1, 2**63]), st.integers(0, 2**64 - 1)
    ),
    st.integers(-2, 2),
    st.integers(-2, 2),
)
def test_translation_matches_guest_memory(
    three_regions: GuestMemory, gpa: int, length: int, dg: int, dl: int
) -> None:
    gpa = min(max(gpa + dg, 0), 2**64 - 1)
    length = min(max(length + dl, 0), 2**64 - 1)
    assert c_translate(three_regions, gpa, length) == py_translate(three_regions, gpa, length)


def test_translation_without_regions() -> None:
    with GuestMemory() as mem:
        assert c_translate(mem, 0x1000, 1) == py_translate(mem, 0x1000, 1) == "0x1000+0x1: no memory regions"


# --- constants declared twice -------------------------------------------------------------------------------


def test_c_constants_match_the_python_ones() -> None:
    assert lib.VRING_DESC_F_NEXT == VRING_DESC_F_NEXT
    assert lib.VRING_DESC_F_WRITE == VRING_DESC_F_WRITE
    assert lib.VRING_DESC_F_INDIRECT == VRING_DESC_F_INDIRECT
    assert lib.VRING_AVAIL_F_NO_INTERRUPT == VRING_AVAIL_F_NO_INTERRUPT
    assert lib.VQ_MAX_CHAIN_LENGTH == MAX_CHAIN_LENGTH
    assert lib.VQ_MAX_FRAME == MAX_FRAME
    assert lib.VIRTIO_NET_HDR_SIZE == VIRTIO_NET_HDR_SIZE
    assert lib.NS_MOREFRAG == NS_MOREFRAG
    assert ffi.sizeof("struct nm_slot") == SLOT_DTYPE.itemsize


def test_datapath_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(choice.REFERENCE_ENV, raising=False)
    assert kernels.select_datapath() is COMPILED
    assert kernels.select_datapath(True) is REFERENCE
    monkeypatch.setenv(choice.REFERENCE_ENV, "1")
    assert kernels.select_datapath() is REFERENCE
    assert kernels.select_datapath(False) is COMPILED
    monkeypatch.setenv(choice.REFERENCE_ENV, "0")
    assert kernels.select_datapath() is COMPILED


# --- what only the kernels check ---------------------------------------------------------------------------


def kernel_only(case: Case, first: int, n: int) -> tuple[tuple[Any, ...], tuple[Any, ...], bytes]:
    """Run the compiled datapath alone; returns its outcome, the queue state and used->idx."""
    with instances(case) as (_, got):
        res = got.run(COMPILED, case, first, n)
        return res, got.state(), got.read(USED_GPA + 2, 2)


def test_dequeue_into_a_slot_rewritten_after_the_checks_uses_buffer_0() -> None:
    """A buf_idx out of range means the scratch buffer 0, as netmap's NMB() (the reference would raise)."""
    case = make_case(False)
    case.chains([[HDR + 100], [HDR + 5000], [HDR + 100]])
    case.ring.slots[2]["buf_idx"] = 0xFFFF_FFFF  # the second frame's second slot
    frame = case.guest.read(case.guest.read_desc(1)[0] + HDR, 5000)
    with instances(case) as (_, got):
        assert got.run(COMPILED, case, 0, 15) == ("ok", 5, 3, 5200, 0, 0, 0, 0)
        assert got.state() == (3, 3, 3, [])
        base = case.ring.base
        assert got.region[base : base + 2048].tobytes() == frame[2048:4096]


def test_enqueue_stops_at_a_slot_rewritten_after_the_checks() -> None:
    case = make_case(True)
    case.chains([[2000], [2000]])
    case.ring.frames(0, [100, 100])
    case.ring.slots[1]["len"] = 4096  # more than buf_size
    res, state, _ = kernel_only(case, 0, 2)
    assert res == ("ok", 1, 1, 100, 0, 0, 0, 0) and state[0] == 1


@pytest.mark.parametrize("writable", [False, True])
def test_kernel_refuses_positions_outside_the_ring(writable: bool) -> None:
    case = make_case(writable, num_slots=16)
    with instances(case) as (_, got), pytest.raises(ValueError, match="kernel refused"):
        got.run(COMPILED, case, 16, 1)
    with instances(case) as (_, got), pytest.raises(ValueError, match="kernel refused"):
        got.run(COMPILED, case, 0, 17)


def test_kernels_follow_a_remapped_queue_and_keep_no_guest_memory_alive() -> None:
    case = make_case(False, batches=[(0, 15)])
    case.chains([[HDR + 100], [HDR + 200]])
    case.finish()
    inst = Instance(case)
    try:
        assert inst.run(COMPILED, case, 0, 1) == ("ok", 1, 1, 100, 0, 0, 0, 0)
        inst.vq.map(inst.mem)  # new ring views: the kernel must use them, not the old addresses
        assert inst.run(COMPILED, case, 1, 1) == ("ok", 1, 1, 200, 0, 0, 0, 0)
        inst.vq.unmap()  # and none once the queue is unmapped
        assert inst.run(COMPILED, case, 2, 1)[:3] == ("fault", TX_QUEUE, "ring not mapped")
        assert inst.vq.c.desc == ffi.NULL
        mappings = list(inst.mem._mappings)
    finally:
        inst.close()
    assert all(m.mm.closed for m in mappings)  # nothing of the kernels' pinned them
    assert inst.mem.c.nregions == 0 and inst.mem.c.regions == ffi.NULL
    key = id(inst.slots)
    assert key in kernels._rings
    del inst
    assert key not in kernels._rings
