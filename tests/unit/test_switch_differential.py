"""The compiled switch kernel (datapath/switch.c) against the numpy/Python reference, byte for byte.

Two switches, one of each implementation, are attached to the same ports (in-memory adapters whose rings the
test drives by hand, as their syncs would). Every batch is forwarded twice from the same memory image: by the
reference, then, after the image is put back, by the compiled kernel; then everything either could have
touched is compared: every byte of every allocator (ring headers, slots, buffers), what the call returned
(slots released, destinations to txsync), every counter of every port and the whole address table (aged
entries not yet removed included, with their timestamps). The compiled result is the state both go on from.

Hypothesis draws the ports (2-4, one or two ring pairs, host rings or not, a second allocator that only
copies), the table size and aging, and a sequence of operations: frames injected into an RX ring (random
addresses among a few unicast ones, broadcast, multicast, the zero address; random lengths; one to four slots
per frame, unfinished NS_MOREFRAG runs, runts, empty or oversized slots, bad buffer indexes, NS_NO_LEARN and
stray flags), batches forwarded, TX rings drained or left full, free TX slots without a buffer, time passing
beyond the aging, ports detached and attached again, sweeps, heads a ring user moved a whole lap ahead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostmap import datapath
from vhostmap.datapath import ffi, lib
from vhostmap.datapath.choice import REFERENCE_ENV, reference_selected
from vhostmap.ethernet import ETH_HLEN
from vhostmap.forwarding.switch import (
    CompiledMacTable,
    MacTable,
    Switch,
    SwitchPort,
    SwitchPortStats,
)
from vhostmap.forwarding.switch import reference as reference_forwarder
from vhostmap.netmap.abi import (
    NM_RESERVED_BUFS,
    NS_BUF_CHANGED,
    NS_FORWARD,
    NS_MOREFRAG,
    NS_NO_LEARN,
    NS_REPORT,
    RingView,
)
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.kring import Kring

PARAMS = AllocatorParams(if_num=8, ring_num=64, ring_size=4096, buf_size=256, buf_num=2048)
BUF = PARAMS.buf_size
UNICAST = [0x02_00_00_00_00_01 + k for k in range(6)]
BROADCAST = 0xFF_FF_FF_FF_FF_FF
MULTICAST = 0x01_00_5E_00_00_01
ADDRESSES = [*UNICAST, BROADCAST, MULTICAST, 0]

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class HandPort(NetmapAdapter):
    """A port whose syncs do nothing: the test plays both its wire and its driver on the rings directly."""

    def nm_txsync(self, kring: Kring, flags: int) -> None:
        pass

    def nm_rxsync(self, kring: Kring, flags: int) -> None:
        pass


class StubHost:
    """A host port that is never synced: it only makes the adapter's host rings a switch port."""

    def __init__(self, adapter: NetmapAdapter) -> None:
        self.adapter = adapter
        adapter.host_port = self

    @property
    def name(self) -> str:
        return "stub"

    def txsync(self, kring: Kring, flags: int) -> None:
        pass

    def rxsync(self, kring: Kring, flags: int) -> None:
        pass

    def send_up(self, kring: Kring) -> int:
        return 0

    def wake_fds(self) -> Sequence[int]:
        return []

    def close(self) -> None:
        self.adapter.host_port = None


# --- frames as the test writes them -------------------------------------------------------------------------


@dataclass
class Chunk:
    """One slot of a frame: ``length`` bytes (0 and > BUF are malformed), or a bad buffer index."""

    length: int
    bad_buf: int | None = None


@dataclass
class Frame:
    dst: int
    src: int
    chunks: list[Chunk]
    unfinished: bool = False  # the last slot keeps NS_MOREFRAG: the next frame continues it
    no_learn: bool = False
    stray: int = 0  # other flag bits a ring user may set, that forwarding must not carry

    def payload(self, seq: int) -> bytes:
        total = sum(min(c.length, BUF) for c in self.chunks)
        head = self.dst.to_bytes(6, "big") + self.src.to_bytes(6, "big") + b"\x88\xb5"
        body = bytes((seq * 7 + i) & 0xFF for i in range(max(total - len(head), 0)))
        return (head + body)[:total]


