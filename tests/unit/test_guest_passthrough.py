"""The guest side of a passthrough port (vhostmap_guest.passthrough) in this process: its NetmapPort over the
region a daemon handed out (the ivshmem handshake done as QEMU does, by pt_guest.FakePtGuest), exact frames
both ways through a link; and the device found and mapped through a sysfs tree (BAR 2 the region's memfd,
BAR 0 a file standing for the registers)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pt_guest import FakePtGuest

from conftest import FRAME, RunningDaemon, StartDaemon
from vhostmap.ivshmem.protocol import DAEMON_PEER_ID
from vhostmap.netmap.abi import Region, map_region
from vhostmap.netmap.user import POLLIN, POLLOUT, parse_port_spec
from vhostmap_guest import open as guest_open
from vhostmap_guest.passthrough import (
    BAR0_SIZE,
    DOORBELL,
    IVPOSITION,
    PassthroughPort,
    PassthroughUnavailable,
    PtDevice,
    ivshmem_devices,
    open_passthrough,
)

SLOTS = 256


def frames(n: int, tag: int) -> list[bytes]:
    return [(bytes([tag]) + k.to_bytes(2, "big")) * 20 + FRAME[: k % 40] for k in range(n)]


@pytest.fixture
def guest(start_daemon: StartDaemon, sock_dir: Path) -> Iterator[tuple[RunningDaemon, FakePtGuest]]:
    d = start_daemon(
        {"a": ""}, ["pt0,a"], other_ports=[f"pt0=passthrough,path={sock_dir}/pt0.sock,slots={SLOTS}"]
    )
    g = FakePtGuest(d.daemon.config.port("pt0").path)
    try:
        yield d, g
    finally:
        g.close()


def test_the_guest_driver_exchanges_exact_frames_with_the_host(
    guest: tuple[RunningDaemon, FakePtGuest],
) -> None:
    d, g = guest
    fe = d.frontend("a")
    region = Region(g.region.mm)
    port = PassthroughPort("pt:0", region, lambda: os.eventfd_write(g.doorbell, 1), release=lambda: None)
    with port:
        tx, rx = port.tx_rings[0], port.rx_rings[0]
        assert port.generation == 1 and tx.space() == SLOTS - 1
        out = frames(3 * SLOTS, tag=1)
        sent: list[bytes] = []
        back = frames(3 * SLOTS, tag=2)
        received: list[bytes] = []
        for k in range(0, len(out), 128):
            fe.post_receive_buffers(128)
            batch = out[k : k + 128]
            while batch:
                assert port.poll(POLLOUT, 5.0) & POLLOUT, "no room in the TX ring"
                batch = batch[tx.send(batch) :]
                port.txsync()
            sent += fe.receive(128)
            fe.transmit(back[k : k + 128])
            while len(received) < k + 128:
                assert port.poll(POLLIN, 5.0) & POLLIN, f"{len(received)} of {k + 128} frames"
                got = rx.receive()
                received += got.frames()
                rx.advance(len(got))
            port.rxsync()
            assert len(fe.wait_used(fe.queues[1], 128)) == 128
        assert sent == out
        assert received == back
        # The guest kicked only when the daemon was idle on a ring, not once per sync.
        q = d.stats("pt0")["queues"][0]
        assert (q["rx_packets"], q["tx_packets"], q["errors"]) == (len(out), len(back), 0)
        assert port.kicks <= 2 * (len(out) // 128) + 2


def test_a_ring_pair_alone_and_no_host_rings(guest: tuple[RunningDaemon, FakePtGuest]) -> None:
    _, g = guest
    region = Region(g.region.mm)
    with PassthroughPort(
        "pt:0-0", region, lambda: None, spec=parse_port_spec("pt:0-0"), release=lambda: None
    ) as port:
        assert len(port.tx_rings) == len(port.rx_rings) == 1
    with pytest.raises(ValueError, match="ring pair 3 does not exist"):
        PassthroughPort("pt:0-3", region, lambda: None, spec=parse_port_spec("pt:0-3"))
    with pytest.raises(ValueError, match="no host rings"):
        PassthroughPort("pt:0^", region, lambda: None, spec=parse_port_spec("pt:0^"))


def fake_device(sysfs: Path, address: str, shm: int | None) -> Path:
    """A sysfs entry of an ivshmem device: BAR 2 the file ``shm`` (through /proc), BAR 0 a plain file."""
    dev = sysfs / address
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x1af4\n")
    (dev / "device").write_text("0x1110\n")
    registers = bytearray(BAR0_SIZE)
    struct.pack_into("<I", registers, IVPOSITION, 7)
    (dev / "resource0").write_bytes(registers)
    if shm is None:
        (dev / "resource2").write_bytes(bytes(4096))  # no vhostmap header there
    else:
        (dev / "resource2").symlink_to(f"/proc/{os.getpid()}/fd/{shm}")
    return dev


def test_the_device_is_found_and_mapped_through_sysfs(
    guest: tuple[RunningDaemon, FakePtGuest], tmp_path: Path
) -> None:
    d, g = guest
    sysfs = tmp_path / "devices"
    other = sysfs / "0000:00:02.0"
    other.mkdir(parents=True)
    (other / "vendor").write_text("0x8086\n")
    (other / "device").write_text("0x100e\n")
    fake_device(sysfs, "0000:00:04.0", None)  # an ivshmem device of somebody else's
    bar0 = fake_device(sysfs, "0000:00:05.0", g.shm) / "resource0"
    assert ivshmem_devices(sysfs) == ["0000:00:04.0", "0000:00:05.0"]

    device = PtDevice("0000:00:05.0", sysfs)
    try:
        assert device.ivposition == 7
        assert device.region.size == os.fstat(g.shm).st_size
    finally:
        device.close()

    port = open_passthrough("pt:0", parse_port_spec("pt:0"), sysfs)
    with port:
        assert port.view.header.doorbell_peer == DAEMON_PEER_ID
        tx = port.tx_rings[0]
        tx.send([FRAME])
        port.txsync()  # the daemon is idle on the ring: a doorbell write, peer << 16 | vector
        assert struct.unpack_from("<I", bar0.read_bytes(), DOORBELL)[0] == DAEMON_PEER_ID << 16
    with pytest.raises(PassthroughUnavailable, match="1 ivshmem device"):
        open_passthrough("pt:1", parse_port_spec("pt:1"), sysfs)
    with pytest.raises(ValueError, match="named pt:N"):
        guest_open("eth0", "passthrough")
    del d


def test_a_region_mapped_twice_is_the_same_memory(guest: tuple[RunningDaemon, FakePtGuest]) -> None:
    # What the guest driver maps through sysfs is the memfd the daemon wrote: the header it parses is there.
    _, g = guest
    again = map_region(g.shm, os.fstat(g.shm).st_size)
    try:
        assert bytes(again.array[:8]) == bytes(g.region.array[:8])
    finally:
        again.close()
