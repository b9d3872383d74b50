"""The netmap memory allocator: pool geometry, buffer alloc/free, interfaces, rollback, sharing by fd."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vhostmap.netmap.abi import NETMAP_API, NR_RX, NR_TX, RING_HEADER_SIZE, NetmapIfView
from vhostmap.netmap.allocator import (
    MAX_CLUSTSIZE,
    PAGE_SIZE,
    AllocatorParams,
    IfLayout,
    NetmapMemory,
    cluster_geometry,
)
from vhostmap.netmap.errors import AllocatorConfigError, AllocatorExhausted, BufferIndexError

SMALL = AllocatorParams(if_num=4, ring_num=8, ring_size=4096, buf_num=256)


@pytest.fixture
def mem() -> Iterator[NetmapMemory]:
    with NetmapMemory(SMALL) as m:
        yield m


def snapshot(m: NetmapMemory) -> tuple[Any, ...]:
    """Every count and bitmap, and the bytes of the if and ring pools."""
    pools = (m.if_pool, m.ring_pool, m.buf_pool)
    return (
        tuple(p.objfree for p in pools),
        tuple(p.free.tobytes() for p in pools),
        m.array[: m.buffers_offset].tobytes(),
    )


# --- geometry -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "objsize", "clustentries", "clustsize"),
    [
        (2048, 2048, 2, 4096),  # two buffers per page
        (1024, 1024, 4, 4096),  # netmap_if default
        (9 * 4096, 9 * 4096, 1, 9 * 4096),  # netmap_ring default: a page multiple is its own cluster
        (1500, 1536, 8, 3 * 4096),  # rounded up to 64; eight fill three pages
        (9216, 9216, 4, 9 * 4096),  # jumbo buffers
        (100, 128, 32, 4096),
    ],
)
def test_cluster_geometry_as_the_seed_computes_it(
    size: int, objsize: int, clustentries: int, clustsize: int
) -> None:
    g = cluster_geometry(size)
    assert (g.objsize, g.clustentries, g.clustsize) == (objsize, clustentries, clustsize)
    assert g.exact


@given(st.integers(1, MAX_CLUSTSIZE))
def test_cluster_geometry_wastes_least_before_a_page_boundary(size: int) -> None:
    g = cluster_geometry(size)
    assert g.objsize % 64 == 0 and g.objsize >= size
    assert g.clustsize % PAGE_SIZE == 0 and g.clustsize <= MAX_CLUSTSIZE
    assert g.clustentries >= 1 and g.clustentries * g.objsize <= g.clustsize
    counts = range(1, MAX_CLUSTSIZE // g.objsize + 1)
    fits = [i for i in counts if (i * g.objsize) % PAGE_SIZE == 0]
    if fits:  # the first count that ends on a page boundary wins
        assert g.exact and g.clustentries == fits[0]
    else:  # otherwise the least room left before the next page boundary, the smallest cluster on a tie
        room = [(-(i * g.objsize)) % PAGE_SIZE for i in counts]
        assert g.clustentries == room.index(min(room)) + 1


def test_odd_buffer_size_is_rounded_up_to_64() -> None:
    with NetmapMemory(AllocatorParams(buf_size=2000, buf_num=16, if_num=1, ring_num=2)) as m:
        assert m.buf_size == 2048


def test_buffer_size_that_cannot_tile_a_cluster_is_rejected_naming_nearby_sizes() -> None:
    with pytest.raises(AllocatorConfigError) as e:
        AllocatorParams(buf_size=2112)
    assert e.value.field == "buf_size" and e.value.value == 2112
    assert "2048" in str(e.value) and "2176" in str(e.value)
    assert not cluster_geometry(2112).exact
    assert cluster_geometry(2048).exact and cluster_geometry(2176).exact


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("if_size", 8),
        ("if_size", 8192),
        ("if_num", 0),
        ("ring_size", 100),
        ("ring_size", 32 * 4096 + 1),
        ("ring_num", 1),
        ("buf_size", 32),
        ("buf_size", 65537),
        ("buf_num", 3),
        ("buf_num", 2_000_000),
    ],
)
def test_params_out_of_range_name_the_field_and_the_range(field: str, value: int) -> None:
    with pytest.raises(AllocatorConfigError) as e:
        AllocatorParams(**{field: value})
    assert isinstance(e.value, ValueError)
    assert e.value.field == field and e.value.value == value
    assert field in str(e.value) and ".." in e.value.allowed


def test_pools_lie_back_to_back_in_whole_pages(mem: NetmapMemory) -> None:
    ifp, ringp, bufp = mem.if_pool, mem.ring_pool, mem.buf_pool
    assert (ifp.offset, ringp.offset, bufp.offset) == (0, ifp.memtotal, ifp.memtotal + ringp.memtotal)
    assert mem.size == ifp.memtotal + ringp.memtotal + bufp.memtotal == os.fstat(mem.fd).st_size
    for p in (ifp, ringp, bufp):
        assert p.memtotal % PAGE_SIZE == 0 and p.memtotal == p.numclusters * p.clustsize
        assert p.objtotal == p.numclusters * p.clustentries
        assert len(np.unique(p.lut)) == p.objtotal
        in_cluster = (p.lut - p.offset) % p.clustsize
        assert np.all(in_cluster + p.objsize <= p.clustsize)  # no object straddles two clusters
    assert np.array_equal(bufp.lut, mem.buffers_offset + np.arange(mem.nbufs) * mem.buf_size)
    assert mem.nbufs >= SMALL.buf_num and bufp.objfree == mem.nbufs - 2
    stats = mem.stats()
    assert stats["netmap_buf"]["objfree"] == mem.nbufs - 2 and stats["size"] == mem.size
    assert set(stats["netmap_ring"]) >= {"objtotal", "objfree", "objsize", "clustsize", "clustentries"}


def test_region_is_sealed_against_resizing(mem: NetmapMemory) -> None:
    seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
    with pytest.raises(PermissionError):
        os.ftruncate(mem.fd, mem.size // 2)


# --- buffers ------------------------------------------------------------------------------------------------
def test_buffers_are_views_of_the_region_and_bounds_checked(mem: NetmapMemory) -> None:
    [idx] = mem.alloc_buffers(1)
    view = mem.buf_view(int(idx))
    assert view.size == mem.buf_size
    view[:3] = [7, 8, 9]
    off = mem.buf_offset(int(idx))
    assert off == mem.buffers_offset + int(idx) * mem.buf_size
    assert list(mem.array[off : off + 3]) == [7, 8, 9]
    for bad in (-1, mem.nbufs):
        with pytest.raises(BufferIndexError):
            mem.buf_view(bad)


@pytest.mark.parametrize("bad", ["reserved", "out of range", "already free", "twice"])
def test_a_bad_free_is_an_error_that_changes_nothing(mem: NetmapMemory, bad: str) -> None:
    held = mem.alloc_buffers(4)
    mem.free_buffers(held[:1])
    victims = {
        "reserved": [int(held[1]), 1],
        "out of range": [int(held[1]), mem.nbufs],
        "already free": [int(held[1]), int(held[0])],
        "twice": [int(held[1]), int(held[1])],
    }[bad]
    before = snapshot(mem)
    with pytest.raises(BufferIndexError) as e:
        mem.free_buffers(victims)
    assert bad.split()[0] in str(e.value)
    assert snapshot(mem) == before


def test_exhausted_buffer_pool_raises_and_takes_nothing(mem: NetmapMemory) -> None:
    before = snapshot(mem)
    with pytest.raises(AllocatorExhausted) as e:
        mem.alloc_buffers(mem.nbufs)
    assert e.value.pool == "netmap_buf" and e.value.available == mem.nbufs - 2
    assert snapshot(mem) == before


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free/create/delete: no object handed out twice, none reserved, every count adds up."""

    def __init__(self) -> None:
        super().__init__()
        self.mem = NetmapMemory(AllocatorParams(if_num=3, ring_num=6, ring_size=1024, buf_num=96))
        self.held: set[int] = set()
        self.ifs: list[IfLayout] = []

    def owned(self) -> set[int]:
        """Buffers in the slots of live interfaces."""
        out: set[int] = set()
        for layout in self.ifs:
            view = NetmapIfView(self.mem.region, layout.offset)
            for ring in view.tx_rings + view.rx_rings:
                out |= {int(i) for i in ring.slots["buf_idx"]}
        return out

    @rule(n=st.integers(0, 40))
    def alloc(self, n: int) -> None:
        before = snapshot(self.mem)
        free = self.mem.buf_pool.objfree
        try:
            got = {int(i) for i in self.mem.alloc_buffers(n)}
        except AllocatorExhausted:
            assert n > free and snapshot(self.mem) == before
            return
        assert len(got) == n and min(got, default=2) >= 2
        assert not got & (self.held | self.owned())
        self.held |= got

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        some = data.draw(st.sets(st.sampled_from(sorted(self.held)), min_size=1))
        self.mem.free_buffers(np.array(sorted(some), dtype=np.uint32))
        self.held -= some

    @rule(data=st.data())
    def free_bad(self, data: st.DataObject) -> None:
        free_now = [int(i) for i in np.flatnonzero(self.mem.buf_pool.free)]
        bad = data.draw(st.sampled_from([0, 1, self.mem.nbufs, *free_now[:3]]))
        before = snapshot(self.mem)
        with pytest.raises(BufferIndexError):
            self.mem.free_buffers([*sorted(self.held)[:2], bad])
        assert snapshot(self.mem) == before

    @rule(ntx=st.integers(1, 2), nrx=st.integers(1, 2), slots=st.integers(2, 16))
    def create(self, ntx: int, nrx: int, slots: int) -> None:
        before = snapshot(self.mem)
        try:
            layout = self.mem.create_if(f"p{len(self.ifs)}", ntx, nrx, slots, slots)
        except AllocatorExhausted:
            assert snapshot(self.mem) == before
            return
        self.ifs.append(layout)

    @precondition(lambda self: bool(self.ifs))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        layout = self.ifs.pop(data.draw(st.integers(0, len(self.ifs) - 1)))
        self.mem.delete_if(layout)

    @invariant()
    def counts_add_up(self) -> None:
        m = self.mem
        for p in (m.if_pool, m.ring_pool, m.buf_pool):
            assert p.objfree == int(np.count_nonzero(p.free))
        assert not m.buf_pool.free[:2].any()
        owned = self.owned()
        assert not owned & self.held and min(owned | self.held, default=2) >= 2
        assert m.buf_pool.objfree == m.nbufs - 2 - len(self.held) - len(owned)
        assert not m.buf_pool.free[sorted(owned | self.held)].any()
        assert m.ring_pool.objfree == m.ring_pool.objtotal - sum(len(i.rings) for i in self.ifs)
        assert m.if_pool.objfree == m.if_pool.objtotal - len(self.ifs)

    def teardown(self) -> None:
        self.mem.close()


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


