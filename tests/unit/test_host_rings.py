"""Host rings on a TAP: host TX -> stack, stack -> host RX (bounded), TAP lifetime, transparent mode.

The "host stack" side of every test is an AF_PACKET socket bound to the TAP: what it sends the kernel queues
to the TAP (our host RX), what we write to the TAP it receives. IPv6 is off on the TAP so that the kernel
sends nothing of its own and every count is exact. Tests that open TAPs need root.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from ringuser import ETH_P_EXPERIMENTAL, frame, release, sync_until, take_frames

from vhostmap.lab.netns import ip, unique_name
from vhostmap.netmap.abi import NR_FORWARD, NS_FORWARD, NS_MOREFRAG, RingView, nm_prev
from vhostmap.netmap.adapter import LoopbackAdapter
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.errors import TapError
from vhostmap.netmap.frames import RxFill, SlotFrames
from vhostmap.netmap.host import HostStack
from vhostmap.netmap.kring import Kring
from vhostmap.netmap.tap import TapDevice, if_exists, link_is_up

PARAMS = AllocatorParams(if_num=4, ring_num=32, ring_size=4096, buf_num=1024)
BUF = PARAMS.buf_size
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates TAP devices (needs root)")


# A loopback port: what TX ring i sends comes back on RX ring i; its host rings are bound by a HostStack.
Port = LoopbackAdapter


def put_frames(ring: RingView, mem: NetmapMemory, frames: Sequence[bytes], *, flags: int = 0) -> None:
    """A ring user writes frames from head, one slot per BUF bytes (NS_MOREFRAG on all but the last)."""
    for f in frames:
        parts = [f[i : i + BUF] for i in range(0, len(f), BUF)]
        for k, part in enumerate(parts):
            i = ring.head
            mem.buf_view(int(ring.slots["buf_idx"][i]))[: len(part)] = np.frombuffer(part, dtype=np.uint8)
            ring.slots["len"][i] = len(part)
            ring.slots["flags"][i] = flags | (NS_MOREFRAG if k < len(parts) - 1 else 0)
            ring.head = ring.cur = (i + 1) % ring.num_slots


def recv_frames(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    """Receive exactly ``count`` frames from ``sock`` before the deadline."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([sock], [], [], max(0.0, left))
        if not ready:
            raise AssertionError(f"received {len(out)} of {count} frames")
        out.append(sock.recv(1 << 16))
    return out


def disable_ipv6(ifname: str) -> None:
    """No router solicitations or MLD reports: the kernel then sends nothing of its own on ``ifname``."""
    path = Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
    if path.exists():
        path.write_text("1")


@pytest.fixture
def mem() -> Iterator[NetmapMemory]:
    with NetmapMemory(PARAMS) as m:
        yield m


def make_stack(port: Port, name: str, *, create: bool = True) -> HostStack:
    """A host stack on TAP ``name``, with IPv6 off before the link goes up and room for jumbo frames."""
    stack = HostStack(port, name, create=create, up=False)
    disable_ipv6(stack.name)
    ip("link", "set", "dev", stack.name, "mtu", "9000")
    stack.tap.set_up()
    return stack


@pytest.fixture
def port(mem: NetmapMemory) -> Iterator[Port]:
    """A loopback port with 16-slot rings and host rings bound to a fresh TAP, deleted afterwards."""
    p = Port("p0", mem, num_desc=16)
    name = unique_name("vhmh")
    try:
        make_stack(p, name)
        yield p
    finally:
        p.close()
        leaked = if_exists(name)
        if leaked:
            ip("link", "delete", "dev", name, check=False)
    assert not leaked, f"closing the port left TAP {name} behind"


@pytest.fixture
def stack_sock(port: Port) -> Iterator[socket.socket]:
    """The host stack's end: an AF_PACKET socket on the TAP that sees only our test frames."""
    s = socket.socket(
        socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.htons(ETH_P_EXPERIMENTAL)
    )
    with s:
        s.bind((stack_of(port).name, ETH_P_EXPERIMENTAL))
        yield s


def stack_of(port: Port) -> HostStack:
    assert isinstance(port.host_port, HostStack)
    return port.host_port


