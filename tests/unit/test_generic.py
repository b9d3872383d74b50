"""The generic adapter over a veth pair whose other end lives in a fresh network namespace.

The far end is an AF_PACKET socket opened inside the namespace (by a short ``ip netns exec`` python child that
passes its fd back), so the test drives it in-process. IPv6 is off on both ends, so the kernel sends nothing
of its own and every count is exact. Needs root.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ringuser import ETH_P_EXPERIMENTAL, frame, release, sync_until, take_frames
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from vhostmap.lab.netns import Netns, VethPair, ip, set_up, unique_name, wait_transmitting
from vhostmap.netmap.abi import NR_FORWARD, NS_FORWARD, NS_MOREFRAG, RingView, nm_prev
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.errors import InterfaceError
from vhostmap.netmap.generic import (
    GENERIC_RX_QUEUE_LIMIT,
    GenericAdapter,
    PacketRingParams,
)
from vhostmap.netmap.host import HostStack
from vhostmap.netmap.tap import if_exists

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates namespaces and veth pairs (needs root)")

PARAMS = AllocatorParams(if_num=4, ring_num=32, ring_size=4 * 4096, buf_num=4096)
BUF = PARAMS.buf_size
MTU = 9000

# Runs inside the namespace: open an AF_PACKET socket on the peer and hand its fd back over a socketpair.
_PEER_CHILD = """
import socket, sys
fd, ifname, proto = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
s.bind((ifname, proto))
socket.send_fds(socket.socket(fileno=fd), [b"fd"], [s.fileno()])
"""


def put_frames(ring: RingView, mem: NetmapMemory, frames: Sequence[bytes]) -> None:
    """A ring user writes frames from head, one slot per BUF bytes (NS_MOREFRAG on all but the last)."""
    for f in frames:
        parts = [f[i : i + BUF] for i in range(0, len(f), BUF)]
        for k, part in enumerate(parts):
            i = ring.head
            mem.buf_view(int(ring.slots["buf_idx"][i]))[: len(part)] = np.frombuffer(part, dtype=np.uint8)
            ring.slots["len"][i] = len(part)
            ring.slots["flags"][i] = NS_MOREFRAG if k < len(parts) - 1 else 0
            ring.head = ring.cur = (i + 1) % ring.num_slots


def recv_frames(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    """Receive exactly ``count`` frames from ``sock`` before the deadline."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"received {len(out)} of {count} frames")
        out.append(sock.recv(1 << 16))
    return out


def packet_socket_in(netns: str, ifname: str, proto: int) -> socket.socket:
    """An AF_PACKET socket bound to ``ifname`` inside ``netns``, usable from this process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", _PEER_CHILD, str(theirs.fileno()), ifname]
        subprocess.run(
            [*cmd, str(proto)], pass_fds=[theirs.fileno()], check=True, capture_output=True, timeout=30
        )
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    return socket.socket(fileno=fds[0])


class Wire:
    """A veth pair: ``name`` here, ``peer`` in namespace ``netns``, and a socket on the peer (``far``)."""

    def __init__(self, name: str, peer: str, netns: str, far: socket.socket) -> None:
        self.name, self.peer, self.netns, self.far = name, peer, netns, far


@pytest.fixture
def wire() -> Iterator[Wire]:
    with Netns() as ns:
        # Set before the peer is created in the namespace, so it comes up without IPv6.
        ns.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
        with VethPair(peer_netns=ns.name) as pair:
            path = Path(f"/proc/sys/net/ipv6/conf/{pair.name}/disable_ipv6")
            if path.exists():
                path.write_text("1")
            set_up(pair.name, mtu=MTU)
            set_up(pair.peer, netns=ns.name, mtu=MTU)
            wait_transmitting(pair.name)
            wait_transmitting(pair.peer, netns=ns.name)
            with packet_socket_in(ns.name, pair.peer, ETH_P_EXPERIMENTAL) as far:
                yield Wire(pair.name, pair.peer, ns.name, far)
        assert not pair.exists
    assert not ns.exists


@pytest.fixture
def mem() -> Iterator[NetmapMemory]:
    with NetmapMemory(PARAMS) as m:
        yield m


@pytest.fixture
def make(wire: Wire, mem: NetmapMemory) -> Iterator[Callable[..., GenericAdapter]]:
    """Builds generic adapters on the wire's near end and closes them afterwards."""
    made: list[GenericAdapter] = []

    def build(**kwargs: Any) -> GenericAdapter:
        made.append(GenericAdapter("g0", mem, wire.name, **kwargs))
        return made[-1]

    yield build
    for adapter in made:
        adapter.close()