# --- interfaces ---------------------------------------------------------------------------------------------
def test_create_if_fills_the_shared_structures_like_netmap(mem: NetmapMemory) -> None:
    layout = mem.create_if("vm0", 2, 3, 32, 16, host_tx_rings=1, host_rx_rings=1)
    nif = NetmapIfView(mem.region, layout.offset)
    assert (nif.name, nif.version) == ("vm0", NETMAP_API)
    assert (nif.num_tx_rings, nif.num_rx_rings, nif.host_tx_rings, nif.host_rx_rings) == (2, 3, 1, 1)
    assert [r.offset for r in nif.tx_rings + nif.rx_rings] == [r.offset for r in layout.rings]
    seen: set[int] = set()
    for i, ring in enumerate(nif.tx_rings):
        assert (ring.dir, ring.ringid, ring.num_slots) == (NR_TX, i, 32)
        assert (ring.head, ring.cur, ring.tail) == (0, 0, 31)  # one slot always stays empty
    for i, ring in enumerate(nif.rx_rings):
        assert (ring.dir, ring.ringid, ring.num_slots) == (NR_RX, i, 16)
        assert (ring.head, ring.cur, ring.tail) == (0, 0, 0)
    for ring in nif.tx_rings + nif.rx_rings:
        assert ring.nr_buf_size == mem.buf_size
        assert ring.offset + ring.buf_ofs == mem.buffers_offset
        assert np.all(ring.slots["len"] == mem.buf_size)
        idx = {int(i) for i in ring.slots["buf_idx"]}
        assert len(idx) == ring.num_slots and min(idx) >= 2 and not idx & seen
        seen |= idx
    assert [r.host for r in layout.tx_rings] == [False, False, True]
    assert mem.buf_pool.objfree == mem.nbufs - 2 - len(seen)
    mem.delete_if(layout)
    assert mem.buf_pool.objfree == mem.nbufs - 2 and mem.ring_pool.objfree == mem.ring_pool.objtotal
    with pytest.raises(ValueError):
        mem.delete_if(layout)


