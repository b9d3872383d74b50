"""Frames through the daemon: two guests on a link, byte for byte, with exact counters; jumbo frames over
several netmap slots, with and without mergeable receive buffers; backpressure; a lone port; interrupts."""

from __future__ import annotations

import os
import random
import select
import time
from collections import Counter

import pytest
from daemons import RunningDaemon, StartDaemon

from vhostmap.forwarding.link import Link
from vhostmap.forwarding.passes import BURST
from vhostmap.lab.frontend import BUFFER_SIZE, FakeFrontend, FakeQueue
from vhostmap.netmap.allocator import AllocatorParams
from vhostmap.netmap.stash import BufferStash
from vhostmap.packets import Addresses, udp_frame
from vhostmap.vhost_user.messages import U64, Request, VringState
from vhostmap.vhost_user.port import PORT_RING_SLOTS, VhostUserPort
from vhostmap.virtio.spec import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    bit,
)

HDR = VIRTIO_NET_HDR.size
NETMAP_BUF = AllocatorParams().buf_size
WITH_MRG = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX)
WITHOUT_MRG = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)


def frame(size: int, seq: int) -> bytes:
    """An Ethernet frame of ``size`` bytes whose every byte depends on ``seq``."""
    rnd = random.Random(seq)
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + rnd.randbytes(size - 14)


def counters(d: RunningDaemon, port: str) -> list[dict[str, int]]:
    """The traffic counters of each queue (not the drops' reasons, kicks and calls)."""
    return [{k: q[k] for k in zero()} for q in d.stats(port)["queues"]]


def totals(d: RunningDaemon, port: str) -> dict[str, int]:
    """The traffic counters of ``port`` summed over its queues (not the drops' reasons, kicks and calls)."""
    return {k: d.totals(port)[k] for k in zero()}


def zero() -> dict[str, int]:
    return dict.fromkeys(
        ("rx_packets", "rx_bytes", "rx_dropped", "tx_packets", "tx_bytes", "tx_dropped", "errors"), 0
    )