def receive(adapter: GenericAdapter, mem: NetmapMemory, frames: int) -> list[bytes]:
    """rxsync until ``frames`` frames are in the RX ring, and return them (not released)."""
    ring = adapter.rx_rings[0].ring
    sync_until(
        lambda: adapter.rxsync(0),
        lambda: len(take_frames(ring, mem)) >= frames,
        adapter.wake_fds(),
        f"{frames} frames in the RX ring",
    )
    return take_frames(ring, mem)


# --- receive ------------------------------------------------------------------------------------------------
def test_frames_sent_from_the_namespace_arrive_in_the_rx_ring_with_exact_bytes(
    wire: Wire, mem: NetmapMemory, make: Callable[..., GenericAdapter]
) -> None:
    g = make(num_desc=64)
    sent = [frame(60, 1), frame(1514, 2), frame(5000, 3)]  # the last spans three slots
    for f in sent:
        wire.far.send(f)
    assert receive(g, mem, 3) == sent
    ring = g.rx_rings[0].ring
    assert ring.tail == 5 and list(ring.slots["flags"][:5]) == [0, 0, NS_MOREFRAG, NS_MOREFRAG, 0]
    assert list(ring.slots["len"][:5]) == [60, 1514, BUF, BUF, 5000 - 2 * BUF]
    c = g.counters()
    assert (c["rx_packets"], c["rx_bytes"], c["rx_drops"], c["kernel_drops"]) == (3, 60 + 1514 + 5000, 0, 0)


def test_a_vlan_tag_the_kernel_moved_out_is_put_back(
    wire: Wire, mem: NetmapMemory, make: Callable[..., GenericAdapter]
) -> None:
    g = make(num_desc=64)
    plain = frame(100, 5)
    tagged = plain[:12] + bytes.fromhex("81006123") + plain[12:]  # PCP 3, VID 0x123
    wire.far.send(tagged)
    assert receive(g, mem, 1) == [tagged]


def test_a_full_rx_ring_queues_up_to_the_limit_then_drops_and_counts(
    wire: Wire, mem: NetmapMemory, make: Callable[..., GenericAdapter]
) -> None:
    g = make(num_desc=16, rx_queue_limit=8)
    sent = [frame(100, seq) for seq in range(40)]
    for f in sent:
        wire.far.send(f)
    s = g.stats
    sync_until(
        lambda: g.rxsync(0), lambda: s.rx_packets + g.rx_queued + s.rx_drops == 40, g.wake_fds(), "40 frames"
    )
    ring = g.rx_rings[0].ring
    assert (s.rx_packets, g.rx_queued, s.rx_drops, g.rx_rings[0].dropped) == (15, 8, 17, 17)
    assert take_frames(ring, mem) == sent[:15]
    assert select.select(g.wake_fds(), [], [], 0)[0] == []  # every block went back to the kernel
    release(ring)
    g.rxsync(0)  # the queue drains first, in order
    assert take_frames(ring, mem) == sent[15:23]
    assert (s.rx_packets, g.rx_queued, s.rx_drops) == (23, 0, 17)