@pytest.mark.parametrize(
    ("args", "pool"),
    [
        ((1, 1, 64, 64), "netmap_buf"),  # buffers run out on the third ring
        ((3, 3, 4, 4), "netmap_ring"),  # rings run out on the seventh ring
    ],
)
def test_create_if_rolls_back_everything_when_a_pool_runs_out(
    mem: NetmapMemory, args: tuple[int, int, int, int], pool: str
) -> None:
    keep = mem.create_if("keep", 1, 1, 16, 16, host_tx_rings=0, host_rx_rings=0)
    mem.alloc_buffers(mem.buf_pool.objfree - 150)
    before = snapshot(mem)
    with pytest.raises(AllocatorExhausted) as e:
        mem.create_if("big", *args)
    assert e.value.pool == pool
    assert snapshot(mem) == before
    assert mem.live_ifs() == [keep]


def test_create_if_rejects_arguments_that_do_not_fit(mem: NetmapMemory) -> None:
    too_many = mem.max_ring_slots + 1
    cases: list[tuple[dict[str, Any], str]] = [
        ({"num_tx_slots": too_many}, "num_tx_slots"),
        ({"num_rx_slots": 1}, "num_rx_slots"),
        ({"num_tx_rings": 0}, "num_tx_rings"),
        ({"num_rx_rings": mem.max_if_rings}, "rings"),
        ({"name": "a-name-longer-than-15"}, "name"),
    ]
    for kwargs, field in cases:
        args: dict[str, Any] = {"name": "x", "num_tx_rings": 1, "num_rx_rings": 1, "num_tx_slots": 8}
        args |= {"num_rx_slots": 8}
        args |= kwargs
        with pytest.raises(AllocatorConfigError) as e:
            mem.create_if(**args)
        assert e.value.field == field
    assert mem.max_ring_slots == (4096 - RING_HEADER_SIZE) // 16