@pytest.mark.parametrize("mergeable", [True, False], ids=["mrg", "no-mrg"])
@pytest.mark.parametrize("size", [60, 1514, 9014])
@pytest.mark.parametrize("pairs", [1, 4])
def test_frames_cross_a_link_byte_exact_with_exact_counters(
    start_daemon: StartDaemon, pairs: int, size: int, mergeable: bool
) -> None:
    d = start_daemon({"a": f"queues={pairs},mtu=9000", "b": f"queues={pairs},mtu=9000"}, links=["a,b"])
    fa = d.frontend("a", queue_pairs=pairs)
    fb = d.frontend("b", queue_pairs=pairs, features=WITH_MRG if mergeable else WITHOUT_MRG)
    per_queue = 6
    # Without mergeable buffers a receive chain must hold a whole frame (Linux's "big packets" chains).
    ndesc = -(-(HDR + size) // BUFFER_SIZE)  # 4 KiB descriptors a frame and its header need
    chain = 1 if mergeable else ndesc
    sent = {p: [frame(size, 1000 * p + k) for k in range(per_queue)] for p in range(pairs)}
    for p in range(pairs):
        fb.post_receive_buffers(per_queue * ndesc // chain, pair=p, chain=chain)
    for p in range(pairs):
        fa.transmit(sent[p], pair=p)
    for p in range(pairs):
        assert fb.receive(per_queue, pair=p) == sent[p]
        # Transmit chains come back in order, with used length 0 (the device wrote nothing into them).
        assert fa.wait_used(fa.queues[2 * p + 1], per_queue) == [(k * ndesc, 0) for k in range(per_queue)]
    assert fb.rx_errors == 0
    sender = {**zero(), "rx_packets": per_queue, "rx_bytes": per_queue * size}
    receiver = {**zero(), "tx_packets": per_queue, "tx_bytes": per_queue * size}
    assert counters(d, "a") == [sender] * pairs
    assert counters(d, "b") == [receiver] * pairs


def test_jumbo_frame_spans_netmap_slots_and_fills_three_mergeable_buffers(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "mtu=9000", "b": "mtu=9000"}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b", features=WITH_MRG)
    jumbo = frame(9014, 7)
    assert -(-len(jumbo) // NETMAP_BUF) == 5  # netmap slots, all but the last with NS_MOREFRAG
    rx = fb.queues[0]
    fb.post_receive_buffers(4)
    fa.transmit([jumbo])
    used = fb.wait_used(rx, 3)
    assert used == [(0, BUFFER_SIZE), (1, BUFFER_SIZE), (2, HDR + 9014 - 2 * BUFFER_SIZE)]
    header = VIRTIO_NET_HDR.unpack(fb.read_chain(rx, 0, HDR))
    assert header == (0, 0, 0, 0, 0, 0, 3)  # no offloads; num_buffers = 3
    assert b"".join(fb.read_chain(rx, h, n) for h, n in used)[HDR:] == jumbo


def test_without_mrg_rxbuf_a_frame_larger_than_the_receive_buffer_is_dropped_and_counted(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": "mtu=9000", "b": "mtu=9000"}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b", features=WITHOUT_MRG)
    small1, jumbo, small2 = frame(60, 1), frame(9014, 2), frame(60, 3)
    fb.post_receive_buffers(3)  # one 4 KiB descriptor each
    fa.transmit([small1, jumbo, small2])
    assert fb.receive(2) == [small1, small2]
    assert fb.rx_errors == 1  # the buffer came back empty
    assert totals(d, "a") == {**zero(), "rx_packets": 3, "rx_bytes": 9134}
    assert totals(d, "b") == {**zero(), "tx_packets": 2, "tx_bytes": 120, "tx_dropped": 1}
    assert d.stats("b")["queues"][0]["drops"]["tx"] == {"no_carrier": 0, "bad_header": 0, "too_big": 1}


def test_backpressure_holds_frames_until_receive_buffers_come(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    tx = fa.queues[1]
    # What the path can hold: a's RX kring and b's TX kring, one slot of each always empty.
    capacity = 2 * (PORT_RING_SLOTS - 1)
    frames = [frame(60, k) for k in range(capacity + 2)]
    batch = 128
    for start in range(0, capacity - capacity % batch, batch):
        fa.transmit(frames[start : start + batch])
        assert len(fa.wait_used(tx, batch)) == batch
    tail = frames[capacity - capacity % batch :]
    fa.transmit(tail)
    # The rings fill up; the last two frames stay in the guest's transmit queue, not dropped.
    assert len(fa.wait_used(tx, len(tail) - 2)) == len(tail) - 2
    with d.daemon.worker.lock:
        assert d.device("a").vqs[1].pending() == 2
    assert totals(d, "a") == {**zero(), "rx_packets": capacity, "rx_bytes": 60 * capacity}
    assert totals(d, "b") == zero()
    got: list[bytes] = []
    while len(got) < len(frames):
        n = min(200, len(frames) - len(got))
        fb.post_receive_buffers(n)
        got += fb.receive(n)
    assert got == frames
    assert len(fa.wait_used(tx, 2)) == 2
    assert totals(d, "a") == {**zero(), "rx_packets": len(frames), "rx_bytes": 60 * len(frames)}
    assert totals(d, "b") == {**zero(), "tx_packets": len(frames), "tx_bytes": 60 * len(frames)}


def test_frames_wait_for_the_receiver_to_post_buffers(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    frames = [frame(1514, k) for k in range(20)]
    fa.transmit(frames)
    assert len(fa.wait_used(fa.queues[1], 20)) == 20
    assert totals(d, "b") == zero()
    fb.post_receive_buffers(5)
    assert fb.receive(5) == frames[:5]
    fb.post_receive_buffers(15)
    assert fb.receive(15) == frames[5:]
    assert totals(d, "b") == {**zero(), "tx_packets": 20, "tx_bytes": 20 * 1514}


def test_a_lone_port_drops_what_its_guest_sends_and_counts_it(start_daemon: StartDaemon) -> None:
    d = start_daemon({"c": "queues=2"})
    fc = d.frontend("c", queue_pairs=2)
    fc.transmit([frame(60, k) for k in range(5)], pair=0)
    fc.transmit([frame(1514, k) for k in range(3)], pair=1)
    assert len(fc.wait_used(fc.queues[1], 5)) == 5
    assert len(fc.wait_used(fc.queues[3], 3)) == 3
    d.wait(lambda: totals(d, "c")["rx_dropped"] == 8, "the sink to count 8 drops")
    assert counters(d, "c") == [
        {**zero(), "rx_packets": 5, "rx_bytes": 300, "rx_dropped": 5},
        {**zero(), "rx_packets": 3, "rx_bytes": 3 * 1514, "rx_dropped": 3},
    ]


def wait_call(fq: FakeQueue, timeout: float = 5.0) -> int:
    """Wait for the call eventfd of ``fq`` and consume it."""
    ready, _, _ = select.select([fq.call], [], [], timeout)
    assert ready, f"queue {fq.index}: no interrupt within {timeout} s"
    return os.eventfd_read(fq.call)


def called(fq: FakeQueue) -> bool:
    """Whether the call eventfd of ``fq`` was signalled (consumes it)."""
    try:
        os.eventfd_read(fq.call)
    except BlockingIOError:
        return False
    return True


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_call_eventfd_is_signalled_for_every_completion(start_daemon: StartDaemon, event_idx: bool) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    features = (
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | (bit(VIRTIO_RING_F_EVENT_IDX) * event_idx)
    )
    fa, fb = d.frontend("a", features=features), d.frontend("b", features=features)
    assert d.device("a").vqs[1].event_idx is event_idx
    tx, rx = fa.queues[1], fb.queues[0]
    fb.post_receive_buffers(8)
    for k in range(4):
        fa.enable_calls(tx)
        fb.enable_calls(rx)
        fa.transmit([frame(60, k)])
        assert wait_call(rx) == 1
        assert wait_call(tx) == 1
        assert fa.used(tx) == [(k, 0)]
        assert fb.used(rx) == [(k, HDR + 60)]


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_no_call_when_the_driver_does_not_want_one(start_daemon: StartDaemon, event_idx: bool) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    features = (
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | (bit(VIRTIO_RING_F_EVENT_IDX) * event_idx)
    )
    fa, fb = d.frontend("a", features=features), d.frontend("b", features=features)
    tx, rx = fa.queues[1], fb.queues[0]
    if event_idx:
        # used_event 3: interrupt when used->idx passes 3, not before.
        fa.mem[tx.avail + 4 + 2 * tx.num : tx.avail + 6 + 2 * tx.num] = (3).to_bytes(2, "little")
    else:
        fa.mem[tx.avail : tx.avail + 2] = VRING_AVAIL_F_NO_INTERRUPT.to_bytes(2, "little")
    fb.post_receive_buffers(8)
    for k in range(3):
        # Before the frame goes: the daemon may deliver it before this line runs otherwise.
        fb.enable_calls(rx)
        fa.transmit([frame(60, k)])
        assert wait_call(rx) == 1
        assert fb.used(rx) == [(k, HDR + 60)]
        # The same forwarder round completes the transmission, just after the delivery (one copy: the
        # source's buffers are given back once the destination copied from them).
        assert d.wait(lambda: fa.used(tx), "the transmission to complete") == [(k, 0)]
        assert not called(tx)
    fa.transmit([frame(60, 3)])
    assert fb.receive(1) == [frame(60, 3)]
    assert d.wait(lambda: fa.used(tx), "the transmission to complete") == [(3, 0)]
    assert called(tx) is event_idx  # used->idx went 3 -> 4, past used_event 3


def test_interrupts_go_to_every_queue_pair(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "queues=4", "b": "queues=4"}, links=["a,b"])
    fa, fb = d.frontend("a", queue_pairs=4), d.frontend("b", queue_pairs=4)
    for p in range(4):
        fb.post_receive_buffers(1, pair=p)
        fb.enable_calls(fb.queues[2 * p])
    deadline = time.monotonic() + 5
    for p in reversed(range(4)):
        fa.transmit([frame(60, p)], pair=p)
    for p in range(4):
        assert wait_call(fb.queues[2 * p], deadline - time.monotonic()) == 1
        assert fb.receive(1, pair=p) == [frame(60, p)]
    assert [q["tx_packets"] for q in counters(d, "b")] == [1, 1, 1, 1]


def test_a_second_link_is_independent(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": "", "c": "", "e": ""}, links=["a,b", "c,e"])
    fa, fb, fc, fe = (d.frontend(p) for p in "abce")
    fb.post_receive_buffers(3)
    fe.post_receive_buffers(3)
    fa.transmit([frame(60, 1)])
    fc.transmit([frame(60, 2)])
    assert fb.receive(1) == [frame(60, 1)]
    assert fe.receive(1) == [frame(60, 2)]
    assert totals(d, "b")["tx_packets"] == totals(d, "e")["tx_packets"] == 1


def test_ports_with_different_queue_counts_are_linked_queue_i_to_i_mod_n(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "queues=4", "b": "queues=1"}, links=["a,b"])
    fa, fb = d.frontend("a", queue_pairs=4), d.frontend("b")
    fb.post_receive_buffers(8)
    for p in range(4):
        fa.transmit([frame(60, p)], pair=p)
    assert sorted(fb.receive(4)) == sorted(frame(60, p) for p in range(4))
    fa.post_receive_buffers(2, pair=0)
    fb.transmit([frame(60, 10), frame(60, 11)])
    assert fa.receive(2, pair=0) == [frame(60, 10), frame(60, 11)]
    assert [q["rx_packets"] for q in counters(d, "a")] == [1, 1, 1, 1]
    assert counters(d, "b") == [
        {**zero(), "rx_packets": 2, "rx_bytes": 120, "tx_packets": 4, "tx_bytes": 240}
    ]


def test_frames_for_pairs_the_guest_did_not_enable_reach_its_enabled_pairs(start_daemon: StartDaemon) -> None:
    # A guest with fewer vCPUs than queue pairs runs only some of them (QEMU disables the others with
    # SET_VRING_ENABLE 0); traffic its peer sends on the other pairs must still reach it.
    d = start_daemon({"a": "queues=4", "b": "queues=4"}, links=["a,b"])
    fa = d.frontend("a", queue_pairs=4)
    fb = d.frontend("b", queue_pairs=4)
    for q in fb.queues[2:]:
        fb.sync(Request.SET_VRING_ENABLE, VringState(q.index, 0))
    fb.post_receive_buffers(8)
    for p in range(4):
        fa.transmit([frame(60, p)], pair=p)
    assert sorted(fb.receive(4)) == sorted(frame(60, p) for p in range(4))
    assert counters(d, "b")[0] == {**zero(), "tx_packets": 4, "tx_bytes": 240}
    assert totals(d, "b")["tx_dropped"] == 0


def test_frames_for_a_guest_that_is_not_there_are_dropped_and_counted_as_frames(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": "mtu=9000", "b": "mtu=9000"}, links=["a,b"])
    fa = d.frontend("a")
    fa.transmit([frame(9014, 1), frame(60, 2), frame(9014, 3)])  # 5 + 1 + 5 netmap slots
    assert len(fa.wait_used(fa.queues[1], 3)) == 3
    d.wait(lambda: totals(d, "b")["tx_dropped"] == 3, "b's drops to be counted")
    assert totals(d, "b") == {**zero(), "tx_dropped": 3}
    assert d.stats("b")["queues"][0]["drops"]["tx"] == {"no_carrier": 3, "bad_header": 0, "too_big": 0}
    # b arrives: it gets what is sent from now on, whole.
    fb = d.frontend("b")
    fb.post_receive_buffers(8)
    fa.transmit([frame(9014, 4)])
    assert fb.receive(1) == [frame(9014, 4)]


def test_send_rarp_announces_the_guest_mac_to_the_linked_port(start_daemon: StartDaemon) -> None:
    """After a migration QEMU asks the back-end to announce the guest: a RARP broadcast from its MAC."""
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    fb.post_receive_buffers(4)
    mac = bytes.fromhex("525400aabbcc")
    fa.send(Request.SEND_RARP, U64(int.from_bytes(mac + bytes(2), "little")))
    (announce,) = fb.receive(1)
    assert announce[:14] == b"\xff" * 6 + mac + b"\x80\x35"
    assert announce[14:22] == bytes.fromhex("0001080006040003")  # Ethernet/IPv4, opcode 3 (request reverse)
    assert announce[22:28] == mac and announce[32:38] == mac and len(announce) == 60


def test_a_link_of_vhost_user_ports_runs_compiled_and_recovers_a_ring_the_python_way(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    link = d.daemon.serving["a"]
    assert isinstance(link, Link)
    fb.post_receive_buffers(16)
    first = [frame(60, k) for k in range(8)]
    fa.transmit(first)
    assert fb.receive(len(first)) == first
    assert link._plan is not None  # the round was one vhu_link_pass
    # A ring that makes no sense (nobody but the link uses it, so only a bug could do this): the compiled
    # prologue refuses it, the Python sync reinitialises it with a log line, and traffic goes on.
    kring = d.daemon.adapters["a"].rx_rings[0]
    with d.daemon.worker.lock:
        kring.ring.header.head = 5000
    second = [frame(60, 100 + k) for k in range(8)]
    fa.transmit(second)
    assert fb.receive(len(second)) == second
    assert kring.reinits == 1
    assert "head 5000 >= num_slots" in caplog.text
    assert totals(d, "a")["rx_packets"] == totals(d, "b")["tx_packets"] == 16


def newest(stash: BufferStash, k: int) -> set[int]:
    """The ``k`` buffers given to ``stash`` last."""
    return {int(stash.bufs[(stash.cursor - 1 - j) % stash.size]) for j in range(k)}


def held(*ports: VhostUserPort) -> Counter[int]:
    """Every buffer index the ports' rings and stashes hold, with how many times."""
    rings = [k for p in ports for k in (*p.tx_rings, *p.rx_rings)]
    in_rings = (int(x) for k in rings for x in k.ring.slots["buf_idx"])
    return Counter([*in_rings, *(int(b) for p in ports for b in p.stash.bufs)])


def stash_state(*ports: VhostUserPort) -> list[tuple[list[int], int]]:
    """The ports' stashes: their buffers in order and their cursors."""
    return [([int(b) for b in p.stash.bufs], int(p.stash.cursor)) for p in ports]


def one_copy_both_ways(
    d: RunningDaemon, fa: FakeFrontend, fb: FakeFrontend, a: VhostUserPort, b: VhostUserPort
) -> None:
    """Frames each way through the link of ports a and b (front-ends fa and fb), byte-exact; then the ports'
    stashes are exactly as they were, and their buffers only moved."""
    with d.daemon.worker.lock:
        before, stashes = held(a, b), stash_state(a, b)
    k = 8
    fa.post_receive_buffers(2 * k)
    fb.post_receive_buffers(2 * k)
    to_a = [frame(1514, i) for i in range(k)]
    fb.transmit(to_a)
    assert fa.receive(k) == to_a
    to_b = [frame(1514, 100 + i) for i in range(k)]
    fa.transmit(to_b)
    assert fb.receive(k) == to_b
    with d.daemon.worker.lock:
        # One copy each, guest to guest: the slots referred to the guests' buffers and their own were never
        # written, so no stash gave or took one.
        assert stash_state(a, b) == stashes
        after = held(a, b)
    assert after == before and max(after.values()) == 1  # buffers only moved: none lost, none twice


def test_a_sink_receives_into_the_buffers_its_last_release_freed_and_loses_none(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": ""})
    fa = d.frontend("a")
    a = d.daemon.adapters["a"]
    assert isinstance(a, VhostUserPort)
    with d.daemon.worker.lock:
        before = held(a)
    k = 8
    first = [frame(1514, i) for i in range(k)]
    fa.transmit(first)
    d.wait(lambda: totals(d, "a")["rx_dropped"] == k, f"the sink to drop {k} frames")
    with d.daemon.worker.lock:  # the pass that released them has finished
        freed = newest(a.stash, k)  # the release gave the buffers the frames were received into to the stash
        assert {bytes(a.memory.buf_view(b)[:1514]) for b in freed} == set(first)
    fa.transmit([frame(1514, 100 + i) for i in range(k)])
    d.wait(lambda: totals(d, "a")["rx_dropped"] == 2 * k, f"the sink to drop {2 * k} frames")
    with d.daemon.worker.lock:
        # a received into exactly those buffers (the newest of its stash), and released them into it again.
        assert newest(a.stash, k) == freed
        after = held(a)
    assert after == before and max(after.values()) == 1  # buffers only moved: none lost, none twice


def test_a_link_copies_guest_to_guest_without_the_stashes_and_loses_no_buffer(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    a, b = d.daemon.adapters["a"], d.daemon.adapters["b"]
    assert isinstance(a, VhostUserPort) and isinstance(b, VhostUserPort)
    one_copy_both_ways(d, fa, fb, a, b)


def test_a_generating_port_gives_its_guest_every_frame_it_has_room_for_and_drops_none(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": "generate=60,mac=52:54:00:00:00:0a"})
    generated = udp_frame(60, Addresses(dst_mac=bytes.fromhex("52540000000a")))
    fa = d.frontend("a")
    for posted, total in ((16, 16), (8, 24)):  # the generator waits for receive buffers, then fills them
        fa.post_receive_buffers(posted)
        assert fa.receive(posted) == [generated] * posted
        d.wait(lambda n=total: totals(d, "a")["tx_packets"] == n, f"{total} frames counted")
    assert totals(d, "a")["tx_dropped"] == 0
    fa.transmit([frame(60, 1)])  # what the guest sends is dropped, counted, as by a sink
    d.wait(lambda: totals(d, "a")["rx_dropped"] == 1, "the guest's frame dropped")
    with pytest.raises(ValueError, match="feeds its guest from a generator"):
        d.daemon.attach("vale0", "a")


def _signals(fd: int) -> int:
    """How many interrupts an eventfd counted since it was last read (and reset it)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def linked_pair(start_daemon: StartDaemon) -> tuple[RunningDaemon, FakeFrontend, FakeFrontend, Link]:
    """Ports a and b in a link, a front-end on each without EVENT_IDX (every publication an interrupt, so
    that they can be counted), and the link."""
    features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a", features=features), d.frontend("b", features=features)
    link = d.daemon.serving["a"]
    assert isinstance(link, Link)
    return d, fa, fb, link


def test_a_link_hands_transmissions_back_every_burst(start_daemon: StartDaemon) -> None:
    # One call of a compiled link takes a source's frames BURST at a time and publishes their used entries
    # after each burst (as DPDK does), not once at the end: a driver whose transmit ring is full meanwhile
    # drops (testpmd) or stops. Without EVENT_IDX every publication is an interrupt, so they can be counted.
    d, fa, fb, link = linked_pair(start_daemon)
    n = BURST + 4  # two rounds of one call (small frames: a burst is BURST of them), the second short
    sent = [frame(60, k) for k in range(n)]
    fb.post_receive_buffers(n)
    tx, rx = fa.queues[1], fb.queues[0]
    with d.daemon.worker.lock:  # the worker waits: this call is the one that moves them all
        _signals(tx.call), _signals(rx.call)
        fa.transmit(sent)
        assert link.run()
        assert (_signals(tx.call), _signals(rx.call)) == (2, 2), "one publication per burst, both guests"
        assert fa.used(tx) == [(k, 0) for k in range(n)]
    assert fb.receive(n) == sent


def test_a_link_takes_large_frames_fewer_at_a_time(start_daemon: StartDaemon) -> None:
    # A round takes BURST small frames, but of large ones about the bytes of 32 MTU frames (DPDK's burst),
    # by the mean frame of the source's last batch: its used entries come back as often as with bursts of 32.
    # 100 frames of 1514 bytes after the first such batch go in four rounds (32, 32, 32, 4): four
    # publications; 100 of 60 bytes after them in two (32, by the large frames before, then the 68 left).
    d, fa, fb, link = linked_pair(start_daemon)
    tx = fa.queues[1]
    n, seq = 100, 0
    for size, publications in ((1514, 1), (1514, 4), (60, 2), (60, 1)):
        sent = [frame(size, seq + k) for k in range(n)]
        seq += n
        fb.post_receive_buffers(n)
        with d.daemon.worker.lock:  # the worker waits: this call is the one that moves them all
            _signals(tx.call)
            fa.transmit(sent)
            assert link.run()
            assert _signals(tx.call) == publications, f"{size}-byte frames after {seq - n}"
            assert len(fa.used(tx)) == n
        assert fb.receive(n) == sent
    assert link._plan is not None  # the rounds were vhu_link_pass's


def test_a_sink_takes_a_guests_frames_a_burst_at_a_time_in_one_call(start_daemon: StartDaemon) -> None:
    # A port with nothing attached drops what its guest sends: one call of its compiled sink takes them all,
    # publishing the guest's transmissions every BURST frames (interrupts counted, as for the link).
    features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)
    d = start_daemon({"a": ""})
    fa = d.frontend("a", features=features)
    sink = d.daemon.serving["a"]
    n = BURST + 1
    tx = fa.queues[1]
    with d.daemon.worker.lock:
        _signals(tx.call)
        fa.transmit([frame(60, k) for k in range(n)])
        assert sink.run()
        assert _signals(tx.call) == 2, "one publication per burst"
        assert fa.used(tx) == [(k, 0) for k in range(n)]
    assert totals(d, "a")["rx_dropped"] == n