def test_a_flood_beyond_the_queue_is_dropped_without_parsing_each_frame(
    wire: Wire, mem: NetmapMemory, make: Callable[..., GenericAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once ring and queue are full, an rxsync drops the rest of what the kernel handed over in one step per
    block: the frames it parses are bounded by the room there is, not by the flood."""
    g = make(num_desc=16, rx_queue_limit=8)
    parsed = 0
    offloads_done = g._offloads_done

    def counting(*args: object) -> tuple[list[bytes | memoryview], int]:
        nonlocal parsed
        parsed += 1
        return offloads_done(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(g, "_offloads_done", counting)
    for seq in range(400):
        wire.far.send(frame(100, seq))
    s = g.stats

    def accounted() -> bool:
        return s.rx_packets + g.rx_queued + s.rx_drops == 400

    sync_until(lambda: g.rxsync(0), accounted, g.wake_fds(), "400 frames")
    assert (s.rx_packets, g.rx_queued, s.rx_drops, g.rx_rings[0].dropped) == (15, 8, 377, 377)
    assert parsed == 15 + 8  # what went into the ring and the queue; none of the 377 dropped


def test_the_rx_queue_limit_defaults_to_the_seeds_1024_frames(
    wire: Wire, mem: NetmapMemory, make: Callable[..., GenericAdapter]
) -> None:
    g = make(num_desc=64)
    assert g.rx_queue_limit == GENERIC_RX_QUEUE_LIMIT == 1024
    total = 63 + 1024 + 13
    for seq in range(total):
        wire.far.send(frame(60, seq))
    s = g.stats
    sync_until(
        lambda: g.rxsync(0),
        lambda: s.rx_packets + g.rx_queued + s.rx_drops == total,
        g.wake_fds(),
        "the burst",
    )
    c = g.counters()
    assert (c["rx_packets"], c["rx_queued"], c["rx_drops"], c["kernel_drops"]) == (63, 1024, 13, 0)


# --- transmit -----------------------------------------------------------------------------------------------
def test_frames_in_the_tx_ring_come_out_of_the_peer_with_exact_bytes_and_do_not_loop_back(
    wire: Wire, mem: NetmapMemory, make: Callable[..., GenericAdapter]
) -> None:
    g = make(num_desc=64)
    sent = [frame(60, 1), frame(3000, 2), frame(MTU + 14, 3)]  # two and five slots: gathered by sendmsg
    put_frames(g.tx_rings[0].ring, mem, sent)
    g.txsync(0)
    assert recv_frames(wire.far, 3) == sent
    s = g.stats
    assert (s.tx_packets, s.tx_bytes, s.tx_drops) == (3, 60 + 3000 + MTU + 14, 0)
    kring = g.tx_rings[0]
    assert kring.nr_hwcur == 8 and kring.ring.tail == nm_prev(8, 64)  # completion is immediate

    # Our own transmissions never reach our RX ring: the reply is the first and only thing there.
    reply = frame(80, 9)
    wire.far.send(reply)
    assert receive(g, mem, 1) == [reply]
    assert g.stats.rx_packets == 1


def test_a_frame_longer_than_the_mtu_is_dropped_counted_and_logged_once(
    wire: Wire, mem: NetmapMemory, make: Callable[..., GenericAdapter], caplog: pytest.LogCaptureFixture
) -> None:
    g = make(num_desc=64)
    ring = g.tx_rings[0].ring
    with caplog.at_level(logging.WARNING, logger="vhostmap.netmap.generic"):
        for _ in range(2):
            put_frames(ring, mem, [frame(MTU + 100)])
            g.txsync(0)
    put_frames(ring, mem, [frame(100, 7)])
    g.txsync(0)
    assert recv_frames(wire.far, 1) == [frame(100, 7)]
    assert (g.stats.tx_packets, g.stats.tx_drops, g.tx_rings[0].dropped) == (1, 2, 2)
    assert g.tx_rings[0].nr_hwcur == 11  # the dropped frames' slots were reclaimed too
    [record] = caplog.records
    assert "EMSGSIZE" in record.getMessage() and record.__dict__["ifname"] == wire.name


def slow_interface(ifname: str) -> None:
    """Give ``ifname`` a token-bucket qdisc much slower than a sender: its queue and the sender's socket
    buffer fill, so sends fail with ENOBUFS or EAGAIN as on a guest NIC whose device is busy."""
    tbf = ["tbf", "rate", "20mbit", "burst", "4kb", "limit", "8kb"]
    subprocess.run(["tc", "qdisc", "add", "dev", ifname, "root", *tbf], check=True, capture_output=True)


def send_all(
    g: GenericAdapter, mem: NetmapMemory, frames: Sequence[bytes], far: socket.socket, timeout: float = 20.0
) -> list[bytes]:
    """Put ``frames`` into the TX ring as room appears and txsync, waiting for POLLOUT on the socket, until
    the ring is empty; what ``far`` received meanwhile (read as it comes: its receive buffer is small)."""
    ring = g.tx_rings[0].ring
    sent = 0
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while sent < len(frames) or ring.tail != nm_prev(ring.head, ring.num_slots):
        room = (ring.tail - ring.head) % ring.num_slots
        put_frames(ring, mem, frames[sent : sent + room])
        sent += min(room, len(frames) - sent)
        g.txsync(0)
        left = deadline - time.monotonic()
        assert left > 0, f"the interface took {sent - g.tx_rings[0].pending()} of {len(frames)} frames"
        readable, _, _ = select.select([far], [g.socket_fd], [], min(left, 0.5))
        while readable:
            got.append(far.recv(1 << 16))
            readable, _, _ = select.select([far], [], [], 0)
    return got


def test_with_backpressure_frames_the_interface_has_no_room_for_wait_in_the_ring_and_none_is_lost(
    wire: Wire, mem: NetmapMemory, make: Callable[..., GenericAdapter]
) -> None:
    g = make(num_desc=64, tx_backpressure=True)
    slow_interface(wire.name)
    sent = [frame(300, seq) for seq in range(600)]  # 1.4 Mbit: about 0.1 s at the qdisc's rate
    got = send_all(g, mem, sent, wire.far)
    assert got + recv_frames(wire.far, len(sent) - len(got)) == sent
    assert (g.stats.tx_packets, g.stats.tx_drops, g.tx_rings[0].dropped) == (len(sent), 0, 0)


def test_without_backpressure_frames_the_interface_has_no_room_for_are_dropped_and_counted(
    wire: Wire, mem: NetmapMemory, make: Callable[..., GenericAdapter]
) -> None:
    g = make(num_desc=64)
    slow_interface(wire.name)
    sent = [frame(300, seq) for seq in range(600)]
    got = send_all(g, mem, sent, wire.far)
    s = g.stats
    assert s.tx_drops > 0 and s.tx_packets + s.tx_drops == len(sent) and g.tx_rings[0].dropped == s.tx_drops
    got += recv_frames(wire.far, s.tx_packets - len(got))
    order = {f: i for i, f in enumerate(sent)}
    assert [order[f] for f in got] == sorted(order[f] for f in got)  # what went out, in order, once each


# --- lifetime -----------------------------------------------------------------------------------------------
def test_a_missing_interface_is_a_typed_error(mem: NetmapMemory) -> None:
    with pytest.raises(InterfaceError) as e:
        GenericAdapter("g0", mem, "vhmnosuchif0")
    assert (e.value.ifname, e.value.errno) == ("vhmnosuchif0", errno.ENODEV)
    assert mem.live_ifs() == []


def test_bad_ring_geometry_is_rejected() -> None:
    with pytest.raises(ValueError, match="page size"):
        PacketRingParams(block_size=5000)
    with pytest.raises(ValueError, match="frame_size"):
        PacketRingParams(frame_size=40)


def test_close_releases_the_socket_the_ring_and_the_buffers(wire: Wire, mem: NetmapMemory) -> None:
    free = mem.buf_pool.objfree
    g = GenericAdapter("g0", mem, wire.name, num_desc=64)
    fd = g.wake_fds()[0]
    # PACKET_MR_PROMISC raises the promiscuity count (ip -d), not the PROMISC flag an admin sets.
    assert "promiscuity 1 " in ip("-d", "link", "show", "dev", wire.name).stdout
    g.close()
    assert mem.buf_pool.objfree == free and mem.live_ifs() == []
    assert list(g.wake_fds()) == []
    with pytest.raises(OSError):
        os.fstat(fd)
    assert "promiscuity 0 " in ip("-d", "link", "show", "dev", wire.name).stdout
    assert if_exists(wire.name)  # the interface is not ours: it stays


# --- with host rings ----------------------------------------------------------------------------------------
def test_transparent_mode_bridges_the_interface_and_the_tap_through_ns_forward(
    wire: Wire, mem: NetmapMemory
) -> None:
    port = GenericAdapter("g0", mem, wire.name, num_desc=64)  # host rings on a TAP: a bump in the wire
    tap = unique_name("vhmb")
    try:
        stack = HostStack(port, tap, up=False)
        Path(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6").write_text("1")
        stack.tap.set_up()
        assert len(port.wake_fds()) == 2 and port.wake_fds()[1] == stack.tap.fd  # the socket, then the TAP
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_EXPERIMENTAL)) as host_side:
            host_side.bind((tap, ETH_P_EXPERIMENTAL))

            # Wire -> hardware RX ring -> (NS_FORWARD) -> the stack.
            from_wire = [frame(100, 1), frame(3000, 2)]
            for f in from_wire:
                wire.far.send(f)
            assert receive(port, mem, 2) == from_wire
            hw_rx = port.rx_rings[0].ring
            hw_rx.flags = NR_FORWARD
            hw_rx.slots["flags"][:3] |= NS_FORWARD
            release(hw_rx)
            port.rxsync(0)
            assert recv_frames(host_side, 2) == from_wire

            # The stack -> host RX ring -> (NS_FORWARD) -> hardware TX ring -> the wire.
            from_stack = frame(200, 3)
            host_side.send(from_stack)
            host_rx = port.host_rx_ring.ring
            sync_until(
                lambda: port.rxsync(1), lambda: host_rx.tail == 1, port.wake_fds(), "a frame from the stack"
            )
            host_rx.flags = NR_FORWARD
            host_rx.slots["flags"][0] |= NS_FORWARD
            release(host_rx)
            port.rxsync(1)
            assert recv_frames(wire.far, 1) == [from_stack]
        assert (stack.stats.forwarded_up, stack.stats.forwarded_down, stack.stats.forward_drops) == (2, 1, 0)
        assert (port.stats.rx_packets, port.stats.tx_packets) == (2, 1)
    finally:
        port.close()
        leaked = if_exists(tap)
        if leaked:
            ip("link", "delete", "dev", tap, check=False)
    assert not leaked


def test_tcp_from_a_peer_with_its_offloads_on_arrives_in_segments(
    wire: Wire, mem: NetmapMemory, make: Callable[..., GenericAdapter]
) -> None:
    """The namespace's stack sends TCP over the veth with TSO and checksum offload on (a veth's defaults):
    it hands over GSO frames of many segments with the checksum left to do. Without PACKET_VNET_HDR they
    arrived whole (too big for any guest); now the ring gets MTU-sized segments with correct checksums."""
    g = make(num_desc=512)
    ip("addr", "add", "10.77.0.1/24", "dev", wire.name)
    ip("addr", "add", "10.77.0.2/24", "dev", wire.peer, netns=wire.netns)
    with socket.create_server(("10.77.0.1", 0)) as server:
        port = server.getsockname()[1]
        send = f"import socket; s = socket.create_connection(('10.77.0.1', {port})); s.sendall(bytes(200000))"
        client = subprocess.Popen(["ip", "netns", "exec", wire.netns, sys.executable, "-c", send])
        conn, _ = server.accept()
        with conn:
            got = 0
            while got < 200000:
                got += len(conn.recv(1 << 16))
        assert client.wait(30) == 0
    ring = g.rx_rings[0].ring
    sync_until(lambda: g.rxsync(0), lambda: g.stats.rx_offloaded > 0, g.wake_fds(), "a GSO frame completed")
    frames = take_frames(ring, mem)
    tcp = [Ether(f) for f in frames if Ether(f).haslayer(TCP) and len(Ether(f)[TCP].payload)]
    assert tcp and all(len(f) <= 14 + MTU for f in frames)
    for pkt in tcp:
        fresh = pkt.copy()
        fresh[IP].chksum = fresh[TCP].chksum = None
        assert bytes(fresh) == bytes(pkt), "a segment's checksums are wrong"
    assert g.stats.rx_bad_header == 0
