"""The guest's native driver against a fake virtio-net device built on vhostmap's own device-side code.

Everything runs on the host, in one process: the driver's rings live in fake DMA memory (memfds with made-up
physical addresses) that the fake device maps as guest memory, and the device moves frames with vhostmap's
reference virtqueue kernels. What is proved here is the driver's logic: negotiation, exact-width register
accesses, zero-copy descriptors, ring accounting, EVENT_IDX, multiqueue, merged receive buffers, and its
distrust of the device.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
from guest_fakedevice import BAR, COMMON, DEFAULT_FEATURES, FakeVirtioNet, pci_config

from vhostmap.netmap.abi import NR_REG_ALL_NIC, NR_REG_ONE_NIC, NS_MOREFRAG
from vhostmap.netmap.errors import PortBroken
from vhostmap.netmap.user import POLLIN, POLLOUT, PortSpec
from vhostmap.virtio.spec import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_RING_F_EVENT_IDX,
    VirtioPciCommonCfg,
    bit,
)
from vhostmap_guest.dma import DmaArea, DmaMemory
from vhostmap_guest.driver import VirtioNetAdapter, negotiate
from vhostmap_guest.port import AdapterPort
from vhostmap_guest.virtio_pci import VirtioPciError, parse_virtio_caps

_bases = itertools.count(1)


def fake_dma(device: FakeVirtioNet) -> object:
    def make(name: str, size: int) -> DmaMemory:
        dma = DmaMemory.fake(size, base=next(_bases) << 36)
        device.attach(dma)
        return dma

    return make


def open_port(device: FakeVirtioNet, spec: PortSpec | None = None, pairs: int | None = None) -> AdapterPort:
    adapter = VirtioNetAdapter.create("eth0", device.transport(), fake_dma(device), pairs)  # type: ignore[arg-type]
    spec = spec or PortSpec("eth0")
    reg = adapter.register(spec.mode, spec.ring_id)
    return AdapterPort("eth0", reg, wait=None, release=adapter.close, mode="native")


@pytest.fixture
def device() -> Iterator[FakeVirtioNet]:
    dev = FakeVirtioNet()
    yield dev
    dev.close()


@pytest.fixture
def port(device: FakeVirtioNet) -> Iterator[AdapterPort]:
    p = open_port(device)
    yield p
    p.close()


def frames(n: int, length: int = 60, start: int = 0) -> list[bytes]:
    return [
        (i + start).to_bytes(4, "big") + bytes((i + j) & 0xFF for j in range(length - 4)) for i in range(n)
    ]


# --- transport ---------------------------------------------------------------------------------------------
def test_capabilities_are_found_in_the_pci_configuration_space() -> None:
    cfg = pci_config()
    caps = parse_virtio_caps(lambda off, width: int.from_bytes(cfg[off : off + width], "little"))
    assert set(caps) == {
        VIRTIO_PCI_CAP_COMMON_CFG,
        VIRTIO_PCI_CAP_NOTIFY_CFG,
        VIRTIO_PCI_CAP_ISR_CFG,
        VIRTIO_PCI_CAP_DEVICE_CFG,
    }
    assert caps[VIRTIO_PCI_CAP_NOTIFY_CFG].notify_off_multiplier == 4
    assert all(c.bar == BAR for c in caps.values())


def test_a_looping_capability_list_is_refused() -> None:
    cfg = bytearray(pci_config())
    cfg[0x84 + 1] = 0x84  # the first capability points at itself
    with pytest.raises(VirtioPciError, match="broken"):
        parse_virtio_caps(lambda off, width: int.from_bytes(cfg[off : off + width], "little"))


def test_negotiation_takes_what_the_driver_supports_and_nothing_else(device: FakeVirtioNet) -> None:
    info = negotiate(device.transport())
    wanted = (
        bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_NET_F_MQ)
        | bit(VIRTIO_NET_F_CTRL_VQ)
    )
    assert info.features & wanted == wanted
    assert not info.features & bit(0), "an offload the driver does not implement was accepted"
    assert info.mac == device.mac and info.max_pairs == 1
    assert info.mtu is None  # not offered
    assert (info.rx_size, info.tx_size) == (256, 256)


def test_every_common_configuration_access_has_the_registers_width(
    port: AdapterPort, device: FakeVirtioNet
) -> None:
    widths = {
        getattr(VirtioPciCommonCfg, f).offset: getattr(VirtioPciCommonCfg, f).size
        for f, _ in VirtioPciCommonCfg._fields_
    }
    common = [(off, w) for _, off, w in device.accesses.log if COMMON <= off < 0x1000]
    assert common and all(widths[off] == w for off, w in common)
    assert device.status & VIRTIO_CONFIG_S_DRIVER_OK


def test_a_device_without_version_1_is_refused() -> None:
    dev = FakeVirtioNet(features=DEFAULT_FEATURES & ~(1 << 32))
    with pytest.raises(VirtioPciError, match="VERSION_1"):
        negotiate(dev.transport())
    dev.close()


# --- transmit ----------------------------------------------------------------------------------------------
def test_sent_frames_reach_the_device_exactly_and_in_order(port: AdapterPort, device: FakeVirtioNet) -> None:
    ring = port.tx_rings[0]
    assert ring.num_slots == 128  # two descriptors per slot
    sent = frames(300, 200)
    done = 0
    while done < len(sent):
        done += ring.send(sent[done : done + 50])
        port.txsync()
    port.txsync()
    assert device.sent == sent
    assert ring.space() == ring.num_slots - 1  # everything reclaimed


def test_descriptors_point_at_the_slots_own_buffers(port: AdapterPort, device: FakeVirtioNet) -> None:
    device.auto = False
    ring = port.tx_rings[0]
    ring.send(frames(3))
    port.txsync()
    adapter = port.adapter
    assert isinstance(adapter, VirtioNetAdapter)
    q = adapter.txq[0]
    for j in range(3):
        buf = int(ring.slots["buf_idx"][j])
        expected = q.bufs.phys(np.array([buf], dtype=np.int64))[0]
        assert int(q.vq.desc["addr"][2 * j + 1]) == int(expected)
        assert int(q.vq.desc["len"][2 * j + 1]) == 60


def test_prefilled_buffers_are_sent_again_without_writing_them(
    port: AdapterPort, device: FakeVirtioNet
) -> None:
    ring = port.tx_rings[0]
    template = frames(1, 64)[0]
    ring.prefill(template)
    total = 0
    while total < 1000:
        total += ring.send_template(1000 - total, template, write=False)
        port.txsync()
    port.txsync()
    assert len(device.sent) == 1000 and set(device.sent) == {template}


def test_a_frame_spanning_slots_is_one_chain(port: AdapterPort, device: FakeVirtioNet) -> None:
    ring = port.tx_rings[0]
    big = bytes(range(256)) * 12  # 3072 bytes: two 2048-byte buffers
    idx = ring.indexes(2)
    for k, part in enumerate((big[:2048], big[2048:])):
        ring.buffers[ring.slots["buf_idx"][idx[k]], : len(part)] = np.frombuffer(part, np.uint8)
        ring.slots["len"][idx[k]] = len(part)
    ring.slots["flags"][idx[0]] = NS_MOREFRAG
    ring.slots["flags"][idx[1]] = 0
    ring.advance(2)
    port.txsync()
    port.txsync()
    assert device.sent == [big]
    assert ring.space() == ring.num_slots - 1


def test_kicks_are_skipped_while_the_device_does_not_ask_for_them(
    port: AdapterPort, device: FakeVirtioNet
) -> None:
    device.auto = False  # the device never re-arms: after the first kick it expects none
    adapter = port.adapter
    assert isinstance(adapter, VirtioNetAdapter)
    vq = adapter.txq[0].vq
    ring = port.tx_rings[0]
    for _ in range(5):
        ring.send(frames(2))
        port.txsync()
    assert vq.kicks == 1
    device.take_sent()  # now it processes and asks to be kicked at the next entry
    ring.send(frames(1))
    port.txsync()
    assert vq.kicks == 2


def test_poll_for_output_reports_room(port: AdapterPort) -> None:
    assert port.poll(POLLOUT, timeout=0) == POLLOUT


# --- receive -----------------------------------------------------------------------------------------------
def test_delivered_frames_are_received_exactly(port: AdapterPort, device: FakeVirtioNet) -> None:
    ring = port.rx_rings[0]
    incoming = frames(1000, 100)
    got: list[bytes] = []
    pos = 0
    while len(got) < len(incoming):
        pos += device.deliver(incoming[pos : pos + 64])
        port.rxsync()
        rx = ring.receive()
        got += rx.frames()
        ring.advance(len(rx))
    assert got == incoming


def test_receive_buffers_are_reposted_after_release(port: AdapterPort, device: FakeVirtioNet) -> None:
    ring = port.rx_rings[0]
    assert device.deliver(frames(200)) == ring.num_slots - 1  # one slot always stays empty
    port.rxsync()
    assert ring.space() == ring.num_slots - 1
    assert device.deliver(frames(1)) == 0  # no buffers until the user releases some
    ring.advance(10)
    port.rxsync()
    assert device.deliver(frames(20)) == 10


def test_poll_for_input_waits_for_frames(port: AdapterPort, device: FakeVirtioNet) -> None:
    assert port.poll(POLLIN, timeout=0) == 0
    device.deliver(frames(1))
    assert port.poll(POLLIN, timeout=0) == POLLIN


def test_a_frame_merged_from_several_buffers_becomes_a_morefrag_run(
    port: AdapterPort, device: FakeVirtioNet
) -> None:
    ring = port.rx_rings[0]
    jumbo = bytes((i * 7) & 0xFF for i in range(5000))
    assert device.deliver([frames(1)[0], jumbo, frames(1, 70)[0]]) == 3
    port.rxsync()
    rx = ring.receive()
    assert rx.frames() == [frames(1)[0], jumbo, frames(1, 70)[0]]
    assert rx.frame_count == 3 and len(rx) > 3


# --- completions in any order ---------------------------------------------------------------------------
def test_transmissions_completed_out_of_order_are_handed_back_in_ring_order(
    port: AdapterPort, device: FakeVirtioNet
) -> None:
    device.auto = False
    ring = port.tx_rings[0]
    adapter = port.adapter
    assert isinstance(adapter, VirtioNetAdapter)
    every = frames(200)
    for round_ in range(4):  # wraps the 128-slot ring
        ring.send(every[50 * round_ : 50 * (round_ + 1)])
        port.txsync()
        assert device.take_sent_reversed() == 50
        port.txsync()
        assert ring.space() == ring.num_slots - 1
        assert adapter.txq[0].done_waiting == 0
    assert device.sent == every


def test_receptions_completed_out_of_order_are_delivered_in_ring_order(
    port: AdapterPort, device: FakeVirtioNet
) -> None:
    ring = port.rx_rings[0]
    got: list[bytes] = []
    every = frames(160, 80)
    for round_ in range(4):
        device.deliver_reversed(every[40 * round_ : 40 * (round_ + 1)])
        port.rxsync()
        rx = ring.receive()
        got += rx.frames()
        ring.advance(len(rx))
    assert got == every


# --- multiqueue --------------------------------------------------------------------------------------------
def test_several_queue_pairs_are_switched_on_and_carry_frames() -> None:
    dev = FakeVirtioNet(max_pairs=3)
    port = open_port(dev)
    try:
        assert dev.active_pairs == 3
        assert len(port.tx_rings) == len(port.rx_rings) == 3
        for i, ring in enumerate(port.tx_rings):
            ring.send(frames(2, start=10 * i))
        port.txsync()
        dev.auto = True
        for i in range(3):
            dev.take_sent(2 * i + 1)
        assert sorted(dev.sent) == sorted(frames(2) + frames(2, start=10) + frames(2, start=20))
        assert dev.deliver(frames(1, start=7), index=4) == 1
        port.rxsync()
        assert port.rx_rings[2].receive().frames() == frames(1, start=7)
    finally:
        port.close()
        dev.close()


def test_one_ring_pair_can_be_bound_alone() -> None:
    dev = FakeVirtioNet(max_pairs=2)
    port = open_port(dev, PortSpec("eth0", NR_REG_ONE_NIC, 1))
    try:
        assert len(port.tx_rings) == 1 and port.tx_rings[0].view.ringid == 1
        port.tx_rings[0].send(frames(1))
        port.txsync()
        assert dev.sent == frames(1)
    finally:
        port.close()
        dev.close()


# --- an untrusted device -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("queue", "head", "length", "reason"),
    [
        (1, 3, 0, "not a chain head"),
        (1, 1000, 0, "not a chain head"),
        (1, 40, 0, "not in flight"),
        (0, 0, 5000, "exceeds"),
        (0, 2 * 127, 100, "not posted"),  # slot 127 is the one always kept empty
    ],
)
def test_a_forged_used_entry_breaks_the_port_with_a_clear_reason(
    port: AdapterPort, device: FakeVirtioNet, queue: int, head: int, length: int, reason: str
) -> None:
    device.forge_used(queue, head, length)
    with pytest.raises(PortBroken, match=reason):
        port.txsync() if queue == 1 else port.rxsync()
    assert port.adapter.broken is not None and reason in port.adapter.broken
    with pytest.raises(PortBroken):
        port.poll(POLLIN, timeout=0)


def test_a_used_index_running_past_the_queue_breaks_the_port(
    port: AdapterPort, device: FakeVirtioNet
) -> None:
    vq = device.vqs[0]
    assert vq._used16 is not None
    vq._used16[1] = 300  # 300 entries at once in a queue of 256
    with pytest.raises(PortBroken, match="beyond the queue size"):
        port.rxsync()


def test_a_frame_length_below_the_header_breaks_the_port(port: AdapterPort, device: FakeVirtioNet) -> None:
    device.forge_used(0, 0, 4)
    with pytest.raises(PortBroken, match="header"):
        port.rxsync()


# --- lifecycle ---------------------------------------------------------------------------------------------
def test_close_resets_the_device_and_frees_everything(device: FakeVirtioNet) -> None:
    port = open_port(device)
    memory = port.adapter.memory
    port.close()
    assert device.resets >= 2 and device.status == 0  # negotiation's reset, then close's
    assert memory.fd == -1
    port.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        port.txsync()


def test_all_rings_by_default(port: AdapterPort) -> None:
    assert port.registration.mode == NR_REG_ALL_NIC


def test_dma_area_pieces_never_straddle_a_page() -> None:
    with DmaMemory.fake(1 << 22, base=1 << 40) as dma:
        area = DmaArea(dma)
        offs = [area.alloc(size) for size in (1 << 20, 1 << 20, 1 << 20)]
        assert offs == [0, 1 << 20, 1 << 21]
        assert dma.phys(offs[2]) == (1 << 40) + (1 << 21)
        assert DmaArea.need([1 << 20] * 3, 1 << 21) == (1 << 21) + (1 << 20)
