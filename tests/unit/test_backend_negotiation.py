"""The vhost-user negotiation as QEMU runs it, over the daemon's real socket: features, protocol features,
config space, memory regions, REPLY_ACK, ring stop and status, and the dirty log of live migration."""

from __future__ import annotations

import logging
import struct

import pytest
from daemons import StartDaemon

from vhostmap import __version__
from vhostmap.lab.frontend import DRIVER_OK_STATUS, FakeFrontend
from vhostmap.vhost_user.device import ALL_OFFLOADS, OFFLOADS
from vhostmap.vhost_user.memory import MAX_MEM_SLOTS, VHOST_LOG_PAGE
from vhostmap.vhost_user.messages import (
    U64,
    DeviceConfig,
    MemoryRegion,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    VringState,
)
from vhostmap.virtio.spec import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_HOST_USO,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    bit,
)

FRAMES = [bytes([i]) * 60 for i in range(1, 6)]


def u64(fe: FakeFrontend, req: Request) -> int:
    reply = fe.call(req).payload
    assert isinstance(reply, U64)
    return reply.value


@pytest.mark.parametrize("offloads", ["", "offloads=off"])
def test_get_features_offers_what_qemu_negotiates_and_offloads_unless_off(
    start_daemon: StartDaemon, offloads: str
) -> None:
    d = start_daemon({"a": offloads})
    fe = d.frontend("a", negotiate=False)
    offered = u64(fe, Request.GET_FEATURES)
    # The guest's transmit offloads (kept for guests that take them, else completed in software as frames
    # come in: rxtx.dequeue), and its receive offloads.
    host = (
        bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_HOST_ECN)
        | bit(VIRTIO_NET_F_HOST_USO)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_GUEST_USO4)
        | bit(VIRTIO_NET_F_GUEST_USO6)
    )
    assert offered == (
        bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_F_ANY_LAYOUT)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_F_IN_ORDER)  # every queue completes in the order the driver made buffers available
        | bit(VIRTIO_F_RING_PACKED)  # unless packed=off
        | bit(VIRTIO_NET_F_MQ)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
        | bit(VHOST_F_LOG_ALL)
        | bit(VHOST_USER_F_PROTOCOL_FEATURES)
        | (0 if offloads else host)
    )
    # UFO never (no peer needs it: Linux stopped sending it in 4.14), and QEMU runs the control queue.
    never = (
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_CTRL_VQ,
    )
    assert [f for f in never if offered & bit(f)] == []


def test_protocol_features_queue_num_and_mem_slots(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "queues=4"})
    fe = d.frontend("a", negotiate=False)
    assert u64(fe, Request.GET_PROTOCOL_FEATURES) == (
        bit(ProtocolFeature.MQ)
        | bit(ProtocolFeature.LOG_SHMFD)
        | bit(ProtocolFeature.RARP)
        | bit(ProtocolFeature.REPLY_ACK)
        | bit(ProtocolFeature.NET_MTU)
        | bit(ProtocolFeature.BACKEND_REQ)
        | bit(ProtocolFeature.CONFIG)
        | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        | bit(ProtocolFeature.STATUS)
    )
    assert u64(fe, Request.GET_QUEUE_NUM) == 4
    assert u64(fe, Request.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS == 509


def test_negotiated_features_are_what_the_front_end_set(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": ""})
    fe = d.frontend("a")
    dev = d.device("a")
    assert (
        dev.features
        == fe.features
        == (
            bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VHOST_USER_F_PROTOCOL_FEATURES)
        )
    )
    assert dev.vnet_hdr_size == 12
    assert [(vq.started, vq.enabled, vq.ready, vq.num) for vq in dev.vqs] == [(True, True, True, 256)] * 2


def test_get_config_returns_mac_status_pairs_and_mtu_of_the_port(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "queues=4,mac=52:54:00:12:34:56,mtu=9000"})
    fe = d.frontend("a")
    reply = fe.call(Request.GET_CONFIG, DeviceConfig(0, 12, 0, bytes(12))).payload
    assert reply == DeviceConfig(
        0, 12, 0, struct.pack("<6sHHH", bytes.fromhex("525400123456"), VIRTIO_NET_S_LINK_UP, 4, 9000)
    )
    # A field on its own: max_virtqueue_pairs.
    reply = fe.call(Request.GET_CONFIG, DeviceConfig(8, 2, 0, bytes(2))).payload
    assert reply == DeviceConfig(8, 2, 0, struct.pack("<H", 4))


