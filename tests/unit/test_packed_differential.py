"""The compiled packed-ring operations (datapath/packed.c) and batch kernels (vqp_dequeue / vqp_enqueue,
datapath/ring_batch.h) against the Python reference (PackedVirtqueue), byte for byte, with rxtx's dequeue and
enqueue running over the reference and the operations, and the kernels doing the whole batch.

Every test builds one guest memory image (two regions of a memfd with a hole between them, a packed ring with
its two event suppression areas, chains of buffers, indirect tables) and one netmap ring image, makes two
identical instances of them, runs rxtx over the reference ring operations (then flush_used, call,
enable_kicks) on one, over the compiled ones (then vqp_complete) on the second, and the batch kernel (through
kernels.COMPILED, as a port runs it) on the third, and compares each of the others with the first: everything
either could have touched: the result or the fault (same message, same cause), the queue's positions, wrap
counters, ids in flight and unpublished used entries, every byte of guest memory, the slots, the netmap
buffers, the dirty log and the call eventfd.

Hypothesis draws honest drivers (chains of 1..N descriptors wrapping around the ring, indirect tables, both
wrap counter values, in-order or not, mergeable or not, every event suppression setting) and hostile ones
(each check of the walk violated in turn); the named tests pin each case, and the notification decisions,
down once more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_kernels_differential import (
    BAD_RANGES,
    BUFFER_AREAS,
    FILE_SIZE,
    RX_QUEUE,
    TX_QUEUE,
    GuestInstance,
    Pick,
    RingImage,
    assert_same_bytes,
    fault_outcome,
    file_offset,
    split,
    uva,
    where_in_guest,
)
from test_offload_ingress import gso

from vhostmap.datapath import lib
from vhostmap.netmap.abi import NS_MOREFRAG, NS_VNET_HDR
from vhostmap.netmap.offload import ALL_NEEDS, NEEDS_CSUM, VnetHeader
from vhostmap.vhost_user import kernels, rxtx
from vhostmap.vhost_user.packed import (
    DESC_F_AVAIL,
    DESC_F_USED,
    PackedRingAddresses,
    PackedVirtqueue,
    packed_need_event,
)
from vhostmap.vhost_user.packed_kernels import CompiledPackedRing
from vhostmap.vhost_user.rxtx import MAX_FRAME
from vhostmap.vhost_user.virtqueue import MAX_CHAIN_LENGTH, VirtqueueError
from vhostmap.virtio.spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT,
)

DESC_GPA, DRIVER_GPA, DEVICE_GPA = 0x1000, 0x3000, 0x3100  # room for 512 descriptors
TABLES = (0x4000, 0x8000)
HDR = VIRTIO_NET_HDR_SIZE

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def avail_flags(wrap: int) -> int:
    """AVAIL and USED as a driver with wrap counter ``wrap`` writes them: available."""
    return DESC_F_AVAIL if wrap else DESC_F_USED


def used_flags(wrap: int) -> int:
    return DESC_F_AVAIL | DESC_F_USED if wrap else 0


# --- the image both instances start from -------------------------------------------------------------------


class PackedImage:
    """Guest memory: random everywhere, a ring whose every descriptor looks used in its latest lap (the device
    is at ``start`` with wrap counter ``wrap``, nothing in flight), and a driver that makes chains available
    from there, at most ``num`` descriptors in all."""

    def __init__(self, num: int, rnd: random.Random, start: int, wrap: int) -> None:
        self.num, self.rnd, self.start, self.wrap = num, rnd, start, wrap
        self.image = bytearray(rnd.randbytes(FILE_SIZE))
        for pos in range(num):
            # Used in the current lap before start, in the previous one from start on.
            flags = used_flags(wrap if pos < start else wrap ^ 1) | rnd.choice([0, VRING_DESC_F_WRITE])
            self.desc(pos, rnd.randrange(1 << 64), rnd.randrange(1 << 32), rnd.randrange(0x10000), flags)
        self.write(DRIVER_GPA, VRING_PACKED_EVENT.pack(0, RING_EVENT_FLAGS_ENABLE))
        self.write(DEVICE_GPA, VRING_PACKED_EVENT.pack(0xABCD, 0x3))  # garbage the device overwrites
        self.next_pos, self.next_wrap = start, wrap
        self.left = num  # descriptors the driver may still make available
        self.free_ids = list(range(num))
        rnd.shuffle(self.free_ids)
        self.next_table = TABLES[0]

    def write(self, gpa: int, data: bytes) -> None:
        off = file_offset(gpa)
        self.image[off : off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = file_offset(gpa)
        return bytes(self.image[off : off + n])

    def desc(
        self, pos: int, addr: int, length: int, buffer_id: int, flags: int, table: int = DESC_GPA
    ) -> None:
        self.write(table + 16 * pos, VRING_PACKED_DESC.pack(addr, length, buffer_id, flags))

    def read_desc(self, pos: int, table: int = DESC_GPA) -> tuple[int, int, int, int]:
        addr, length, buffer_id, flags = VRING_PACKED_DESC.unpack(self.read(table + 16 * pos, 16))
        return addr, length, buffer_id, flags

    def patch(self, pos: int, table: int = DESC_GPA, **changes: int) -> None:
        addr, length, buffer_id, flags = self.read_desc(pos, table)
        self.desc(
            pos,
            changes.get("addr", addr),
            changes.get("length", length),
            changes.get("buffer_id", buffer_id),
            changes.get("flags", flags),
            table,
        )

    def table(self, entries: int) -> int:
        size = 16 * entries
        if self.next_table + size > TABLES[1]:
            self.next_table = TABLES[0]
        gpa = self.next_table
        self.next_table += size + self.rnd.choice((0, 8, 16))  # sometimes misaligned
        return gpa

    def buffer(self, length: int) -> int:
        areas = [(lo, hi) for lo, hi in BUFFER_AREAS if hi - lo >= length]
        lo, hi = self.rnd.choice(areas)
        return self.rnd.randrange(lo, hi - length + 1)

    def take(self) -> tuple[int, int]:
        """The driver's next descriptor position and its wrap counter; moves on."""
        pos, wrap = self.next_pos, self.next_wrap
        self.next_pos += 1
        if self.next_pos == self.num:
            self.next_pos, self.next_wrap = 0, wrap ^ 1
        self.left -= 1
        return pos, wrap


@dataclass
class Chain:
    """A chain the driver made available: its ring positions (with their wrap counters), its table."""

    places: list[tuple[int, int]]
    table: int | None
    buffer_id: int


