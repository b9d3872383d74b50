"""A guest's transmit offloads (VIRTIO_NET_F_CSUM, HOST_TSO4/6, HOST_USO) done for a peer that does not
take them, over the real socket with both datapaths: the peer gets exactly the frames netmap/offload.py makes
(which test_offload.py judges with scapy), a 64 KiB frame of small segments gets through a link whose passes
take 32 slots a round, a header split over descriptors reads whole, and a header the frame does not bear out
drops that frame alone, counted with its reason."""

from __future__ import annotations

import pytest
from daemons import StartDaemon
from test_offload import super_frame

from vhostmap.netmap.offload import VnetHeader, complete
from vhostmap.virtio.spec import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_USO,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    bit,
)

pytestmark = pytest.mark.usefixtures("datapath")

OFFLOADING = (
    bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_USO)
)


def gso(l3: str, l4: str, payload: int, gso_size: int) -> tuple[VnetHeader, bytes]:
    frame = bytes(super_frame(l3, l4, bytes(k % 251 for k in range(payload))))
    kind = {
        ("4", "tcp"): VIRTIO_NET_HDR_GSO_TCPV4,
        ("6", "tcp"): VIRTIO_NET_HDR_GSO_TCPV6,
    }.get((l3, l4), VIRTIO_NET_HDR_GSO_UDP_L4)
    # As Linux fills it in: the checksum is left at the transport header (IPv4 or IPv6, no options).
    start = 14 + (20 if l3 == "4" else 40)
    offset = 16 if l4 == "tcp" else 6
    return VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, kind, len(frame) - payload, gso_size, start, offset), frame


@pytest.mark.parametrize("l3,l4", [("4", "tcp"), ("6", "tcp"), ("4", "udp")])
def test_segmentation_offload_reaches_the_peer_as_segments(
    start_daemon: StartDaemon, l3: str, l4: str
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a", features=OFFLOADING), d.frontend("b")
    h, frame = gso(l3, l4, 40000, 1448)
    want = complete(h, frame, 4096, 1 << 18)
    assert len(want) == 28
    fb.post_receive_buffers(len(want))
    fa.transmit([frame], header=h.pack())
    assert fb.receive(len(want)) == want
    assert len(fa.wait_used(fa.queues[1], 1)) == 1
    # Whole from a (b's port completes what its guest does not take), 28 segments to b.
    a, b = d.stats("a")["queues"][0], d.stats("b")["queues"][0]
    assert (a["rx_packets"], a["rx_bytes"], a["rx_dropped"], a["rx_offload_passed"]) == (1, len(frame), 0, 1)
    assert (b["tx_packets"], b["tx_bytes"], b["tx_offloaded"]) == (28, sum(map(len, want)), 1)


def test_a_checksum_left_to_the_device_is_filled_in_even_with_the_header_split(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a", features=OFFLOADING), d.frontend("b")
    frame = bytes(super_frame("4", "udp", b"checksum me" * 20))
    h = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 34, 6)
    [want] = complete(h, frame, 1, len(frame))
    fb.post_receive_buffers(2)
    # CVE-2022-2132: a header over two descriptors is still the header.
    fa.transmit([frame], header=h.pack(), first=5)
    fa.transmit([frame], header=h.pack())
    assert fb.receive(2) == [want, want]


def test_a_64k_frame_of_small_segments_gets_through_a_link_of_32_slot_rounds(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a", features=OFFLOADING), d.frontend("b")
    h, frame = gso("4", "tcp", 65000, 536)
    want = complete(h, frame, 4096, 1 << 18)
    assert len(want) == 122
    fb.post_receive_buffers(len(want))
    fa.transmit([frame], header=h.pack())
    assert fb.receive(len(want), timeout=10) == want


@pytest.mark.parametrize(
    "header",
    [
        VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 4000, 10),  # beyond the frame
        VnetHeader(0, 3, 54, 1000, 0, 0),  # UFO: never offered
        VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV6, 54, 1000, 0, 0),  # an IPv4 frame
        VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 54, 0, 0, 0),  # gso_size 0
        VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1, 0, 0),  # 3000 segments: more than the ring
    ],
)
def test_a_header_the_frame_does_not_bear_out_drops_that_frame_alone(
    start_daemon: StartDaemon, header: VnetHeader
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a", features=OFFLOADING), d.frontend("b")
    _, frame = gso("4", "tcp", 3000, 1000)
    plain = bytes(super_frame("4", "tcp", b"fine"))
    fb.post_receive_buffers(4)
    fa.transmit([frame], header=header.pack())
    fa.transmit([plain])
    assert fb.receive(1) == [plain]
    assert len(fa.wait_used(fa.queues[1], 2)) == 2
    stats = d.stats("a")["queues"][0]
    assert stats["drops"]["rx"] == {"unconnected": 0, "bad_header": 1, "invalid": 0}
    assert d.device("a").broken is None


def test_without_the_offload_features_the_header_asks_for_nothing(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")  # CSUM not negotiated: the driver may not ask
    h, frame = gso("4", "tcp", 2000, 1000)
    fb.post_receive_buffers(1)
    fa.transmit([frame], header=h.pack())
    assert fb.receive(1) == [frame]


def test_offloads_off_keeps_them_out_of_the_offer(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "offloads=off", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a", features=OFFLOADING), d.frontend("b")
    assert not fa.features & (bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4))
    h, frame = gso("4", "tcp", 2000, 1000)
    fb.post_receive_buffers(1)
    fa.transmit([frame], header=h.pack())
    assert fb.receive(1) == [frame]
