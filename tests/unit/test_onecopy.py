"""One copy between vhost-user ports: a frame a link or the switch moves from one guest to another in a
compiled pass is copied once, from the source guest's transmit buffers into the destination guest's receive
buffers, never through a netmap buffer (the slots refer to guest memory while the pass runs: passes.OneCopy).

The proof is the netmap buffers: they are poisoned before the traffic and must still be poisoned after it,
while what a destination cannot take yet (no receive buffers) is kept in them, in order, and whatever takes
the Python path (the reference datapath) goes through them as before. Faults on either side mark that port
broken and no other.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from daemons import RunningDaemon, StartDaemon

from vhostmap.datapath import lib
from vhostmap.forwarding.link import Link
from vhostmap.forwarding.passes import BUDGET, BURST
from vhostmap.lab.frontend import BUFFER_SIZE, FakeFrontend
from vhostmap.netmap.abi import NS_INDIRECT
from vhostmap.vhost_user.port import VhostUserPort
from vhostmap.virtio.spec import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    bit,
)

POISON = 0xA5
BROADCAST = "ff:ff:ff:ff:ff:ff"
WITH_MRG = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX)


def mac(n: int) -> bytes:
    return bytes([0x02, 0, 0, 0, 0, n])


def frame(dst: bytes, src: bytes, size: int, seq: int) -> bytes:
    """An Ethernet frame of ``size`` bytes whose every byte past the addresses depends on ``seq``."""
    return dst + src + b"\x88\xb5" + random.Random(seq).randbytes(size - 14)


def port(d: RunningDaemon, name: str) -> VhostUserPort:
    p = d.daemon.adapters[name]
    assert isinstance(p, VhostUserPort)
    return p


def poison(d: RunningDaemon) -> None:
    """Fill every netmap buffer of the daemon's allocator with POISON (ports share one allocator)."""
    with d.daemon.worker.lock:
        port(d, "a").memory.buffer_rows()[:] = POISON


def written_buffers(d: RunningDaemon) -> int:
    """How many netmap buffers are no longer all POISON."""
    with d.daemon.worker.lock:
        rows = port(d, "a").memory.buffer_rows()
        return int(np.count_nonzero((rows != POISON).any(axis=1)))


def no_slot_refers(d: RunningDaemon, names: list[str]) -> None:
    """Between passes no slot that holds a frame (received and not released, or handed over and not sent)
    refers to guest memory. (A slot the backend owns may keep a void ticket: the next sync rewrites it.)"""
    with d.daemon.worker.lock:
        for name in names:
            p = port(d, name)
            for k in (*p.rx_rings, *p.tx_rings):
                n = k.ring.num_slots
                first, last = (k.nr_hwcur, k.ring.head) if k.c.tx else (k.ring.head, k.nr_hwtail)
                held = (first + np.arange((last - first) % n)) % n
                flags = k.ring.slots["flags"][held]
                assert not (flags & NS_INDIRECT).any(), f"{name}: a slot of {k.name} still refers"


def transmit_split(fe: FakeFrontend, data: bytes, sizes: list[int], pair: int = 0) -> None:
    """Transmit header + ``data`` over a chain of descriptors of ``sizes`` bytes (summing to all of it)."""
    fq = fe.queues[2 * pair + 1]
    whole = bytes(fe.hdr_len) + data
    assert sum(sizes) == len(whole)
    head = fe._chain(fq, sizes, 0)
    off = 0
    for addr, length in fe.chain_segments(fq, head):
        fe.mem[addr : addr + length] = whole[off : off + length]
        off += length
    fq.in_flight += len(sizes) - 1
    fe.publish(fq, [head])


