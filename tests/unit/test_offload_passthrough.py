"""Offloads that travel with the frame (NS_VNET_HDR): a guest's checksum and segmentation requests reach a
guest that negotiated the receive offloads as they were sent, header and 64 KiB frame unchanged, through a
link and through a switch, with both datapaths; a switch with a port that does not take them completes them
for everyone (a flood may reach any port), and a driver that takes none gets plain frames."""

from __future__ import annotations

import pytest
from test_offload_ingress import OFFLOADING, gso, wire

from conftest import StartDaemon
from vhostmap.netmap.offload import complete
from vhostmap.virtio.spec import (
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6,
    bit,
)

pytestmark = pytest.mark.usefixtures("datapath")

# A driver that sends and takes every offload (Linux with its defaults, USO included).
TAKING = (
    OFFLOADING
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_USO4)
    | bit(VIRTIO_NET_F_GUEST_USO6)
)


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
    fa.transmit([frame], header=wire(h))
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


def test_a_guest_that_takes_no_offload_gets_the_segments(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a", features=TAKING), d.frontend("b", features=OFFLOADING)
    h, frame = gso("4", "tcp", 40000, 1448)
    want = complete(h, frame, 4096, 1 << 18)
    fb.post_receive_buffers(len(want))
    fa.transmit([frame], header=wire(h))
    got = fb.receive_with_headers(len(want))
    assert [f for _, f in got] == want
    assert all(hdr[:6] == (0,) * 6 for hdr, _ in got)
    assert d.stats("a")["queues"][0]["rx_offloaded"] == 1


def test_a_switch_completes_for_every_port_when_one_does_not_take_the_offload(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": "", "b": "", "c": ""}, switches=["vale0=a,b,c"])
    fa, fb = d.frontend("a", features=TAKING), d.frontend("b", features=TAKING)
    fc = d.frontend("c", features=OFFLOADING)  # takes none: a flood reaches it too
    h, frame = gso("6", "tcp", 20000, 1448)
    want = complete(h, frame, 4096, 1 << 18)
    for f in (fb, fc):
        f.post_receive_buffers(len(want))
    fa.transmit([frame], header=wire(h))  # to an address nobody has sent from: flooded
    assert fb.receive(len(want)) == want
    assert fc.receive(len(want)) == want
    a = d.stats("a")["queues"][0]
    assert (a["rx_offloaded"], a["rx_offload_passed"]) == (1, 0)
