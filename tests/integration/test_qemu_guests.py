"""Stock Linux guests (QEMU TCG, the kernel's virtio_net) attached to vhostmap: ping, a file copy, restarts.

Guest A is 10.0.0.1 on port a, guest B 10.0.0.2 on port b, and the ports are linked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal

import pytest

from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.qemu import Nic, QemuGuest
from vhostmap.lab.wait import wait_until

pytestmark = pytest.mark.slow

GUESTS = {"a": ("52:54:00:00:00:0a", "10.0.0.1/24"), "b": ("52:54:00:00:00:0b", "10.0.0.2/24")}


@contextmanager
def linked_guests(
    kernel: GuestKernel,
    workdir: Path,
    qemu_mode: Literal["client", "server"],
    options: dict[str, str] | None = None,
    nic_options: tuple[str, ...] = (),
) -> Iterator[tuple[VhostmapDaemon, QemuGuest, QemuGuest]]:
    """vhostmap with ports a and b linked, and a guest on each; QEMU is the socket's ``qemu_mode`` side.
    ``options``: more --port options, by port; ``nic_options``: more virtio-net-pci properties."""
    our_mode = "server" if qemu_mode == "client" else "client"
    extra = {n: f",{o}" for n, o in (options or {}).items()}
    ports = [
        f"{n}=vhost-user,path={workdir}/{n}.sock,mode={our_mode},mac={mac}{extra.get(n, '')}"
        for n, (mac, _) in GUESTS.items()
    ]
    daemon = VhostmapDaemon(workdir, ports, ["a,b"])
    guests = [
        QemuGuest(
            [Nic(workdir / f"{n}.sock", mac, mode=qemu_mode, ip=ip, options=nic_options)],
            kernel=kernel,
            workdir=workdir / f"q{n}",
        )
        for n, (mac, ip) in GUESTS.items()
    ]
    with ExitStack() as stack:
        stack.enter_context(daemon)
        for g in guests:
            stack.enter_context(g)
        for g in guests:
            g.wait_ready()
            g.wait_carrier("eth0")
        yield daemon, guests[0], guests[1]
        for g in guests:
            g.poweroff()


def copy_file(src: QemuGuest, dst: QemuGuest, megabytes: int) -> tuple[str, str]:
    """Copy a random file from ``src`` (10.0.0.1) to ``dst`` by HTTP (busybox httpd, wget); both md5s."""
    src.run(
        f"mkdir -p /srv && dd if=/dev/urandom of=/srv/blob bs=1M count={megabytes} 2>/dev/null",
        check=True,
        timeout=60,
    )
    sent = src.run("md5sum /srv/blob", check=True).output.split()[0]
    src.run("busybox httpd -p 8080 -h /srv", check=True)
    dst.run("wget -q -O /tmp/blob http://10.0.0.1:8080/blob", check=True, timeout=240)
    received = dst.run("md5sum /tmp/blob", check=True).output.split()[0]
    return sent, received


def cpu_seconds(pid: int, over: float) -> float:
    """CPU time (user + system) process ``pid`` uses during the next ``over`` seconds."""

    def used() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = used()
    time.sleep(over)  # a measurement window, not synchronisation
    return used() - before


@pytest.mark.parametrize("qemu_mode", ["client", "server"])
def test_two_guests_on_a_link_ping_and_copy_a_file(
    guest_kernel: GuestKernel, sock_dir: Path, qemu_mode: Literal["client", "server"]
) -> None:
    with linked_guests(guest_kernel, sock_dir, qemu_mode) as (daemon, a, b):
        assert a.ping("10.0.0.2", count=10) == 0.0
        assert b.ping("10.0.0.1", count=3) == 0.0
        sent, received = copy_file(a, b, megabytes=10)
        assert sent == received
        stats = daemon.stats()
        assert stats["a"]["totals"]["rx_bytes"] > 10 * 2**20
        # The sender left checksums and segmentation to the device, and the receiver takes them: its frames
        # (up to 64 KiB of TCP) went across with their headers, in one copy, unsegmented (the md5s above).
        for name in ("a", "b"):
            features = set(daemon.status()["ports"][name]["features"])
            assert {"VIRTIO_NET_F_CSUM", "VIRTIO_NET_F_HOST_TSO4", "VIRTIO_NET_F_GUEST_TSO4"} <= features
        a = stats["a"]["totals"]
        assert 0 < a["rx_offload_passed"] < a["rx_packets"] and a["rx_offloaded"] == 0, a
        assert a["rx_bytes"] / a["rx_packets"] > 2000, "the copy's frames were not larger than the MTU"
        assert stats["b"]["totals"]["tx_bad_header"] == 0
        assert stats["a"]["totals"]["errors"] == stats["b"]["totals"]["errors"] == 0
        assert stats["a"]["broken"] is None and stats["b"]["broken"] is None
        # Connected but idle guests: the datapath sleeps in epoll, the daemon uses (almost) no CPU.
        assert daemon.pid is not None
        busy = cpu_seconds(daemon.pid, over=2.0)
        assert busy < 0.04, f"idle vhostmap used {busy:.3f} s of CPU in 2 s"


def test_guests_with_packed_rings_ping_and_copy_a_file(guest_kernel: GuestKernel, sock_dir: Path) -> None:
    """virtio-net-pci,packed=on on ports with packed=on: Linux's virtio_net drives packed rings (#18)."""
    options, packed = {"a": "packed=on", "b": "packed=on"}, ("packed=on",)
    with linked_guests(guest_kernel, sock_dir, "client", options, nic_options=packed) as (daemon, a, b):
        for name in ("a", "b"):
            assert daemon.status()["ports"][name]["ring"] == "packed"
        assert a.ping("10.0.0.2", count=5) == 0.0
        assert b.ping("10.0.0.1", count=3) == 0.0
        sent, received = copy_file(a, b, megabytes=4)
        assert sent == received
        stats = daemon.stats()
        assert stats["a"]["totals"]["errors"] == stats["b"]["totals"]["errors"] == 0
        assert stats["a"]["broken"] is None and stats["b"]["broken"] is None