@dataclass
class Case:
    """One scenario: a guest image with one packed queue, a netmap ring, and the batches to run on them."""

    guest: PackedImage
    ring: RingImage
    writable: bool
    chains: list[Chain] = field(default_factory=list)
    hdr_len: int = HDR
    mergeable: bool = True
    event_idx: bool = False
    indirect: bool = True
    in_order: bool = False
    kicks: bool = True
    log_dirty: bool = False
    log_size: int | None = None
    log_rings: bool = True
    host_offloads: bool = False
    pass_offloads: int = 0
    guest_offloads: int = 0
    signalled_back: int = 0  # signalled_used this many descriptors before the device's used position
    batches: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num(self) -> int:
        return self.guest.num

    def chain(self, lens: list[int], *, indirect: bool = False, buffer_id: int | None = None) -> Chain:
        """Make a chain of buffers of ``lens`` bytes available, in as many ring descriptors (one, the
        indirect one, when ``indirect``); ``buffer_id`` default: the next free one."""
        g = self.guest
        flag = VRING_DESC_F_WRITE if self.writable else 0
        bid = g.free_ids.pop() if buffer_id is None else buffer_id
        noise = g.rnd.randrange
        if indirect:
            table = g.table(len(lens))
            for e, n in enumerate(lens):
                # NEXT and ids mean nothing in a table (spec 2.8.7): some noise there.
                g.desc(e, g.buffer(n), n, noise(0x10000), flag | g.rnd.choice([0, VRING_DESC_F_NEXT]), table)
            pos, wrap = g.take()
            # WRITE of an indirect descriptor is ignored too.
            flags = VRING_DESC_F_INDIRECT | avail_flags(wrap) | g.rnd.choice([0, VRING_DESC_F_WRITE])
            g.desc(pos, table, 16 * len(lens), bid, flags)
            c = Chain([(pos, wrap)], table, bid)
        else:
            places = [g.take() for _ in lens]
            for k, ((pos, wrap), n) in enumerate(zip(places, lens, strict=True)):
                last = k + 1 == len(lens)
                flags = flag | avail_flags(wrap) | (0 if last else VRING_DESC_F_NEXT)
                g.desc(pos, g.buffer(n), n, bid if last else noise(0x10000), flags)
            c = Chain(places, None, bid)
        self.chains.append(c)
        return c

    def many(self, lens_list: list[list[int]], *, indirect: bool = False) -> None:
        for lens in lens_list:
            self.chain(lens, indirect=indirect)


def make_case(
    writable: bool,
    num: int = 8,
    start: int = 0,
    wrap: int = 1,
    num_slots: int = 16,
    buf_size: int = 2048,
    seed: int = 1,
    **kw: Any,
) -> Case:
    rnd = random.Random(seed)
    ring = RingImage.make(num_slots, buf_size, rnd)
    if writable:
        ring.fragments(0, [rnd.randint(1, buf_size) for _ in range(num_slots)], [False] * num_slots)
    return Case(PackedImage(num, rnd, start, wrap), ring, writable, **kw)


def driver_event(case: Case, flags: int, off: int = 0, wrap: int = 0) -> None:
    """The driver's event suppression structure."""
    case.guest.write(DRIVER_GPA, VRING_PACKED_EVENT.pack(off | wrap << 15, flags))


# --- running both ------------------------------------------------------------------------------------------


def back(num: int, pos: int, wrap: int, n: int) -> tuple[int, int]:
    """The position ``n`` descriptors before ``pos`` (wrap counter ``wrap``)."""
    for _ in range(n):
        pos -= 1
        if pos < 0:
            pos, wrap = num - 1, wrap ^ 1
    return pos, wrap


class Instance(GuestInstance):
    """One copy of a Case, its packed ring mapped as the device maps it."""

    def __init__(self, case: Case, compiled: bool, batch: bool = False) -> None:
        super().__init__(case.guest.image, case.log_size, case.ring)
        self.compiled = compiled
        self.batched = batch
        vq = PackedVirtqueue(RX_QUEUE if case.writable else TX_QUEUE)
        vq.set_num(case.num)
        vq.addresses = PackedRingAddresses(
            uva(DESC_GPA), uva(DRIVER_GPA), uva(DEVICE_GPA), DESC_GPA, DEVICE_GPA, case.log_rings
        )
        vq.map(self.mem)
        vq.event_idx, vq.indirect, vq.in_order = case.event_idx, case.indirect, case.in_order
        vq.log_dirty, vq.kicks = case.log_dirty, case.kicks
        vq.host_offloads, vq.guest_offloads = case.host_offloads, case.guest_offloads
        vq.pass_offloads = case.pass_offloads
        g = case.guest
        vq.last_avail_idx = vq.used_idx = g.start
        vq.avail_wrap_counter = vq.used_wrap_counter = g.wrap
        vq.signalled_used, vq.signalled_used_wrap = back(case.num, g.start, g.wrap, case.signalled_back)
        vq.started = vq.enabled = True
        vq.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.vq = vq
        self.ring = CompiledPackedRing(vq, self.mem)

    def run(self, case: Case, first: int, n: int) -> tuple[Any, ...]:
        if self.batched:
            # The whole batch in one C call, completed, as a port runs it.
            return self.batch(kernels.COMPILED, case, first, n)
        q: rxtx.Virtqueue = self.ring if self.compiled else self.vq
        try:
            if case.writable:
                res = rxtx.enqueue(q, self.mem, case.hdr_len, case.mergeable, self.slots, first, n, self.bufs)
            else:
                res = rxtx.dequeue(q, self.mem, case.hdr_len, self.slots, first, n, self.bufs)
        except VirtqueueError as e:
            return fault_outcome(e)
        if self.compiled:
            self.ring.complete()
        else:
            self.vq.flush_used()
            self.vq.call()
            self.vq.enable_kicks()
        return ("ok", *dataclasses.astuple(res))

    def state(self) -> tuple[Any, ...]:
        vq = self.vq
        return (
            vq.last_avail_idx,
            vq.avail_wrap_counter,
            vq.used_idx,
            vq.used_wrap_counter,
            vq.signalled_used,
            vq.signalled_used_wrap,
            vq.inflight.tobytes(),
            list(vq._pending_used),
        )


@dataclass
class Outcome:
    results: list[tuple[Any, ...]]
    instance: Instance  # the reference's
    calls: int


@contextlib.contextmanager
def instances(case: Case) -> Iterator[tuple[Instance, list[Instance]]]:
    """The reference's instance, and those compared with it: over the compiled operations, and the batch
    kernel's."""
    with contextlib.ExitStack() as stack:
        made: list[Instance] = []
        for compiled, batch in ((False, False), (True, False), (True, True)):
            inst = Instance(case, compiled, batch)
            stack.callback(inst.close)
            made.append(inst)
        yield made[0], made[1:]


def run_both(case: Case, check: Callable[[Outcome], None] | None = None) -> list[tuple[Any, ...]]:
    """Run every batch of ``case`` over both and assert, after each, that they did exactly the same."""
    results: list[tuple[Any, ...]] = []
    calls = 0
    with instances(case) as (ref, others):
        first = 0
        for start, n in case.batches or [(0, 0)]:
            if start >= 0:
                first = start
            a = ref.run(case, first, n)
            signalled = ref.calls()
            for got in others:
                b = got.run(case, first, n)
                where = (
                    f"batch ({first}, {n}) of the {'batch kernel' if got.batched else 'compiled operations'}"
                )
                assert b == a, where
                assert got.state() == ref.state(), f"queue state after {where}"
                assert got.calls() == signalled, f"call eventfd after {where}"
                assert_same_bytes(ref.memory(), got.memory(), f"guest memory after {where}", where_in_guest)
                assert_same_bytes(ref.slots.tobytes(), got.slots.tobytes(), f"netmap slots after {where}")
                assert_same_bytes(ref.region.tobytes(), got.region.tobytes(), f"netmap buffers after {where}")
                assert_same_bytes(ref.log(), got.log(), f"dirty log after {where}")
            calls += signalled
            results.append(a)
            if a[0] == "fault":
                break
            first = (first + a[1]) % case.ring.num_slots
        if check is not None:
            check(Outcome(results, ref, calls))
    return results