def chunks() -> st.SearchStrategy[list[Chunk]]:
    honest = st.builds(Chunk, st.integers(1, BUF))
    full = st.just(Chunk(BUF))
    runt = st.builds(Chunk, st.integers(1, ETH_HLEN - 1))
    malformed = st.one_of(
        st.just(Chunk(0)),
        st.builds(Chunk, st.integers(BUF + 1, 0xFFFF)),
        st.builds(Chunk, st.integers(1, BUF), st.sampled_from([0, 1, PARAMS.buf_num, 0xFFFF_FFFF])),
    )
    one = st.one_of(honest, honest, full, full, runt, malformed)
    return st.one_of(
        st.lists(st.one_of(honest, full), min_size=1, max_size=1),
        st.lists(one, min_size=1, max_size=4),
    )


def frames() -> st.SearchStrategy[Frame]:
    return st.builds(
        Frame,
        dst=st.sampled_from(ADDRESSES),
        src=st.sampled_from([*UNICAST, *UNICAST, MULTICAST, 0]),
        chunks=chunks(),
        unfinished=st.sampled_from([False] * 9 + [True]),
        no_learn=st.sampled_from([False] * 5 + [True]),
        stray=st.sampled_from([0, 0, 0, NS_FORWARD | NS_REPORT, NS_BUF_CHANGED]),
    )


# --- the world both switches live in ------------------------------------------------------------------------


