"""Packed virtqueues with a third-party front-end: dpdk-testpmd's net_virtio_user with ``packed_vq=1``
(issue #18, phase 2: the per-operation path; DPDK's driver takes its own packed paths, in order or not).

Counts are exact as in test_dpdk_virtio_user.py: testpmd's final TX count is what entered the virtqueue, and a
link never drops (a full ring holds the sender back).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.testpmd import Testpmd, VirtioUserPort
from vhostmap.lab.wait import wait_until

pytestmark = pytest.mark.slow

# testpmd's lcores share CPU 0, leaving CPU 1 to vhostmap.
CPU = 0
PACKED = ("packed_vq=1",)


def _totals(daemon: VhostmapDaemon, port: str) -> dict[str, int]:
    return daemon.stats()[port]["totals"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("size", "options"),
    [(64, PACKED), (1500, PACKED), (64, (*PACKED, "in_order=1")), (64, (*PACKED, "mrg_rxbuf=0"))],
    ids=["64", "1500", "64-in-order", "64-no-mrg"],
)
def test_txonly_into_a_lone_packed_port_is_received_and_dropped_exactly(
    sock_dir: Path, size: int, options: tuple[str, ...]
) -> None:
    with (
        VhostmapDaemon(sock_dir, [f"a=vhost-user,path={sock_dir}/a.sock,packed=on"]) as daemon,
        Testpmd(
            [VirtioUserPort(sock_dir / "a.sock", options=options)],
            forward_mode="txonly",
            txpkts=size,
            cpu=CPU,
        ) as tp,
    ):
        assert daemon.status()["ports"]["a"]["ring"] == "packed"
        tp.start()
        tp.wait_for_packets(2000, direction="tx", timeout=60)
        sent = tp.stop()[0].tx_packets
        totals = wait_until(
            lambda: (t := _totals(daemon, "a"))["rx_packets"] == sent and t, 30, f"{sent} packets in vhostmap"
        )
        assert totals["rx_packets"] == totals["rx_dropped"] == sent
        assert totals["rx_bytes"] == sent * size
        assert totals["errors"] == 0


@pytest.mark.parametrize("b_packed", [True, False], ids=["packed-packed", "packed-split"])
def test_io_forwarding_through_a_link_loses_nothing(sock_dir: Path, b_packed: bool) -> None:
    """Two virtio-user ports (a packed; b packed or split) io-forward into each other through a link: every
    burst keeps circulating, and every frame testpmd injected is in flight or was dropped by testpmd."""
    ports = [f"{n}=vhost-user,path={sock_dir}/{n}.sock,packed=on" for n in ("a", "b")]
    bursts, burst = 4, 32
    with (
        VhostmapDaemon(sock_dir, ports, ["a,b"]) as daemon,
        Testpmd(
            [
                VirtioUserPort(sock_dir / "a.sock", options=PACKED),
                VirtioUserPort(sock_dir / "b.sock", options=PACKED if b_packed else ()),
            ],
            forward_mode="io",
            burst=burst,
            cpu=CPU,
        ) as tp,
    ):
        status = daemon.status()["ports"]
        assert (status["a"]["ring"], status["b"]["ring"]) == ("packed", "packed" if b_packed else "split")
        tp.start(tx_first=bursts)
        tp.wait_for_packets(20 * bursts * burst, port=0, timeout=60)
        final = tp.stop()
        sent = sum(s.tx_packets for s in final.values())
        received = sum(s.rx_packets for s in final.values())
        dropped = sum(s.tx_dropped for s in final.values())
        assert sent - received + dropped == 2 * bursts * burst
        # Every frame testpmd counted as sent entered a virtqueue, and vhostmap takes it (the last burst maybe
        # after testpmd stopped); what vhostmap delivered is at least what testpmd received, and no more than
        # it took.
        a, b = wait_until(
            lambda: (
                (t := (_totals(daemon, "a"), _totals(daemon, "b")))
                and t[0]["rx_packets"] + t[1]["rx_packets"] == sent
                and t
            ),
            30,
            f"vhostmap to take the {sent} frames testpmd sent",
        )
        assert received <= a["tx_packets"] + b["tx_packets"] <= sent
        assert a["rx_dropped"] == a["tx_dropped"] == b["rx_dropped"] == b["tx_dropped"] == 0
        assert a["errors"] == b["errors"] == 0


def test_txonly_through_a_link_from_packed_to_split_arrives_exactly(sock_dir: Path) -> None:
    ports = [f"{n}=vhost-user,path={sock_dir}/{n}.sock,packed=on" for n in ("a", "b")]
    size = 64
    with (
        VhostmapDaemon(sock_dir, ports, ["a,b"]) as daemon,
        Testpmd([VirtioUserPort(sock_dir / "b.sock")], forward_mode="rxonly", txpkts=size, cpu=CPU) as rx,
        Testpmd(
            [VirtioUserPort(sock_dir / "a.sock", options=PACKED)], forward_mode="txonly", txpkts=size, cpu=CPU
        ) as tx,
    ):
        rx.start()
        tx.start()
        tx.wait_for_packets(1000, direction="tx", timeout=60)
        sent = tx.stop()[0].tx_packets
        got = rx.wait_for_packets(sent, timeout=60)
        assert got.rx_packets == sent
        assert got.rx_bytes == sent * size
        a, b = _totals(daemon, "a"), _totals(daemon, "b")
        assert a["rx_packets"] == b["tx_packets"] == sent
        assert a["rx_dropped"] == b["tx_dropped"] == a["errors"] == b["errors"] == 0
        rx.stop()
