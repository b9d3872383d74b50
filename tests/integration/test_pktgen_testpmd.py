"""``vhostmap pkt-gen`` (the netmap client library in a process of its own) against dpdk-testpmd's virtio-user
on another port of the same switch: exact frame counts both ways, and ping answered by testpmd's icmpecho."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vhostmap.control.client import call
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.testpmd import Testpmd, VirtioUserPort
from vhostmap.lab.wait import wait_until

pytestmark = pytest.mark.slow

CPU = 0  # testpmd's lcores share CPU 0; the daemon and pkt-gen have CPU 1


def pktgen(daemon: VhostmapDaemon, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``vhostmap pkt-gen`` to completion; its JSON result."""
    argv = [sys.executable, "-m", "vhostmap.cli", "pkt-gen", "--control", daemon.control, "--json", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"pkt-gen failed ({proc.returncode}): {proc.stderr}"
    result = json.loads(proc.stdout)
    result["stderr"] = proc.stderr
    return result  # type: ignore[no-any-return]


def switch_ports(daemon: VhostmapDaemon) -> dict[str, Any]:
    """The switch's per-port counters (for failure messages)."""
    return call(daemon.control, "switch", op="list")["switches"]["vale0"]["ports"]  # type: ignore[no-any-return]


def start_daemon(sock_dir: Path) -> VhostmapDaemon:
    return VhostmapDaemon(
        sock_dir, [f"t=vhost-user,path={sock_dir}/t.sock"], extra_args=["--switch", "vale0=t"]
    )


@pytest.mark.parametrize("size", [60, 1500])
def test_pktgen_sends_exactly_what_testpmd_receives(sock_dir: Path, size: int) -> None:
    # A switch drops what finds its destination ring full. Rounds of 1000 frames, each awaited, always fit
    # the rings between pkt-gen and testpmd (the port's TX ring holds 1023), whatever the machine's load.
    rounds, count = 5, 1000
    with (
        start_daemon(sock_dir) as daemon,
        Testpmd([VirtioUserPort(sock_dir / "t.sock")], forward_mode="rxonly", cpu=CPU) as tp,
    ):
        tp.start()
        for r in range(1, rounds + 1):
            result = pktgen(daemon, "-i", "vale0:pg", "-f", "tx", "-l", str(size), "-n", str(count))
            assert result["packets"] == count and result["bytes"] == count * size, result
            try:
                got = tp.wait_for_packets(r * count, timeout=30)
            except Exception as e:
                raise AssertionError(
                    f"round {r}: switch counters {switch_ports(daemon)}\n{daemon.diagnostics()}"
                ) from e
        assert got.rx_packets == rounds * count and got.rx_bytes == rounds * count * size
        t = daemon.stats()["t"]["totals"]
        assert t["tx_packets"] == rounds * count and t["tx_dropped"] == 0
        tp.stop()


def test_pktgen_receives_exactly_what_testpmd_sends(sock_dir: Path) -> None:
    # Each round sends 7 bursts of 32 at once: they fit testpmd's TX ring (256 descriptors) and pkt-gen's
    # rings whatever the pace; testpmd forwards nothing back (pkt-gen sends nothing).
    rounds, bursts, burst = 4, 7, 32
    with (
        start_daemon(sock_dir) as daemon,
        Testpmd([VirtioUserPort(sock_dir / "t.sock")], forward_mode="io", burst=burst, cpu=CPU) as tp,
    ):
        receiver = subprocess.Popen(
            [
                sys.executable, "-m", "vhostmap.cli", "pkt-gen", "--control", daemon.control, "--json",
                "-i", "vale0:pg", "-f", "rx", "-n", str(rounds * bursts * burst), "-D", "60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            # The receiver's switch port exists once the daemon lists it.
            wait_until(lambda: "vale0:pg" in daemon.status()["ports"], 30, "pkt-gen's switch port")
            sent = 0
            for _ in range(rounds):
                tp.start(tx_first=bursts)
                sent = tp.wait_for_packets(sent + bursts * burst, direction="tx").tx_packets
                tp.stop()
            out, err = receiver.communicate(timeout=90)
        finally:
            receiver.kill()
            receiver.wait()
        assert receiver.returncode == 0, err
        result = json.loads(out)
        assert sent == tp.stats()[0].tx_packets == rounds * bursts * burst
        assert result["packets"] == sent and result["bytes"] == sent * 64


def test_pktgen_pings_testpmd_icmpecho(sock_dir: Path) -> None:
    with (
        start_daemon(sock_dir) as daemon,
        Testpmd([VirtioUserPort(sock_dir / "t.sock")], forward_mode="icmpecho", cpu=CPU) as tp,
    ):
        tp.start()
        result = pktgen(daemon, "-i", "vale0:pg", "-f", "ping", "-n", "200", "--timeout", "2")
        tp.stop()
    assert result["packets"] == 200 and result["lost"] == 0
    rtt = result["rtt_us"]
    assert 0 < rtt["min"] <= rtt["p50"] <= rtt["p99"] <= rtt["max"]
