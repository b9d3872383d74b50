"""The parts of a passthrough port on their own: the ivshmem protocol (messages in the spec's order, parsed
back from a real socket with their fds), the nm_copy_slots kernel against its reference on hostile rings, the
allocator's head room, and the configuration of passthrough ports."""

from __future__ import annotations

import array
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostmap.daemon.config import ConfigError, build_config, parse_port_flag
from vhostmap.ivshmem.protocol import (
    IVSHMEM_PROTOCOL_VERSION,
    NEED_DATA,
    SHM_MARKER,
    ClientConnection,
    ClientId,
    IvshmemProtocolError,
    Message,
    OwnVector,
    PeerGone,
    PeerVector,
    SharedMemory,
    Version,
    peer_gone,
    welcome,
)
from vhostmap.netmap.abi import (
    CSB_ENTRY_SIZE,
    NR_RX,
    NR_TX,
    NS_MOREFRAG,
    NS_VNET_HDR,
    PT_HEADER_SIZE,
    RingView,
    ring_size,
)
from vhostmap.netmap.allocator import PAGE_SIZE, AllocatorParams, NetmapMemory, region_size
from vhostmap.netmap.errors import AllocatorConfigError
from vhostmap.netmap.kring import Kring
from vhostmap.netmap.passthrough import COPY_BAD_DEST, COPY_BAD_SOURCE, COPY_OK, PassthroughPort, copy_slots


# --- the ivshmem protocol -----------------------------------------------------------------------------------
def test_welcome_follows_the_spec_order() -> None:
    msgs = welcome(0, 10, {1: [11, 12]}, [13])
    assert msgs == [
        Message(IVSHMEM_PROTOCOL_VERSION),
        Message(0),
        Message(SHM_MARKER, 10),
        Message(1, 11),
        Message(1, 12),
        Message(0, 13),
    ]
    assert msgs[2].encode() == (-1).to_bytes(8, "little", signed=True)
    assert peer_gone(1) == Message(1)
    with pytest.raises(ValueError, match="client's own ID"):
        welcome(1, 10, {1: [11]}, [])
    with pytest.raises(ValueError, match=r"outside 0\.\.65535"):
        welcome(70000, 10, {}, [])


def send(sock: socket.socket, msgs: list[Message]) -> None:
    """As the server sends: one sendmsg per message, its fd with it."""
    for m in msgs:
        anc = [] if m.fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [m.fd]))]
        sock.sendmsg([m.encode()], anc)


def receive_all(sock: socket.socket, parser: ClientConnection) -> list[object]:
    events: list[object] = []
    sock.setblocking(False)
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(64))
        except BlockingIOError:
            return events
        fds = [fd for level, kind, payload in anc for fd in array.array("i", payload)]
        parser.receive_data(data, fds)
        while (event := parser.next_event()) is not NEED_DATA:
            events.append(event)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_client_parses_the_welcome_with_its_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    shm = os.memfd_create("shm")
    vectors = [os.eventfd(0) for _ in range(3)]
    try:
        send(server, [*welcome(0, shm, {1: vectors[:2]}, vectors[2:]), peer_gone(1)])
        parser = ClientConnection()
        events = receive_all(client, parser)
        got = [e for e in events if isinstance(e, SharedMemory | PeerVector | OwnVector)]
        try:
            assert [type(e) for e in events] == [
                Version, ClientId, SharedMemory, PeerVector, PeerVector, OwnVector, PeerGone,
            ]  # fmt: skip
            assert events[1] == ClientId(0) and events[-1] == PeerGone(1)
            assert [(e.peer_id, e.vector) for e in events if isinstance(e, PeerVector)] == [(1, 0), (1, 1)]
            # Each fd is the file that was sent with that message.
            for e, sent in zip(got, [shm, *vectors], strict=True):
                assert os.fstat(e.fd).st_ino == os.fstat(sent).st_ino
        finally:
            for e in got:
                os.close(e.fd)
    finally:
        for fd in (shm, *vectors):
            os.close(fd)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1], "version 1"),
        ([0, 70000], "client ID 70000"),
        ([0, 0, 5], "expected -1 with the shared memory fd"),
    ],
)
def test_a_client_refuses_a_broken_stream(values: list[int], message: str) -> None:
    parser = ClientConnection()
    parser.receive_data(b"".join(Message(v).encode() for v in values))
    with pytest.raises(IvshmemProtocolError, match=message):
        while parser.next_event() is not NEED_DATA:
            pass