HOST = 1  # ring index of the host rings of a one-ring-pair port


# --- slot <-> frame helpers (no root needed) ----------------------------------------------------------------
def test_slot_frames_groups_morefrag_runs_and_holds_an_unfinished_frame(mem: NetmapMemory) -> None:
    p = LoopbackAdapter("p0", mem, num_desc=16)
    kring = p.tx_rings[0]
    ring = kring.ring
    put_frames(ring, mem, [frame(60), frame(3000), frame(100)])
    ring.slots["flags"][3] = NS_MOREFRAG  # the last frame is not finished yet
    frames = SlotFrames(kring, mem, 0, 4)
    assert (frames.starts, frames.ends, frames.slots) == ([0, 1], [1, 3], 3)
    assert frames.lengths == [60, 3000] and frames.valid == [True, True]
    assert b"".join(bytes(v) for v in frames.payload(1)) == frame(3000)
    ring.slots["buf_idx"][1] = mem.nbufs  # a user's nonsense makes its frame invalid, nothing else
    bad = SlotFrames(kring, mem, 0, 4)
    assert bad.valid == [True, False]
    with pytest.raises(ValueError):
        bad.payload(1)
    p.close()


def test_rx_fill_spans_slots_and_stops_at_buffer_zero_quietly(
    mem: NetmapMemory, caplog: pytest.LogCaptureFixture
) -> None:
    p = LoopbackAdapter("p0", mem, num_desc=8)
    kring = p.rx_rings[0]
    kring.ring.slots["buf_idx"][4] = 0  # what ring_reinit leaves: "no buffer here"
    with caplog.at_level(logging.WARNING):
        fill = RxFill(kring, mem)
    assert fill.room == 4 and not caplog.records
    assert fill.put(frame(3000)) and fill.put(frame(60))
    assert not fill.put(frame(5000))  # three slots, two left: nothing changes
    assert kring.nr_hwtail == 0 and fill.room == 1  # slots are published once per batch
    fill.close()
    assert kring.nr_hwtail == 3
    assert list(kring.ring.slots["len"][:3]) == [BUF, 3000 - BUF, 60]
    assert list(kring.ring.slots["flags"][:3]) == [NS_MOREFRAG, 0, 0]
    kring.ring.slots["buf_idx"][3] = mem.nbufs + 7  # garbage, not "no buffer": the ring is reinitialised
    with caplog.at_level(logging.WARNING):
        assert RxFill(kring, mem).room == 0
    assert kring.reinits == 1 and "buf_idx" in caplog.text
    p.close()


def test_host_rings_without_a_host_port_drop_what_is_sent_and_receive_nothing(mem: NetmapMemory) -> None:
    p = Port("p0", mem, num_desc=8)
    assert p.host_port is None
    put_frames(p.host_tx_ring.ring, mem, [frame(60), frame(3000)])
    p.txsync(HOST)
    assert p.host_tx_ring.dropped == 2 and p.host_tx_ring.nr_hwcur == 3
    p.rxsync(HOST)
    assert p.host_rx_ring.ring.tail == 0
    assert list(p.wake_fds()) == []
    p.close()


class RecordingHostPort:
    """A host port that records what the adapter asks of it."""

    name = "recorder"

    def __init__(self, adapter: LoopbackAdapter) -> None:
        self.adapter = adapter
        self.calls: list[str] = []
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)
        adapter.host_port = self

    def txsync(self, kring: Kring, flags: int) -> None:
        self.calls.append(f"txsync {kring.name}")
        kring.nr_hwcur = kring.rhead
        kring.nr_hwtail = nm_prev(kring.nr_hwcur, kring.nkr_num_slots)

    def rxsync(self, kring: Kring, flags: int) -> None:
        self.calls.append(f"rxsync {kring.name}")
        kring.nr_hwcur = kring.rhead

    def send_up(self, kring: Kring) -> int:
        self.calls.append(f"send_up {kring.name} {kring.pending()}")
        return 0

    def wake_fds(self) -> Sequence[int]:
        return [self.fd]

    def close(self) -> None:
        self.calls.append("close")
        os.close(self.fd)


