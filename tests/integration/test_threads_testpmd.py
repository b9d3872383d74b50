"""Two datapath threads (``--cpu 0,1``) between two dpdk-testpmd virtio-user ports, through a link and through
the switch, both ways at once: every frame each side sends arrives once on the other side, and the daemon's
counters agree with testpmd's. Each port's receive queue is served by another thread, so each direction is
forwarded by its own thread into a ring the other thread's direction never fills."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.testpmd import Testpmd, VirtioUserPort

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="two threads need CPUs 0 and 1"),
]

CPU = 0  # both testpmds poll on CPU 0, beside datapath thread 0; thread 1 has CPU 1


@pytest.mark.parametrize("size", [64, 1500])
@pytest.mark.parametrize("topology", ["link", "switch"])
def test_two_threads_forward_both_ways_exactly(sock_dir: Path, topology: str, size: int) -> None:
    rounds, bursts, burst = 3, 7, 32  # 224 frames a round each way: they fit every ring on the way
    forwarder = ["--link", "a,b"] if topology == "link" else ["--switch", "vale0=a,b"]
    ports = [f"{name}=vhost-user,path={sock_dir}/{name}.sock" for name in "ab"]

    def testpmd(name: str) -> Testpmd:
        # rxonly: what it receives goes nowhere; `start tx_first N` sends N bursts first.
        port = VirtioUserPort(sock_dir / f"{name}.sock")
        return Testpmd([port], forward_mode="rxonly", cpu=CPU, txpkts=size, burst=burst)

    with (
        VhostmapDaemon(sock_dir, ports, extra_args=["--cpu", "0,1", *forwarder]) as daemon,
        testpmd("a") as ta,
        testpmd("b") as tb,
    ):
        threads = daemon.status()["datapath"]["threads"]
        owners = {q["port"]: t["cpu"] for t in threads for q in t["rx_queues"]}
        assert owners == {"a": 0, "b": 1}, f"each port's receive queue on its own thread: {threads}"
        for r in range(1, rounds + 1):
            ta.start(tx_first=bursts)
            tb.start(tx_first=bursts)
            each = r * bursts * burst
            for sender, receiver in ((ta, tb), (tb, ta)):
                assert sender.wait_for_packets(each, direction="tx").tx_packets == each
                got = receiver.wait_for_packets(each)
                assert got.rx_packets == each, f"round {r}: {got.rx_packets} of {each} frames arrived"
            ta.stop()
            tb.stop()
        total = rounds * bursts * burst
        for tp in (ta, tb):
            s = tp.stats()[0]
            assert (s.tx_packets, s.rx_packets, s.rx_bytes) == (total, total, total * size)
        stats = daemon.stats()
        for name in "ab":
            t = stats[name]["totals"]
            counted = (t["rx_packets"], t["tx_packets"], t["rx_dropped"], t["tx_dropped"])
            assert counted == (total, total, 0, 0), f"port {name}"