def test_a_guest_without_receive_offloads_gets_segments_of_the_senders_tso_frames(
    guest_kernel: GuestKernel, sock_dir: Path
) -> None:
    """b's port offers no offloads, a's all: a hands over 64 KiB TCP frames, and b's port completes them into
    MTU segments on the way out (VALE's mismatch path), in the one-copy link pass."""
    with linked_guests(guest_kernel, sock_dir, "client", {"b": "offloads=off"}) as (daemon, a, b):
        sent, received = copy_file(a, b, megabytes=8)
        assert sent == received
        assert "VIRTIO_NET_F_GUEST_TSO4" not in daemon.status()["ports"]["b"]["features"]
        stats = daemon.stats()
        a_rx, b_tx = stats["a"]["totals"], stats["b"]["totals"]
        assert a_rx["rx_offload_passed"] > 0 and a_rx["rx_bytes"] / a_rx["rx_packets"] > 2000, a_rx
        assert b_tx["tx_offloaded"] > 0 and b_tx["tx_bytes"] / b_tx["tx_packets"] <= 1514, b_tx
        assert b_tx["tx_bad_header"] == 0 and stats["b"]["broken"] is None


def test_restarted_vhostmap_resumes_traffic_without_guest_reboot(
    guest_kernel: GuestKernel, sock_dir: Path
) -> None:
    """QEMU listens (server=on): vhostmap is killed and started again, the guests keep running."""
    with linked_guests(guest_kernel, sock_dir, "server") as (daemon, a, b):
        assert a.ping("10.0.0.2", count=3) == 0.0
        boot_ids = [g.run("cat /proc/sys/kernel/random/boot_id", check=True).output for g in (a, b)]
        daemon.kill()
        # While vhostmap is gone the link is down: nothing gets through.
        assert a.ping("10.0.0.2", count=2, interval=0.5) == 100.0
        daemon.start()
        daemon.wait_connected("a")
        daemon.wait_connected("b")
        for g in (a, b):
            g.wait_carrier("eth0")
        # QEMU restarts its rings right after the handshake; the first echo may race that.
        wait_until(lambda: a.ping("10.0.0.2", count=1) == 0.0, 30, "traffic to resume")
        assert a.ping("10.0.0.2", count=10) == 0.0
        assert [g.run("cat /proc/sys/kernel/random/boot_id", check=True).output for g in (a, b)] == boot_ids


def test_a_ping_between_guests_captured_live_decodes_in_tcpdump_and_tshark(
    guest_kernel: GuestKernel, sock_dir: Path
) -> None:
    """`vhostmap capture a -w - | tcpdump -r -` while guest A pings B, and `-w FILE` of port b for tshark:
    both decode the ICMP exchange with the guests' addresses, each frame on its port and in its direction."""
    with linked_guests(guest_kernel, sock_dir, "client") as (daemon, a, _):
        capture = [sys.executable, "-m", "vhostmap.cli", "capture", "--control", daemon.control]
        b_file = sock_dir / "b.pcapng"
        with ExitStack() as stack:
            on_a = stack.enter_context(
                subprocess.Popen([*capture, "a", "-w", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            )
            assert on_a.stdout is not None and on_a.stderr is not None
            tcpdump = stack.enter_context(
                subprocess.Popen(
                    ["tcpdump", "-n", "-r", "-"],
                    stdin=on_a.stdout,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
            on_a.stdout.close()  # tcpdump's now
            on_b = stack.enter_context(
                subprocess.Popen([*capture, "b", "-w", str(b_file)], stderr=subprocess.PIPE)
            )
            wait_until(lambda: len(daemon.status()["captures"]) == 2, 30, "both captures to start")
            assert a.ping("10.0.0.2", count=3) == 0.0
            for cap in (on_a, on_b):
                cap.send_signal(signal.SIGINT)
                assert cap.wait(30) == 0, cap.stderr.read() if cap.stderr else ""
            decoded, _ = tcpdump.communicate(timeout=30)
        print(decoded.decode())  # what the closing note quotes: tcpdump's view of the stream
        icmp = [line.split(" ", 1)[1] for line in decoded.decode().splitlines() if "ICMP echo" in line]
        assert [line.split(",")[0] for line in icmp] == [
            "IP 10.0.0.1 > 10.0.0.2: ICMP echo request",
            "IP 10.0.0.2 > 10.0.0.1: ICMP echo reply",
        ] * 3, decoded.decode()
        fields = ["frame.interface_name", "frame.packet_flags_direction", "ip.src", "ip.dst", "icmp.type"]
        tshark = subprocess.run(
            [
                "tshark",
                "-r",
                str(b_file),
                "-Y",
                "icmp",
                "-T",
                "fields",
                *(x for f in fields for x in ("-e", f)),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        print(tshark.stdout)
        rows = [line.split("\t") for line in tshark.stdout.splitlines()]
        # On port b the requests are delivered to guest B (out) and its replies come in.
        assert (
            rows
            == [
                ["b", "0x00000002", "10.0.0.1", "10.0.0.2", "8"],
                ["b", "0x00000001", "10.0.0.2", "10.0.0.1", "0"],
            ]
            * 3
        ), tshark.stdout
        assert daemon.status()["captures"] == []