@pytest.mark.parametrize("size", [60, 1514, 9014])
def test_a_link_copies_guest_to_guest_and_leaves_netmap_buffers_alone(
    start_daemon: StartDaemon, size: int
) -> None:
    d = start_daemon({"a": "mtu=9000", "b": "mtu=9000"}, links=["a,b"])
    fa, fb = d.frontend("a", features=WITH_MRG), d.frontend("b", features=WITH_MRG)
    poison(d)
    to_b = [frame(mac(2), mac(1), size, k) for k in range(16)]
    to_a = [frame(mac(1), mac(2), size, 100 + k) for k in range(16)]
    fb.post_receive_buffers(16 * 3)
    fa.post_receive_buffers(16 * 3)
    fa.transmit(to_b)
    fb.transmit(to_a)
    assert fb.receive(16) == to_b
    assert fa.receive(16) == to_a
    assert fa.wait_used(fa.queues[1], 16) == [(k * -(-(12 + size) // BUFFER_SIZE), 0) for k in range(16)]
    assert written_buffers(d) == 0
    no_slot_refers(d, ["a", "b"])
    assert d.totals("a")["rx_packets"] == d.totals("b")["tx_packets"] == 16
    assert d.totals("b")["rx_bytes"] == d.totals("a")["tx_bytes"] == 16 * size


def test_a_frame_over_many_small_descriptors_is_still_copied_once(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    poison(d)
    fb.post_receive_buffers(8)
    frames = [frame(mac(2), mac(1), 1514, k) for k in range(3)]
    transmit_split(fa, frames[0], [12, 14, 100, 1400])  # header alone, then the Ethernet header alone
    transmit_split(fa, frames[1], [5, 7 + 1, 1513])  # the header split, the frame's first byte with it
    transmit_split(fa, frames[2], [1526])
    assert fb.receive(3) == frames
    assert written_buffers(d) == 0


def test_link_backpressure_keeps_frames_in_netmap_buffers_in_order(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    poison(d)
    frames = [frame(mac(2), mac(1), 1514, k) for k in range(40)]
    fa.transmit(frames)
    # b has no receive buffers: the frames wait in the rings, in netmap buffers, and a has its transmit
    # buffers back (their bytes no longer needed).
    assert len(fa.wait_used(fa.queues[1], 40)) == 40
    assert written_buffers(d) == 40
    no_slot_refers(d, ["a", "b"])
    for k in range(40):  # a's guest reuses its buffers: what b gets must not change
        fa.mem[fa.buffer(fa.queues[1], k) : fa.buffer(fa.queues[1], k) + 1526] = bytes(1526)
    got: list[bytes] = []
    for n in (1, 9, 30):
        fb.post_receive_buffers(n)
        got += fb.receive(n)
    assert got == frames
    assert d.totals("a")["rx_packets"] == d.totals("b")["tx_packets"] == 40
    assert d.totals("b")["tx_dropped"] == 0
    # Once the rings are empty again, the next frames go guest to guest.
    poison(d)
    fb.post_receive_buffers(4)
    more = [frame(mac(2), mac(1), 60, 100 + k) for k in range(4)]
    fa.transmit(more)
    assert fb.receive(4) == more
    assert written_buffers(d) == 0


def test_the_switch_copies_unicast_and_floods_guest_to_guest(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": "", "c": ""}, switches=["vale0=a,b,c"])
    fa, fb, fc = d.frontend("a"), d.frontend("b"), d.frontend("c")
    for fe in (fa, fb, fc):
        fe.post_receive_buffers(32)
    poison(d)
    bcast = bytes.fromhex(BROADCAST.replace(":", ""))
    flood = [frame(bcast, mac(1), 1514, k) for k in range(4)]
    fa.transmit(flood)
    assert fb.receive(4) == flood and fc.receive(4) == flood
    fb.transmit([frame(mac(1), mac(2), 60, 10)])
    assert fa.receive(1) == [frame(mac(1), mac(2), 60, 10)]
    unicast = [frame(mac(2), mac(1), 9014 if k % 2 else 60, 20 + k) for k in range(4)]
    fa.transmit(unicast[:2])
    transmit_split(fa, unicast[2], [12, 14, 46])  # the Ethernet header alone in a descriptor
    transmit_split(fa, unicast[3], [12, 4096, 4096, 822])
    assert fb.receive(4) == unicast
    assert written_buffers(d) == 0
    no_slot_refers(d, ["a", "b", "c"])
    sw = d.daemon.switches["vale0"].stats()["ports"]
    assert (sw["a"]["flooded"], sw["a"]["forwarded"]) == (4, 4)
    assert (sw["b"]["tx_frames"], sw["c"]["tx_frames"]) == (8, 4)


def test_the_switch_copies_a_frame_whose_addresses_are_split_through_a_netmap_buffer(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": "", "b": ""}, switches=["vale0=a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    fb.post_receive_buffers(4)
    poison(d)
    split = frame(mac(2), mac(1), 200, 1)
    transmit_split(fa, split, [12, 8, 192])  # the switch must read 14 bytes in the first slot: copied
    assert fb.receive(1) == [split]
    assert written_buffers(d) == 1


def test_the_switch_drops_for_a_full_destination_and_keeps_what_it_took(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, switches=["vale0=a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    ring = port(d, "b").tx_rings[0].ring.num_slots - 1
    total = ring + 50
    sent: list[bytes] = []
    for start in range(0, total, 100):
        batch = [frame(mac(2), mac(1), 60, k) for k in range(start, min(total, start + 100))]
        fa.transmit(batch)
        fa.wait_used(fa.queues[1], len(batch))  # the source never waits for the destination
        sent += batch
    no_slot_refers(d, ["a", "b"])
    sw = d.daemon.switches["vale0"].stats()["ports"]
    assert (sw["b"]["tx_frames"], sw["b"]["tx_dropped"], sw["a"]["dropped"]) == (ring, 50, 50)
    got: list[bytes] = []
    while len(got) < ring:
        n = min(200, ring - len(got))
        fb.post_receive_buffers(n)
        got += fb.receive(n)
    assert got == sent[:ring]
    assert d.totals("b")["tx_packets"] == ring


def still_switching(d: RunningDaemon, x: FakeFrontend, y: FakeFrontend) -> None:
    """Broadcasts from x reach y and back."""
    bcast = b"\xff" * 6
    for src, dst, n in ((x, y, 5), (y, x, 7)):
        frames = [frame(bcast, mac(n), 60, k) for k in range(4)]
        dst.post_receive_buffers(4)
        src.transmit(frames)
        assert dst.receive(4) == frames


def bad_chain(fe: FakeFrontend, queue: int, writable: bool) -> None:
    """A chain whose second descriptor lies outside guest memory, made available."""
    fq = fe.queues[queue]
    flag = VRING_DESC_F_WRITE if writable else 0
    fe.write_desc(fq, 0, fe.buffer(fq, 0), 64, flag | VRING_DESC_F_NEXT, 1)
    fe.write_desc(fq, 1, 1 << 50, 64, flag)
    fe.publish(fq, [0])


@pytest.mark.parametrize("where", ["link", "switch"])
def test_a_destination_fault_breaks_that_port_only_and_the_source_gets_its_buffers_back(
    start_daemon: StartDaemon, where: str
) -> None:
    topo = {"links": ["a,b"]} if where == "link" else {"switches": ["vale0=a,b,c"]}
    d = start_daemon({"a": "", "b": "", "c": ""}, **topo)
    fa, fb = d.frontend("a"), d.frontend("b")
    bad_chain(fb, 0, writable=True)
    frames = [frame(mac(2), mac(1), 60, k) for k in range(3)]
    fa.transmit(frames)
    assert "buffer of descriptor 1" in d.wait_broken("b")
    assert len(fa.wait_used(fa.queues[1], 3)) == 3
    assert d.device("a").broken is None
    assert d.totals("a")["rx_packets"] == 3
    if where == "switch":
        still_switching(d, fa, d.frontend("c"))
    no_slot_refers(d, ["a"])


def linked_pair(start_daemon: StartDaemon) -> tuple[RunningDaemon, FakeFrontend, FakeFrontend, Link]:
    """Ports a and b joined by a link, their front-ends, and the link (for tests that run its pass)."""
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    link = d.daemon.serving["a"]
    assert isinstance(link, Link)
    return d, d.frontend("a"), d.frontend("b"), link


def test_a_faulted_queue_is_left_alone_until_its_port_reports_the_fault(start_daemon: StartDaemon) -> None:
    # With two datapath threads filling one guest receive queue, the other thread's pass can reach the queue
    # between the pass that met its fault and the port's handling of it (after the ring lock went). Emulated
    # in one thread: the link's pass runs twice before the port hears of the fault. The second leaves the
    # fault and its pending used entries alone (VHU_FAULTED), and the port reports the first fault only.
    d, fa, fb, link = linked_pair(start_daemon)
    with d.daemon.worker.lock:  # the worker waits: the passes below are the only ones
        fb.post_receive_buffers(1)  # descriptor 0; then a chain whose second descriptor is outside memory
        rx = fb.queues[0]
        fb.write_desc(rx, 1, fb.buffer(rx, 1), 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2)
        fb.write_desc(rx, 2, 1 << 50, 64, VRING_DESC_F_WRITE)
        fb.publish(rx, [1])
        fa.transmit([frame(mac(2), mac(1), 60, k) for k in range(3)])
        plan, out, refs = link._compiled(), link._outcome, link._refs
        assert plan is not None and refs is not None
        vq = d.device("b").vqs[0]

        def run() -> tuple[int, int]:
            lib.vhu_link_pass(plan.c, plan.n, refs.c, BURST, BUDGET, out.failed, out.status)
            return out.failed[0], out.status[0]

        assert run() == (1, lib.VQ_ERR_BUFFER_MEM)  # lane 0's destination: b's receive queue
        fault = (vq.out.err_desc, vq.out.used, vq.scratch[0].id, vq.scratch[0].len)
        assert fault == (2, 1, 0, 12 + 60)  # descriptor 2 faulted; the first frame's used entry waits
        assert run() == (1, lib.VHU_FAULTED)
        assert (vq.out.err_desc, vq.out.used, vq.scratch[0].id, vq.scratch[0].len) == fault
        kring = d.daemon.adapters["b"].tx_rings[0]
        port(d, "b").fast_failed(kring, False, lib.VHU_FAULTED)
        assert d.device("b").broken is None, "VHU_FAULTED is not the fault: the pass that met it reports"
        port(d, "b").fast_failed(kring, False, lib.VQ_ERR_BUFFER_MEM)
        assert "buffer of descriptor 2" in str(d.device("b").broken)
        assert vq._pending_used == [(0, 12 + 60)], "the first frame's used entry, queued once"
    assert len(fa.wait_used(fa.queues[1], 3)) == 3 and d.device("a").broken is None


def test_a_link_pass_runs_rounds_until_it_moved_its_budget(start_daemon: StartDaemon) -> None:
    # A call's rounds stop at its budget of slots (the round that passes it finishes), or at the first that
    # moves nothing: not after a count of rounds, which stopped rounds of large frames (fewer a round) early.
    d, fa, fb, link = linked_pair(start_daemon)
    with d.daemon.worker.lock:  # the worker waits: the passes below are the only ones
        fb.post_receive_buffers(40)
        fa.transmit([frame(mac(2), mac(1), 60, k) for k in range(40)])
        plan, out, refs = link._compiled(), link._outcome, link._refs
        assert plan is not None and refs is not None
        # A call returns the slots taken from a guest plus those moved into the other (2 a frame); the budget
        # counts the first.

        def run(budget: int) -> int:
            return int(lib.vhu_link_pass(plan.c, plan.n, refs.c, 8, budget, out.failed, out.status))

        assert run(12) == 2 * 16  # two rounds of 8
        assert run(0) == 2 * 8  # at least one
        assert run(1000) == 2 * 16  # the rest, then a round that moved nothing
        assert out.failed[0] == -1
    assert len(fb.receive(40)) == 40


@pytest.mark.parametrize("where", ["link", "switch"])
def test_a_source_fault_breaks_that_port_only(start_daemon: StartDaemon, where: str) -> None:
    topo = {"links": ["a,b"]} if where == "link" else {"switches": ["vale0=a,b,c"]}
    d = start_daemon({"a": "", "b": "", "c": ""}, **topo)
    fa, fb = d.frontend("a"), d.frontend("b")
    fb.post_receive_buffers(8)
    fa.transmit([frame(mac(2), mac(1), 60, 0)])
    assert fb.receive(1) == [frame(mac(2), mac(1), 60, 0)]
    bad_chain(fa, 1, writable=False)
    assert "buffer of descriptor 1" in d.wait_broken("a")
    assert d.device("b").broken is None
    if where == "switch":
        still_switching(d, fb, d.frontend("c"))


def test_frames_the_python_path_moves_go_through_netmap_buffers(
    start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference datapath (as every port but a vhost-user one) copies into netmap buffers, and then out
    of them: the same frames arrive, and the buffers were written."""
    monkeypatch.setenv("VHOSTMAP_REFERENCE_DATAPATH", "1")
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    assert port(d, "a").fast_queues() is None
    poison(d)
    fb.post_receive_buffers(8)
    frames = [frame(mac(2), mac(1), 1514, k) for k in range(8)]
    fa.transmit(frames)
    assert fb.receive(8) == frames
    assert written_buffers(d) == 8


def test_the_reference_table_constants_agree() -> None:
    assert lib.NS_INDIRECT == NS_INDIRECT
    assert lib.VQ_REF_MAX == 1 << lib.VQ_REF_BITS
