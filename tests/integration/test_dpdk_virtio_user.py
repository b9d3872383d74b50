"""vhostmap against a third-party vhost-user front-end: dpdk-testpmd with net_virtio_user.

Counts are exact: testpmd's final TX count is what entered the virtqueue, and vhostmap never drops on a link
(a full ring holds the sender back), so the receiver ends with exactly that many.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.frontend import FakeFrontend
from vhostmap.lab.testpmd import Testpmd, VirtioUserPort
from vhostmap.lab.wait import wait_until

pytestmark = pytest.mark.slow

# testpmd's lcores share CPU 0, leaving CPU 1 to vhostmap.
CPU = 0
JUMBO_ARGS = ("--mbuf-size=10240", "--max-pkt-len=9600")


def _testpmd_args(size: int) -> dict[str, object]:
    return {"txpkts": size, "app_args": JUMBO_ARGS if size > 2000 else (), "cpu": CPU}


def _totals(daemon: VhostmapDaemon, port: str) -> dict[str, int]:
    return daemon.stats()[port]["totals"]  # type: ignore[no-any-return]


def check_txonly_through_link(
    daemon: VhostmapDaemon, tx: Testpmd, rx: Testpmd, size: int, at_least: int, queues: int = 1
) -> None:
    """Start rxonly ``rx`` and txonly ``tx`` on the two ends of link a,b, stop ``tx`` after ``at_least``
    frames: ``rx`` gets every frame ``tx`` sent, byte for byte counted, the daemon counts them once each
    way with nothing dropped, and with several queue pairs every one carried frames."""
    rx.start()
    tx.start()
    tx.wait_for_packets(at_least, direction="tx", timeout=60)
    sent = tx.stop()[0].tx_packets
    got = rx.wait_for_packets(sent, timeout=60)
    assert got.rx_packets == sent
    assert got.rx_bytes == sent * size
    a, b = _totals(daemon, "a"), _totals(daemon, "b")
    assert a["rx_packets"] == b["tx_packets"] == sent
    assert a["rx_dropped"] == b["tx_dropped"] == a["errors"] == b["errors"] == 0
    if queues > 1:
        used = [q["rx_packets"] > 0 for q in daemon.stats()["a"]["queues"]]
        assert all(used), f"testpmd spreads over every queue pair: {used}"
    rx.stop()


@pytest.mark.parametrize("size", [64, 1500])
def test_txonly_into_a_lone_port_is_received_and_dropped_exactly(sock_dir: Path, size: int) -> None:
    with (
        VhostmapDaemon(sock_dir, [f"a=vhost-user,path={sock_dir}/a.sock"]) as daemon,
        Testpmd([VirtioUserPort(sock_dir / "a.sock")], forward_mode="txonly", **_testpmd_args(size)) as tp,
    ):
        tp.start()
        tp.wait_for_packets(2000, direction="tx")
        sent = tp.stop()[0].tx_packets
        totals = wait_until(
            lambda: (t := _totals(daemon, "a"))["rx_packets"] == sent and t, 30, f"{sent} packets in vhostmap"
        )
        assert totals["rx_packets"] == totals["rx_dropped"] == sent
        assert totals["rx_bytes"] == sent * size
        assert totals["errors"] == 0


@pytest.mark.parametrize(("size", "queues"), [(64, 1), (1500, 1), (9000, 1), (64, 4)])
def test_txonly_through_a_link_arrives_exactly(sock_dir: Path, size: int, queues: int) -> None:
    mtu = ",mtu=9000" if size > 1500 else ""
    ports = [f"{n}=vhost-user,path={sock_dir}/{n}.sock,queues={queues}{mtu}" for n in ("a", "b")]
    with (
        VhostmapDaemon(sock_dir, ports, ["a,b"]) as daemon,
        Testpmd(
            [VirtioUserPort(sock_dir / "b.sock", queues=queues)], forward_mode="rxonly", **_testpmd_args(size)
        ) as rx,
        Testpmd(
            [VirtioUserPort(sock_dir / "a.sock", queues=queues)], forward_mode="txonly", **_testpmd_args(size)
        ) as tx,
    ):
        # testpmd checks --txpkts against the default mbuf size before it reads --mbuf-size: set it here.
        tx.command(f"set txpkts {size}")
        check_txonly_through_link(daemon, tx, rx, size, 1000, queues)


def test_io_forwarding_with_tx_first_loses_nothing(sock_dir: Path) -> None:
    """Two virtio-user ports io-forward into each other through a link: every burst keeps circulating."""
    ports = [f"{n}=vhost-user,path={sock_dir}/{n}.sock" for n in ("a", "b")]
    bursts, burst = 4, 32
    with (
        VhostmapDaemon(sock_dir, ports, ["a,b"]) as daemon,
        Testpmd(
            [VirtioUserPort(sock_dir / "a.sock"), VirtioUserPort(sock_dir / "b.sock")],
            forward_mode="io",
            burst=burst,
            cpu=CPU,
        ) as tp,
    ):
        tp.start(tx_first=bursts)
        # Many round trips: far more packets received than were ever injected.
        tp.wait_for_packets(20 * bursts * burst, port=0, timeout=60)
        final = tp.stop()
        sent = sum(s.tx_packets for s in final.values())
        received = sum(s.rx_packets for s in final.values())
        dropped = sum(s.tx_dropped for s in final.values())
        in_flight = sent - received
        # Packets are conserved: what testpmd injected is in flight or was dropped by testpmd itself.
        assert in_flight + dropped == 2 * bursts * burst
        a, b = _totals(daemon, "a"), _totals(daemon, "b")
        assert a["rx_dropped"] == a["tx_dropped"] == b["rx_dropped"] == b["tx_dropped"] == 0


def test_testpmd_frames_reach_a_driver_byte_for_byte(sock_dir: Path) -> None:
    """Frames testpmd builds arrive intact in a guest driver on the other side of a link."""
    ports = [f"{n}=vhost-user,path={sock_dir}/{n}.sock" for n in ("a", "b")]
    count = 64
    with VhostmapDaemon(sock_dir, ports, ["a,b"]) as daemon, FakeFrontend(str(sock_dir / "b.sock")) as guest:
        guest.connect()
        guest.negotiate()
        guest.post_receive_buffers(count)
        with Testpmd(
            [VirtioUserPort(sock_dir / "a.sock")], forward_mode="io", txpkts=200, burst=count, cpu=CPU
        ) as tp:
            # io mode with tx_first sends exactly one burst of testpmd's txonly frames, then forwards
            # what it receives: nothing, as the driver sends nothing back.
            tp.start(tx_first=1)
            frames = guest.receive(count, timeout=30)
            tp.command("stop")
        assert len(frames) == count
        for frame in frames:
            pkt = Ether(frame)
            assert len(frame) == 200
            assert IP in pkt and UDP in pkt
            # testpmd's txonly template: IPv4 198.18.0.1 -> 198.18.0.2, UDP 9 -> 9, valid header checksum.
            assert (pkt[IP].src, pkt[IP].dst, pkt[UDP].sport, pkt[UDP].dport) == (
                "198.18.0.1",
                "198.18.0.2",
                9,
                9,
            )
            header = pkt[IP].copy()
            del header.chksum
            assert IP(bytes(header)).chksum == pkt[IP].chksum
        assert _totals(daemon, "b")["tx_packets"] == count


@pytest.mark.parametrize("size", [64, 1500])
def test_a_generating_port_feeds_testpmd_rxonly_without_drops(sock_dir: Path, size: int) -> None:
    """A port with generate= is a traffic source for a guest's receive path, as net_vhost's txonly is: every
    frame vhostmap counts as delivered is one testpmd received, of the right length, and none is dropped."""
    with (
        VhostmapDaemon(sock_dir, [f"a=vhost-user,path={sock_dir}/a.sock,generate={size}"]) as daemon,
        Testpmd([VirtioUserPort(sock_dir / "a.sock")], forward_mode="rxonly", **_testpmd_args(size)) as rx,
    ):
        rx.start()
        rx.wait_for_packets(10_000, timeout=60)
        got = rx.stop()[0]
        # Stopped, the front-end takes nothing more: the daemon delivered what testpmd received plus at most
        # what fills the receive queue testpmd stopped polling (its size: 256 entries by default).
        totals = _totals(daemon, "a")
        assert got.rx_bytes == got.rx_packets * size
        assert 0 <= totals["tx_packets"] - got.rx_packets <= 256
        assert totals["tx_dropped"] == totals["errors"] == 0