def test_the_adapter_delegates_its_host_rings_wake_fds_and_close_to_its_host_port(mem: NetmapMemory) -> None:
    p = Port("p0", mem, num_desc=8)
    hp = RecordingHostPort(p)
    assert list(p.wake_fds()) == [hp.fd]
    put_frames(p.host_tx_ring.ring, mem, [frame(60)])
    p.txsync(HOST)
    p.rxsync(HOST)
    assert p.host_tx_ring.dropped == 0
    # Transparent mode: a hardware RX ring with NR_FORWARD hands the slots being released to the host port.
    put_frames(p.tx_rings[0].ring, mem, [frame(60), frame(60)])
    p.txsync(0)
    p.rxsync(0)
    hw_rx = p.rx_rings[0].ring
    release(hw_rx)
    p.rxsync(0)  # no NR_FORWARD: nothing goes up
    put_frames(p.tx_rings[0].ring, mem, [frame(60)])
    p.txsync(0)
    p.rxsync(0)
    hw_rx.flags = NR_FORWARD
    release(hw_rx)
    p.rxsync(0)
    p.close()
    assert hp.calls == ["txsync p0 host TX", "rxsync p0 host RX", "send_up p0 RX0 1", "close"]
    assert p.host_port is None


# --- TAP lifetime -------------------------------------------------------------------------------------------
@needs_root
def test_a_tap_we_create_is_deleted_on_close_and_one_we_attach_to_is_left(mem: NetmapMemory) -> None:
    created, existing = unique_name("vhmc"), unique_name("vhme")
    ip("tuntap", "add", "dev", existing, "mode", "tap")
    try:
        a, b = Port("a", mem, num_desc=8), Port("b", mem, num_desc=8)
        sa = HostStack(a, created)
        sb = HostStack(b, existing, create=False)
        assert (sa.tap.created, sb.tap.created) == (True, False)
        assert link_is_up(created) and link_is_up(existing)
        assert list(a.wake_fds()) == [sa.tap.fd]
        with pytest.raises(ValueError, match="already bound"):
            HostStack(a, unique_name("vhmx"))
        a.close()
        b.close()
        assert a.host_port is None and sa.tap.closed
        assert not if_exists(created)
        assert if_exists(existing)
    finally:
        for name in (created, existing):
            if if_exists(name):
                ip("link", "delete", "dev", name, check=False)


@needs_root
def test_attaching_to_a_missing_tap_or_a_tun_is_a_typed_error(mem: NetmapMemory) -> None:
    missing, tun = unique_name("vhmm"), unique_name("vhmu")
    with pytest.raises(TapError) as e:
        TapDevice.open(missing, create=False)
    assert (e.value.ifname, e.value.errno) == (missing, errno.ENODEV) and not if_exists(missing)
    ip("tuntap", "add", "dev", tun, "mode", "tun")
    try:
        p = Port("p", mem, num_desc=8)
        with pytest.raises(TapError) as e:
            HostStack(p, tun)
        assert e.value.ifname == tun and p.host_port is None
        p.close()
    finally:
        ip("link", "delete", "dev", tun, check=False)


# --- host TX: ring -> stack ---------------------------------------------------------------------------------
@needs_root
def test_frames_in_the_host_tx_ring_appear_on_the_tap_with_exact_bytes(
    port: Port, mem: NetmapMemory, stack_sock: socket.socket
) -> None:
    sent = [frame(60, 1), frame(3000, 2), frame(1514, 3)]  # the second spans two slots
    ring = port.host_tx_ring.ring
    put_frames(ring, mem, sent)
    port.txsync(HOST)
    assert recv_frames(stack_sock, 3) == sent
    s = stack_of(port).stats
    assert (s.tx_packets, s.tx_bytes, s.tx_drops) == (3, 60 + 3000 + 1514, 0)
    kring = port.host_tx_ring
    assert kring.nr_hwcur == 4 and ring.tail == nm_prev(4, 16)  # every slot written is reclaimed at once