def test_get_config_beyond_the_config_space_replies_empty_and_keeps_the_connection(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": ""})
    fe = d.frontend("a")
    # The spec's failure answer to GET_CONFIG is a reply without payload.
    reply = fe.call(Request.GET_CONFIG, DeviceConfig(0, 64, 0, bytes(64)))
    assert reply.request is Request.GET_CONFIG and reply.payload.pack() == b""
    assert "port a: GET_CONFIG refused: config range 0+64 beyond 12 bytes" in caplog.messages
    assert u64(fe, Request.GET_QUEUE_NUM) == 1


def test_set_config_writes_the_mac(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": ""})
    fe = d.frontend("a")
    assert fe.checked(Request.SET_CONFIG, DeviceConfig(0, 6, 0, bytes.fromhex("020000000042")))
    reply = fe.call(Request.GET_CONFIG, DeviceConfig(0, 6, 0, bytes(6))).payload
    assert isinstance(reply, DeviceConfig) and reply.data == bytes.fromhex("020000000042")
    assert not fe.checked(Request.SET_CONFIG, DeviceConfig(6, 2, 0, bytes(2)))  # status is read-only


def test_reply_ack_acknowledges_success_and_failure(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "queues=2"})
    fe = d.frontend("a")
    assert fe.checked(Request.SET_VRING_ENABLE, VringState(1, 1)) is True
    assert fe.checked(Request.SET_VRING_NUM, VringState(3, 100)) is False
    assert fe.checked(Request.SET_VRING_NUM, VringState(4, 256)) is False
    assert fe.checked(Request.SET_FEATURES, U64(bit(VIRTIO_NET_F_GUEST_UFO))) is False
    assert fe.checked(Request.NET_SET_MTU, U64(9000)) is True
    assert fe.checked(Request.NET_SET_MTU, U64(10)) is False
    assert [m for m in caplog.messages if "refused" in m] == [
        "port a: SET_VRING_NUM refused: queue size 100 is not a power of two in 1..32768",
        "port a: SET_VRING_NUM refused: queue 4 does not exist (device has 4)",
        "port a: SET_FEATURES refused: features 0x400 were never offered",
        "port a: NET_SET_MTU refused: mtu 10 outside 68..65521",
    ]
    assert d.device("a").mtu == 9000


def test_without_reply_ack_no_ack_is_sent(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": ""})
    fe = d.frontend("a", protocol_features=bit(ProtocolFeature.MQ))
    fe.send(Request.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    fe.send(Request.SET_VRING_NUM, VringState(0, 3), need_reply=True)
    # The next thing on the socket is the answer to GET_QUEUE_NUM, not an ack.
    assert fe.call(Request.GET_QUEUE_NUM).payload == U64(1)


def test_status_is_stored_and_reported(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": ""})
    fe = d.frontend("a")  # negotiate() ends with SET_STATUS
    assert fe.get_status() == DRIVER_OK_STATUS == 0x0F
    fe.sync(Request.SET_STATUS, U64(0x03))
    assert fe.get_status() == 0x03
    assert not fe.get_status() & VIRTIO_CONFIG_S_NEEDS_RESET


def test_many_memory_regions_with_rings_across_them_carry_traffic(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa = d.frontend("a")
    fb = FakeFrontend(d.path("b"))
    d.adopt(fb).connect()
    # Two pages per region: every ring's descriptor table, available ring and used ring sit in different
    # regions, and so do consecutive buffers.
    regions = fb.mem_size // (2 * 4096)
    assert regions > 8
    fb.negotiate(mem_regions=regions)
    assert len(d.device("b").memory.regions) == regions
    rx, tx = fb.queues[0], fb.queues[1]
    assert [q.desc // 8192 for q in (rx, tx)] == [0, 1]
    assert [q.avail // 8192 for q in (rx, tx)] == [0, 2]
    assert [q.used // 8192 for q in (rx, tx)] == [1, 2]
    fb.post_receive_buffers(8)
    fa.transmit(FRAMES)
    assert fb.receive(5) == FRAMES
    fb.transmit(FRAMES[:2])
    fa.post_receive_buffers(2)
    assert fa.receive(2) == FRAMES[:2]


def test_removing_and_adding_a_region_stops_and_restarts_the_ring_in_it(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa = d.frontend("a")
    fb = FakeFrontend(d.path("b"))
    d.adopt(fb).connect()
    fb.negotiate(mem_regions=12)
    regions = fb.memory_regions(12)
    assert len(d.device("b").memory.regions) == 12
    rx = fb.queues[0]
    ring_region = next(r for r in regions if r.guest_phys_addr <= rx.used < r.guest_phys_addr + r.memory_size)
    # Gone: the receive ring is unmapped and stops.
    assert fb.checked(Request.REM_MEM_REG, SingleMemoryRegion(ring_region))
    assert len(d.device("b").memory.regions) == 11
    assert not d.device("b").vqs[0].ready
    # A region that is not there, and one overlapping another, are refused.
    assert not fb.checked(Request.REM_MEM_REG, SingleMemoryRegion(ring_region))
    overlapping = MemoryRegion(regions[1].guest_phys_addr, 4096, 0x1000, 0)
    assert not fb.checked(Request.ADD_MEM_REG, SingleMemoryRegion(overlapping), (fb.memfd,))
    # Back: the ring is mapped again and traffic flows.
    assert fb.checked(Request.ADD_MEM_REG, SingleMemoryRegion(ring_region), (fb.memfd,))
    assert d.device("b").vqs[0].ready
    fb.post_receive_buffers(5)
    fa.transmit(FRAMES)
    assert fb.receive(5) == FRAMES
    refused = [m for m in caplog.messages if "refused" in m]
    assert refused[0] == (
        f"port b: REM_MEM_REG refused: {ring_region.guest_phys_addr:#x}+{ring_region.memory_size:#x}: "
        f"no region with user address {ring_region.userspace_addr:#x} to remove"
    )
    assert refused[1].startswith(
        f"port b: ADD_MEM_REG refused: {regions[1].guest_phys_addr:#x}+0x1000: overlaps"
    )


def test_get_vring_base_returns_the_next_index_and_stops_the_ring(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    fb.post_receive_buffers(16)
    fa.transmit(FRAMES)
    assert fb.receive(5) == FRAMES
    assert fa.wait_used(fa.queues[1], 5) == [(i, 0) for i in range(5)]
    assert fa.stop_queue(fa.queues[1]) == 5
    assert fb.stop_queue(fb.queues[0]) == 5
    assert not d.device("a").vqs[1].ready and not d.device("b").vqs[0].ready
    # A stopped transmit ring is not read: its frames stay in the guest.
    fa.transmit(FRAMES[:3])
    # Barrier: traffic the other way passes through the same forwarder after the kick above.
    fa.post_receive_buffers(1)
    fb.transmit(FRAMES[:1])
    assert fa.receive(1) == FRAMES[:1]
    assert fa.used(fa.queues[1]) == []
    assert d.totals("a")["rx_packets"] == 5
    # Started again from the index GET_VRING_BASE returned, each picks up where it stopped (the receiver
    # first: frames for a stopped receive ring are dropped, as by a NIC without carrier).
    fb.start_queue(fb.queues[0])
    fa.start_queue(fa.queues[1])
    assert fb.receive(3) == FRAMES[:3]
    assert d.totals("a")["rx_packets"] == 8


def test_dirty_log_marks_used_rings_and_received_buffers(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa = d.frontend("a")
    fb = d.frontend(
        "b",
        features=bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VHOST_F_LOG_ALL),
    )
    assert fb.features & bit(VHOST_F_LOG_ALL)
    bitmap = fb.set_log_base()
    try:
        assert d.device("b").memory.logging
        rx, tx = fb.queues
        fb.post_receive_buffers(8)
        fa.transmit(FRAMES[:3])
        assert fb.receive(3) == FRAMES[:3]
        fb.transmit(FRAMES[:2])
        fb.wait_used(tx, 2)
        fa.post_receive_buffers(2)
        assert fa.receive(2) == FRAMES[:2]
        dirty = {i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (1 << (i % 8))}
        assert dirty == {
            rx.used // VHOST_LOG_PAGE,
            tx.used // VHOST_LOG_PAGE,
            *(fb.buffer(rx, i) // VHOST_LOG_PAGE for i in range(3)),
        }
    finally:
        bitmap.close()


def test_needs_reset_shows_in_status_only_while_broken(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": ""})
    fe = d.frontend("a")
    tx = fe.queues[1]
    fe.write_desc(tx, 0, fe.mem_size + 4096, 64, 0)
    fe.publish(tx, [0])
    d.wait_broken("a")
    assert fe.get_status() == DRIVER_OK_STATUS | VIRTIO_CONFIG_S_NEEDS_RESET
    fe.restart()
    assert fe.get_status() == DRIVER_OK_STATUS
    assert d.device("a").broken is None


def test_negotiation_and_traffic_are_quiet_when_all_is_well(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a", mem_regions=10), d.frontend("b")
    fb.post_receive_buffers(5)
    fa.transmit(FRAMES)
    assert fb.receive(5) == FRAMES
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"vhostmap {__version__} serving 2 port(s)",
        f"port a: front-end connected on {d.path('a')}",
        f"port b: front-end connected on {d.path('b')}",
    ]


def test_status_names_the_features_the_front_end_negotiated(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": ""})
    d.frontend("a", features=bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_F_IN_ORDER))
    assert d.daemon.status(None)["ports"]["a"]["features"] == [
        "VIRTIO_NET_F_MRG_RXBUF",
        "VHOST_USER_F_PROTOCOL_FEATURES",
        "VIRTIO_F_VERSION_1",
        "VIRTIO_F_IN_ORDER",
    ]


def test_a_port_offers_the_offloads_it_lists(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "offloads=csum+tso4", "b": ""})
    offered = {n: u64(d.frontend(n, negotiate=False), Request.GET_FEATURES) for n in ("a", "b")}
    assert offered["a"] == offered["b"] & ~ALL_OFFLOADS | OFFLOADS["csum"] | OFFLOADS["tso4"]