# --- hostile drivers ---------------------------------------------------------------------------------------

HOSTILE = (
    "not_avail",  # a descriptor after a chain's head not made available
    "chain_long",  # every descriptor of the ring chained by NEXT
    "direction",  # a buffer of the wrong direction, in the ring or a table
    "addr",  # a buffer outside guest memory, in the ring or a table
    "indirect_off",  # an indirect descriptor without INDIRECT_DESC
    "indirect_len",  # an indirect table of a bad length
    "indirect_next",  # INDIRECT and NEXT
    "indirect_in_chain",  # an indirect descriptor after the head of a chain
    "nested",  # an indirect descriptor inside a table
    "indirect_addr",  # a table outside guest memory
    "id",  # a buffer id >= num
    "id_twice",  # a buffer id made available twice
    "short",  # a chain shorter than the virtio-net header
    "flags",  # random flags on a random descriptor
)


def make_hostile(case: Case, hostile: str, pick: Pick) -> None:
    """Break one thing the way ``hostile`` says (HOSTILE)."""
    g, num = case.guest, case.num
    flag = VRING_DESC_F_WRITE if case.writable else 0
    if hostile == "chain_long":
        # The chains so far and every descriptor left: one chain all around the ring.
        for c in case.chains:
            for pos, wrap in c.places:
                g.desc(pos, g.buffer(8), 8, 0, flag | avail_flags(wrap) | VRING_DESC_F_NEXT)
        while g.left:
            pos, wrap = g.take()
            g.desc(pos, g.buffer(8), 8, 0, flag | avail_flags(wrap) | VRING_DESC_F_NEXT)
        case.chains.append(Chain([], None, 0))
        return
    if hostile == "flags":
        g.patch(g.rnd.randrange(num), flags=pick.int(0, 0xFFFF))
        return
    if not case.chains and g.left:
        case.chain([100])
    if not case.chains:
        return
    c = case.chains[g.rnd.randrange(len(case.chains))]
    if not c.places:
        return
    head, head_wrap = c.places[0]
    last = c.places[-1][0]
    if hostile == "not_avail":
        if len(c.places) > 1:
            pos, wrap = c.places[pick.int(1, len(c.places) - 1)]
            flags = g.read_desc(pos)[3] & ~(DESC_F_AVAIL | DESC_F_USED)
            g.patch(
                pos, flags=flags | pick.one([used_flags(wrap), used_flags(wrap ^ 1), avail_flags(wrap ^ 1)])
            )
        else:  # a NEXT into the descriptor after it, which the driver did not make available
            g.patch(head, flags=g.read_desc(head)[3] | VRING_DESC_F_NEXT)
    elif hostile == "direction":
        if c.table is not None:
            e = pick.int(0, g.read_desc(head)[1] // 16 - 1)
            g.patch(e, table=c.table, flags=g.read_desc(e, c.table)[3] ^ VRING_DESC_F_WRITE)
        else:
            pos, _ = c.places[pick.int(0, len(c.places) - 1)]
            g.patch(pos, flags=g.read_desc(pos)[3] ^ VRING_DESC_F_WRITE)
    elif hostile == "addr":
        bad, bad_len = pick.one(BAD_RANGES)
        if c.table is not None:
            g.patch(0, table=c.table, addr=bad, length=bad_len)
        else:
            g.patch(head, addr=bad, length=bad_len)
    elif hostile == "indirect_off":
        case.indirect = False
        if c.table is None:
            g.patch(head, flags=VRING_DESC_F_INDIRECT | avail_flags(head_wrap), length=16, addr=g.table(1))
    elif hostile == "indirect_len":
        case.indirect = True
        bad_len = pick.one([0, 8, 17, 24, 16 * (MAX_CHAIN_LENGTH + 1)])
        flags = VRING_DESC_F_INDIRECT | avail_flags(head_wrap)
        g.patch(head, flags=flags, length=bad_len, addr=g.table(1))
    elif hostile == "indirect_next":
        case.indirect = True
        flags = VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT | avail_flags(head_wrap)
        g.patch(head, flags=flags, length=16, addr=g.table(1))
    elif hostile == "indirect_in_chain":
        case.indirect = True
        if len(c.places) == 1 and g.left:  # a second descriptor for it
            pos, wrap = g.take()
            g.desc(pos, 0, 0, c.buffer_id, flag | avail_flags(wrap))
            g.patch(head, flags=g.read_desc(head)[3] & ~VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT)
            c.places.append((pos, wrap))
        if len(c.places) > 1:
            pos, wrap = c.places[pick.int(1, len(c.places) - 1)]
            g.patch(pos, flags=g.read_desc(pos)[3] | VRING_DESC_F_INDIRECT, length=16, addr=g.table(1))
    elif hostile == "nested":
        case.indirect = True
        table = g.table(2)
        g.desc(0, g.buffer(8), 8, 0, flag, table)
        g.desc(1, g.table(1), 16, 0, VRING_DESC_F_INDIRECT, table)
        g.patch(head, flags=VRING_DESC_F_INDIRECT | avail_flags(head_wrap), length=32, addr=table)
    elif hostile == "indirect_addr":
        case.indirect = True
        bad, _ = pick.one(BAD_RANGES)
        g.patch(head, flags=VRING_DESC_F_INDIRECT | avail_flags(head_wrap), length=64, addr=bad)
    elif hostile == "id":
        g.patch(last, buffer_id=pick.int(num, 0xFFFF))
    elif hostile == "id_twice" and len(case.chains) > 1:
        other = case.chains[(case.chains.index(c) + 1) % len(case.chains)]
        g.patch(last, buffer_id=other.buffer_id)
    elif hostile == "short" and c.table is None:  # the head alone, and too short
        short = pick.int(0, max(case.hdr_len - 1, 0))
        flags = g.read_desc(head)[3] & ~VRING_DESC_F_NEXT
        g.patch(head, flags=flags, length=short, buffer_id=c.buffer_id)


# --- hypothesis: honest and hostile drivers ----------------------------------------------------------------

TX_SIZES = {"empty": (0, 0), "small": (1, 100), "normal": (60, 1600), "jumbo": (1600, 9100)}
TX_SIZES["oversize"] = (MAX_FRAME + 1, MAX_FRAME + 3000)
RX_SIZES = {"small": (0, 100), "normal": (60, 2000), "big": (2000, 9100)}


@st.composite
def cases(draw: st.DrawFn, writable: bool) -> Case:
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    num = draw(st.sampled_from([8, 16, 5, 2, 3, 1, 32, 256]))  # any size: a packed ring need not be 2^n
    num_slots = draw(st.sampled_from([16, 48, 256, 2, 5]))
    buf_size = draw(st.sampled_from([64, 512, 2048]))
    ring = RingImage.make(num_slots, buf_size, rnd, base=draw(st.sampled_from([0, 64])))
    start = draw(st.one_of(st.integers(0, num - 1), st.just(num - 1), st.just(0)))
    wrap = int(draw(st.booleans()))
    case = Case(
        PackedImage(num, rnd, start, wrap),
        ring,
        writable,
        hdr_len=draw(st.sampled_from([HDR, HDR, 10, 0])),
        mergeable=draw(st.booleans()),
        event_idx=draw(st.booleans()),
        indirect=draw(st.booleans()),
        in_order=draw(st.booleans()),
        kicks=draw(st.booleans()),
        log_dirty=draw(st.booleans()),
        log_size=draw(st.sampled_from([None, 2, 64])),
        log_rings=draw(st.booleans()),
        signalled_back=draw(st.integers(0, 3)),
        # Headers of random bytes mostly ask for nonsense; the named offload tests below ask for real work.
        host_offloads=draw(st.booleans()),
        pass_offloads=draw(st.sampled_from([0, ALL_NEEDS, NEEDS_CSUM]) | st.integers(0, 0xFF)),
        guest_offloads=draw(st.sampled_from([0, ALL_NEEDS, NEEDS_CSUM]) | st.integers(0, 0xFF)),
    )
    ev_flags = draw(
        st.sampled_from([RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_DESC, 3])
    )
    driver_event(case, ev_flags, (start + draw(st.integers(-3, num + 3))) % num, int(draw(st.booleans())))

    g, hdr = case.guest, case.hdr_len
    # Half the drivers make single-descriptor chains only: the kernels take those a group of four at a time
    # (pvq_pop_batch, and straight into slots or chains: vqp_take_groups, vqp_put_groups), which chains of
    # random lengths seldom line up for.
    singles = draw(st.booleans())
    while g.left and draw(st.integers(0, 20 if singles else 5)):
        if writable:
            lo, hi = RX_SIZES[draw(st.sampled_from(["small", "normal", "normal", "big"]))]
            kind = "rx"
        else:
            kind = draw(st.sampled_from(["empty", "small", "normal", "normal", "jumbo", "oversize"]))
            lo, hi = TX_SIZES[kind]
        use_indirect = case.indirect and draw(st.booleans())
        most = 8 if use_indirect else min(6, g.left)
        least = 2 if kind == "oversize" else 1  # no buffer area holds an oversized frame in one piece
        if least > most:
            break
        parts = least if singles and not use_indirect else draw(st.integers(least, most))
        lens = split(hdr + rnd.randint(lo, hi), parts, rnd)
        case.chain(lens, indirect=use_indirect)

    hostile = draw(st.one_of(st.none(), st.none(), st.sampled_from(HOSTILE)))
    if hostile is not None:
        make_hostile(case, hostile, Pick(draw))

    if writable:
        lens = [draw(st.sampled_from([0, 1, 60, buf_size // 2, buf_size])) for _ in range(num_slots)]
        more = [draw(st.integers(0, 3)) == 0 for _ in range(num_slots)]
        flags = [0, 0x0001, NS_VNET_HDR, NS_VNET_HDR | 0x0001]
        ring.fragments(0, lens, more, other_flags=draw(st.sampled_from(flags)))
    first = draw(st.integers(0, num_slots - 1))
    case.batches = [(first, draw(st.integers(1, max(num_slots - 1, 1))) if draw(st.integers(0, 9)) else 0)]
    if draw(st.booleans()):
        case.batches.append((-1, draw(st.integers(0, num_slots - 1))))
    return case


@FUZZ
@given(cases(writable=False))
def test_dequeue_over_packed_ring_matches_reference(case: Case) -> None:
    note_outcomes(run_both(case))


@FUZZ
@given(cases(writable=True))
def test_enqueue_over_packed_ring_matches_reference(case: Case) -> None:
    note_outcomes(run_both(case))


def note_outcomes(results: list[tuple[Any, ...]]) -> None:
    """What the examples exercised (pytest --hypothesis-show-statistics)."""
    for k, r in enumerate(results):
        batch = "first" if k == 0 else "second"
        if r[0] == "fault":
            event(f"{batch} fault: " + re.sub(r"\b(0x[0-9a-f]+|[0-9]+)\b", "N", str(r[2]).split(":")[0]))
        else:
            event(f"{batch} ok: " + ("packets" if r[2] else "no packet") + (", drops" if r[4] else ""))


# --- named cases: honest drivers ---------------------------------------------------------------------------


def ok(results: list[tuple[Any, ...]]) -> list[tuple[int, int, int, int]]:
    assert all(r[0] == "ok" for r in results), results
    return [r[1:5] for r in results]


def used_desc(o: Outcome, pos: int) -> tuple[int, int, int]:
    """(len, id, flags) of descriptor ``pos`` as the reference left it."""
    _, length, buffer_id, flags = VRING_PACKED_DESC.unpack(o.instance.read(DESC_GPA + 16 * pos, 16))
    return length, buffer_id, flags


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("segments", [1, 3, 6])
def test_dequeue_chains_of_several_descriptors(segments: int, indirect: bool) -> None:
    case = make_case(False, num=32, batches=[(0, 15)])
    lens = [HDR + 40] + [100] * (segments - 1) if segments > 1 else [HDR + 300]
    case.many([lens, lens, [HDR + 60]], indirect=indirect)
    frame = sum(lens) - HDR

    def check(o: Outcome) -> None:
        # One used descriptor per chain, each where its chain started, with its buffer id.
        heads = [c.places[0][0] for c in case.chains]
        assert [used_desc(o, p)[1:] for p in heads] == [(c.buffer_id, used_flags(1)) for c in case.chains]

    assert ok(run_both(case, check)) == [(3, 3, 2 * frame + 60, 0)]


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize("wrap", [0, 1])
def test_chains_wrap_around_the_ring_and_flip_both_counters(writable: bool, wrap: int) -> None:
    case = make_case(writable, num=5, start=3, wrap=wrap, batches=[(0, 15)])
    case.many([[HDR + 50, 50, 50], [HDR + 100], [HDR + 20]])  # positions 3 4 0 | 1 | 2
    if writable:
        case.ring.frames(0, [100, 100, 20])

    def check(o: Outcome) -> None:
        vq = o.instance.vq
        assert (vq.last_avail_idx, vq.avail_wrap_counter) == (3, wrap ^ 1)
        assert (vq.used_idx, vq.used_wrap_counter) == (3, wrap ^ 1)
        assert used_desc(o, 3)[2] & ~VRING_DESC_F_WRITE == used_flags(wrap)  # the first lap's
        assert used_desc(o, 1)[2] & ~VRING_DESC_F_WRITE == used_flags(wrap ^ 1)  # the next one's
        assert not vq.inflight.any()

    run_both(case, check)


def test_in_order_dequeue_writes_one_used_descriptor_per_batch() -> None:
    case = make_case(False, num=8, start=6, in_order=True, batches=[(0, 15)])
    case.many([[HDR + 10, 10], [HDR + 20], [HDR + 30, 1, 1]])  # 6 7 | 0 | 1 2 3

    def check(o: Outcome) -> None:
        assert used_desc(o, 6) == (0, case.chains[-1].buffer_id, used_flags(1))
        assert used_desc(o, 0)[2] == case.guest.read_desc(0)[3]  # not written: skipped over
        assert (o.instance.vq.used_idx, o.instance.vq.used_wrap_counter) == (4, 0)

    assert ok(run_both(case, check)) == [(3, 3, 72, 0)]


def test_in_order_receive_writes_every_length() -> None:
    case = make_case(True, num=8, in_order=True, batches=[(0, 15)])
    case.many([[HDR + 100], [HDR + 200]])
    case.ring.frames(0, [100, 200])

    def check(o: Outcome) -> None:
        w = VRING_DESC_F_WRITE
        assert used_desc(o, 0) == (HDR + 100, case.chains[0].buffer_id, used_flags(1) | w)
        assert used_desc(o, 1) == (HDR + 200, case.chains[1].buffer_id, used_flags(1) | w)

    assert ok(run_both(case, check)) == [(2, 2, 300, 0)]


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize("at", [0, 5, 9])
@pytest.mark.parametrize("breakage", ["none", "same_id", "direction", "empty", "next", "addr"])
def test_batch_of_single_descriptor_chains(writable: bool, at: int, breakage: str) -> None:
    """Chains of one descriptor each, which the kernels take up to PVQ_BATCH_MAX at a time in groups of
    PVQ_BATCH, one of them (in the first group, the second, the third) broken: the batch stops before its
    group and the chain meets every check of its own, exactly as in the reference."""
    case = make_case(writable, num=32, num_slots=32, batches=[(0, 31), (-1, 31)])
    case.many([[HDR + 60]] * 12)
    if writable:
        case.ring.frames(0, [60] * 12)
    g, (pos, _) = case.guest, case.chains[at].places[0]
    flags = g.read_desc(pos)[3]
    if breakage == "same_id":  # an id in flight since an earlier group, or twice in the first
        g.patch(pos, buffer_id=case.chains[1 if at != 1 else 0].buffer_id)
    elif breakage == "direction":
        g.patch(pos, flags=flags ^ VRING_DESC_F_WRITE)
    elif breakage == "empty":
        g.patch(pos, length=0)
    elif breakage == "next":
        g.patch(pos, flags=flags | VRING_DESC_F_NEXT)
    elif breakage == "addr":
        g.patch(pos, addr=0xFFFF_FFFF_FFFF_FFF0, length=0x20)
    results = run_both(case)
    if breakage == "none":
        assert [r[:3] for r in results] == [("ok", 12, 12), ("ok", 0, 0)], results  # every frame through


def plain_run(writable: bool, at: int, breakage: str) -> Case:
    """Twelve single-descriptor chains of plain frames (a header that asks for nothing, 60 bytes after it;
    receive: slots of whole 60-byte frames), the one at ``at`` not plain in the way ``breakage`` says."""
    case = make_case(writable, num=32, num_slots=32, buf_size=512, batches=[(0, 31), (-1, 31)])
    case.host_offloads = not writable
    case.many([[HDR + 60]] * 12)
    g = case.guest
    for c in case.chains:
        g.write(g.read_desc(c.places[0][0])[0], bytes(HDR))  # a header that asks for nothing
    if writable:
        case.ring.frames(0, [60] * 12)
    pos = case.chains[at].places[0][0]
    addr = g.read_desc(pos)[0]
    if breakage == "header_only":  # a frame of 0 bytes: dropped
        g.patch(pos, length=HDR)
    elif breakage == "tiny":  # shorter than a one-copy pass's min_head (14): copied, not referred to
        g.patch(pos, length=HDR + 10)
    elif breakage == "long":  # more than a buffer holds: copied over two slots
        g.patch(pos, addr=g.buffer(HDR + 600), length=HDR + 600)
        g.write(g.read_desc(pos)[0], bytes(HDR))
    elif breakage == "offload":  # a header asking for a checksum
        g.write(addr, VnetHeader(flags=1, csum_start=14, csum_offset=16).pack())
    elif breakage == "short_chain":  # a receive buffer shorter than the frame and its header
        g.patch(pos, length=HDR + 10)
    elif breakage == "vnet_hdr":  # a slot with a header of its own
        case.ring.slots[at]["flags"] |= NS_VNET_HDR
    elif breakage == "fragment":  # a frame over two slots
        case.ring.fragments(at, [30, 30], [True, False])
    return case


@pytest.mark.parametrize("at", [0, 5, 9])
@pytest.mark.parametrize(
    ("writable", "breakage"),
    [
        (False, "none"),
        (False, "header_only"),
        (False, "long"),
        (False, "offload"),
        (False, "tiny"),
        (True, "none"),
        (True, "short_chain"),
        (True, "vnet_hdr"),
        (True, "fragment"),
    ],
)
def test_groups_of_plain_frames_stop_at_one_that_is_not(writable: bool, at: int, breakage: str) -> None:
    """The batch kernels move groups of PVQ_BATCH plain frames straight between ring and slots
    (vqp_take_groups, vqp_put_groups); a frame that is not plain (in the first group, the second, the third)
    leaves its group to the chain-by-chain path, which meets it with every check of its own: the same frames,
    bytes, counters, used descriptors and ids in flight as the reference."""
    results = run_both(plain_run(writable, at, breakage))
    if breakage == "none":
        assert [r[:3] for r in results] == [("ok", 12, 12), ("ok", 0, 0)], results


@pytest.mark.parametrize("plain", [1, 6, 10])
def test_frame_without_room_gives_back_the_chains_it_took_from_a_batch(plain: int) -> None:
    """A frame after ``plain`` plain ones needs more receive buffers than the guest gave: the chains it took
    from the middle of a batch go back, from its own first one on, and the next call takes them again."""
    case = make_case(True, num=32, num_slots=32, batches=[(0, 31), (-1, 31)])
    case.many([[HDR + 60]] * 12)
    case.ring.frames(0, [60] * plain + [5000])

    def check(o: Outcome) -> None:
        vq = o.instance.vq
        assert vq.last_avail_idx == plain and np.count_nonzero(vq.inflight) == 0

    assert ok(run_both(case, check)) == [(plain, plain, 60 * plain, 0), (0, 0, 0, 0)]


def test_enqueue_mergeable_frame_spans_chains() -> None:
    case = make_case(True, num=16, batches=[(0, 15)])
    case.many([[1500]] * 4 + [[HDR + 100]])
    case.ring.frames(0, [5000, 60])
    assert ok(run_both(case)) == [(4, 2, 5060, 0)]


def test_dequeue_chain_that_does_not_fit_waits_and_is_taken_again() -> None:
    case = make_case(False, buf_size=512, batches=[(0, 4), (-1, 2), (-1, 15)])
    case.many([[HDR + 1000], [HDR + 1500], [HDR + 100]])
    assert ok(run_both(case)) == [(2, 1, 1000, 0), (0, 0, 0, 0), (4, 2, 1600, 0)]


def test_enqueue_without_receive_buffers_gives_chains_back() -> None:
    case = make_case(True, batches=[(0, 15)])
    case.many([[HDR + 100], [1000]])
    case.ring.frames(0, [50, 3000])  # the second frame needs more than what is left

    def check(o: Outcome) -> None:
        assert o.instance.vq.last_avail_idx == 1 and list(o.instance.vq.inflight).count(0) == case.num

    assert ok(run_both(case, check)) == [(1, 1, 50, 0)]


def test_nothing_available_in_a_ring_used_all_around() -> None:
    case = make_case(False, num=4, start=2, wrap=0, batches=[(0, 15)])
    assert ok(run_both(case)) == [(0, 0, 0, 0)]


# --- notifications -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "event_idx", "wanted"),
    [
        (RING_EVENT_FLAGS_ENABLE, False, True),
        (RING_EVENT_FLAGS_DISABLE, False, False),
        (RING_EVENT_FLAGS_DISABLE, True, False),
        (RING_EVENT_FLAGS_DESC, False, True),  # DESC without EVENT_IDX means nothing: an interrupt
        (3, False, True),  # reserved: an interrupt too
    ],
)
def test_driver_event_flags_decide_the_interrupt(flags: int, event_idx: bool, wanted: bool) -> None:
    case = make_case(False, event_idx=event_idx, batches=[(0, 15), (-1, 15)])
    case.many([[HDR + 100]])
    driver_event(case, flags, 7, 0)

    def check(o: Outcome) -> None:
        assert o.calls == int(wanted)  # and none for the second, empty batch

    run_both(case, check)


# (start, wrap, chains of 1 descriptor, event offset, event wrap) -> interrupt?
EVENT_CASES = [
    (0, 1, 2, 0, 1, True),  # at the first used descriptor
    (0, 1, 2, 1, 1, True),  # at the second
    (0, 1, 2, 2, 1, False),  # at the third: not yet
    (6, 1, 3, 7, 1, True),
    (6, 1, 3, 0, 0, True),  # past the end of the ring, in the next lap
    (6, 1, 3, 1, 0, False),
    (6, 0, 3, 0, 1, True),  # the same with the other wrap value
    (6, 0, 3, 0, 0, False),  # ... an event a whole lap away
    (3, 1, 2, 2, 1, False),  # already behind
]


@pytest.mark.parametrize(("start", "wrap", "n", "off", "ev_wrap", "wanted"), EVENT_CASES)
def test_event_idx_descriptor_event_decides_the_interrupt(
    start: int, wrap: int, n: int, off: int, ev_wrap: int, wanted: bool
) -> None:
    case = make_case(False, num=8, start=start, wrap=wrap, event_idx=True, batches=[(0, 15)])
    case.many([[HDR + 100]] * n)
    driver_event(case, RING_EVENT_FLAGS_DESC, off, ev_wrap)

    def check(o: Outcome) -> None:
        assert o.calls == int(wanted)

    run_both(case, check)


def test_packed_need_event_is_exact_for_any_queue_size() -> None:
    """Against counting the positions passed one by one, over every case of two small rings."""
    for num in (3, 4):
        lap = 2 * num
        for old in range(lap):
            for moved in range(num + 1):
                new = (old + moved) % lap
                passed = {(old + k) % lap for k in range(moved)}
                for ev in range(lap):
                    assert packed_need_event(num, ev, new, old) == (ev in passed)


@pytest.mark.parametrize(
    ("kicks", "event_idx", "expected"),
    [
        (True, False, (None, RING_EVENT_FLAGS_ENABLE)),
        (False, True, (None, RING_EVENT_FLAGS_DISABLE)),
        (False, False, (None, RING_EVENT_FLAGS_DISABLE)),
        (True, True, (2 | 0 << 15, RING_EVENT_FLAGS_DESC)),
    ],
)
def test_device_event_asks_for_kicks_or_none(
    kicks: bool, event_idx: bool, expected: tuple[int | None, int]
) -> None:
    """The device area: ENABLE, DISABLE (a polling device), or with EVENT_IDX the next available descriptor
    (here 2, in the next lap: wrap counter 0); logged even without used descriptors."""
    case = make_case(False, num=4, start=2, kicks=kicks, event_idx=event_idx, batches=[(0, 15), (-1, 15)])
    case.many([[HDR + 10]] * 4)  # 2 3 | 0 1: every descriptor, the device ends where it started
    case.log_dirty, case.log_size = True, 64

    def check(o: Outcome) -> None:
        off_wrap, flags = VRING_PACKED_EVENT.unpack(o.instance.read(DEVICE_GPA, 4))
        assert flags == expected[1]
        assert off_wrap == (0xABCD if expected[0] is None else expected[0])
        assert o.instance.log()[0] & 1 << DEVICE_GPA // 4096  # the device area's page

    run_both(case, check)


# --- named cases: hostile drivers --------------------------------------------------------------------------


def fault(results: list[tuple[Any, ...]]) -> str:
    assert results[-1][0] == "fault", results
    return str(results[-1][2])


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize(
    ("hostile", "reason"),
    [
        ("not_avail", "is not available"),
        ("chain_long", "is longer than 8 descriptors (a loop?)"),
        ("direction", "in a chain that must not have one"),
        ("addr", "buffer of "),
        ("indirect_off", "but INDIRECT_DESC not negotiated"),
        ("indirect_len", "has bad length"),
        ("indirect_next", "has both INDIRECT and NEXT"),
        ("indirect_in_chain", "inside a chain"),
        ("nested", "nested indirect table in entry 1 of descriptor"),
        ("indirect_addr", "indirect table of descriptor"),
        ("id", ">= 8"),
        ("id_twice", "is already in use (made available twice)"),
        ("short", "shorter than its header"),
    ],
)
def test_hostile_driver_gets_the_same_fault(writable: bool, hostile: str, reason: str) -> None:
    for seed in range(4):
        case = make_case(writable, seed=seed, start=seed * 2, batches=[(0, 15)])
        indirect = seed % 2 == 1 and hostile not in ("not_avail", "indirect_in_chain", "short")
        case.many([[HDR + 50, 50], [HDR + 50, 50], [HDR + 70]], indirect=indirect)
        if writable:
            case.ring.frames(0, [100, 100, 100])
        make_hostile(case, hostile, Pick(rnd=random.Random(seed)))
        assert reason in fault(run_both(case))


def test_fault_leaves_completed_chains_unpublished_and_in_flight() -> None:
    case = make_case(False, batches=[(0, 15)])
    case.many([[HDR + 100], [HDR + 100], [HDR + 100]])
    case.guest.patch(2, flags=case.guest.read_desc(2)[3] | VRING_DESC_F_WRITE)

    def check(o: Outcome) -> None:
        vq = o.instance.vq
        ids = [c.buffer_id for c in case.chains[:2]]
        assert vq._pending_used == [(ids[0], 0, 1), (ids[1], 0, 1)]
        assert sorted(i for i in range(case.num) if vq.inflight[i]) == sorted(ids)
        assert used_desc(o, 0)[2] == avail_flags(1)  # nothing was marked used

    assert fault(run_both(case, check)) == "device-writable descriptor 2 in a chain that must not have one"


def test_buffer_id_is_read_from_the_last_descriptor_of_a_chain() -> None:
    case = make_case(False, batches=[(0, 15)])
    c = case.chain([HDR + 10, 10, 10])
    case.guest.patch(0, buffer_id=c.buffer_id)  # the head's id is noise a checker must not look at
    case.guest.patch(1, buffer_id=0xFFFF)

    def check(o: Outcome) -> None:
        assert used_desc(o, 0)[1] == c.buffer_id

    assert ok(run_both(case, check)) == [(1, 1, 30, 0)]


# --- named cases: the groups of four (pvq_pop_batch) --------------------------------------------------------

# What a driver may put among four single-descriptor chains from a multiple of four on, where the batch
# kernels take groups of four chains at once: each must end exactly as the reference's pops one by one
# (nothing of that group taken by the batch, the fault where the reference finds it).
BATCH_HOSTILE = (
    "not_avail",  # not made available (looks used), the chains after it available
    "avail_wrong_lap",  # AVAIL and USED of the other wrap counter
    "next",  # NEXT: a chain of two descriptors inside the four
    "indirect",  # an indirect descriptor
    "addr",  # a buffer outside guest memory
    "addr_across",  # a buffer from the region of the chain before it across that region's end
    "id",  # a buffer id >= num
    "id_twice",  # the id of the batch's first chain again
    "id_in_flight",  # the id of a chain taken before the batch
    "direction",  # the wrong direction
    "empty",  # length 0
    "short",  # shorter than the virtio-net header
)


def batch_case(writable: bool, start: int, chains: int, frame: int = 60, **kw: Any) -> Case:
    """``chains`` single-descriptor chains from ``start`` (frames of ``frame`` bytes to send, or buffers of
    200 bytes for the frames of 60 bytes in the netmap ring)."""
    case = make_case(writable, num=16, start=start, num_slots=32, **kw)
    case.many([[HDR + (200 if writable else frame)]] * chains)
    if writable:
        case.ring.frames(0, [60] * 31)
    return case


def break_in_batch(case: Case, hostile: str, k: int) -> None:
    """Break chain ``k`` of ``case`` the way ``hostile`` says (BATCH_HOSTILE)."""
    g = case.guest
    c = case.chains[k]
    pos, wrap = c.places[0]
    flags = g.read_desc(pos)[3]
    if hostile == "not_avail":
        g.patch(pos, flags=flags & ~(DESC_F_AVAIL | DESC_F_USED) | used_flags(wrap))
    elif hostile == "avail_wrong_lap":
        g.patch(pos, flags=flags & ~(DESC_F_AVAIL | DESC_F_USED) | avail_flags(wrap ^ 1))
    elif hostile == "next":
        g.patch(pos, flags=flags | VRING_DESC_F_NEXT)
    elif hostile == "indirect":
        table = g.table(1)
        g.desc(0, g.buffer(HDR + 60), HDR + 60, 0, flags & VRING_DESC_F_WRITE, table)
        g.patch(pos, flags=flags | VRING_DESC_F_INDIRECT, addr=table, length=16)
    elif hostile == "addr":
        bad, bad_len = BAD_RANGES[k % len(BAD_RANGES)]
        g.patch(pos, addr=bad, length=bad_len)
    elif hostile == "addr_across":
        # The batch translates the one before into a region and tries that region first for this one.
        lo, hi = BUFFER_AREAS[k % len(BUFFER_AREAS)]
        before = case.chains[k - 1].places[0][0]
        g.patch(before, addr=lo)
        g.patch(pos, addr=hi - HDR, length=2 * HDR)
    elif hostile == "id":
        g.patch(pos, buffer_id=case.num + k)
    elif hostile == "id_twice":
        g.patch(pos, buffer_id=case.chains[k & ~3].buffer_id if k % 4 else case.chains[k + 1].buffer_id)
    elif hostile == "id_in_flight":
        g.patch(pos, buffer_id=case.chains[0].buffer_id)
    elif hostile == "direction":
        g.patch(pos, flags=flags ^ VRING_DESC_F_WRITE)
    elif hostile == "empty":
        g.patch(pos, length=0)
    elif hostile == "short":
        g.patch(pos, length=HDR - 1)


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize(("start", "wrap"), [(0, 1), (4, 0), (1, 1), (3, 0), (12, 1), (10, 0)])
def test_batches_of_four_chains_match_the_reference(writable: bool, start: int, wrap: int) -> None:
    # From a multiple of four, or after single pops up to one; across the end of the ring (no batch wraps).
    case = batch_case(writable, start, 12, wrap=wrap, batches=[(0, 31)])

    def check(o: Outcome) -> None:
        vq = o.instance.vq
        assert not vq.inflight.any()
        assert [used_desc(o, c.places[0][0])[1] for c in case.chains] == [c.buffer_id for c in case.chains]

    assert ok(run_both(case, check))[0][:2] == (12, 12)


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize("hostile", BATCH_HOSTILE)
@pytest.mark.parametrize("k", [4, 6, 7])
def test_hostile_descriptor_inside_a_batch_ends_as_the_reference(
    writable: bool, hostile: str, k: int
) -> None:
    # Chains 4..7 would be the second batch: the first, a middle one and the last of it broken.
    case = batch_case(writable, 0, 12, batches=[(0, 31), (-1, 31)])
    break_in_batch(case, hostile, k)
    results = run_both(case)
    if hostile not in ("not_avail", "avail_wrong_lap", "next", "indirect", "empty"):
        fault(results)  # a fault, found by both at the same chain, those before it taken and unpublished


@pytest.mark.parametrize("mergeable", [False, True])
@pytest.mark.parametrize("log_dirty", [False, True])
def test_frames_at_the_edges_of_the_plain_way_match_the_reference(mergeable: bool, log_dirty: bool) -> None:
    # The batch kernels take a plain frame a short way (take_plain, put_plain) and leave the rest to the
    # general one: send frames of nothing (the header alone), one byte, a 64-byte slot exactly and one byte
    # over; receive frames of nothing, one byte, and one that fills a chain (header and 60 bytes) exactly,
    # one byte short of it and one byte over (a second chain when mergeable, dropped when not).
    for writable in (False, True):
        frames = [0, 1, 64, 65, 0, 1, 64, 65] if not writable else [0, 1, 59, 60, 61, 60, 0, 1]
        case = make_case(
            writable, num=16, num_slots=32, buf_size=64, mergeable=mergeable, log_dirty=log_dirty
        )
        if log_dirty:
            case.log_size = 64
        case.many([[HDR + (60 if writable else f)] for f in frames])
        if writable:
            case.ring.frames(0, frames + [60] * 8)
        case.batches = [(0, 31)]
        run_both(case)


@pytest.mark.parametrize(("writable", "space", "taken"), [(False, 5, 2), (False, 6, 3), (True, 31, 3)])
def test_batch_of_four_with_room_for_fewer_gives_the_rest_back(
    writable: bool, space: int, taken: int
) -> None:
    # Dequeue: frames of two slots each, room for two and a half (the third waits) or three; enqueue: three
    # frames for a batch of four chains.
    case = batch_case(writable, 0, 8, frame=100, buf_size=64, batches=[(0, space), (-1, 31)])
    if writable:
        case.ring.frames(0, [60] * 3)
        case.ring.fragments(3, [0] * 29, [True] * 29)  # an unfinished frame: the enqueue stops there

    def check(o: Outcome) -> None:
        assert not o.instance.vq.inflight.any()

    assert ok(run_both(case, check))[0][1] == taken


# --- named cases: offloads --------------------------------------------------------------------------------


def tx_chain(case: Case, data: bytes, parts: int) -> None:
    """A transmit chain holding ``data`` (header and frame) over ``parts`` ring descriptors."""
    g = case.guest
    cuts = sorted({0, len(data), *(g.rnd.randrange(1, len(data)) for _ in range(parts - 1))})
    pieces = [data[a:b] for a, b in itertools.pairwise(cuts)]
    places = [g.take() for _ in pieces]
    bid = g.free_ids.pop()
    for k, ((pos, wrap), piece) in enumerate(zip(places, pieces, strict=True)):
        gpa = g.buffer(len(piece))
        g.write(gpa, piece)
        last = k + 1 == len(pieces)
        g.desc(pos, gpa, len(piece), bid, avail_flags(wrap) | (0 if last else VRING_DESC_F_NEXT))
    case.chains.append(Chain(places, None, bid))


def slot_frame(case: Case, first: int, data: bytes, flags: int = NS_VNET_HDR) -> int:
    """``data`` in the slots from ``first`` (``flags`` on the first), a buffer each at most; the slots."""
    ring = case.ring
    pieces = [data[o : o + ring.buf_size] for o in range(0, len(data), ring.buf_size)] or [b""]
    for k, piece in enumerate(pieces):
        s = (first + k) % ring.num_slots
        at = ring.base + int(ring.slots[s]["buf_idx"]) * ring.buf_size
        ring.region[at : at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
        ring.slots[s]["len"] = len(piece)
        ring.slots[s]["flags"] = (flags if k == 0 else 0) | (NS_MOREFRAG if k + 1 < len(pieces) else 0)
    return len(pieces)


GSO_KINDS = [("4", "tcp"), ("6", "tcp"), ("4", "udp")]


@pytest.mark.parametrize(("l3", "l4"), GSO_KINDS)
@pytest.mark.parametrize("passes", [0, ALL_NEEDS])
def test_dequeue_segments_or_passes_what_the_header_asks(l3: str, l4: str, passes: int) -> None:
    """A 20 KB GSO frame whose header asks for segmentation and a checksum, among plain frames: completed
    into its segments (nothing passes), or kept whole with its header (NS_VNET_HDR) when every destination
    takes it; a second GSO frame whose checksum would start beyond it is dropped alone."""
    for seed, buf_size in enumerate((2048, 512)):
        case = make_case(False, seed=seed, num=32, num_slots=256, buf_size=buf_size, batches=[(3, 255)])
        case.host_offloads, case.pass_offloads = True, passes
        h, frame = gso(l3, l4, 20000, 1400)
        tx_chain(case, bytes(HDR) + bytes(range(60)), parts=1)  # headers that ask for nothing
        tx_chain(case, h.pack() + frame, parts=3)
        bad = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, len(frame) + 100, 10)  # beyond the frame
        tx_chain(case, bad.pack() + frame, parts=2)
        tx_chain(case, bytes(HDR) + bytes(200), parts=2)
        (res,) = ok_all(run_both(case))
        _, packets, _, dropped, bad_headers, offloaded, passed = res
        assert (dropped, bad_headers) == (1, 1)
        assert (offloaded, passed) == ((0, 1) if passes else (1, 0))
        assert packets == (3 if passes else 2 + -(-20000 // 1400))


@pytest.mark.parametrize(("l3", "l4"), GSO_KINDS)
@pytest.mark.parametrize("takes", [0, ALL_NEEDS])
@pytest.mark.parametrize("mergeable", [True, False])
def test_enqueue_delivers_or_completes_a_frame_with_its_header(
    l3: str, l4: str, takes: int, mergeable: bool
) -> None:
    """A GSO frame in slots with its header (NS_VNET_HDR): delivered with it to a driver that takes what it
    asks, over mergeable buffers; completed into segments for one that does not (all of them or, short of
    receive chains, none); a header the frame does not bear out drops it alone."""
    h, frame = gso(l3, l4, 6000, 1000)
    for chains in (12, 3):
        case = make_case(True, seed=chains, num=16, num_slots=64, buf_size=2048)
        case.guest_offloads, case.mergeable = takes, mergeable
        case.many([[HDR + 1500]] * chains if mergeable else [[HDR + 9000]] * chains)
        n = slot_frame(case, 0, h.pack() + frame)
        bad = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, len(frame) + 100, 10)  # beyond the frame
        n += slot_frame(case, n, bad.pack() + frame)
        n += slot_frame(case, n, bytes(range(100)), flags=0)
        case.batches = [(0, n)]
        ((consumed, packets, _, dropped, bad_headers, offloaded, passed),) = ok_all(run_both(case))
        assert passed == 0
        # Room for the frame (one big chain, or 5 mergeable ones; or its 6 segments) and the plain one?
        if chains == 12 or (takes and not mergeable):
            assert (consumed, dropped, bad_headers) == (n, 1, 1)
            assert (packets, offloaded) == ((2, 0) if takes else (7, 1))
        else:  # too few chains for it: nothing of it is delivered, and the batch stops there
            assert (consumed, packets, dropped, offloaded) == (0, 0, 0, 0)


def ok_all(results: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    assert all(r[0] == "ok" for r in results), results
    return [r[1:] for r in results]


# --- constants declared twice -------------------------------------------------------------------------------


def test_c_constants_match_the_python_ones() -> None:
    assert lib.VRING_PACKED_DESC_F_AVAIL_MASK == 1 << VRING_PACKED_DESC_F_AVAIL == DESC_F_AVAIL
    assert lib.VRING_PACKED_DESC_F_USED_MASK == 1 << VRING_PACKED_DESC_F_USED == DESC_F_USED
    assert lib.RING_EVENT_FLAGS_ENABLE == RING_EVENT_FLAGS_ENABLE
    assert lib.RING_EVENT_FLAGS_DISABLE == RING_EVENT_FLAGS_DISABLE
    assert lib.RING_EVENT_FLAGS_DESC == RING_EVENT_FLAGS_DESC


def test_queue_size_need_not_be_a_power_of_two() -> None:
    vq = PackedVirtqueue(0)
    vq.set_num(3)
    assert vq.num == 3 and len(vq.inflight) == 3
    for bad in (0, 32769):
        with pytest.raises(VirtqueueError, match=r"not in 1\.\.32768"):
            vq.set_num(bad)
    assert struct.calcsize("<QIHH") == 16


@pytest.mark.parametrize("compiled", [False, True])
def test_positions_outside_the_ring_are_refused_not_followed(compiled: bool) -> None:
    """A position past the ring (a bad SET_VRING_BASE, say) is the caller's error: nothing is read or
    written at it."""
    case = make_case(False, num=4)
    case.many([[HDR + 10]])
    inst = Instance(case, compiled)
    try:
        q: rxtx.Virtqueue = inst.ring if compiled else inst.vq
        inst.vq.last_avail_idx = 4
        assert q.pending() == 0
        with pytest.raises(ValueError, match="outside the ring"):
            q.pop(writable=False)
        inst.vq.last_avail_idx, inst.vq.used_idx = 0, 7
        q.push_used(q.pop(writable=False).head, 0)
        with pytest.raises(ValueError, match="outside the ring"):
            inst.ring.complete() if compiled else inst.vq.flush_used()
        assert inst.memory() == bytes(case.guest.image)
    finally:
        inst.close()


def test_compiled_ring_refuses_an_unmapped_queue() -> None:
    case = make_case(False)
    inst = Instance(case, compiled=True)
    try:
        inst.vq.unmap()
        assert inst.ring.pending() == 0
        with pytest.raises(VirtqueueError, match="ring not mapped"):
            inst.ring.pop(writable=False)
    finally:
        inst.close()
