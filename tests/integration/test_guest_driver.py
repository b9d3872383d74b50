"""The guest-side driver in a real guest (QEMU TCG) attached to vhostmap, with the host side checking.

The guest boots the Python image (scripts/guest-image) with eth0 on vhostmap port ``g`` (two queue pairs,
1024-entry queues). On the host, this test is the consumer: it opens port ``g`` with the client library
(vhostmap.apps.client), so it receives exactly what the guest transmits and transmits what the guest
must receive. The guest runs ``python -m vhostmap_guest.pktgen`` in the background (so the host can serve
it meanwhile) and writes its result to the 9p share.

One boot covers native and generic modes in both directions (exact counts, every frame compared, numbered
frames checked for loss, duplicates and order), the NIC returning to the kernel after a clean exit and
after a SIGKILL (the guardian), and a ping through the kernel driver each time; a second boot runs the
benchmark.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vhostmap.apps import client
from vhostmap.apps.client import ClientPort
from vhostmap.apps.pktgen import echo_replies
from vhostmap.lab import guestbench
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestimage import MEMORY_MB, GuestImage
from vhostmap.lab.qemu import Nic, QemuGuest
from vhostmap.lab.wait import wait_until
from vhostmap.netmap.user import POLLIN, POLLOUT
from vhostmap.packets import Addresses, udp_frame
from vhostmap_guest.pktgen import numbered

pytestmark = pytest.mark.slow

MAC = "52:54:00:00:00:0a"
GUEST_IP, HOST_IP = "10.0.0.1", "10.0.0.2"
HOST_MAC = bytes.fromhex("020000000002")
N = 3000
LENGTH = 60
PKTGEN = "python3 -m vhostmap_guest.pktgen -i eth0"
NIC_ADDRESS = "0000:00:02.0"  # eth0's PCI function in the lab's guest
ETH_P_IP, ETH_P_ARP = b"\x08\x00", b"\x08\x06"


@dataclass
class Lab:
    """The daemon, the guest, the host's client on the guest's port, and the share for results."""

    daemon: VhostmapDaemon
    guest: QemuGuest
    port: ClientPort
    share: Path

    def background(self, name: str, command: str) -> Path:
        """Start ``command`` in the guest in the background; its output goes to the returned share file."""
        out = self.share / name
        out.unlink(missing_ok=True)
        # Written under another name and renamed when complete: the host never reads half a result.
        self.guest.run(f"({command} > /mnt/host/{name}.tmp 2>&1; mv /mnt/host/{name}.tmp /mnt/host/{name}) &")
        return out

    def result(self, out: Path, timeout: float = 120.0) -> dict[str, object]:
        """The JSON a background pktgen printed (its last line), once it has finished."""
        wait_until(out.exists, timeout, f"the guest to finish {out.name}", details=self.guest.diagnostics)
        text = out.read_text()
        try:
            return dict(json.loads(text.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            raise AssertionError(f"pktgen in the guest failed:\n{text}") from None

    def drain(self) -> list[list[bytes]]:
        """Whatever the host has received so far, per RX ring (released)."""
        got: list[list[bytes]] = []
        for ring in self.port.rx_rings:
            b = ring.receive()
            got.append(b.frames())
            ring.advance(len(b))
        self.port.rxsync()
        return got

    def collect(self, count: int, timeout: float = 120.0) -> list[list[bytes]]:
        """Receive until ``count`` IPv4 frames have arrived (the kernel's ARP or IPv6 chatter aside)."""
        per_ring: list[list[bytes]] = [[] for _ in self.port.rx_rings]

        def enough() -> bool:
            self.port.poll(POLLIN, 0.2)
            for i, frames in enumerate(self.drain()):
                per_ring[i] += [f for f in frames if f[12:14] == ETH_P_IP]
            return sum(map(len, per_ring)) >= count

        wait_until(enough, timeout, f"{count} frames from the guest", details=self.guest.diagnostics)
        return per_ring

    def send(self, frames: list[bytes], timeout: float = 120.0, rings: int | None = None) -> None:
        """Send ``frames`` to the guest, spread over every TX ring of the port (the first ``rings`` only)."""
        rings_used = self.port.tx_rings[:rings]
        sent = 0

        def all_sent() -> bool:
            nonlocal sent
            moved = 0
            for ring in rings_used:
                moved += ring.send(frames[sent + moved : sent + moved + 128])
            sent += moved
            self.port.txsync()
            if not moved and sent < len(frames):
                self.port.poll(POLLOUT, 0.5)
            return sent == len(frames)

        wait_until(
            all_sent, timeout, f"the guest to take {len(frames)} frames", details=self.guest.diagnostics
        )

    def nic_driver(self) -> str:
        """The kernel driver eth0's PCI device is bound to in the guest."""
        return self.guest.run(
            f"basename $(readlink /sys/bus/pci/devices/{NIC_ADDRESS}/driver)", check=True
        ).output.strip()


@contextmanager
def lab(image: GuestImage, workdir: Path) -> Iterator[Lab]:
    share = workdir / "share"
    share.mkdir()
    sock = workdir / "g.sock"
    daemon = VhostmapDaemon(workdir, [f"g=vhost-user,path={sock},mode=server,mac={MAC},queues=2"])
    guest = QemuGuest(
        [Nic(sock, MAC, queues=2, options=guestbench.QUEUE_OPTIONS)],
        kernel=image.kernel(),
        memory_mb=MEMORY_MB,
        hugepages=guestbench.HUGEPAGES,
        share=share,
        workdir=workdir / "q",
    )
    with ExitStack() as stack:
        stack.enter_context(daemon)
        stack.enter_context(guest)
        guest.wait_ready()
        guest.wait_carrier("eth0")
        # No IPv6 chatter from the guest kernel: the host compares every frame it receives.
        guest.run(
            "for k in all default; do echo 1 > /proc/sys/net/ipv6/conf/$k/disable_ipv6; done", check=True
        )
        port = client.open("g", daemon.control)
        stack.callback(port.close)
        yield Lab(daemon, guest, port, share)
        guest.poweroff()


def expected(count: int) -> list[bytes]:
    """The numbered frames pktgen sends and expects."""
    frame = udp_frame(LENGTH, Addresses(bytes.fromhex(MAC.replace(":", ""))))
    return [numbered(frame, i) for i in range(count)]


def seq_of(frame: bytes) -> int:
    return int(struct.unpack_from(">I", frame, 42)[0])


def guest_transmits_exactly(lab: Lab, mode: str) -> None:
    lab.drain()
    out = lab.background(f"tx-{mode}", f"{PKTGEN} -f tx -l {LENGTH} -n {N} --seq -b 256 --mode {mode} --json")
    per_ring = lab.collect(N)
    report = lab.result(out)
    assert report["driver"] == mode and report["packets"] == N
    got = [f for ring in per_ring for f in ring]
    want = expected(N)
    assert len(got) == N, f"{mode}: {len(got)} frames arrived, {N} were sent"
    assert sorted(got, key=seq_of) == want, f"{mode}: frames differ from what pktgen sent"
    for ring in per_ring:  # each queue keeps its frames in order
        assert [seq_of(f) for f in ring] == sorted(seq_of(f) for f in ring)
    if mode == "native":
        assert all(per_ring), f"native mode used only some of the queue pairs: {[len(r) for r in per_ring]}"


def guest_receives_exactly(lab: Lab, mode: str) -> None:
    ready = lab.share / f"ready-{mode}"
    out = lab.background(
        f"rx-{mode}",
        f"{PKTGEN} -f rx -l {LENGTH} -n {N} -D 90 --seq --check --mode {mode} --json "
        f"--ready /mnt/host/{ready.name}",
    )
    wait_until(ready.exists, 60, f"the {mode} receiver to be ready", details=lab.guest.diagnostics)
    # Order is kept within a queue, not across queues. The native driver checks it per ring (a queue each);
    # the generic one reads the kernel's one interface, where the two receive queues' frames interleave as
    # NAPI polls them (a reordering was seen once). So the generic receiver gets one queue's worth.
    lab.send(expected(N), rings=1 if mode == "generic" else None)
    report = lab.result(out)
    assert report["driver"] == mode
    assert report["packets"] == N, f"{mode}: the guest received {report['packets']} of {N}"
    assert report["check"] == {"mismatched": 0, "missing": 0, "duplicates": 0, "reordered": 0}


def answer_arp_and_ping(port: ClientPort, stop: threading.Event) -> None:
    """Be HOST_IP on the port: answer ARP requests and ICMP echo requests (vhostmap pkt-gen's pong)."""
    ip = bytes(int(x) for x in HOST_IP.split("."))
    while not stop.is_set():
        if not port.poll(POLLIN, 0.1):
            continue
        replies = []
        for ring in port.rx_rings:
            got = ring.receive()
            for f in got.frames():
                if f[12:14] == ETH_P_ARP and f[20:22] == b"\x00\x01" and f[38:42] == ip:
                    sender_mac, sender_ip = f[22:28], f[28:32]
                    arp = b"\x00\x01\x08\x00\x06\x04\x00\x02" + HOST_MAC + ip + sender_mac + sender_ip
                    replies.append((sender_mac + HOST_MAC + ETH_P_ARP + arp).ljust(60, b"\0"))
                elif f[12:14] == ETH_P_IP and f[30:34] == ip:
                    row = np.frombuffer(f, np.uint8).copy()[None, :]
                    if echo_replies(row, np.array([len(f)]))[0]:
                        replies.append(row[0].tobytes())
            ring.advance(len(got))
        port.rxsync()
        if replies:
            port.tx_rings[0].send(replies)
            port.txsync()


def kernel_pings(lab: Lab) -> float:
    """Configure eth0 (the kernel's again) and ping the host's client through it; the loss in %."""
    lab.guest.run(
        f"ip addr flush dev eth0; ip addr add {GUEST_IP}/24 dev eth0; ip link set eth0 up", check=True
    )
    lab.guest.wait_carrier("eth0")
    stop = threading.Event()
    responder = threading.Thread(target=answer_arp_and_ping, args=(lab.port, stop), daemon=True)
    responder.start()
    try:
        return lab.guest.ping(HOST_IP, count=3)
    finally:
        stop.set()
        responder.join(5)


def test_native_and_generic_modes_move_exact_frames_and_the_kernel_gets_the_nic_back(
    python_image: GuestImage, sock_dir: Path
) -> None:
    with lab(python_image, sock_dir) as lb:
        assert lb.nic_driver() == "virtio-pci"
        # Native: the userspace driver takes the device (two queue pairs), then gives it back.
        guest_transmits_exactly(lb, "native")
        guest_receives_exactly(lb, "native")
        assert lb.nic_driver() == "virtio-pci"
        assert kernel_pings(lb) == 0.0

        # Generic: the same application over the kernel's driver.
        guest_transmits_exactly(lb, "generic")
        guest_receives_exactly(lb, "generic")

        # An application killed outright: its guardian resets the device and hands it back. (It names the
        # device by its PCI address, as an application must while a native port holds eth0.)
        ready = lb.share / "ready-kill"
        by_address = PKTGEN.replace("-i eth0", f"-i {NIC_ADDRESS}")
        lb.guest.run(
            f"({by_address} -f rx -D 600 --mode native --ready /mnt/host/ready-kill > /dev/null 2>&1 & "
            "echo $! > /mnt/host/pid)",
            check=True,
        )
        wait_until(ready.exists, 60, "the native receiver to be ready", details=lb.guest.diagnostics)
        assert lb.nic_driver() == "uio_pci_generic"
        lb.guest.run("kill -9 $(cat /mnt/host/pid)", check=True)
        wait_until(
            lambda: lb.guest.run("test -e /sys/class/net/eth0").rc == 0, 30, "eth0 to come back after SIGKILL"
        )
        assert lb.nic_driver() == "virtio-pci"
        assert kernel_pings(lb) == 0.0

        stats = lb.daemon.stats()["g"]
        assert stats["broken"] is None and stats["totals"]["errors"] == 0


def test_guest_benchmark_native_generic_socket(
    python_image: GuestImage, capsys: pytest.CaptureFixture[str]
) -> None:
    result = guestbench.run(duration=3.0, image=python_image)
    with capsys.disabled():
        print("\n" + result.table())
    by_mode = {m.mode: m for m in result.modes}
    assert set(by_mode) == set(guestbench.MODES)
    for m in result.modes:
        assert m.pps > 0 and m.sent > 0, m
        assert m.arrived >= m.sent * 0.99, f"{m.mode}: {m.arrived} of {m.sent} frames arrived"
    # Zero copy and batching are the point of native mode: it must beat the kernel's per-frame paths.
    assert by_mode["native"].pps > by_mode["socket"].pps
    assert by_mode["native"].pps > by_mode["generic"].pps
