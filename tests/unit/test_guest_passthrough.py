"""The guest side of a passthrough port (vhostmap_guest.passthrough) in this process: its NetmapPort over the
region a daemon handed out (the ivshmem handshake done as QEMU does, by pt_guest.FakePtGuest), exact frames
both ways through a link; and the device found and mapped through a sysfs tree (BAR 2 the region's memfd,
BAR 0 a file standing for the registers)."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from daemons import FRAME, RunningDaemon, StartDaemon
from pt_guest import FakePtGuest
from test_switch_daemon import frame as switch_frame

from vhostmap.ivshmem.protocol import DAEMON_PEER_ID
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.netmap.abi import (
    NR_REG_ALL_NIC,
    NR_REG_ONE_NIC,
    PT_HEARTBEAT_INTERVAL,
    PtHeader,
    Region,
    map_region,
)
from vhostmap.netmap.passthrough import GuestRegion
from vhostmap.netmap.user import POLLIN, POLLOUT, PortSpec, parse_port_spec
from vhostmap_guest import open as guest_open
from vhostmap_guest import port_spec
from vhostmap_guest.passthrough import (
    BAR0_SIZE,
    DOORBELL,
    IVPOSITION,
    PassthroughGone,
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


def test_a_pci_address_may_name_the_device() -> None:
    assert port_spec("0000:00:05.0") == PortSpec("0000:00:05.0", NR_REG_ALL_NIC, 0, None)
    assert port_spec("pt:0000:00:05.0") == PortSpec("0000:00:05.0", NR_REG_ALL_NIC, 0, "pt")
    assert port_spec("pt:0000:00:0a.7-2") == PortSpec("0000:00:0a.7", NR_REG_ONE_NIC, 2, "pt")
    assert port_spec("pt:1-1") == parse_port_spec("pt:1-1")  # anything else is nm_open's
    assert port_spec("eth0") == parse_port_spec("eth0")
    for bad in ("pt:0000:00:05.8", "0000:00:05", "pt:0000:00:05.0^", "vale0:0000:00:05.0"):
        with pytest.raises(ValueError):
            port_spec(bad)


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
        # No IOMMU group here: no vfio-pci, so no interrupt; the port busy-polls and says why.
        assert port.irq_fd is None and port.interrupt_problem is not None
        assert "vfio-pci" in port.interrupt_problem or "IOMMU" in port.interrupt_problem
        assert port.view.header.doorbell_peer == DAEMON_PEER_ID
        tx = port.tx_rings[0]
        tx.send([FRAME])
        port.txsync()  # the daemon is idle on the ring: a doorbell write, peer << 16 | vector
        assert struct.unpack_from("<I", bar0.read_bytes(), DOORBELL)[0] == DAEMON_PEER_ID << 16
    with pytest.raises(PassthroughUnavailable, match="1 ivshmem device"):
        open_passthrough("pt:1", parse_port_spec("pt:1"), sysfs)
    with pytest.raises(ValueError, match="named pt:N"):
        guest_open("eth0", "passthrough")

    # By the device's PCI address: the same device, also for one ring pair; others are refused, saying why.
    for name in ("pt:0000:00:05.0", "0000:00:05.0", "pt:0000:00:05.0-0"):
        with open_passthrough(name, port_spec(name), sysfs) as port:
            assert port.view.header.doorbell_peer == DAEMON_PEER_ID
            assert len(port.tx_rings) == 1
    with pytest.raises(ValueError, match="ring pair 1 does not exist"):
        open_passthrough("pt:0000:00:05.0-1", port_spec("pt:0000:00:05.0-1"), sysfs)
    with pytest.raises(PassthroughUnavailable, match=r"0000:00:02\.0 is no ivshmem device"):
        open_passthrough("pt:0000:00:02.0", port_spec("pt:0000:00:02.0"), sysfs)
    with pytest.raises(PassthroughUnavailable, match=r"no vhostmap passthrough region in 0000:00:04\.0"):
        open_passthrough("pt:0000:00:04.0", port_spec("pt:0000:00:04.0"), sysfs)
    del d


def test_a_region_mapped_twice_is_the_same_memory(guest: tuple[RunningDaemon, FakePtGuest]) -> None:
    # What the guest driver maps through sysfs is the memfd the daemon wrote: the header it parses is there.
    _, g = guest
    again = map_region(g.shm, os.fstat(g.shm).st_size)
    try:
        assert bytes(again.array[:8]) == bytes(g.region.array[:8])
    finally:
        again.close()


def test_the_daemon_stopping_stops_the_driver_with_a_clear_error(
    guest: tuple[RunningDaemon, FakePtGuest], capsys: pytest.CaptureFixture[str]
) -> None:
    d, g = guest
    region = Region(g.region.mm)
    port = PassthroughPort("pt:0", region, lambda: os.eventfd_write(g.doorbell, 1), release=lambda: None)
    with port:
        port.txsync()  # served
        d.daemon.stop()
        # The daemon wrote the header's gone word before it let go; the guest's memory stays (QEMU's).
        with pytest.raises(PassthroughGone, match="pt:0: the vhostmap daemon let go of this port"):
            port.poll(POLLIN, 1.0)
        with pytest.raises(PassthroughGone):
            port.txsync()
    # A driver opened afterwards is refused at once.
    with pytest.raises(PassthroughGone, match="generation 1"):
        PassthroughPort("pt:0", Region(g.region.mm), lambda: None, release=lambda: None)


def test_two_guests_in_passthrough_mode_through_a_switch_exchange_exact_frames(
    start_daemon: StartDaemon, sock_dir: Path
) -> None:
    """Guest to guest through a vhostmap switch, both guests' drivers in passthrough mode (the topology of
    ``python -m vhostmap.lab.ptswitch``, with QEMU's part played in this process)."""
    ports = [f"{n}=passthrough,path={sock_dir}/{n}.sock,slots={SLOTS}" for n in ("pt0", "pt1")]
    d = start_daemon({}, switches=["vale0=pt0,pt1"], other_ports=ports)
    fakes = [FakePtGuest(d.daemon.config.port(n).path) for n in ("pt0", "pt1")]
    try:
        drivers = [
            PassthroughPort(f"pt:{k}", Region(g.region.mm), lambda g=g: os.eventfd_write(g.doorbell, 1))
            for k, g in enumerate(fakes)
        ]
        mac_a, mac_b = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
        for src, dst, (tx, rx) in ((mac_a, mac_b, drivers), (mac_b, mac_a, drivers[::-1])):
            # A broadcast first: the switch learns the sender; then unicast, a ring's worth at a time (the
            # switch drops what finds no room, as VALE does: the receiver keeps up here, so nothing is).
            out = [switch_frame("ff:ff:ff:ff:ff:ff", src, 60)] + [
                switch_frame(dst, src, 60 + k % 1400, seq=k) for k in range(3 * SLOTS)
            ]
            got: list[bytes] = []
            for k in range(0, len(out), SLOTS // 2):
                batch = out[k : k + SLOTS // 2]
                assert tx.poll(POLLOUT, 5.0) & POLLOUT
                assert tx.tx_rings[0].send(batch) == len(batch)
                tx.txsync()
                while len(got) < k + len(batch):
                    assert rx.poll(POLLIN, 5.0) & POLLIN, f"{len(got)} of {k + len(batch)} frames"
                    b = rx.rx_rings[0].receive()
                    got += b.frames()
                    rx.rx_rings[0].advance(len(b))
                rx.rxsync()
            assert got == out
        sw = d.daemon.stats({})["switches"]["vale0"]["ports"]
        total = 2 * (3 * SLOTS + 1)
        assert sum(p["dropped"] + p["tx_dropped"] for p in sw.values()) == 0, sw
        q0, q1 = d.stats("pt0")["queues"][0], d.stats("pt1")["queues"][0]
        assert q0["rx_packets"] + q1["rx_packets"] == total and q0["tx_packets"] + q1["tx_packets"] == total
        for driver in drivers:
            driver.close()
    finally:
        for g in fakes:
            g.close()


def test_with_an_interrupt_poll_sleeps_until_the_daemon_raises_it(
    guest: tuple[RunningDaemon, FakePtGuest],
) -> None:
    """The eventfd the daemon interrupts the guest through is what vfio-pci's MSI-X eventfd stands for in a
    guest (vfio.VfioPtDevice): poll asks for the interrupt (appl_need_kick), sleeps, and wakes when frames
    arrive; nothing else wakes it."""
    d, g = guest
    fe = d.frontend("a")
    port = PassthroughPort(
        "pt:0",
        Region(g.region.mm),
        lambda: os.eventfd_write(g.doorbell, 1),
        release=lambda: None,
        irq_fd=g.irq,
    )
    with port, ThreadPoolExecutor(1) as pool:
        assert port.poll(POLLIN, 0.2) == 0 and port.sleeps >= 1  # nothing came: it slept, then timed out
        before = d.stats("pt0")["passthrough"]["interrupts"]
        sleeps = port.sleeps
        woke = pool.submit(port.poll, POLLIN, 30.0)
        d.wait(lambda: port.sleeps > sleeps, "the guest driver to sleep on its interrupt")
        out = frames(10, tag=5)
        fe.transmit(out)
        assert woke.result(30) & POLLIN
        assert d.stats("pt0")["passthrough"]["interrupts"] > before
        got = port.rx_rings[0].receive()
        assert got.frames() == out
        # The flag is down again once awake: a busy receiver costs the daemon no interrupts.
        assert port.csb(port.rx_rings[0]).atok.appl_need_kick == 0


def test_a_daemon_serving_the_port_advances_its_heartbeat(guest: tuple[RunningDaemon, FakePtGuest]) -> None:
    d, g = guest
    at = PtHeader.heartbeat.offset
    beats = g.region.array[at : at + 4].view("<u4")  # a view of the region's array: nothing to release
    first = int(beats[0])
    d.wait(lambda: int(beats[0]) >= first + 3, "three heartbeats")


def test_a_heartbeat_that_stands_still_stops_a_waiting_driver_and_one_that_moves_does_not() -> None:
    region = GuestRegion("pt0", num_rings=1, num_slots=SLOTS, buf_size=2048, doorbell=(0, 0), generation=1)
    try:
        mm = region.memory.region.mm
        port = PassthroughPort("pt:0", Region(mm), lambda: None, release=lambda: None, heartbeat_timeout=0.5)
        with pytest.raises(ValueError, match="heartbeat_timeout"):
            PassthroughPort("pt:0", Region(mm), lambda: None, heartbeat_timeout=0)
        # A beating daemon with nothing to say: poll waits its whole timeout, well past heartbeat_timeout.
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(0.05):
                region.beat()

        beater = threading.Thread(target=beat)
        beater.start()
        try:
            start = time.monotonic()
            assert port.poll(POLLIN, 1.5) == 0
            assert time.monotonic() - start >= 1.5
        finally:
            stop.set()
            beater.join()
        # No beat any more (a SIGKILLed daemon): the wait ends with a clear error after about the timeout.
        start = time.monotonic()
        with pytest.raises(
            PassthroughGone, match=r"pt:0: the vhostmap daemon stopped answering .*SIGKILLed or hung"
        ):
            port.poll(POLLIN, 30.0)
        assert 0.4 <= time.monotonic() - start < 5.0  # the last beat came up to 0.05 s before ``start``
        # Ready rings are no wait: poll returns them without looking at the heartbeat.
        assert port.poll(POLLOUT, 0.0) & POLLOUT
        port.close()
        del port, mm
    finally:
        region.close()


def test_a_sigkilled_daemon_is_reported_by_its_still_heartbeat(sock_dir: Path) -> None:
    """A daemon that cannot write ``gone`` (SIGKILL): the driver of a guest waiting on the port gives up
    after its heartbeat timeout instead of waiting forever."""
    path = sock_dir / "pt0.sock"
    with VhostmapDaemon(sock_dir, [f"pt0=passthrough,path={path},slots={SLOTS}"]) as daemon:
        g = FakePtGuest(str(path))
        try:
            port = PassthroughPort(
                "pt:0",
                Region(g.region.mm),
                lambda: os.eventfd_write(g.doorbell, 1),
                release=lambda: None,
                heartbeat_timeout=1.0,
            )
            with port:
                # Alive: a wait longer than the timeout ends with nothing, not an error.
                assert port.poll(POLLIN, 3 * PT_HEARTBEAT_INTERVAL + 1.0) == 0
                daemon.kill()
                start = time.monotonic()
                with pytest.raises(PassthroughGone, match="stopped answering"):
                    port.poll(POLLIN, 30.0)
                assert time.monotonic() - start < 10.0
                assert not port.view.header.gone  # nobody wrote it: only the heartbeat told
        finally:
            g.close()
