"""Offloads that travel with the frame (NS_VNET_HDR): a guest's checksum and segmentation requests reach a
guest that negotiated the receive offloads as they were sent, header and 64 KiB frame unchanged, through a
link and through a switch, with both datapaths, and reach the host stack through a generic port or a TAP the
same way; a guest that does not take them gets the frame completed for it on the way out, its segments whole
or not at all, while the others still get it whole (VALE's mismatch path); a switch with a port that neither
takes nor completes them (an application that did not ask for the header) completes them for everyone."""

from __future__ import annotations

import select
import socket
import time
from dataclasses import astuple

import numpy as np
import pytest
from daemons import RunningDaemon, StartDaemon
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from test_offload_ingress import OFFLOADING, gso
from test_pktgen import control_path
from test_switch_daemon import needs_root

from vhostmap.apps import client
from vhostmap.control.client import ControlError
from vhostmap.lab.frontend import FakeFrontend
from vhostmap.lab.netns import VethPair
from vhostmap.netmap.abi import NS_MOREFRAG, NS_VNET_HDR
from vhostmap.netmap.offload import VnetHeader, complete
from vhostmap.vhost_user.device import GUEST_OFFLOADS
from vhostmap.virtio.spec import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4

pytestmark = pytest.mark.usefixtures("datapath")

ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_VNET_HDR = 263, 15

# A driver that sends and takes every offload (Linux with its defaults, USO included).
TAKING = OFFLOADING | GUEST_OFFLOADS