def test_two_fds_for_one_message_break_the_stream_and_are_closed() -> None:
    parser = ClientConnection()
    fds = [os.eventfd(0), os.eventfd(0)]
    parser.receive_data(Message(0).encode() + Message(0).encode() + Message(-1).encode(), fds)
    assert isinstance(parser.next_event(), Version) and isinstance(parser.next_event(), ClientId)
    with pytest.raises(IvshmemProtocolError, match="2 fds with one message"):
        parser.next_event()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


# --- nm_copy_slots against its reference --------------------------------------------------------------------
N = 16


def kring(mem: NetmapMemory, direction: int) -> Kring:
    layout = mem.create_if("k", 1, 1, N, N, 0, 0)
    r = (layout.tx_rings if direction == NR_TX else layout.rx_rings)[0]
    view = RingView(mem.region, r.offset, N, buf_ofs=mem.buffers_offset - r.offset, nr_buf_size=mem.buf_size)
    return Kring(view, direction=direction, ring_id=0, port="p", nbufs=mem.nbufs, buf_size=mem.buf_size)


@pytest.fixture(scope="module")
def rings() -> Iterator[dict[str, Kring]]:
    # Two allocators per side (the guest's region and the daemon's), one pair for each implementation.
    mems = [NetmapMemory(AllocatorParams(ring_size=1024, ring_num=4, buf_num=96)) for _ in range(4)]
    try:
        yield {
            "ref_src": kring(mems[0], NR_TX),
            "ref_dst": kring(mems[1], NR_RX),
            "got_src": kring(mems[2], NR_TX),
            "got_dst": kring(mems[3], NR_RX),
        }
    finally:
        for m in mems:
            m.close()


slot_values = st.tuples(
    st.sampled_from([0, 1, 5, 40, 95, 96, 10**6]),  # buf_idx: reserved, valid, past the pool
    st.sampled_from([0, 1, 60, 2048, 2049, 65535]),  # len
    st.sampled_from([0, NS_MOREFRAG, NS_VNET_HDR | NS_MOREFRAG]),
)


