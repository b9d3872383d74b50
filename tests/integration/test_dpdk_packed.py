"""Packed virtqueues with a third-party front-end: dpdk-testpmd's net_virtio_user with ``packed_vq=1``
(issue #18, phase 2: the per-operation path; DPDK's driver takes its own packed paths, in order or not).

Counts are exact as in test_dpdk_virtio_user.py: testpmd's final TX count is what entered the virtqueue, and a
link never drops (a full ring holds the sender back).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from test_dpdk_virtio_user import _totals, check_txonly_through_link

from vhostmap.control.client import call
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.frontend import FakeFrontend
from vhostmap.lab.testpmd import Testpmd, VirtioUserPort
from vhostmap.lab.wait import wait_until
from vhostmap.virtio.spec import RING_EVENT_FLAGS_DISABLE

pytestmark = pytest.mark.slow

# testpmd's lcores share CPU 0, leaving CPU 1 to vhostmap.
CPU = 0
PACKED = ("packed_vq=1",)


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
        check_txonly_through_link(daemon, tx, rx, size, 1000)


def _virtio_paths(log: str) -> dict[str, str]:
    """The Rx and Tx paths DPDK's virtio PMD chose, as its init log names them ("standard", "vectorized",
    "mergeable buffer", ...), by direction."""
    return {
        d: m.group(1) for d in ("Rx", "Tx") if (m := re.search(rf"using packed ring (.+?) {d} path", log))
    }


# DPDK 22.11 has vectorized packed paths for x86 only with AVX512F, IN_ORDER and a SIMD width of 512 allowed;
# without them the driver says so once and takes its standard paths.
HAS_AVX512F = "avx512f" in Path("/proc/cpuinfo").read_text().split()
VIRTIO_LOG = ("--log-level=pmd.net.virtio.init:info", "--log-level=pmd.net.virtio.driver:info")
VECTORIZED = (*PACKED, "in_order=1", "mrg_rxbuf=0", "vectorized=1")


@pytest.mark.parametrize(
    ("options", "queues"), [(VECTORIZED, 1), (PACKED, 4)], ids=["vectorized", "4-queues"]
)
def test_txonly_through_a_link_between_packed_ports_arrives_exactly(
    sock_dir: Path, options: tuple[str, ...], queues: int
) -> None:
    """Both ends packed: txonly into a, rxonly on b. With vectorized=1 (in order, no mergeable buffers, SIMD
    width 512 allowed) DPDK takes its vectorized packed paths where the CPU has AVX512F, and says it does
    not elsewhere; either way counts are exact. With 4 queue pairs testpmd spreads over all of them."""
    size = 64
    ports = [f"{n}=vhost-user,path={sock_dir}/{n}.sock,packed=on,queues={queues}" for n in ("a", "b")]
    eal = (*VIRTIO_LOG, "--force-max-simd-bitwidth=512") if "vectorized=1" in options else VIRTIO_LOG
    with (
        VhostmapDaemon(sock_dir, ports, ["a,b"]) as daemon,
        Testpmd(
            [VirtioUserPort(sock_dir / "b.sock", queues=queues, options=options)],
            forward_mode="rxonly",
            cpu=CPU,
            eal_args=eal,
        ) as rx,
        Testpmd(
            [VirtioUserPort(sock_dir / "a.sock", queues=queues, options=options)],
            forward_mode="txonly",
            txpkts=size,
            cpu=CPU,
            eal_args=eal,
        ) as tx,
    ):
        status = daemon.status()["ports"]
        assert status["a"]["ring"] == status["b"]["ring"] == "packed"
        for tp in (rx, tx):
            log = tp.startup_output + tp.log_path.read_text(errors="replace")
            paths = _virtio_paths(log)
            if "vectorized=1" not in options:
                assert "vectorized" not in " ".join(paths.values()), paths
            elif HAS_AVX512F:
                assert paths == {"Rx": "vectorized", "Tx": "vectorized"}, paths
            else:
                assert "disabled packed ring vectorized path for requirements not met" in log
                assert paths == {"Rx": "standard", "Tx": "standard"}, paths
        if "vectorized=1" in options:
            assert "VIRTIO_F_IN_ORDER" in status["a"]["features"]
            assert "VIRTIO_NET_F_MRG_RXBUF" not in status["a"]["features"]
        check_txonly_through_link(daemon, tx, rx, size, 2000, queues)


MAC_A, MAC_B = "52:54:00:00:00:0a", "52:54:00:00:00:0b"


def test_io_forwarding_through_the_switch_loses_nothing_and_keeps_the_frames_intact(sock_dir: Path) -> None:
    """Two packed virtio-user ports io-forward into each other through switch vale0, whose third port is a
    packed driver (FakeFrontend). testpmd's frames go to addresses nobody has (its default peers,
    02:00:00:00:00:0N), so the switch floods each to the other testpmd port and to the driver; each keeps
    its source address on every lap (io mode sends a frame out of the port paired with the one it came
    in on), so the switch learns nothing wrong. Counts are exact as over a link, and the copies the driver
    takes after dozens of laps over packed rings are testpmd's frames byte for byte."""
    size, bursts, burst, taken = 200, 4, 32, 64
    ports = [
        f"a=vhost-user,path={sock_dir}/a.sock,packed=on,mac={MAC_A}",
        f"b=vhost-user,path={sock_dir}/b.sock,packed=on,mac={MAC_B}",
        f"c=vhost-user,path={sock_dir}/c.sock,packed=on",
    ]
    with (
        VhostmapDaemon(sock_dir, ports, extra_args=["--switch", "vale0=a,b,c"]) as daemon,
        FakeFrontend(str(sock_dir / "c.sock"), packed=True) as driver,
    ):
        driver.connect()
        driver.negotiate()
        with Testpmd(
            [
                VirtioUserPort(sock_dir / "a.sock", mac=MAC_A, options=PACKED),
                VirtioUserPort(sock_dir / "b.sock", mac=MAC_B, options=PACKED),
            ],
            forward_mode="io",
            txpkts=size,
            burst=burst,
            cpu=CPU,
        ) as tp:
            status = daemon.status()["ports"]
            assert [status[n]["ring"] for n in "abc"] == ["packed"] * 3
            tp.start(tx_first=bursts)
            tp.wait_for_packets(20 * bursts * burst, port=0, timeout=60)
            # Copies of frames that have gone round many times, taken while they still circulate.
            driver.post_receive_buffers(taken)
            frames = driver.receive(taken, timeout=30)
            final = tp.stop()
        sent = sum(s.tx_packets for s in final.values())
        received = sum(s.rx_packets for s in final.values())
        dropped = sum(s.tx_dropped for s in final.values())
        assert sent - received + dropped == 2 * bursts * burst

        def settled() -> dict[str, dict[str, int]] | None:
            stats = daemon.stats()
            t = {n: stats[n]["totals"] | {"held": stats[n]["occupancy"][0]["held"]} for n in "abc"}
            return t if t["a"]["rx_packets"] + t["b"]["rx_packets"] == sent else None

        t = wait_until(
            settled, 30, f"vhostmap to take the {sent} frames testpmd sent", details=daemon.diagnostics
        )
        a, b, c = t["a"], t["b"], t["c"]
        switch = daemon.switches()["vale0"]["ports"]
        # Each frame in was flooded: out of the other testpmd port, and into the driver port's TX ring (then
        # taken by the driver or held there), or dropped by the switch once that ring was full.
        assert switch["a"]["flooded"] + switch["b"]["flooded"] == sent
        assert received <= a["tx_packets"] + b["tx_packets"] + a["held"] + b["held"] == sent
        assert (
            a["tx_dropped"] == b["tx_dropped"] == switch["a"]["tx_dropped"] == switch["b"]["tx_dropped"] == 0
        )
        assert c["tx_packets"] + c["held"] == switch["c"]["tx_frames"]
        assert switch["c"]["tx_frames"] + switch["c"]["tx_dropped"] == sent, switch["c"]
        assert c["tx_packets"] == taken
        assert a["errors"] == b["errors"] == c["errors"] == 0
        assert daemon.learnt_port("vale0", MAC_A) == "a" and daemon.learnt_port("vale0", MAC_B) == "b"
    # testpmd's txonly frames (IPv4 198.18.0.1 -> 198.18.0.2, UDP 9 -> 9) from both ports, and the same
    # bytes every time a port's frame is copied: nothing changed them on any lap.
    by_source: dict[str, set[bytes]] = {}
    for frame in frames:
        pkt = Ether(frame)
        assert len(frame) == size
        assert pkt.dst in ("02:00:00:00:00:00", "02:00:00:00:00:01"), pkt.dst
        assert (pkt[IP].src, pkt[IP].dst, pkt[UDP].sport, pkt[UDP].dport) == (
            "198.18.0.1",
            "198.18.0.2",
            9,
            9,
        )
        header = pkt[IP].copy()
        del header.chksum
        assert IP(bytes(header)).chksum == pkt[IP].chksum
        by_source.setdefault(pkt.src, set()).add(frame)
    assert set(by_source) <= {MAC_A, MAC_B}
    assert all(len(copies) == 1 for copies in by_source.values()), {k: len(v) for k, v in by_source.items()}