def test_delete_if_frees_the_buffers_the_slots_hold_now(mem: NetmapMemory) -> None:
    a = mem.create_if("a", 1, 1, 8, 8)
    b = mem.create_if("b", 1, 1, 8, 8)
    ra = NetmapIfView(mem.region, a.offset).tx_rings[0]
    rb = NetmapIfView(mem.region, b.offset).rx_rings[0]
    # Zero-copy forwarding swaps buffers between interfaces; a user may also write garbage.
    mine, theirs = ra.slots["buf_idx"][:4].copy(), rb.slots["buf_idx"][:4].copy()
    ra.slots["buf_idx"][:4], rb.slots["buf_idx"][:4] = theirs, mine
    ra.slots["buf_idx"][5] = 1
    ra.slots["buf_idx"][6] = 10**6
    ra.slots["buf_idx"][7] = np.flatnonzero(mem.buf_pool.free)[0]  # a buffer nobody holds
    rb.slots["buf_idx"][7] = rb.slots["buf_idx"][6]  # one buffer in two slots
    lost = 4  # the buffers those four slots held are gone, as in netmap
    mem.delete_if(a)
    mem.delete_if(b)
    assert mem.buf_pool.objfree == mem.nbufs - 2 - lost == np.count_nonzero(mem.buf_pool.free)
    assert not mem.buf_pool.free[:2].any()