@settings(max_examples=200, deadline=None)
@given(
    src=st.lists(slot_values, min_size=N, max_size=N),
    dst=st.lists(st.sampled_from([0, 7, 50, 95, 96]), min_size=N, max_size=N),
    sfirst=st.integers(0, N),
    dfirst=st.integers(0, N),
    count=st.integers(0, N + 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_copy_slots_kernel_matches_its_reference(
    rings: dict[str, Kring],
    src: list[tuple[int, int, int]],
    dst: list[int],
    sfirst: int,
    dfirst: int,
    count: int,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (96, 2048), dtype=np.uint8)
    for side in ("ref", "got"):
        s, d = rings[f"{side}_src"], rings[f"{side}_dst"]
        for k, (b, length, flags) in enumerate(src):
            s.ring.slots[k] = (b, length, flags, 0)
        d.ring.slots["buf_idx"] = dst
        d.ring.slots["len"] = d.ring.slots["flags"] = 0
        for kr in (s, d):
            start = kr.ring.offset + kr.ring.buf_ofs
            kr.ring.region.array[start : start + data.size] = data.ravel()
    want = copy_slots(rings["ref_src"], sfirst, rings["ref_dst"], dfirst, count, reference=True)
    got = copy_slots(rings["got_src"], sfirst, rings["got_dst"], dfirst, count, reference=False)
    assert got == want
    copied, bad = got
    assert bad in (COPY_OK, COPY_BAD_SOURCE, COPY_BAD_DEST)
    assert copied <= count and (bad != COPY_OK or copied == count)
    ref, out = rings["ref_dst"], rings["got_dst"]
    assert (ref.ring.slots == out.ring.slots).all()
    for b in set(dst):
        if 2 <= b < ref.nbufs:
            assert (ref.ring.buf(b) == out.ring.buf(b)).all()
    # Each destination buffer holds what the last slot copied into it brought (a ring may name one twice).
    last = {int(out.ring.slots[(dfirst + k) % N]["buf_idx"]): k for k in range(copied)}
    src_slots = rings["got_src"].ring.slots
    for b, k in last.items():
        i, j = (sfirst + k) % N, (dfirst + k) % N
        length = int(src_slots[i]["len"])
        assert (out.ring.buf(b)[:length] == data[int(src_slots[i]["buf_idx"])][:length]).all()
    for k in range(copied):
        i, j = (sfirst + k) % N, (dfirst + k) % N
        assert out.ring.slots[j]["len"] == src_slots[i]["len"]
        assert out.ring.slots[j]["flags"] == src_slots[i]["flags"] & NS_MOREFRAG


# --- the allocator's head room ------------------------------------------------------------------------------
def test_head_room_comes_before_the_pools_and_is_never_handed_out() -> None:
    params = AllocatorParams(ring_num=4, buf_num=64)
    with NetmapMemory(params, head_room=2 * PAGE_SIZE) as mem:
        assert mem.size == region_size(params, 2 * PAGE_SIZE) == region_size(params) + 2 * PAGE_SIZE
        layout = mem.create_if("x", 1, 1, 16, 16, 0, 0)
        assert layout.offset >= 2 * PAGE_SIZE
        assert all(r.offset >= 2 * PAGE_SIZE for r in layout.rings)
        assert mem.buffers_offset >= 2 * PAGE_SIZE
    with pytest.raises(AllocatorConfigError, match="head_room"):
        NetmapMemory(params, head_room=100)


# --- configuration --------------------------------------------------------------------------------------
def test_passthrough_port_flag() -> None:
    pc = parse_port_flag("pt0=passthrough,path=/tmp/pt0.sock,rings=2,slots=512,group=0")
    assert (pc.type, pc.rings, pc.slots, pc.ring_pairs, pc.serves_socket) == ("passthrough", 2, 512, 2, True)
    config = build_config(None, ["pt0=passthrough,path=/tmp/pt0.sock"], socket_mode="0600")
    assert config.port("pt0").perm == 0o600


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("pt0=passthrough", "path= (the ivshmem server socket"),
        ("pt0=passthrough,path=/tmp/p.sock,mode=client", "mode=server"),
        ("pt0=passthrough,path=/tmp/p.sock,queues=2", "rings=, not queues="),
        ("pt0=passthrough,path=/tmp/p.sock,rings=17", "rings must be 1..16"),
        ("pt0=passthrough,path=/tmp/p.sock,slots=8", "slots must be 64..4096"),
        ("pt0=passthrough,path=/tmp/p.sock,ifname=eth0", "ifname= is for generic ports"),
    ],
)
def test_bad_passthrough_ports_are_refused(flag: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_port_flag(flag)


# --- a guest writing anything anywhere in its region ------------------------------------------------------
GUEST_SLOTS = 64


@pytest.fixture(scope="module")
def attached() -> Iterator[tuple[PassthroughPort, NetmapMemory]]:
    mem = NetmapMemory(AllocatorParams(ring_num=8, buf_num=8 * GUEST_SLOTS + 64))
    port = PassthroughPort("pt0", mem, threading.RLock(), num_desc=GUEST_SLOTS, guest_slots=GUEST_SLOTS)
    try:
        yield port, mem
    finally:
        port.close()
        mem.close()


# Where a write lands: a CSB entry, one of the rings (header and slots), or anywhere before the buffers.
pokes = st.lists(
    st.tuples(
        st.sampled_from(["csb", "ring", "any"]),
        st.floats(0, 1, exclude_max=True),
        st.binary(min_size=1, max_size=16),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(rounds=st.lists(st.tuples(pokes, st.integers(0, GUEST_SLOTS)), min_size=1, max_size=6))
def test_a_guest_writing_anything_in_its_region_never_breaks_the_port(
    attached: tuple[PassthroughPort, NetmapMemory], rounds: list[tuple[list[tuple[str, float, bytes]], int]]
) -> None:
    port, mem = attached
    region = port.attach()
    logging.getLogger("vhostmap.netmap.kring").disabled = True  # thousands of reinit lines
    try:
        array_ = region.memory.region.array
        guest = region.tx + region.rx
        tx, rx = port.tx_rings[0], port.rx_rings[0]
        for writes, frames_out in rounds:
            for target, where, data in writes:
                if target == "csb":
                    lo, hi = PT_HEADER_SIZE, PT_HEADER_SIZE + len(guest) * CSB_ENTRY_SIZE
                elif target == "ring":
                    rings = region.nifp.rings
                    r = rings[int(where * len(rings))]
                    where = where * len(rings) % 1
                    lo, hi = r.offset, r.offset + ring_size(GUEST_SLOTS)
                else:  # what the daemon may read: header, CSB, netmap_if, rings
                    lo, hi = 0, region.memory.buffers_offset
                at = lo + int(where * (hi - lo - len(data)))
                array_[at : at + len(data)] = np.frombuffer(data, np.uint8)
            tx.ring.slots["len"] = 60
            n = min(frames_out, (tx.ring.tail - tx.ring.head) % GUEST_SLOTS)
            tx.ring.head = tx.ring.cur = (tx.ring.head + n) % GUEST_SLOTS
            port.txsync(0)
            port.rxsync(0)
            rx.ring.head = rx.ring.cur = rx.ring.tail
            assert port.broken is None
            for k in (tx, rx, *guest):
                assert 0 <= k.nr_hwcur < k.nkr_num_slots and 0 <= k.nr_hwtail < k.nkr_num_slots
            for g in guest:
                # What the CSB says is what the kring knows (any garbage written there was rewritten).
                assert g.csb.read_hw() == (g.nr_hwcur, g.nr_hwtail)
        # The daemon's rings still hold buffers of the daemon's pool only.
        for k in (tx, rx):
            idx = k.ring.slots["buf_idx"]
            assert ((idx >= 2) & (idx < mem.nbufs)).all()
    finally:
        logging.getLogger("vhostmap.netmap.kring").disabled = False
        port.release()


# --- the compiled syncs against their reference ---------------------------------------------------------
@pytest.fixture(scope="module")
def twins() -> Iterator[tuple[PassthroughPort, PassthroughPort]]:
    """Two identical ports, one syncing through pt_take/pt_give, one through their Python references."""
    made: list[tuple[PassthroughPort, NetmapMemory]] = []
    try:
        for reference in (False, True):
            mem = NetmapMemory(AllocatorParams(ring_num=8, buf_num=8 * GUEST_SLOTS + 64))
            made.append(
                (
                    PassthroughPort(
                        "pt0",
                        mem,
                        threading.RLock(),
                        num_desc=GUEST_SLOTS,
                        guest_slots=GUEST_SLOTS,
                        reference=reference,
                    ),
                    mem,
                )
            )
        yield made[0][0], made[1][0]
    finally:
        for port, mem in made:
            port.close()
            mem.close()


guest_steps = st.lists(
    st.one_of(
        st.tuples(st.just("poke"), pokes),
        st.tuples(st.just("send"), st.integers(0, GUEST_SLOTS)),  # the guest hands over frames
        st.tuples(st.just("release"), st.integers(0, GUEST_SLOTS)),  # the guest gives RX slots back
        st.tuples(st.just("sleep"), st.booleans()),  # appl_need_kick on both rings
        st.tuples(st.just("forward"), st.integers(0, GUEST_SLOTS)),  # the consumer sends and releases
    ),
    min_size=1,
    max_size=12,
)


def _step(port: PassthroughPort, step: tuple[str, Any]) -> None:
    region = port.guest
    assert region is not None
    kind, arg = step
    g_tx, g_rx = region.tx[0], region.rx[0]
    if kind == "poke":
        poke(region, arg)
    elif kind == "send":
        k = min(arg, (g_tx.rtail - g_tx.rhead) % GUEST_SLOTS)
        idx = (g_tx.rhead + np.arange(k)) % GUEST_SLOTS
        g_tx.ring.slots["len"][idx] = 60
        new = (g_tx.rhead + k) % GUEST_SLOTS
        g_tx.csb.write_head_cur(new, new)
    elif kind == "release":
        k = min(arg, (g_rx.nr_hwtail - g_rx.rhead) % GUEST_SLOTS)
        new = (g_rx.rhead + k) % GUEST_SLOTS
        g_rx.csb.write_head_cur(new, new)
    elif kind == "sleep":
        g_tx.csb.atok.appl_need_kick = g_rx.csb.atok.appl_need_kick = int(arg)
    else:
        tx, rx = port.tx_rings[0], port.rx_rings[0]
        tx.ring.slots["len"] = 60
        n = min(arg, (tx.ring.tail - tx.ring.head) % GUEST_SLOTS)
        tx.ring.head = tx.ring.cur = (tx.ring.head + n) % GUEST_SLOTS
        port.txsync(0)
        port.rxsync(0)
        rx.ring.head = rx.ring.cur = rx.ring.tail


def poke(region: Any, writes: list[tuple[str, float, bytes]]) -> None:
    """Write ``writes`` into a guest region: into a CSB entry, a ring, or anywhere before the buffers."""
    array_ = region.memory.region.array
    guest = region.tx + region.rx
    for target, where, data in writes:
        if target == "csb":
            lo, hi = PT_HEADER_SIZE, PT_HEADER_SIZE + len(guest) * CSB_ENTRY_SIZE
        elif target == "ring":
            rings = region.nifp.rings
            r = rings[int(where * len(rings))]
            where = where * len(rings) % 1
            lo, hi = r.offset, r.offset + ring_size(GUEST_SLOTS)
        else:
            lo, hi = 0, region.memory.buffers_offset
        at = lo + int(where * (hi - lo - len(data)))
        array_[at : at + len(data)] = np.frombuffer(data, np.uint8)


def _state(port: PassthroughPort) -> tuple[Any, ...]:
    region = port.guest
    assert region is not None
    krings = [*port.tx_rings, *port.rx_rings, *region.tx, *region.rx]
    return (
        [(k.nr_hwcur, k.nr_hwtail, k.rhead, k.rcur, k.rtail, k.reinits, k.dropped) for k in krings],
        (port.interrupts, port.self_kicks),
        [(int(g.pt.frames), int(g.pt.bytes)) for g in (*region.tx, *region.rx)],
    )


@settings(max_examples=150, deadline=None)
@given(steps=guest_steps)
def test_compiled_syncs_match_their_reference(
    twins: tuple[PassthroughPort, PassthroughPort], steps: list[tuple[str, Any]]
) -> None:
    compiled, reference = twins
    logging.getLogger("vhostmap.netmap.kring").disabled = True
    for port in twins:
        port.interrupts = port.self_kicks = 0
        port.attach()
    try:
        for step in steps:
            for port in twins:
                _step(port, step)
            assert _state(compiled) == _state(reference), step
            a, b = compiled.guest, reference.guest
            assert a is not None and b is not None
            # Every byte of both regions (CSB, rings, slots, buffers) and of both daemons' memories.
            assert (a.memory.region.array == b.memory.region.array).all(), step
            assert (compiled.memory.array == reference.memory.array).all(), step
    finally:
        logging.getLogger("vhostmap.netmap.kring").disabled = False
        for port in twins:
            port.release()
