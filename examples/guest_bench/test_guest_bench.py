"""A guest packet-IO benchmark written with vhostmap's pytest plugin: two guests of the Python image on a
vhostmap switch, a traffic generator in one, a counting receiver in the other.

Both ends are ``python3 -m vhostmap_guest.pktgen`` (netmap's pkt-gen for a guest's NIC, in the Python image)
in ``socket`` mode: one AF_PACKET send() or recv() per frame through the guest kernel's virtio-net driver.
The sender numbers its frames (``--seq``); the receiver compares every frame with the one expected and
counts the numbers it never saw or saw twice (``--check``). The test prints the rates each side measured;
it asserts only what holds however slow the machine is: frames arrived, each unchanged and at most once,
and the counters agree (no more received than the daemon delivered, no more delivered than it took from
the sender, no more taken than the sender sent). A rate is never asserted: under TCG on a busy CI
machine it varies several-fold.

Only the plugin's documented fixtures are used (``topology``; `vhostmap.testing.Topology` is imported for
the type hints). Run it with ``pytest -s examples/guest_bench`` (as root, with QEMU, the guest kernel of
scripts/guest-kernel and the Python image of scripts/guest-image, which the first run builds).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from vhostmap.testing import Guest, Topology

pytestmark = pytest.mark.slow

LENGTH = 60  # frame length without FCS: the smallest Ethernet frame, the hardest case per byte
COUNT = 50_000  # frames to send, unless SEND_SECONDS run out first
SEND_SECONDS = 5.0
RX_GRACE = 3.0  # how much longer than the sender the receiver may run (it starts first)
PKTGEN = "python3 -m vhostmap_guest.pktgen -i eth0 --seq --json"
# Both go through the guest kernel's socket path, one send() or recv() per frame ("generic" and "native",
# netmap rings over the kernel's driver or the userspace virtio driver, are the other modes).
TX_MODE = RX_MODE = "socket"
NO_IPV6 = "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do [ -e $f ] && echo 1 > $f; done; true"


@pytest.fixture
def bench_lab(topology: Callable[[dict[str, Any]], Topology]) -> Topology:
    """Two Python guests on switch sw0, without IPv6 (so the kernels send nothing of their own)."""
    lab = topology(
        {
            "switches": ["sw0"],
            "guests": {
                "sender": {"nics": ["sw0"], "image": "python"},
                "receiver": {"nics": ["sw0"], "image": "python"},
            },
        }
    )
    for g in lab.guests.values():
        g.run(NO_IPV6, check=True)
    return lab


def last_json(guest: Guest, path: str) -> dict[str, Any]:
    """The JSON object a pktgen run wrote (its last line) to ``path`` in ``guest``."""
    text = guest.run(f"cat {path}", check=True).output
    try:
        return dict(json.loads(text.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        raise AssertionError(f"pktgen in {guest.name} printed no result:\n{text}") from None


def nic_rx_packets(guest: Guest) -> int:
    """What ``guest``'s kernel counted arriving on eth0."""
    return int(guest.run("cat /sys/class/net/eth0/statistics/rx_packets", check=True).output)


def test_frames_from_one_guest_reach_the_other_through_the_switch_and_the_counters_agree(
    bench_lab: Topology,
) -> None:
    sender, receiver = bench_lab.guests["sender"], bench_lab.guests["receiver"]
    daemon = bench_lab.vhostmap
    # Both ends build the same frames: the sender's MAC to the receiver's, numbered from 0.
    frames = f"-l {LENGTH} --src-mac {sender.macs[0]} --dst-mac {receiver.macs[0]}"
    before, nic_before = daemon.stats(), nic_rx_packets(receiver)
    # The receiver runs in the background until it has every frame or its -D is over (a little longer than
    # the sender's, which starts after it); --ready says its rings are open, so it misses no frame.
    receiver.run(
        f"{PKTGEN} -f rx --mode {RX_MODE} --check {frames} -n {COUNT} -D {SEND_SECONDS + RX_GRACE:g} "
        "--ready /tmp/rx.ready > /tmp/rx.json 2>&1 & echo $! > /tmp/rx.pid",
        check=True,
    )
    receiver.run("until [ -e /tmp/rx.ready ]; do sleep 0.02; done", timeout=30, check=True)
    # The sender exits 1 when SEND_SECONDS ran out before COUNT frames were sent: a slow machine, no failure.
    sending = sender.run(
        f"{PKTGEN} -f tx --mode {TX_MODE} {frames} -n {COUNT} -D {SEND_SECONDS:g}", timeout=60
    )
    assert sending.rc in (0, 1), sending.output
    tx = json.loads(sending.output.strip().splitlines()[-1])
    receiver.run("while kill -0 $(cat /tmp/rx.pid) 2>/dev/null; do sleep 0.05; done", timeout=60, check=True)
    rx = last_json(receiver, "/tmp/rx.json")
    after, nic = daemon.stats(), nic_rx_packets(receiver) - nic_before

    def delta(port: str, counter: str) -> int:
        return int(after[port]["totals"][counter]) - int(before[port]["totals"][counter])

    took, delivered = delta("sender.0", "rx_packets"), delta("receiver.0", "tx_packets")
    sent, got, check = int(tx["packets"]), int(rx["packets"]), rx["check"]
    seconds = float(tx["seconds"])
    print(
        f"\nguest to guest over a vhostmap switch, {LENGTH}-byte frames, AF_PACKET sockets, QEMU TCG:"
        f"\n  sender     sent {sent} frames in {seconds:.2f} s: {sent / seconds / 1e3:.1f} Kpps"
        f"\n  vhostmap   took {took} of them, delivered {delivered}"
        f"\n  receiver   its kernel got {nic}: {nic / seconds / 1e3:.1f} Kpps over the sender's time;"
        f"\n             its application {got}, each unchanged and once "
        f"({100 * got / sent:.0f}% of the frames sent)"
    )
    assert sent > 0 and got > 0, (tx, rx)
    # Every frame that arrived was one of those sent, unchanged, and arrived once.
    assert check["mismatched"] == 0 and check["duplicates"] == 0, rx
    # Each frame number the sender did not send, or the receiver did not get, is missing: no more, no less.
    assert got + check["missing"] == COUNT, rx
    # No frame is counted twice or made up along the way: sent >= taken >= delivered >= arrived >= received.
    assert sent >= took >= delivered >= nic >= got, (sent, took, delivered, nic, got)