def test_restock_gives_back_the_buffers_users_overwrote_before_taking_free_ones(mem: NetmapMemory) -> None:
    initial = mem.buf_pool.objfree
    a = mem.create_if("a", 1, 1, 8, 8)
    slots = NetmapIfView(mem.region, a.offset).tx_rings[0].slots
    private = mem.alloc_buffers(2)  # a caller's: never taken as lost
    stash = mem.alloc_buffers(3)
    mem.hold(stash)  # held outside the rings: not lost either
    overwritten = slots["buf_idx"][:3].copy()
    slots["buf_idx"][:3] = [0, 1, 10**6]
    stash[0], slots["buf_idx"][3] = slots["buf_idx"][3], stash[0]  # a swap: nothing lost
    free = mem.buf_pool.objfree
    assert mem.restock(slots, np.arange(3)) == 3
    assert sorted(slots["buf_idx"][:3]) == sorted(overwritten) and mem.buf_pool.objfree == free
    assert not mem._lost().any()

    def move_to_holder(i: int) -> npt.NDArray[np.uint32]:
        held = np.array([slots["buf_idx"][i]], dtype=np.uint32)
        mem.hold(held)
        slots["buf_idx"][i] = 0
        return held

    moved = [move_to_holder(4)]  # nothing lost: a free buffer
    assert mem.restock(slots, np.array([4])) == 1 and mem.buf_pool.objfree == free - 1
    assert len(set(slots["buf_idx"].tolist())) == 8 and not mem._lost().any()
    # A dry pool: what was lost still comes back; else the slot keeps buffer 0 until a buffer is free.
    rest = mem.alloc_buffers(mem.buf_pool.objfree)
    slots["buf_idx"][:2] = 0
    assert mem.restock(slots, np.array([0, 1])) == 2
    moved.append(move_to_holder(2))
    assert mem.restock(slots, np.array([2])) == 0 and slots["buf_idx"][2] == 0
    mem.free_buffers(rest[:1])
    assert mem.restock(slots, np.array([2])) == 1 and slots["buf_idx"][2] == rest[0]
    # Everything comes back when the interface goes: as many free as before it was made.
    mem.free_buffers(np.concatenate([rest[1:], private]))
    for held in (stash, *moved):
        mem.release_held(held)
        mem.unhold(held)
    mem.delete_if(a)
    assert mem.buf_pool.objfree == initial


def test_close_is_idempotent_and_closes_the_fd() -> None:
    m = NetmapMemory(SMALL)
    fd = m.fd
    m.close()
    m.close()
    with pytest.raises(OSError):
        os.fstat(fd)


# --- sharing ------------------------------------------------------------------------------------------------
PEER = textwrap.dedent(
    """
    import sys
    from vhostmap.netmap.abi import NetmapIfView, map_region

    fd, size, nifp = map(int, sys.argv[1:4])
    nif = NetmapIfView(map_region(fd, size), nifp)
    assert nif.name == "shared0", nif.name
    tx = nif.tx_rings[0]
    slot = tx.slots[tx.head]
    frame = bytes(tx.buf(slot["buf_idx"])[: slot["len"]])
    assert frame == b"hello from the backend", frame
    rx = nif.rx_rings[0]
    reply = b"hello back from the peer"
    rx.buf(rx.slots["buf_idx"][0])[: len(reply)] = list(reply)
    rx.slots["len"][0] = len(reply)
    rx.head = rx.cur = 1
    print("peer ok")
    """
)


def test_a_second_process_finds_rings_slots_and_buffers_from_the_fd(mem: NetmapMemory) -> None:
    layout = mem.create_if("shared0", 1, 1, 8, 8)
    tx = NetmapIfView(mem.region, layout.offset).tx_rings[0]
    msg = b"hello from the backend"
    mem.buf_view(int(tx.slots["buf_idx"][0]))[: len(msg)] = list(msg)
    tx.slots["len"][0] = len(msg)

    args = [str(mem.fd), str(mem.size), str(layout.offset)]
    proc = subprocess.run(
        [sys.executable, "-c", PEER, *args], pass_fds=[mem.fd], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "peer ok"

    rx = NetmapIfView(mem.region, layout.offset).rx_rings[0]
    reply = b"hello back from the peer"
    assert (rx.head, int(rx.slots["len"][0])) == (1, len(reply))
    assert bytes(mem.buf_view(int(rx.slots["buf_idx"][0]))[: len(reply)]) == reply