@needs_root
def test_an_unfinished_frame_waits_for_its_last_slot(
    port: Port, mem: NetmapMemory, stack_sock: socket.socket
) -> None:
    ring = port.host_tx_ring.ring
    whole = frame(3000, 7)
    put_frames(ring, mem, [whole])
    ring.head = ring.cur = 1  # only the first of its two slots is handed over
    port.txsync(HOST)
    assert stack_of(port).stats.tx_packets == 0 and port.host_tx_ring.nr_hwcur == 0
    ring.head = ring.cur = 2
    port.txsync(HOST)
    assert recv_frames(stack_sock, 1) == [whole]
    assert stack_of(port).stats.tx_packets == 1 and port.host_tx_ring.nr_hwcur == 2


@needs_root
def test_an_unfinished_frame_that_fills_the_whole_ring_is_dropped(port: Port, mem: NetmapMemory) -> None:
    ring = port.host_tx_ring.ring
    put_frames(ring, mem, [frame(60, seq) for seq in range(15)])
    ring.slots["flags"][:15] = NS_MOREFRAG  # 15 fragments, no end: the user can never finish this frame
    port.txsync(HOST)
    s = stack_of(port).stats
    assert (s.tx_packets, s.tx_drops, port.host_tx_ring.nr_hwcur) == (0, 1, 15)


@needs_root
def test_writes_to_a_tap_that_is_down_are_dropped_counted_and_logged_once(
    port: Port, mem: NetmapMemory, caplog: pytest.LogCaptureFixture
) -> None:
    stack_of(port).tap.set_up(False)
    ring = port.host_tx_ring.ring
    with caplog.at_level(logging.WARNING, logger="vhostmap.netmap.host"):
        for seq in range(3):
            put_frames(ring, mem, [frame(60, seq)])
            port.txsync(HOST)
    s = stack_of(port).stats
    assert (s.tx_packets, s.tx_drops, port.host_tx_ring.dropped) == (0, 3, 3)
    assert port.host_tx_ring.nr_hwcur == 3  # dropped slots are reclaimed too: nothing blocks
    [record] = caplog.records
    assert "EIO" in record.getMessage() and record.__dict__["port"] == "p0"


# --- host RX: stack -> ring ---------------------------------------------------------------------------------
@needs_root
def test_frames_the_stack_sends_arrive_in_the_host_rx_ring_with_exact_bytes(
    port: Port, mem: NetmapMemory, stack_sock: socket.socket
) -> None:
    sent = [frame(60, 1), frame(5000, 2), frame(1514, 3)]  # the second spans three slots
    for f in sent:
        stack_sock.send(f)
    ring = port.host_rx_ring.ring
    sync_until(lambda: port.rxsync(HOST), lambda: ring.tail == 5, port.wake_fds(), "5 slots in host RX")
    assert take_frames(ring, mem) == sent
    assert list(ring.slots["flags"][:5]) == [0, NS_MOREFRAG, NS_MOREFRAG, 0, 0]
    s = stack_of(port).stats
    assert (s.rx_packets, s.rx_bytes, s.rx_drops) == (3, 60 + 5000 + 1514, 0)


@needs_root
def test_a_full_host_rx_ring_drops_and_counts_and_the_tap_is_drained(
    port: Port, mem: NetmapMemory, stack_sock: socket.socket
) -> None:
    sent = [frame(100, seq) for seq in range(20)]
    for f in sent:
        stack_sock.send(f)
    s = stack_of(port).stats
    sync_until(
        lambda: port.rxsync(HOST), lambda: s.rx_packets + s.rx_drops == 20, port.wake_fds(), "20 frames"
    )
    ring = port.host_rx_ring.ring
    assert (s.rx_packets, s.rx_drops, port.host_rx_ring.dropped) == (15, 5, 5)  # 16 slots, one stays empty
    assert take_frames(ring, mem) == sent[:15]
    assert select.select(port.wake_fds(), [], [], 0)[0] == []  # nothing left behind to wake a poller
    release(ring)
    stack_sock.send(frame(100, 99))
    sync_until(lambda: port.rxsync(HOST), lambda: s.rx_packets == 16, port.wake_fds(), "one more frame")
    assert take_frames(ring, mem) == [frame(100, 99)]