@pytest.mark.parametrize("l3,l4", [("4", "tcp"), ("6", "tcp"), ("4", "udp")])
@pytest.mark.parametrize("via", ["link", "switch"])
def test_an_offloaded_frame_reaches_a_guest_that_takes_it_unchanged(
    start_daemon: StartDaemon, via: str, l3: str, l4: str
) -> None:
    topology = {"links": ["a,b"]} if via == "link" else {"switches": ["vale0=a,b"]}
    d = start_daemon({"a": "", "b": ""}, **topology)  # type: ignore[arg-type]
    fa, fb = d.frontend("a", features=TAKING), d.frontend("b", features=TAKING)
    h, frame = gso(l3, l4, 40000, 1448)
    fb.post_receive_buffers(16)
    fa.transmit([frame], header=h.pack())
    [(header, got)] = fb.receive_with_headers(1)
    assert got == frame
    assert header[:6] == (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset)
    assert header[6] == -(-(len(frame) + 12) // 4096)  # num_buffers: the 4 KiB buffers it filled
    a = d.stats("a")["queues"][0]
    assert (a["rx_packets"], a["rx_bytes"], a["rx_offload_passed"], a["rx_offloaded"]) == (
        1,
        len(frame),
        1,
        0,
    )
    b = d.stats("b")["queues"][0]
    assert (b["tx_packets"], b["tx_bytes"], b["tx_dropped"]) == (1, len(frame), 0)


def to_a_guest_without_offloads(
    start_daemon: StartDaemon, payload: int
) -> tuple[RunningDaemon, FakeFrontend, FakeFrontend, VnetHeader, bytes, list[bytes]]:
    """a (which takes every offload) linked to b (which takes none), a TCP frame of ``payload`` bytes with
    its header for a to send, and the segments b should get."""
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a", features=TAKING), d.frontend("b", features=OFFLOADING)
    h, frame = gso("4", "tcp", payload, 1448)
    return d, fa, fb, h, frame, complete(h, frame, 4096, 1 << 18)


def test_a_guest_that_takes_no_offload_gets_the_segments(start_daemon: StartDaemon) -> None:
    d, fa, fb, h, frame, want = to_a_guest_without_offloads(start_daemon, 40000)
    fb.post_receive_buffers(len(want))
    fa.transmit([frame], header=h.pack())
    got = fb.receive_with_headers(len(want))
    assert [f for _, f in got] == want
    assert all(hdr[:6] == (0,) * 6 for hdr, _ in got)
    # Completed on the way out, for b alone (VALE's mismatch path): a's frame left whole.
    assert d.stats("a")["queues"][0]["rx_offload_passed"] == 1
    b = d.stats("b")["queues"][0]
    assert (b["tx_offloaded"], b["tx_packets"], b["tx_dropped"]) == (1, len(want), 0)


def test_segments_wait_whole_for_receive_buffers(start_daemon: StartDaemon) -> None:
    """A frame completed for a guest goes in all its segments or waits: never half of it."""
    d, fa, fb, h, frame, want = to_a_guest_without_offloads(start_daemon, 20000)
    fb.post_receive_buffers(len(want) - 1)
    fa.transmit([frame], header=h.pack())
    d.wait(lambda: d.stats("a")["queues"][0]["rx_packets"] == 1, "a's frame to be taken")
    assert fb.used(fb.queues[0]) == []  # not one segment delivered
    fb.post_receive_buffers(1)
    assert fb.receive(len(want)) == want


def test_a_switch_passes_or_completes_per_destination(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": "", "c": ""}, switches=["vale0=a,b,c"])
    fa, fb = d.frontend("a", features=TAKING), d.frontend("b", features=TAKING)
    fc = d.frontend("c", features=OFFLOADING)  # takes none
    h, frame = gso("6", "tcp", 20000, 1448)
    want = complete(h, frame, 4096, 1 << 18)
    for f in (fb, fc):
        f.post_receive_buffers(len(want))
    fa.transmit([frame], header=h.pack())  # to an address nobody has sent from: flooded
    assert fb.receive(1) == [frame]  # whole, as b takes it
    assert fc.receive(len(want)) == want  # segmented for c
    assert d.stats("a")["queues"][0]["rx_offload_passed"] == 1
    assert d.stats("c")["queues"][0]["tx_offloaded"] == 1


GUEST_MAC = "52:54:00:00:00:0a"


@pytest.mark.parametrize("takes", [True, False], ids=["takes", "takes-none"])
def test_a_tso_source_sends_64k_frames_whole_or_in_mtu_segments(
    start_daemon: StartDaemon, takes: bool
) -> None:
    """generate= beyond the MTU: 64000-byte TCP frames asking for segmentation into 1460-byte segments and the
    checksum, as a guest with TSO sends them; a guest that takes TSO gets them whole, one that does not gets
    44 correct segments of each."""
    d = start_daemon({"a": f"generate=64000,mac={GUEST_MAC}"})
    fa = d.frontend("a", features=TAKING if takes else OFFLOADING)
    if takes:
        fa.post_receive_buffers(16)  # 4 KiB each: one frame
        [(header, got)] = fa.receive_with_headers(1)
        assert header[:6] == (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1460, 34, 16)
        pkt = Ether(got)
        assert (len(got), pkt.dst, pkt[IP].len, pkt[IP].proto) == (64000, GUEST_MAC, 64000 - 14, 6)
        assert d.stats("a")["queues"][0]["tx_offloaded"] == 0
        return
    fa.post_receive_buffers(44)
    segments = [Ether(f) for f in fa.receive(44)]
    assert sum(len(s[TCP].payload) for s in segments) == 64000 - 54
    for k, seg in enumerate(segments):
        assert len(seg) <= 1514 and seg[TCP].seq == 1 + 1460 * k
        fresh = seg.copy()
        fresh[IP].chksum = fresh[TCP].chksum = None
        assert bytes(fresh) == bytes(seg), f"segment {k}: wrong checksums"
    assert d.stats("a")["queues"][0]["tx_offloaded"] == 1


def receive_large(sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    """The first frame of at least ``size`` bytes ``sock`` receives (the stack may send small ones)."""
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no frame of {size} bytes or more within {timeout} s")
        data = sock.recv(1 << 17)
        if len(data) >= size:
            return data


def sniffer(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.htons(ETH_P_ALL))
    s.bind((ifname, ETH_P_ALL))
    return s


@needs_root
@pytest.mark.parametrize("via", ["generic", "host"])
def test_the_host_stack_gets_the_offloaded_frame_whole(
    start_daemon: StartDaemon, veth: VethPair, tap: str, via: str
) -> None:
    """Through a generic port (PACKET_VNET_HDR) and through host rings (a TAP with IFF_VNET_HDR), the stack
    takes the 64 KiB frame and its header as they are: a packet socket on the far side sees it unsegmented."""
    if via == "generic":
        d = start_daemon({"a": ""}, links=["a,up"], other_ports=[f"up=generic,ifname={veth.name}"])
        far = veth.peer
    else:
        d = start_daemon({"a": f"host={tap}"})
        far = tap
    fa = d.frontend("a", features=TAKING)
    h, frame = gso("4", "tcp", 40000, 1448)
    with sniffer(far) as s:
        fa.transmit([frame], header=h.pack())
        assert receive_large(s, len(frame)) == frame
    a = d.stats("a")["queues"][0]
    assert (a["rx_offload_passed"], a["rx_offloaded"]) == (1, 0)


def stack_sender(ifname: str) -> socket.socket:
    """A packet socket on ``ifname`` that sends frames after a virtio-net header (PACKET_VNET_HDR): the
    stack makes a GSO frame of what it is given, as its TCP does with TSO on."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.bind((ifname, 0))
    return s


@needs_root
@pytest.mark.parametrize("takes", [True, False], ids=["takes", "takes-none"])
@pytest.mark.parametrize("via", ["generic", "host", "switch"])
def test_the_host_stacks_offloaded_frame_reaches_a_guest_whole_or_in_segments(
    start_daemon: StartDaemon, veth: VethPair, tap: str, via: str, takes: bool
) -> None:
    """A 64 KiB GSO frame from the stack, through a generic port (a link), a TAP (host rings) or host rings
    on a switch, keeps its header on the way in (NS_VNET_HDR): a guest that takes the offloads gets it as
    the stack sent it, one that does not gets its segments, completed on the way out."""
    if via == "generic":
        d = start_daemon({"a": ""}, links=["a,up"], other_ports=[f"up=generic,ifname={veth.name}"])
        far = veth.peer
    else:
        d = start_daemon({"a": f"host={tap}"}, switches=["vale0=a"] if via == "switch" else [])
        far = tap
    fa = d.frontend("a", features=TAKING if takes else OFFLOADING)
    h, frame = gso("4", "tcp", 40000, 1448)
    want = [frame] if takes else complete(h, frame, 4096, 1 << 18)
    fa.post_receive_buffers(max(len(want), 16))  # 4 KiB each: the whole frame takes 10
    with stack_sender(far) as s:
        s.send(h.legacy() + frame)
    got = fa.receive_with_headers(len(want))
    assert [f for _, f in got] == want
    if takes:
        [(header, _)] = got
        # What the stack sends with it: its own hdr_len (the frame's linear part), the rest as given.
        kept = (header[0], header[1], header[3], header[4], header[5])
        assert kept == (h.flags, h.gso_type, h.gso_size, h.csum_start, h.csum_offset)
    else:
        assert all(hdr[:6] == (0,) * 6 for hdr, _ in got)
    stack = d.stats("up")["generic"] if via == "generic" else d.stats("a")["host"]
    assert (stack["rx_offload_passed"], stack["rx_offloaded"], stack["rx_bad_header"]) == (1, 0, 0)
    assert d.stats("a")["queues"][0]["tx_offloaded"] == (0 if takes else 1)


def app_receive(port: client.ClientPort, frames: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    """``frames`` frames from the application's RX ring: the flags of each frame's first slot, its bytes."""
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    ring = port.rx_rings[0]
    while len(out) < frames:
        if not port.poll(client.POLLIN, max(0.0, deadline - time.monotonic())):
            raise AssertionError(f"received {len(out)} of {frames} frames")
        got = ring.receive()
        ends = np.flatnonzero((got.flags & NS_MOREFRAG) == 0) + 1
        if not ends.size:
            continue  # the rest of a frame is on its way
        starts = [0, *ends[:-1].tolist()]
        out += [(int(got.flags[s]), f) for s, f in zip(starts, got.frames(), strict=False)]
        ring.advance(int(ends[-1]))
    return out


def app_send(port: client.ClientPort, data: bytes, flags: int) -> None:
    """Send ``data`` as one frame over as many slots as it takes, ``flags`` on the first."""
    ring = port.tx_rings[0]
    size = ring.buf_size
    pieces = [data[k : k + size] for k in range(0, len(data), size)]
    assert ring.space() >= len(pieces)
    for k, piece in enumerate(pieces):
        i = (ring.cur + k) % ring.num_slots
        ring.buffers[ring.slots["buf_idx"][i], : len(piece)] = np.frombuffer(piece, np.uint8)
        ring.slots["len"][i] = len(piece)
        ring.slots["flags"][i] = (flags if k == 0 else 0) | (NS_MOREFRAG if k + 1 < len(pieces) else 0)
    ring.advance(len(pieces))
    port.txsync()


def test_an_application_that_asks_for_the_header_gets_and_sends_offloaded_frames(
    start_daemon: StartDaemon,
) -> None:
    """A switch port opened with vnet_hdr (netmap's NETMAP_REQ_PORT_HDR_SET): the guest's 64 KiB frame
    arrives whole after its header; what the application sends with NS_VNET_HDR reaches the guest that way;
    and an application that did not ask makes the switch complete offloads for everyone."""
    d = start_daemon({"a": ""}, switches=["vale0=a"])
    path = control_path(d)
    fa = d.frontend("a", features=TAKING)
    h, frame = gso("6", "tcp", 30000, 1448)
    with client.open("vale0:app", path, vnet_hdr=True) as app:
        fa.transmit([frame], header=h.pack())
        [(flags, got)] = app_receive(app, 1)
        assert flags & NS_VNET_HDR and got == h.pack() + frame
        fb_header, back = gso("4", "tcp", 20000, 1000)
        fa.post_receive_buffers(16)
        app_send(app, fb_header.pack() + back, NS_VNET_HDR)
        [(header, arrived)] = fa.receive_with_headers(1)
        assert arrived == back and header[:6] == astuple(fb_header)
        with client.open("vale0:plain", path) as plain:
            d.wait(lambda: d.device("a").vqs[1].pass_offloads == 0, "the switch to stop passing offloads")
            fa.transmit([frame], header=h.pack())
            want = complete(h, frame, 4096, 1 << 18)
            assert [f for _, f in app_receive(app, len(want))] == want
            assert [f for _, f in app_receive(plain, len(want))] == want


def test_an_application_on_a_port_a_switch_let_go_gets_plain_frames(start_daemon: StartDaemon) -> None:
    """A port detached from a switch where every port took offloads, then opened by an application: the
    guest's frames are completed for it, never left with a header it did not ask for."""
    d = start_daemon({"a": "", "b": ""}, switches=["vale0=a,b"])
    fa = d.frontend("a", features=TAKING)
    d.frontend("b", features=TAKING)
    d.wait(lambda: d.device("a").vqs[1].pass_offloads != 0, "the switch to let a's frames keep offloads")
    d.daemon.detach("vale0", "a")
    h, frame = gso("4", "tcp", 20000, 1448)
    with client.open("a", control_path(d)) as app:
        fa.transmit([frame], header=h.pack())
        want = complete(h, frame, 4096, 1 << 18)
        got = app_receive(app, len(want))
    assert [f for _, f in got] == want and not any(flags & NS_VNET_HDR for flags, _ in got)


def test_only_switch_ports_carry_the_header(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": ""})
    with pytest.raises(ControlError, match="switch ports"):
        client.open("a", control_path(d), vnet_hdr=True)
