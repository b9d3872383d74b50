"""Packed virtqueues end to end over the real socket (issue #18).

FakeFrontend drives packed rings as a driver does, with both wrap counters: through a link, the switch, a
sink, a generator, host rings and an application, beside split rings on the other side; GET_VRING_BASE and
SET_VRING_BASE keep the wrap counters across a ring restart and a reconnection; a hostile packed ring breaks
its own port only. With the compiled datapath the forwarders run their compiled passes over packed ports as
over split ones, in any mix (VhostUserPort.fast_queues); with the reference, their Python rounds. Which one
ran shows in the netmap buffers (test_onecopy.py's proof): poisoned before the traffic, only the compiled
passes leave them so, copying each frame from guest to guest.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from daemons import RunningDaemon, StartDaemon, exchange, still_serving
from test_backend_traffic import _signals, counters, frame, one_copy_both_ways, totals, zero
from test_netmap_client import open_port, receive, send
from test_onecopy import poison, port, written_buffers
from test_switch_daemon import frame as switch_frame
from test_switch_daemon import mac, needs_root, packet_socket, recv_frames

from vhostmap import cli
from vhostmap.daemon.config import ConfigError, _port_from_mapping, parse_port_flag
from vhostmap.datapath import ffi, lib
from vhostmap.forwarding.link import Link
from vhostmap.forwarding.passes import BUDGET, BURST
from vhostmap.lab.frontend import BUFFER_SIZE, DEFAULT_FEATURES, PACKED_START, PAGE, UVA_BASE, FakeFrontend
from vhostmap.packets import Addresses, udp_frame
from vhostmap.vhost_user import kernels
from vhostmap.vhost_user.memory import VHOST_LOG_PAGE
from vhostmap.vhost_user.messages import U64, VHOST_VRING_F_LOG, Request, VringAddr, VringState
from vhostmap.vhost_user.packed import position_from_used_flags
from vhostmap.virtio.spec import (
    RING_EVENT_FLAGS_DISABLE,
    VHOST_F_LOG_ALL,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VRING_PACKED_EVENT,
    bit,
)

PACKED = "packed=on"


def reap(fe: FakeFrontend) -> None:
    """Take back the transmitted chains the device used, as a driver frees them before sending more."""
    for fq in fe.queues[1::2]:
        fe.used(fq)


@pytest.fixture(params=["compiled", "reference"])
def datapath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every port runs the compiled datapath (CompiledPackedRing for packed rings) or the reference."""
    monkeypatch.setenv("VHOSTMAP_REFERENCE_DATAPATH", "1" if request.param == "reference" else "0")
    return str(request.param)


def fast_layouts(d: RunningDaemon, name: str) -> set[str] | None:
    """The ring layouts of the compiled queue handles of port ``name`` (None: it takes the Python path)."""
    fast = port(d, name).fast_queues()
    if fast is None:
        return None
    queues = [*fast.rx.values(), *fast.tx.values()]
    assert all((q.packed == ffi.NULL) != (q.vq == ffi.NULL) for q in queues), "one ring per handle"
    return {"split" if q.packed == ffi.NULL else "packed" for q in queues}


def assert_passes_ran(d: RunningDaemon, datapath: str, layouts: dict[str, str]) -> None:
    """The forwarders ran their compiled passes over the ports of ``layouts`` (name: ring layout), copying
    guest to guest (the netmap buffers poisoned before the traffic still are), or, with the reference
    datapath, their Python rounds through the netmap buffers."""
    if datapath == "compiled":
        assert {name: fast_layouts(d, name) for name in layouts} == {n: {k} for n, k in layouts.items()}
        assert written_buffers(d) == 0, "a frame went through a netmap buffer: not the one-copy pass"
    else:
        assert all(fast_layouts(d, name) is None for name in layouts)
        assert written_buffers(d) > 0


@pytest.mark.usefixtures("datapath")
def test_packed_rings_are_offered_unless_the_port_says_off(start_daemon: StartDaemon, datapath: str) -> None:
    d = start_daemon({"a": "", "b": "packed=off"})
    assert d.device("a").offered_features & bit(VIRTIO_F_RING_PACKED)
    assert not d.device("b").offered_features & bit(VIRTIO_F_RING_PACKED)
    with pytest.raises(ConnectionError, match="packed"):
        d.frontend("b", packed=True)
    d.frontend("a", packed=True)
    status = d.daemon.status({})["ports"]
    assert (status["a"]["ring"], status["b"]["ring"]) == ("packed", "split")
    # The compiled syncs and passes take packed rings as they take split ones.
    assert fast_layouts(d, "a") == ({"packed"} if datapath == "compiled" else None)