# --- transparent mode ---------------------------------------------------------------------------------------
@needs_root
def test_transparent_mode_passes_ns_forward_frames_host_to_nic_and_nic_to_host(
    port: Port, mem: NetmapMemory, stack_sock: socket.socket
) -> None:
    host_rx, hw_rx = port.host_rx_ring.ring, port.rx_rings[0].ring
    up, kept, jumbo = frame(200, 1), frame(300, 2), frame(3000, 3)
    for f in (up, kept, jumbo):
        stack_sock.send(f)
    sync_until(
        lambda: port.rxsync(HOST), lambda: host_rx.tail == 4, port.wake_fds(), "3 frames from the stack"
    )

    # The user forwards the first and third frame (every slot of the 2-slot jumbo) and keeps the second.
    host_rx.flags = NR_FORWARD
    host_rx.slots["flags"][[0, 2, 3]] |= NS_FORWARD
    release(host_rx)
    port.rxsync(HOST)
    s = stack_of(port).stats
    assert (s.forwarded_down, s.forward_drops) == (2, 0)
    assert port.tx_rings[0].ring.head == 3  # moved as a user would: head advanced, then txsynced

    # The loopback port brings them back on its hardware RX ring, zero copy and whole.
    port.rxsync(0)
    assert take_frames(hw_rx, mem) == [up, jumbo]
    assert list(hw_rx.slots["flags"][:3] & NS_MOREFRAG) == [0, NS_MOREFRAG, 0]

    # NIC -> host: the jumbo goes back up to the stack; the other frame is released without NS_FORWARD.
    hw_rx.flags = NR_FORWARD
    hw_rx.slots["flags"][[1, 2]] |= NS_FORWARD
    release(hw_rx)
    port.rxsync(0)
    assert recv_frames(stack_sock, 1) == [jumbo]
    assert (s.forwarded_up, s.tx_packets, s.tx_bytes) == (1, 1, 3000)
    assert not (hw_rx.slots["flags"][:3] & NS_FORWARD).any()  # cleared, as netmap_grab_packets does


@needs_root
def test_ns_forward_is_ignored_on_a_ring_without_nr_forward(
    port: Port, mem: NetmapMemory, stack_sock: socket.socket
) -> None:
    host_rx = port.host_rx_ring.ring
    stack_sock.send(frame(100))
    sync_until(
        lambda: port.rxsync(HOST), lambda: host_rx.tail == 1, port.wake_fds(), "a frame from the stack"
    )
    host_rx.slots["flags"][0] |= NS_FORWARD
    release(host_rx)
    port.rxsync(HOST)
    assert stack_of(port).stats.forwarded_down == 0 and port.tx_rings[0].ring.head == 0

    put_frames(port.tx_rings[0].ring, mem, [frame(80)])
    port.txsync(0)
    port.rxsync(0)
    hw_rx = port.rx_rings[0].ring
    hw_rx.slots["flags"][0] |= NS_FORWARD
    release(hw_rx)
    port.rxsync(0)
    assert stack_of(port).stats.forwarded_up == 0 and stack_of(port).stats.tx_packets == 0


@needs_root
def test_forwarding_to_full_tx_rings_drops_and_counts(
    port: Port, mem: NetmapMemory, stack_sock: socket.socket
) -> None:
    tx = port.tx_rings[0].ring
    tx.head = tx.cur = tx.tail  # the user holds every free TX slot (filled, not yet handed over)
    host_rx = port.host_rx_ring.ring
    for seq in range(2):
        stack_sock.send(frame(100, seq))
    sync_until(
        lambda: port.rxsync(HOST), lambda: host_rx.tail == 2, port.wake_fds(), "2 frames from the stack"
    )
    host_rx.flags = NR_FORWARD
    host_rx.slots["flags"][:2] |= NS_FORWARD
    release(host_rx)
    port.rxsync(HOST)
    s = stack_of(port).stats
    assert (s.forwarded_down, s.forward_drops) == (0, 2)
    assert port.host_rx_ring.nr_hwcur == 2  # released all the same, as netmap does