@dataclass
class World:
    memories: list[NetmapMemory]
    adapters: list[HandPort]
    ref: Switch
    comp: Switch
    now: float = 1000.0
    seq: int = 0
    # Slots the test gave a bad buffer index: (id of the ring view, slot) -> the ring, the buffer they held.
    saved: dict[tuple[int, int], tuple[RingView, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Images of every allocator, as 64-bit words (whole pages), made once: copies and comparisons of
        # preallocated arrays cost a memcpy, fresh ones a page fault per page too.
        self.before = [np.empty_like(a) for a in self.arrays()]
        self.after = [np.empty_like(a) for a in self.arrays()]
        self.differ = [np.empty(a.shape, dtype=bool) for a in self.arrays()]

    def arrays(self) -> list[np.ndarray[Any, Any]]:
        return [m.array.view(np.uint64) for m in self.memories]

    def save(self, images: list[np.ndarray[Any, Any]]) -> None:
        for image, a in zip(images, self.arrays(), strict=True):
            np.copyto(image, a)

    def restore(self, images: list[np.ndarray[Any, Any]]) -> None:
        for image, a in zip(images, self.arrays(), strict=True):
            np.copyto(a, image)


@dataclass
class Config:
    ports: list[tuple[int, bool, bool]]  # (ring pairs, host rings, own allocator)
    slots: int
    aging: float
    max_addresses: int


configs = st.builds(
    Config,
    ports=st.lists(
        st.tuples(
            st.integers(1, 2), st.sampled_from([False, False, True]), st.sampled_from([False] * 4 + [True])
        ),
        min_size=2,
        max_size=4,
    ),
    slots=st.sampled_from([4, 8, 16, 32]),
    aging=st.sampled_from([1.0, 30.0, 300.0]),
    max_addresses=st.sampled_from([1, 2, 4, 8, 8192]),
)


@contextlib.contextmanager
def make_world(cfg: Config) -> Iterator[World]:
    """The ports of ``cfg`` attached to a reference and a compiled switch; closed on the way out."""
    shared = NetmapMemory(PARAMS)
    memories = [shared]
    adapters: list[HandPort] = []
    try:
        for i, (rings, host, own) in enumerate(cfg.ports):
            mem = shared
            if own:
                mem = NetmapMemory(PARAMS)
                memories.append(mem)
            a = HandPort(
                f"p{i}",
                mem,
                num_tx_rings=rings,
                num_rx_rings=rings,
                num_tx_desc=cfg.slots,
                num_rx_desc=cfg.slots,
            )
            if host:
                StubHost(a)
            adapters.append(a)
        switches = [
            Switch(name, aging=cfg.aging, max_addresses=cfg.max_addresses, reference=name == "ref")
            for name in ("ref", "comp")
        ]
        for a in adapters:
            for sw in switches:
                sw.attach(a)
        yield World(memories, adapters, *switches)
    finally:
        for a in adapters:
            a.close()
        for m in memories:
            m.close()


def inject(w: World, ring: RingView, mem: NetmapMemory, batch: list[Frame]) -> None:
    """Put ``batch`` in the free slots of RX ring ``ring`` from its tail, as an rxsync would, as far as whole
    frames fit."""
    n = ring.num_slots
    tail = ring.tail
    free = (ring.head % n - 1 - tail) % n
    slots = ring.slots
    for f in batch:
        if len(f.chunks) > free:
            break
        data = f.payload(w.seq)
        w.seq += 1
        pos = 0
        for k, c in enumerate(f.chunks):
            key = (id(ring), tail)
            if key in w.saved:
                slots["buf_idx"][tail] = w.saved.pop(key)[1]
            if c.bad_buf is not None:
                w.saved[key] = (ring, int(slots["buf_idx"][tail]))
                slots["buf_idx"][tail] = c.bad_buf
            else:
                take = min(c.length, BUF)
                off = mem.buf_offset(int(slots["buf_idx"][tail]))
                piece = data[pos : pos + take]
                mem.array[off : off + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                pos += take
            slots["len"][tail] = c.length
            more = k < len(f.chunks) - 1 or f.unfinished
            slots["flags"][tail] = (
                (NS_MOREFRAG if more else 0) | (NS_NO_LEARN if f.no_learn and k == 0 else 0) | f.stray
            )
            tail = (tail + 1) % n
            free -= 1
    ring.tail = tail


def fragments(w: World, ring: RingView) -> None:
    """Fill every free slot of an RX ring with fragments that never end."""
    n = ring.num_slots
    free = (ring.head % n - 1 - ring.tail) % n
    tail = ring.tail
    for _ in range(free):
        key = (id(ring), tail)
        if key in w.saved:
            ring.slots["buf_idx"][tail] = w.saved.pop(key)[1]
        ring.slots["len"][tail] = 60
        ring.slots["flags"][tail] = NS_MOREFRAG
        tail = (tail + 1) % n
    ring.tail = tail


def drain(ring: RingView, count: int) -> None:
    """The port sends ``count`` of the slots the switch filled (at most all): TX tail moves on."""
    n = ring.num_slots
    pending = (ring.head % n - 1 - ring.tail) % n
    ring.tail = (ring.tail + min(count, pending)) % n


def spoil(w: World, ring: RingView, at: int, bad: int) -> None:
    """A free TX slot loses its buffer (as after a ring reinit): the switch must stop filling there."""
    n = ring.num_slots
    space = (ring.tail - ring.head % n) % n
    if not space:
        return
    i = (ring.head % n + at % space) % n
    key = (id(ring), i)
    if key not in w.saved:
        w.saved[key] = (ring, int(ring.slots["buf_idx"][i]))
    ring.slots["buf_idx"][i] = bad


def repair(w: World) -> None:
    """Give every slot the test spoiled its buffer back."""
    for (_, i), (ring, buf) in w.saved.items():
        ring.slots["buf_idx"][i] = buf
    w.saved.clear()


# --- comparing ----------------------------------------------------------------------------------------------


def table_state(sw: Switch) -> tuple[dict[int, tuple[str, float]], int, int]:
    entries = {mac: (port.name, seen) for mac, (port, seen) in sw.table.entries().items()}
    return entries, len(sw.table), sw.table.not_learnt


def counters(sw: Switch) -> list[tuple[str, SwitchPortStats]]:
    return [(p.name, p.stats) for p in sw.ports]


def where(w: World, mem_index: int, offset: int) -> str:
    m = w.memories[mem_index]
    if offset >= m.buffers_offset:
        buf, byte = divmod(offset - m.buffers_offset, m.buf_size)
        return f"memory {mem_index} buffer {buf} byte {byte}"
    for a in w.adapters:
        for k in (*a.tx_rings, *a.rx_rings):
            r = k.ring
            if a.memory is m and r.offset <= offset < r.offset + 256 + 16 * r.num_slots:
                rel = offset - r.offset
                what = (
                    f"header byte {rel}" if rel < 256 else f"slot {(rel - 256) // 16} byte {(rel - 256) % 16}"
                )
                return f"{k.name}: {what}"
    return f"memory {mem_index} offset {offset}"


def assert_same(w: World, images: list[np.ndarray[Any, Any]]) -> None:
    """The allocators hold ``images`` (what the reference left), the switches the same state."""
    for i, (want, got, differ) in enumerate(zip(images, w.arrays(), w.differ, strict=True)):
        np.not_equal(want, got, out=differ)
        if differ.any():
            want8, got8 = want.view(np.uint8), got.view(np.uint8)
            first = int(np.flatnonzero(want8 != got8)[0])
            raise AssertionError(
                f"memory differs at {where(w, i, first)}: reference {want8[first]}, compiled {got8[first]}"
            )
    assert counters(w.comp) == counters(w.ref)
    assert table_state(w.comp) == table_state(w.ref)


def forward_both(w: World, port: int, q: int) -> None:
    """Forward one batch of the ``q``-th RX ring of switch port ``port`` with both, and compare."""
    w.save(w.before)
    rp, cp = w.ref.ports[port], w.comp.ports[port]
    ring_index = rp.rx_rings[q]
    ref_used, ref_touched = w.ref.forward(rp, q, ring_index, w.now)
    w.save(w.after)
    w.restore(w.before)
    used, touched = w.comp.forward(cp, q, ring_index, w.now)
    assert used == ref_used
    assert [(p.name, tx) for p, tx in touched] == [(p.name, tx) for p, tx in ref_touched]
    assert_same(w, w.after)


operations = st.one_of(
    st.tuples(st.just("inject"), st.integers(0, 7), st.integers(0, 1), st.lists(frames(), max_size=12)),
    st.tuples(st.just("inject"), st.integers(0, 7), st.integers(0, 1), st.lists(frames(), max_size=12)),
    st.tuples(st.just("forward"), st.integers(0, 7), st.integers(0, 1)),
    st.tuples(st.just("forward"), st.integers(0, 7), st.integers(0, 1)),
    st.tuples(st.just("drain"), st.integers(0, 7), st.integers(0, 1), st.integers(0, 40)),
    st.tuples(st.just("time"), st.sampled_from([0.0, 0.25, 1.0, 2.0, 29.0, 31.0, 301.0])),
    st.tuples(
        st.just("spoil"),
        st.integers(0, 7),
        st.integers(0, 1),
        st.integers(0, 40),
        st.sampled_from([0, 1, 512]),
    ),
    st.tuples(st.just("repair")),
    st.tuples(st.just("fragments"), st.integers(0, 7), st.integers(0, 1)),
    st.tuples(st.just("cycle"), st.integers(0, 3)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("lap"), st.integers(0, 7), st.integers(0, 1), st.booleans()),
)


def apply(w: World, op: tuple[Any, ...]) -> None:
    kind = op[0]
    ports = w.ref.ports
    if kind == "time":
        w.now += op[1]
        return
    if kind == "repair":
        repair(w)
        return
    if kind == "expire":
        assert w.comp.table.expire(w.now) == w.ref.table.expire(w.now)
        w.save(w.after)
        assert_same(w, w.after)
        return
    if kind == "cycle":
        adapter = w.adapters[op[1] % len(w.adapters)]
        for sw in (w.ref, w.comp):
            sw.detach(adapter)
            sw.attach(adapter)
        assert [p.name for p in w.comp.ports] == [p.name for p in w.ref.ports]
        w.save(w.after)
        assert_same(w, w.after)
        return
    sp = ports[op[1] % len(ports)]
    q = op[2] % len(sp.rx_rings)
    mem = sp.adapter.memory
    rx = sp.adapter.rx_rings[sp.rx_rings[q]].ring
    tx = sp.adapter.tx_rings[sp.tx_ring(q)].ring
    if kind == "inject":
        inject(w, rx, mem, op[3])
    elif kind == "fragments":
        fragments(w, rx)
    elif kind == "forward":
        forward_both(w, op[1] % len(ports), q)
    elif kind == "drain":
        drain(tx, op[3])
    elif kind == "spoil":
        spoil(w, tx, op[3], op[4] if op[4] < NM_RESERVED_BUFS else mem.nbufs)
    elif kind == "lap":
        # A ring user's head a whole lap ahead: the same position, as both take it modulo the ring size.
        ring = rx if op[3] else tx
        ring.head = ring.cur = ring.head % ring.num_slots + ring.num_slots


@FUZZ
@given(cfg=configs, ops=st.lists(operations, min_size=1, max_size=40))
def test_compiled_switch_matches_the_reference(cfg: Config, ops: list[tuple[Any, ...]]) -> None:
    with make_world(cfg) as w:
        for op in ops:
            apply(w, op)
        # Whatever is left in the rings goes through too.
        for i, p in enumerate(w.ref.ports):
            for q in range(len(p.rx_rings)):
                forward_both(w, i, q)


@FUZZ
@given(cfg=configs, rounds=st.lists(st.lists(frames(), max_size=20), min_size=1, max_size=6))
def test_busy_traffic_matches_the_reference(cfg: Config, rounds: list[list[Frame]]) -> None:
    """Every port sends at once, round after round, and every TX ring is drained between rounds."""
    with make_world(cfg) as w:
        for frames_ in rounds:
            for i, sp in enumerate(w.ref.ports):
                for q, ring_index in enumerate(sp.rx_rings):
                    inject(w, sp.adapter.rx_rings[ring_index].ring, sp.adapter.memory, frames_[i::3])
                    forward_both(w, i, q)
            for a in w.adapters:
                for k in a.tx_rings:
                    drain(k.ring, k.ring.num_slots)
            w.now += 0.5


# --- named cases --------------------------------------------------------------------------------------------


def unicast_frame(dst: int, src: int, length: int = 60) -> Frame:
    return Frame(dst, src, [Chunk(min(length - k, BUF)) for k in range(0, length, BUF)])


def test_a_learnt_destination_moves_buffers_and_both_agree() -> None:
    with make_world(Config([(1, False, False)] * 3, 16, 300.0, 8192)) as w:
        p0, p1 = w.ref.ports[0], w.ref.ports[1]
        inject(w, p1.adapter.rx_rings[0].ring, p1.adapter.memory, [unicast_frame(BROADCAST, UNICAST[1])])
        forward_both(w, 1, 0)
        inject(
            w, p0.adapter.rx_rings[0].ring, p0.adapter.memory, [unicast_frame(UNICAST[1], UNICAST[0], 600)]
        )
        rx = p0.adapter.rx_rings[0].ring
        first = [int(b) for b in rx.slots["buf_idx"][:3]]
        forward_both(w, 0, 0)
        tx = p1.adapter.tx_rings[0].ring
        assert [int(b) for b in tx.slots["buf_idx"][:3]] == first  # moved, not copied
        assert (tx.slots["flags"][:3] & NS_BUF_CHANGED).all()
        assert w.comp.port("p0").stats.forwarded == 1


def test_a_full_table_floods_new_addresses_and_counts_them() -> None:
    with make_world(Config([(1, False, False)] * 2, 32, 300.0, 2)) as w:
        p0 = w.ref.ports[0]
        batch = [unicast_frame(BROADCAST, mac) for mac in UNICAST[:5]]
        inject(w, p0.adapter.rx_rings[0].ring, p0.adapter.memory, batch)
        forward_both(w, 0, 0)
        assert len(w.comp.table) == 2 and w.comp.table.not_learnt == 3
        # The lowest addresses of the batch made it, as with the reference.
        assert sorted(w.comp.table.entries()) == UNICAST[:2]


def test_many_senders_in_one_batch_are_learnt_lowest_first() -> None:
    """More distinct senders in one batch than the compiled switch keeps sorted as they come (it sorts them
    once at the end then), descending and with repeats: the lowest addresses fill the table, as with the
    reference."""
    senders = [0x02_00_00_00_01_00 + k for k in range(10)]
    with make_world(Config([(1, False, False)] * 2, 32, 300.0, 3)) as w:
        p0 = w.ref.ports[0]
        order = senders[::-1] + senders[5:7] + senders[:2]
        inject(
            w, p0.adapter.rx_rings[0].ring, p0.adapter.memory, [unicast_frame(BROADCAST, m) for m in order]
        )
        forward_both(w, 0, 0)
        assert sorted(w.comp.table.entries()) == senders[:3] and w.comp.table.not_learnt == 7


def test_destinations_taking_turns_in_a_batch_are_looked_up_alike() -> None:
    """Frames to addresses taking turns (the compiled switch remembers the last two it looked up in a batch):
    a learnt one, one whose entry went stale (the first lookup removes it), then the learnt one and an unknown
    one."""
    with make_world(Config([(1, False, False)] * 3, 32, 30.0, 8192)) as w:
        p0, p1, p2 = w.ref.ports
        inject(w, p1.adapter.rx_rings[0].ring, p1.adapter.memory, [unicast_frame(BROADCAST, UNICAST[1])])
        forward_both(w, 1, 0)
        w.now += 20
        inject(w, p2.adapter.rx_rings[0].ring, p2.adapter.memory, [unicast_frame(BROADCAST, UNICAST[2])])
        forward_both(w, 2, 0)
        w.now += 15  # UNICAST[1] was heard from 35 s ago: stale; UNICAST[2] 15 s ago
        turns = [UNICAST[2], UNICAST[1]] * 3 + [UNICAST[3], UNICAST[2]] * 2
        inject(
            w, p0.adapter.rx_rings[0].ring, p0.adapter.memory, [unicast_frame(d, UNICAST[0]) for d in turns]
        )
        forward_both(w, 0, 0)
        stats = w.comp.port("p0").stats
        assert (stats.forwarded, stats.flooded) == (5, 5)
        assert UNICAST[1] not in w.comp.table.entries()


def test_aged_entries_are_swept_when_the_table_is_full() -> None:
    with make_world(Config([(1, False, False)] * 2, 32, 30.0, 2)) as w:
        p0, p1 = w.ref.ports
        inject(
            w,
            p0.adapter.rx_rings[0].ring,
            p0.adapter.memory,
            [unicast_frame(BROADCAST, m) for m in UNICAST[:2]],
        )
        forward_both(w, 0, 0)
        w.now += 31
        inject(w, p1.adapter.rx_rings[0].ring, p1.adapter.memory, [unicast_frame(BROADCAST, UNICAST[4])])
        forward_both(w, 1, 0)
        assert {mac: port.name for mac, (port, _) in w.comp.table.entries().items()} == {UNICAST[4]: "p1"}


def test_a_ring_of_fragments_that_never_end_is_dropped_whole() -> None:
    with make_world(Config([(1, False, False)] * 2, 8, 300.0, 8192)) as w:
        rx = w.ref.ports[0].adapter.rx_rings[0].ring
        fragments(w, rx)
        forward_both(w, 0, 0)
        assert rx.head == 7 and w.comp.ports[0].stats == SwitchPortStats(dropped=1)


# --- the tables alone ---------------------------------------------------------------------------------------


def fake_ports(n: int) -> list[SwitchPort]:
    return [
        SwitchPort(
            cast(
                NetmapAdapter,
                SimpleNamespace(name=f"p{i}", num_rx_rings=1, num_tx_rings=1, carries_vnet_header=False),
            )
        )
        for i in range(n)
    ]


table_ops = st.lists(
    st.one_of(
        st.tuples(st.just("learn"), st.integers(1, 40), st.integers(0, 3)),
        st.tuples(st.just("learn"), st.integers(1, 40), st.integers(0, 3)),
        st.tuples(st.just("lookup"), st.integers(0, 40)),
        st.tuples(st.just("time"), st.sampled_from([0.0, 1.0, 5.0, 11.0])),
        st.tuples(st.just("expire")),
        st.tuples(st.just("forget"), st.integers(0, 3)),
        st.tuples(st.just("reorder"), st.permutations(range(4))),
    ),
    max_size=200,
)


@FUZZ
@given(max_entries=st.integers(1, 24), ops=table_ops)
def test_the_compiled_table_matches_the_reference(max_entries: int, ops: list[tuple[Any, ...]]) -> None:
    """Many addresses in a small table: long probe chains, removals in the middle of wrapping clusters."""
    ports = fake_ports(4)
    ref, comp = MacTable(10.0, max_entries), CompiledMacTable(10.0, max_entries)
    live = list(ports)
    ref.reindex(live)
    comp.reindex(live)
    now = 5.0
    for op in ops:
        if op[0] == "learn":
            port = live[op[2]]
            mac = op[1] * 0x0100_0000_0100  # spread over the 48 bits, unicast
            ref.learn(mac, port, now)
            comp.learn(mac, port, now)
        elif op[0] == "lookup":
            mac = op[1] * 0x0100_0000_0100
            assert comp.lookup(mac, now) is ref.lookup(mac, now)
        elif op[0] == "time":
            now += op[1]
        elif op[0] == "expire":
            assert comp.expire(now) == ref.expire(now)
        elif op[0] == "forget":
            ref.forget(live[op[1]])
            comp.forget(live[op[1]])
        elif op[0] == "reorder":
            live = [live[i] for i in op[1]]
            ref.reindex(live)
            comp.reindex(live)
        assert comp.entries() == ref.entries()
        assert (len(comp), comp.not_learnt) == (len(ref), ref.not_learnt)
        assert sorted(comp.items(now)) == sorted(ref.items(now))


def test_tables_refuse_nonsense() -> None:
    for cls in (MacTable, CompiledMacTable):
        with pytest.raises(ValueError, match="aging"):
            cls(aging=0)
        with pytest.raises(ValueError, match="max_entries"):
            cls(max_entries=0)
        table = cls()
        port = fake_ports(1)[0]
        table.reindex([port])
        with pytest.raises(ValueError, match="48-bit"):
            table.learn(1 << 48, port, 0.0)


# --- the plumbing -------------------------------------------------------------------------------------------


def test_c_constants_agree_with_python() -> None:
    assert (lib.NS_BUF_CHANGED, lib.NS_NO_LEARN, lib.NS_MOREFRAG) == (
        NS_BUF_CHANGED,
        NS_NO_LEARN,
        NS_MOREFRAG,
    )
    assert lib.NM_RESERVED_BUFS == NM_RESERVED_BUFS
    assert lib.SW_ETH_HLEN == ETH_HLEN
    assert lib.SW_FLOOD == reference_forwarder.FLOOD
    names = [name for name, _ in ffi.typeof("struct sw_stats").fields]
    assert names == [f.name for f in dataclasses.fields(SwitchPortStats)]


def test_the_environment_selects_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REFERENCE_ENV, raising=False)
    assert not reference_selected() and not Switch("s").reference
    assert isinstance(Switch("s").table, CompiledMacTable)
    assert reference_selected(True) and Switch("s", reference=True).reference
    monkeypatch.setenv(REFERENCE_ENV, "1")
    assert Switch("s").reference and isinstance(Switch("s").table, MacTable)
    assert not Switch("s", reference=False).reference
    monkeypatch.setenv(REFERENCE_ENV, "0")
    assert not Switch("s").reference


def test_the_kernel_releases_the_gil(tmp_path: Path) -> None:
    """cffi's API mode drops the GIL around every call of a C function it compiles: sw_forward's too."""
    script = Path(datapath.__file__).parent / "build.py"
    spec = importlib.util.spec_from_file_location("vhostmap_kernels_build", script)
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    out = tmp_path / "kernels.c"
    build.ffibuilder.emit_c_code(str(out))
    code = out.read_text()
    call = code.index("{ result = sw_forward(x0, x1, x2); }")
    assert code.rfind("Py_BEGIN_ALLOW_THREADS", 0, call) > code.rfind("Py_END_ALLOW_THREADS", 0, call)
    assert code.index("Py_END_ALLOW_THREADS", call) < code.find("Py_BEGIN_ALLOW_THREADS", call) or (
        code.find("Py_BEGIN_ALLOW_THREADS", call) == -1
    )