@pytest.mark.parametrize("other", ["packed", "split"])
@pytest.mark.parametrize("size", [60, 1514, 9014])
def test_frames_cross_a_link_between_a_packed_port_and_a_packed_or_split_one(
    start_daemon: StartDaemon, datapath: str, other: str, size: int
) -> None:
    d = start_daemon({"a": f"{PACKED},queues=2,mtu=9000", "b": f"queues=2,mtu=9000,{PACKED}"}, links=["a,b"])
    fa = d.frontend("a", packed=True, queue_pairs=2, queue_size=64)
    fb = d.frontend("b", packed=other == "packed", queue_pairs=2, queue_size=64)
    assert (d.device("a").layout, d.device("b").layout) == ("packed", other)
    poison(d)
    per_queue = 20
    for rnd in range(4):  # more descriptors than the rings hold: both wrap counters turn over
        for src, dst in ((fa, fb), (fb, fa)):
            for p in range(2):
                sent = [frame(size, 100 * rnd + 10 * p + k) for k in range(per_queue)]
                dst.post_receive_buffers(per_queue * -(-(12 + size) // 4096), pair=p)
                reap(src)
                src.transmit(sent, pair=p)
                assert dst.receive(per_queue, pair=p) == sent
    n = 4 * 2 * per_queue
    both = {**zero(), "rx_packets": n, "rx_bytes": n * size, "tx_packets": n, "tx_bytes": n * size}
    assert totals(d, "a") == both
    assert totals(d, "b") == both
    assert_passes_ran(d, datapath, {"a": "packed", "b": other})
    # 80 chains of 1 to 3 descriptors through rings of 64: once or three times round, so the driver's and
    # the device's wrap counters are 0 now.
    packed = ["a", "b"] if other == "packed" else ["a"]
    for name in packed:
        fe = fa if name == "a" else fb
        assert all(fq.avail_wrap == 0 for fq in fe.queues)
        assert all(vq.avail_wrap_counter == vq.used_wrap_counter == 0 for vq in d.device(name).vqs)


@pytest.mark.parametrize("other", ["packed", "split"])
def test_the_switch_forwards_between_packed_and_split_ports(
    start_daemon: StartDaemon, datapath: str, other: str
) -> None:
    d = start_daemon({"a": PACKED, "b": PACKED, "c": ""}, switches=["vale0=a,b,c"])
    fa = d.frontend("a", packed=True)
    fb = d.frontend("b", packed=other == "packed")
    fc = d.frontend("c")
    for fe in (fa, fb, fc):
        fe.post_receive_buffers(40)
    poison(d)
    # Learn where a and b are (the flood reaches everyone), then unicast both ways.
    fa.transmit([switch_frame("ff:ff:ff:ff:ff:ff", mac(0xA), seq=1)])
    assert fb.receive(1) == fc.receive(1) == [switch_frame("ff:ff:ff:ff:ff:ff", mac(0xA), seq=1)]
    fb.transmit([switch_frame("ff:ff:ff:ff:ff:ff", mac(0xB), seq=2)])
    assert fa.receive(1) == fc.receive(1) == [switch_frame("ff:ff:ff:ff:ff:ff", mac(0xB), seq=2)]
    to_b = [switch_frame(mac(0xB), mac(0xA), 60 + k, seq=k) for k in range(30)]
    to_a = [switch_frame(mac(0xA), mac(0xB), 1514, seq=k) for k in range(30)]
    fa.transmit(to_b)
    fb.transmit(to_a)
    assert fb.receive(30) == to_b
    assert fa.receive(30) == to_a
    assert totals(d, "c")["tx_packets"] == 2  # the floods only
    assert_passes_ran(d, datapath, {"a": "packed", "b": other, "c": "split"})
    sw = d.daemon.switches["vale0"].stats()["ports"]
    assert (sw["a"]["forwarded"], sw["b"]["forwarded"], sw["c"]["tx_frames"]) == (30, 30, 2)


@pytest.mark.parametrize("other", ["packed", "split"])
def test_a_compiled_link_hands_packed_transmissions_back_every_burst(
    start_daemon: StartDaemon, other: str
) -> None:
    # test_backend_traffic's test of the same shape: one call of the compiled link moves every frame, and
    # publishes each guest's used entries every BURST frames, each publication an interrupt (no EVENT_IDX:
    # RING_EVENT_FLAGS_ENABLE in the driver area) until the driver disables them (RING_EVENT_FLAGS_DISABLE).
    features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)
    d = start_daemon({"a": PACKED, "b": PACKED}, links=["a,b"])
    fa = d.frontend("a", packed=True, features=features)
    fb = d.frontend("b", packed=other == "packed", features=features)
    link = d.daemon.serving["a"]
    assert isinstance(link, Link)
    n = BURST + 4  # two rounds of one call (small frames: a burst is BURST of them), the second short
    tx, rx = fa.queues[1], fb.queues[0]
    got: list[bytes] = []
    for k, signals in enumerate([(2, 2), (0, 2)]):
        fb.post_receive_buffers(n)
        sent = [frame(60, k * n + j) for j in range(n)]
        with d.daemon.worker.lock:  # the worker waits: this call is the one that moves them all
            _signals(tx.call), _signals(rx.call)
            fa.transmit(sent)
            assert link.run()
            assert (_signals(tx.call), _signals(rx.call)) == signals, "one publication per burst, both guests"
            assert fa.used(tx) == [(j % tx.num, 0) for j in range(k * n, (k + 1) * n)]  # ids wrap
            # a's driver wants no more interrupts for its transmissions.
            VRING_PACKED_EVENT.pack_into(fa.mem, tx.avail, 0, RING_EVENT_FLAGS_DISABLE)
        got += fb.receive(n)
        assert got[k * n :] == sent
    assert link._plan is not None  # the rounds were vhu_link_pass's


@pytest.mark.parametrize("other", ["packed", "split"])
def test_a_compiled_link_of_packed_ports_copies_without_the_stashes_and_loses_no_buffer(
    start_daemon: StartDaemon, other: str
) -> None:
    # test_backend_traffic's one-copy link test with a packed port: no stash gives or takes a buffer, and
    # buffers only move.
    d = start_daemon({"a": PACKED, "b": PACKED}, links=["a,b"])
    fa, fb = d.frontend("a", packed=True), d.frontend("b", packed=other == "packed")
    a, b = port(d, "a"), port(d, "b")
    assert fast_layouts(d, "a") == {"packed"}
    one_copy_both_ways(d, fa, fb, a, b)


def test_a_lone_packed_port_drops_what_its_guest_sends_and_counts_it(
    start_daemon: StartDaemon, datapath: str
) -> None:
    d = start_daemon({"c": f"{PACKED},queues=2"})
    fc = d.frontend("c", packed=True, queue_pairs=2)
    assert fast_layouts(d, "c") == ({"packed"} if datapath == "compiled" else None)  # vhu_sink_pass
    fc.transmit([frame(60, k) for k in range(5)], pair=0)
    fc.transmit([frame(1514, k) for k in range(3)], pair=1)
    assert len(fc.wait_used(fc.queues[1], 5)) == 5
    assert len(fc.wait_used(fc.queues[3], 3)) == 3
    d.wait(lambda: totals(d, "c")["rx_dropped"] == 8, "the sink to count 8 drops")
    assert counters(d, "c") == [
        {**zero(), "rx_packets": 5, "rx_bytes": 300, "rx_dropped": 5},
        {**zero(), "rx_packets": 3, "rx_bytes": 3 * 1514, "rx_dropped": 3},
    ]


def test_a_generating_packed_port_gives_its_guest_every_frame_it_has_room_for(
    start_daemon: StartDaemon, datapath: str
) -> None:
    d = start_daemon({"a": f"{PACKED},generate=60,mac=52:54:00:00:00:0a"})
    generated = udp_frame(60, Addresses(dst_mac=bytes.fromhex("52540000000a")))
    fa = d.frontend("a", packed=True, queue_size=64)
    assert fast_layouts(d, "a") == ({"packed"} if datapath == "compiled" else None)  # vhu_source_pass
    total = 0
    for posted in (16, 40, 40):  # past the end of the ring: the wrap counters turn over
        fa.post_receive_buffers(posted)
        assert fa.receive(posted) == [generated] * posted
        total += posted
        d.wait(lambda n=total: totals(d, "a")["tx_packets"] == n, f"{total} frames counted")
    assert totals(d, "a")["tx_dropped"] == 0
    assert fa.queues[0].used_wrap == 0


def test_in_order_transmissions_come_back_as_one_used_descriptor_per_batch(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": PACKED, "b": ""}, links=["a,b"])
    fa = d.frontend("a", packed=True, features=DEFAULT_FEATURES | bit(VIRTIO_F_IN_ORDER))
    fb = d.frontend("b")
    assert d.device("a").vqs[1].in_order
    fb.post_receive_buffers(8)
    sent = [frame(60, k) for k in range(8)]
    fa.transmit(sent)
    assert fb.receive(8) == sent
    # The driver skips every chain up to the id the one used descriptor names (spec 2.8.8).
    tx = fa.queues[1]
    d.wait(lambda: fa.used(tx) or tx.in_flight == 0, "the batch to be used")
    assert tx.in_flight == 0


@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize("dpdk_style", [False, True], ids=["both-halves", "lower-half"])
def test_a_reconnection_keeps_the_wrap_counters(start_daemon: StartDaemon, dpdk_style: bool) -> None:
    d = start_daemon({"a": PACKED, "b": ""}, links=["a,b"])
    fa = d.frontend("a", packed=True, queue_size=32)
    fb = d.frontend("b")
    for _ in range(5):  # 40 chains each way through rings of 32: both wrap counters are 0 now
        reap(fa)
        exchange(fa, fb, 8)
        exchange(fb, fa, 8)
    assert [(fq.avail_wrap, fq.next_desc) for fq in fa.queues] == [(0, 8), (0, 8)]
    for fq in fa.queues:
        base = fa.stop_queue(fq)  # QEMU's vhost_dev_stop
        # The next position and wrap counter of both sides, as vhost-user.rst lays them out.
        assert base == (8 | 0 << 15) * 0x10001
        if dpdk_style:
            fq.base = base & 0xFFFF  # what DPDK's virtio-user sends: the lower half only
    assert d.device("a").vqs[0].ready is False
    # The back-end forgets everything with the connection; the guest's rings stay where they are.
    assert fa.sock is not None
    fa.sock.close()
    d.wait(lambda: not d.device("a").features, "the device to be reset")
    fa.connect()
    fa.negotiate()
    vq = d.device("a").vqs[1]
    assert (vq.last_avail_idx, vq.avail_wrap_counter, vq.used_idx, vq.used_wrap_counter) == (8, 0, 8, 0)
    for _ in range(3):
        reap(fa)
        exchange(fa, fb, 10)
        exchange(fb, fa, 10)
    assert totals(d, "a")["errors"] == 0


@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize(
    ("laps", "stopped"),
    [(0, False), (1, False), (1, True)],
    ids=["first-lap", "wrapped", "after-get-vring-base"],
)
def test_a_back_end_that_died_without_get_vring_base_is_resumed_where_the_used_flags_turn(
    start_daemon: StartDaemon, laps: int, stopped: bool
) -> None:
    """QEMU keeps no packed ring state: when its back-end dies (no GET_VRING_BASE), it starts the rings of
    the next one from the positions of its last GET_VRING_BASE (a migration's or a stop's), or else from
    their reset positions (0, both wrap counters 1), wherever the driver is. The device resumes where the
    descriptors' USED flags turn instead, and traffic goes on both ways."""
    d = start_daemon({"a": PACKED, "b": ""}, links=["a,b"])
    fa = d.frontend("a", packed=True, queue_size=32)
    fb = d.frontend("b")
    for _ in range(1 + 4 * laps):  # 8 or 40 chains each way through rings of 32
        reap(fa)
        exchange(fa, fb, 8)
        exchange(fb, fa, 8)
    if stopped:  # QEMU stops and restarts the rings: it knows where they are (8, wrap counters 0) then
        for fq in fa.queues:
            fa.stop_queue(fq)
            fa.start_queue(fq)
        for _ in range(2):  # and they move on from there: 24, wrap counters 0
            reap(fa)
            exchange(fa, fb, 8)
            exchange(fb, fa, 8)
    reap(fa)
    where = [(fq.next_desc, fq.avail_wrap) for fq in fa.queues]
    expected = (24 if stopped else 8, 1 - laps)
    assert where == [expected] * 2
    if stopped:
        # The driver refills its receive ring as Linux does, into the next lap: there the descriptor at the
        # old base is available again, which alone would not tell; the transmit ring does, for the device.
        fa.post_receive_buffers(20)
    # The back-end is gone with its state; the front-end sends what it last knew.
    assert fa.sock is not None
    fa.sock.close()
    d.wait(lambda: not d.device("a").features, "the device to be reset")
    assert all(fq.base == ((8 | 0 << 15) * 0x10001 if stopped else PACKED_START) for fq in fa.queues)
    fa.connect()
    fa.negotiate()
    for vq in d.device("a").vqs:
        assert (vq.last_avail_idx, vq.avail_wrap_counter, vq.used_idx, vq.used_wrap_counter) == 2 * expected
    for _ in range(5):  # on through the next wrap
        reap(fa)
        exchange(fa, fb, 10)
        exchange(fb, fa, 10)
    assert totals(d, "a")["errors"] == 0
    assert d.device("a").broken is None


@pytest.mark.usefixtures("datapath")
def test_a_logging_packed_ring_marks_every_page_the_device_writes(start_daemon: StartDaemon) -> None:
    """A live migration's dirty log (SET_LOG_BASE, VHOST_F_LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG on
    the running rings, as QEMU switches it on): every page of the guest's memory the device changed while
    logging is marked, the descriptor ring (used descriptors), the device area (event suppression) and the
    receive buffers; the pages it did not change are what the driver wrote (transmit buffers)."""
    d = start_daemon({"a": PACKED, "b": ""}, links=["a,b"])
    fa = d.frontend("a", packed=True, queue_size=32)
    fb = d.frontend("b")
    reap(fa)
    exchange(fa, fb, 8)
    exchange(fb, fa, 8)
    bitmap = fa.set_log_base()
    try:
        fa.sync(Request.SET_FEATURES, U64(fa.features | bit(VHOST_F_LOG_ALL)))
        for fq in fa.queues:
            addr = VringAddr(
                fq.index,
                1 << VHOST_VRING_F_LOG,
                UVA_BASE + fq.desc,
                UVA_BASE + fq.used,
                UVA_BASE + fq.avail,
                fq.used,
            )
            fa.sync(Request.SET_VRING_ADDR, addr)
        before = bytes(fa.mem)
        for _ in range(5):  # through the rings' wrap
            reap(fa)
            exchange(fa, fb, 8)
            exchange(fb, fa, 8)
        for fq in fa.queues:
            fa.stop_queue(fq)
        logged = {i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (1 << (i % 8))}
    finally:
        bitmap.close()
    assert VHOST_LOG_PAGE == PAGE
    changed = {
        p
        for p in range(len(before) // PAGE)
        if before[p * PAGE : (p + 1) * PAGE] != fa.mem[p * PAGE : (p + 1) * PAGE]
    }
    rx, tx = fa.queues
    transmit_buffers = set(range(tx.buffers // PAGE, (tx.buffers + tx.num * BUFFER_SIZE - 1) // PAGE + 1))
    device_written = {q.desc // PAGE for q in fa.queues} | {q.used // PAGE for q in fa.queues}
    device_written |= {(rx.buffers + BUFFER_SIZE * k) // PAGE for k in range(rx.num)} & changed
    assert device_written <= logged
    assert changed - logged <= transmit_buffers, sorted(changed - logged)


def test_used_flags_say_where_a_ring_of_single_descriptor_chains_stopped() -> None:
    def flags(text: str) -> npt.NDArray[np.bool_]:
        return np.array([c == "1" for c in text])

    assert position_from_used_flags(flags("0000")) == (0, 1)  # a fresh ring, or one lap 0 just ended
    assert position_from_used_flags(flags("1111")) == (0, 0)  # lap 1 just ended
    assert position_from_used_flags(flags("1100")) == (2, 1)
    assert position_from_used_flags(flags("0011")) == (2, 0)
    assert position_from_used_flags(flags("1000")) == (1, 1)
    assert position_from_used_flags(flags("1101")) is None  # a batch half published, or longer chains
    assert position_from_used_flags(flags("0110")) is None


def test_set_vring_base_refuses_a_position_outside_the_ring(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": PACKED})
    fa = d.frontend("a", packed=True, queue_size=32)
    fq = fa.queues[0]
    fa.stop_queue(fq)
    assert not fa.checked(Request.SET_VRING_BASE, VringState(0, 40 | 1 << 15))
    assert fa.checked(Request.SET_VRING_BASE, VringState(0, PACKED_START))


def test_a_hostile_packed_ring_breaks_its_own_port_only(start_daemon: StartDaemon, datapath: str) -> None:
    d = start_daemon({"a": PACKED, "b": "", "c": PACKED, "e": ""}, links=["a,b", "c,e"])
    fa = d.frontend("a", packed=True)
    fc, fe = d.frontend("c", packed=True), d.frontend("e")
    # With the compiled datapath, the links' compiled passes are what meet the hostile rings.
    compiled = datapath == "compiled"
    assert [fast_layouts(d, p) for p in "ac"] == [{"packed"} if compiled else None] * 2
    tx = fa.queues[1]
    # A chain whose buffer id is beyond the ring (ids name a driver's slots: 0..num-1).
    fa.write_packed_desc(tx, 0, fa.buffer(tx, 0), 100, 300, fa.packed_flags(1))
    fa.publish(tx, [], kick=True)
    reason = d.wait_broken("a")
    assert "buffer id 300" in reason
    still_serving(d, fc, fe)
    # A receive chain that is not device-writable (no VRING_DESC_F_WRITE) breaks c, and nothing else.
    rx = fc.queues[0]
    pos = rx.next_desc  # where the device looks next
    fc.write_packed_desc(rx, pos, fc.buffer(rx, pos), 4096, pos, fc.packed_flags(rx.avail_wrap))
    fe.transmit([frame(60, 1)])
    assert f"read-only descriptor {pos} in a chain" in d.wait_broken("c")
    assert d.device("e").broken is None
    assert (totals(d, "a")["errors"], totals(d, "c")["errors"]) == (1, 1)
    assert port(d, "a").fast_queues() is None  # broken: nothing runs over it until the driver resets it


@pytest.mark.parametrize("source", ["packed", "split"])
def test_a_faulted_packed_queue_is_left_alone_until_its_port_reports_the_fault(
    start_daemon: StartDaemon, source: str
) -> None:
    # test_onecopy's test of the same name, for a packed destination: the link's compiled pass runs twice
    # before the port hears of the fault; the second leaves the fault and its pending used entries alone.
    d = start_daemon({"a": PACKED, "b": PACKED}, links=["a,b"])
    fa, fb = d.frontend("a", packed=source == "packed"), d.frontend("b", packed=True)
    link = d.daemon.serving["a"]
    assert isinstance(link, Link)
    with d.daemon.worker.lock:  # the worker waits: the passes below are the only ones
        fb.post_receive_buffers(1)  # position 0; then a receive chain that is not device-writable
        rx = fb.queues[0]
        fb.write_packed_desc(rx, 1, fb.buffer(rx, 1), 4096, 1, fb.packed_flags(rx.avail_wrap))
        fa.transmit([frame(60, k) for k in range(3)])
        plan, out, refs = link._compiled(), link._outcome, link._refs
        assert plan is not None and refs is not None
        vq = d.device("b").vqs[0]
        ring = kernels.packed_ring(vq, d.device("b").memory)

        def run() -> tuple[int, int]:
            lib.vhu_link_pass(plan.c, plan.n, refs.c, BURST, BUDGET, out.failed, out.status)
            return out.failed[0], out.status[0]

        assert run() == (1, lib.VQ_ERR_DIRECTION)  # lane 0's destination: b's receive queue
        fault = (ring.out.err_desc, ring.out.used, ring.scratch()[0].id, ring.scratch()[0].len)
        assert fault == (1, 1, 0, 12 + 60)  # descriptor 1 faulted; the first frame's used entry waits
        assert vq.faulted
        assert run() == (1, lib.VHU_FAULTED)
        assert (ring.out.err_desc, ring.out.used, ring.scratch()[0].id, ring.scratch()[0].len) == fault
        kring = d.daemon.adapters["b"].tx_rings[0]
        port(d, "b").fast_failed(kring, False, lib.VHU_FAULTED)
        assert d.device("b").broken is None, "VHU_FAULTED is not the fault: the pass that met it reports"
        port(d, "b").fast_failed(kring, False, lib.VQ_ERR_DIRECTION)
        assert "read-only descriptor 1 in a chain" in str(d.device("b").broken)
        assert vq._pending_used == [(0, 12 + 60, 1)], "the first frame's used entry, queued once"
    assert len(fa.wait_used(fa.queues[1], 3)) == 3 and d.device("a").broken is None


@pytest.mark.usefixtures("datapath")
def test_an_application_opens_a_packed_guest_port(start_daemon: StartDaemon) -> None:
    d = start_daemon({"g": PACKED})
    guest = d.frontend("g", packed=True)
    guest.post_receive_buffers(64)
    with open_port(d, "g") as port:
        frames = [switch_frame(mac(0x10), mac(0x20), 200, k) for k in range(50)]
        send(port, frames)
        assert guest.receive(50) == frames
        guest.transmit([switch_frame(mac(0x20), mac(0x10), 90, k) for k in range(20)])
        assert receive(port, 20) == [switch_frame(mac(0x20), mac(0x10), 90, k) for k in range(20)]


@needs_root
def test_a_packed_vm_on_a_tap_talks_to_the_host_stack(tap: str, start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": f"host={tap},{PACKED}"})
    fa = d.frontend("a", packed=True)
    with packet_socket(tap) as stack:
        up = [switch_frame(mac(0xC), mac(0xA), seq=1), switch_frame(mac(0xC), mac(0xA), 1514, 2)]
        fa.transmit(up)
        assert recv_frames(stack, 2) == up
        down = [switch_frame(mac(0xA), mac(0xC), seq=3), switch_frame(mac(0xA), mac(0xC), 1514, 4)]
        fa.post_receive_buffers(4)
        for f in down:
            stack.send(f)
        assert fa.receive(2) == down


def test_packed_is_a_port_option_of_flags_and_toml() -> None:
    assert parse_port_flag("a=vhost-user,path=/tmp/a.sock").packed  # offered by default
    assert parse_port_flag("a=vhost-user,path=/tmp/a.sock,packed=on").packed
    assert not parse_port_flag("a=vhost-user,path=/tmp/a.sock,packed=off").packed
    assert not _port_from_mapping("a", {"path": "/tmp/a.sock", "packed": False}).packed
    parse_port_flag("u=generic,ifname=veth0")  # other ports have no virtqueues, and say nothing of them
    with pytest.raises(ConfigError, match="packed= is for vhost-user ports"):
        parse_port_flag("u=generic,ifname=veth0,packed=on")
    with pytest.raises(ConfigError, match="packed= is for vhost-user ports"):
        _port_from_mapping("u", {"type": "generic", "ifname": "veth0", "packed": False})
    with pytest.raises(ConfigError, match="on or off"):
        parse_port_flag("a=vhost-user,path=/tmp/a.sock,packed=yes")


def test_inspect_shows_a_packed_queue_and_walks_its_chains_without_taking_them(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": PACKED})
    fa = d.frontend("a", packed=True, queue_size=32)
    fa.post_receive_buffers(3, chain=2)
    reply = d.daemon.inspect({"port": "a", "chains": 5})
    assert reply["ring"] == "packed"
    rx = reply["queues"][0]["guest_receive"]
    assert (rx["layout"], rx["pending"], rx["avail_wrap_counter"], rx["used_wrap_counter"]) == (
        "packed",
        3,
        1,
        1,
    )
    assert [c["head"] for c in rx["chains"]] == [0, 2, 4]
    assert all(len(c["segments"]) == 2 and c["length"] == 2 * 4096 for c in rx["chains"])
    assert reply["queues"][0]["stalled"] == []
    assert "packed rings" in cli._format_inspect(reply)
    # Nothing was taken: the guest still gets its three buffers filled.
    assert d.device("a").vqs[0].last_avail_idx == 0