def _eventfd_counts(pid: int) -> list[int]:
    """The counters of every eventfd process ``pid`` holds (a virtio-user driver: its kick and call fds), read
    from /proc without touching them."""
    counts = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:[eventfd]":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue  # closed meanwhile
        match = re.search(r"^eventfd-count:\s*([0-9a-f]+)$", info, re.M)
        assert match is not None, info
        counts.append(int(match.group(1), 16))
    return counts


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_a_polling_daemon_tells_packed_drivers_not_to_kick(sock_dir: Path, poll: bool) -> None:
    """testpmd txonly (packed) -> link -> testpmd rxonly (packed), vhostmap polling on CPU 1 or sleeping on
    kicks. Polling, it sets RING_EVENT_FLAGS_DISABLE in every device area, and the drivers never kick: their
    kick eventfds, which nobody reads then, hold at most the one kick each driver made before the device's
    first batch on that queue wrote the flags (as with split rings, a queue's device area is written by its
    batches). In interrupt mode the same drivers kick hundreds of times. Neither asks for interrupts (their
    driver areas say RING_EVENT_FLAGS_DISABLE) and none is sent. Counts are exact either way."""
    size = 64
    ports = [f"{n}=vhost-user,path={sock_dir}/{n}.sock,packed=on" for n in ("a", "b")]
    extra = ["--poll", "--cpu", "1"] if poll else []
    with (
        VhostmapDaemon(sock_dir, ports, ["a,b"], extra_args=extra) as daemon,
        Testpmd([VirtioUserPort(sock_dir / "b.sock", options=PACKED)], forward_mode="rxonly", cpu=CPU) as rx,
        Testpmd(
            [VirtioUserPort(sock_dir / "a.sock", options=PACKED)], forward_mode="txonly", txpkts=size, cpu=CPU
        ) as tx,
    ):
        rx.start()
        tx.start()
        tx.wait_for_packets(2000, direction="tx", timeout=60)
        sent = tx.stop()[0].tx_packets
        got = rx.wait_for_packets(sent, timeout=60)
        assert (got.rx_packets, got.rx_bytes) == (sent, sent * size)
        for port in ("a", "b"):
            for pair in call(daemon.control, "inspect", port=port)["queues"]:
                for vq in (pair["guest_receive"], pair["guest_transmit"]):
                    assert vq["layout"] == "packed"
                    assert vq["kicks_asked"] is not poll, vq
                    # testpmd polls too: its driver areas say not to interrupt it, and vhostmap never does.
                    assert vq["driver_event_flags"] == RING_EVENT_FLAGS_DISABLE, vq
                    carried = vq["index"] == (1 if port == "a" else 0)  # a's transmissions, b's receptions
                    if carried:  # the device area says so from the queue's first batch on
                        assert (vq["device_event_flags"] == RING_EVENT_FLAGS_DISABLE) is poll, vq
        kicks = _totals(daemon, "a")["kicks"] + _totals(daemon, "b")["kicks"]
        if poll:
            for tp in (tx, rx):
                assert tp.pid is not None
                counts = _eventfd_counts(tp.pid)
                assert len(counts) >= 2, f"testpmd {tp.pid} has no kick and call eventfds: {counts}"
                # Each queue's kick fd: at most the one kick the driver made before that first batch.
                assert max(counts) <= 1, f"testpmd {tp.pid} kicked a polling daemon: {counts}"
        else:
            assert kicks > 100, f"the drivers kicked an interrupt-mode daemon {kicks} times only"
        a, b = _totals(daemon, "a"), _totals(daemon, "b")
        assert a["rx_packets"] == b["tx_packets"] == sent
        assert a["rx_dropped"] == b["tx_dropped"] == a["errors"] == b["errors"] == 0
        assert a["calls"] == b["calls"] == 0
        rx.stop()
