"""Hostile guests: every descriptor a driver can get wrong marks only its own device broken, with a log line
naming the fault and NEEDS_RESET in its status, while another link of the same daemon keeps passing traffic;
after a reset the device works again."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from daemons import FRAME, StartDaemon, exchange

from vhostmap.lab.frontend import DRIVER_OK_STATUS, FakeFrontend
from vhostmap.vhost_user.virtqueue import MAX_CHAIN_LENGTH
from vhostmap.virtio.spec import (
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
    VRING_AVAIL_HEADER,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    bit,
)

RX, TX = 0, 1
NO_INDIRECT = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX)


@dataclass(frozen=True)
class Attack:
    """What a hostile driver does on ``queue`` of port a, and the fault the device must report."""

    name: str
    queue: int
    run: Callable[[FakeFrontend], None]
    reason: Callable[[FakeFrontend], str]
    features: int | None = None
    queue_size: int = 256


def tx_chain(fe: FakeFrontend, *descs: tuple[int, int, int, int]) -> None:
    """Descriptors 0.. of the transmit queue as given, and head 0 made available."""
    q = fe.queues[TX]
    for i, (addr, length, flags, nxt) in enumerate(descs):
        fe.write_desc(q, i, addr, length, flags, nxt)
    fe.publish(q, [0])


def rx_chain(fe: FakeFrontend, *descs: tuple[int, int, int, int]) -> None:
    """The same on the receive queue (the peer's transmission makes the device read it)."""
    q = fe.queues[RX]
    for i, (addr, length, flags, nxt) in enumerate(descs):
        fe.write_desc(q, i, addr, length, flags, nxt)
    fe.publish(q, [0])


def set_avail_idx(fe: FakeFrontend, idx: int) -> None:
    """Write the transmit queue's avail->idx (any value) and kick."""
    q = fe.queues[TX]
    fe.mem[q.avail + 2 : q.avail + 4] = (idx & 0xFFFF).to_bytes(2, "little")
    os.eventfd_write(q.kick, 1)


def table(fe: FakeFrontend, *entries: tuple[int, int, int, int], at: int = 0) -> int:
    """An indirect table in the fake guest's free memory; its guest address."""
    addr = fe.scratch + at
    for i, entry in enumerate(entries):
        VRING_DESC.pack_into(fe.mem, addr + VRING_DESC.size * i, *entry)
    return addr


def buf(fe: FakeFrontend) -> int:
    return fe.buffer(fe.queues[TX], 0)


def long_chain(fe: FakeFrontend) -> None:
    n = MAX_CHAIN_LENGTH + 1
    tx_chain(fe, *[(buf(fe), 16, VRING_DESC_F_NEXT if i < n - 1 else 0, i + 1) for i in range(n)])


def avail_idx_far_ahead(fe: FakeFrontend) -> None:
    q = fe.queues[TX]
    set_avail_idx(fe, q.avail_idx + q.num + 1)


def head_out_of_range(fe: FakeFrontend) -> None:
    q = fe.queues[TX]
    entry = q.avail + VRING_AVAIL_HEADER + 2 * (q.avail_idx % q.num)
    fe.mem[entry : entry + 2] = (300).to_bytes(2, "little")
    set_avail_idx(fe, q.avail_idx + 1)


ATTACKS = [
    Attack(
        "address-outside-guest-memory",
        TX,
        lambda fe: tx_chain(fe, (fe.mem_size + 0x10000, 64, 0, 0)),
        lambda fe: f"buffer of descriptor 0: {fe.mem_size + 0x10000:#x}+0x40: guest address in no region",
    ),
    Attack(
        "address-plus-length-wraps",
        TX,
        lambda fe: tx_chain(fe, (2**64 - 0x1000, 0x2000, 0, 0)),
        lambda fe: (
            f"buffer of descriptor 0: {2**64 - 0x1000:#x}+0x2000: range outside the 64-bit address space"
        ),
    ),
    Attack(
        "length-crosses-the-region-end",
        TX,
        lambda fe: tx_chain(fe, (fe.mem_size - 32, 64, 0, 0)),
        lambda fe: (
            f"buffer of descriptor 0: {fe.mem_size - 32:#x}+0x40: crosses the end of the region at "
            f"0x0+{fe.mem_size:#x}"
        ),
    ),
    Attack(
        "descriptor-loop",
        TX,
        lambda fe: tx_chain(fe, (buf(fe), 16, VRING_DESC_F_NEXT, 1), (buf(fe), 16, VRING_DESC_F_NEXT, 0)),
        lambda fe: f"chain from head 0 is longer than {MAX_CHAIN_LENGTH} (a loop?)",
    ),
    Attack(
        "chain-longer-than-the-limit",
        TX,
        long_chain,
        lambda fe: f"chain from head 0 is longer than {MAX_CHAIN_LENGTH} (a loop?)",
        queue_size=2048,
    ),
    Attack(
        "indirect-without-indirect-desc",
        TX,
        lambda fe: tx_chain(fe, (table(fe, (buf(fe), 72, 0, 0)), 16, VRING_DESC_F_INDIRECT, 0)),
        lambda fe: "indirect descriptor 0 but INDIRECT_DESC not negotiated",
        features=NO_INDIRECT,
    ),
    Attack(
        "indirect-length-not-a-multiple-of-16",
        TX,
        lambda fe: tx_chain(fe, (table(fe, (buf(fe), 72, 0, 0)), 24, VRING_DESC_F_INDIRECT, 0)),
        lambda fe: "indirect table at descriptor 0 has bad length 24",
    ),
    Attack(
        "indirect-table-longer-than-the-limit",
        TX,
        lambda fe: tx_chain(fe, (fe.scratch, 16 * (MAX_CHAIN_LENGTH + 1), VRING_DESC_F_INDIRECT, 0)),
        lambda fe: f"indirect table at descriptor 0 has bad length {16 * (MAX_CHAIN_LENGTH + 1)}",
    ),
    Attack(
        "nested-indirect",
        TX,
        lambda fe: tx_chain(
            fe, (table(fe, (table(fe, (buf(fe), 72, 0, 0), at=4096), 16, VRING_DESC_F_INDIRECT, 0)), 16, 4, 0)
        ),
        lambda fe: "nested indirect table at descriptor 0",
    ),
    Attack(
        "indirect-and-next",
        TX,
        lambda fe: tx_chain(
            fe,
            (table(fe, (buf(fe), 72, 0, 0)), 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1),
            (buf(fe), 16, 0, 0),
        ),
        lambda fe: "descriptor 0 has both INDIRECT and NEXT",
    ),
    Attack(
        "indirect-table-outside-guest-memory",
        TX,
        lambda fe: tx_chain(fe, (fe.mem_size, 32, VRING_DESC_F_INDIRECT, 0)),
        lambda fe: f"indirect table of descriptor 0: {fe.mem_size:#x}+0x20: guest address in no region",
    ),
    Attack(
        "next-beyond-the-ring",
        TX,
        lambda fe: tx_chain(fe, (buf(fe), 16, VRING_DESC_F_NEXT, 256)),
        lambda fe: "descriptor 0 links to 256, beyond the table of 256",
    ),
    Attack(
        "next-beyond-the-indirect-table",
        TX,
        lambda fe: tx_chain(
            fe,
            (
                table(fe, (buf(fe), 16, VRING_DESC_F_NEXT, 2), (buf(fe), 56, 0, 0)),
                32,
                VRING_DESC_F_INDIRECT,
                0,
            ),
        ),
        lambda fe: "descriptor 0 links to 2, beyond the table of 2",
    ),
    Attack(
        "avail-idx-more-than-the-ring-ahead",
        TX,
        avail_idx_far_ahead,
        lambda fe: "available index moved 257 entries ahead of the device, beyond size 256",
    ),
    Attack(
        "head-index-beyond-the-ring",
        TX,
        head_out_of_range,
        lambda fe: "available ring entry 3 names descriptor 300 >= 256",
    ),
    Attack(
        "writable-descriptor-on-the-transmit-queue",
        TX,
        lambda fe: tx_chain(fe, (buf(fe), 72, VRING_DESC_F_WRITE, 0)),
        lambda fe: "device-writable descriptor 0 in a chain that must not have one",
    ),
    Attack(
        "read-only-descriptor-on-the-receive-queue",
        RX,
        lambda fe: rx_chain(fe, (fe.buffer(fe.queues[RX], 0), 4096, 0, 0)),
        lambda fe: "read-only descriptor 0 in a chain that must not have one",
    ),
    Attack(
        "transmit-chain-shorter-than-the-header",
        TX,
        lambda fe: tx_chain(fe, (buf(fe), 8, 0, 0)),
        lambda fe: "chain 0 of 8 bytes is shorter than its header",
    ),
    Attack(
        "receive-chain-shorter-than-the-header",
        RX,
        lambda fe: rx_chain(fe, (fe.buffer(fe.queues[RX], 0), 8, VRING_DESC_F_WRITE, 0)),
        lambda fe: "receive chain 0 of 8 bytes is shorter than its header",
    ),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_hostile_descriptor_breaks_only_its_device_until_reset(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture, attack: Attack
) -> None:
    d = start_daemon({"a": "", "b": "", "c": "", "e": ""}, links=["a,b", "c,e"])
    options = {} if attack.features is None else {"features": attack.features}
    fa = d.frontend("a", queue_size=attack.queue_size, **options)
    fb, fc, fe = d.frontend("b"), d.frontend("c"), d.frontend("e")
    exchange(fa, fb, 3)

    attack.run(fa)
    if attack.queue == RX:
        fb.transmit([FRAME])  # makes the device read a's receive queue
    reason = f"virtqueue {attack.queue}: {attack.reason(fa)}"
    assert d.wait_broken("a") == reason
    assert f"port a: device broken: {reason}" in caplog.messages
    assert fa.get_status() == DRIVER_OK_STATUS | VIRTIO_CONFIG_S_NEEDS_RESET
    assert os.eventfd_read(fa.queues[attack.queue].err) == 1  # "vhost vring error" for QEMU
    assert d.totals("a")["errors"] == 1
    if attack.queue == RX:
        # What b sent towards the broken device is dropped and counted, like a NIC without carrier.
        d.wait(lambda: d.totals("a")["tx_dropped"] == 1, "the frame for a to be dropped")

    # Meanwhile: the other link of the daemon, and a's peer, are untouched.
    exchange(fc, fe)
    exchange(fe, fc)
    assert [d.device(p).broken for p in "bce"] == [None, None, None]
    assert fb.get_status() == DRIVER_OK_STATUS

    # The driver resets the device and starts over: it works again.
    fa.restart()
    assert fa.get_status() == DRIVER_OK_STATUS
    assert d.device("a").broken is None
    exchange(fa, fb)
    exchange(fb, fa)
    assert d.stats("a")["broken"] is None


def test_reconnecting_front_end_gets_a_working_device(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    tx_chain(fa, (fa.mem_size, 64, 0, 0))
    d.wait_broken("a")
    fa.close()
    d.wait(lambda: d.device("a").broken is None, "a disconnect to reset the device")
    assert not d.endpoint("a").is_connected
    fa2 = d.frontend("a")
    exchange(fa2, fb)
    exchange(fb, fa2)


def test_a_second_fault_while_broken_logs_once(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    tx_chain(fa, (fa.mem_size, 64, 0, 0))
    d.wait_broken("a")
    rx_chain(fa, (fa.buffer(fa.queues[RX], 0), 4096, 0, 0))
    fb.transmit([FRAME])
    d.wait(lambda: d.totals("a")["tx_dropped"] == 1, "the frame for a to be dropped")
    assert len([m for m in caplog.messages if "device broken" in m]) == 1


def test_reset_with_status_before_ring_stop_does_not_reread_the_bad_chain(start_daemon: StartDaemon) -> None:
    # QEMU before 8.1 stops a vhost device with SET_STATUS 0 first and GET_VRING_BASE after; traffic from
    # the peer in between must not make the device read the faulty chain again.
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    tx_chain(fa, (fa.mem_size, 64, 0, 0))
    d.wait_broken("a")

    def peer_traffic() -> None:
        fb.transmit([FRAME])
        fb.wait_used(fb.queues[TX], 1)

    fa.restart(status_first=True, between=peer_traffic)
    assert d.device("a").broken is None
    assert fa.get_status() == DRIVER_OK_STATUS
    exchange(fa, fb)
    exchange(fb, fa)
