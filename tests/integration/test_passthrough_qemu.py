"""A passthrough port reaches a real guest: QEMU's ivshmem-doorbell device takes vhostmap's ivshmem server
protocol, the guest finds the port's region as BAR 2 of PCI device 1af4:1110, header first, and the guest
driver (vhostmap_guest passthrough mode) sends and receives through the rings in place.

One boot of the Python guest image (no NIC). Through /dev/mem (busybox devmem; no driver claims the device,
so its BARs are open to it) the guest reads the header's first fields, its ID, and rings the daemon's
doorbell; then ``python -m vhostmap_guest.pktgen -i pt:0 --mode passthrough`` transmits numbered frames that
an application on the host (vhostmap.apps.client holding port pt0) receives exactly, and receives, checked,
the numbered frames that application sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostmap.apps import client
from vhostmap.apps.client import ClientPort
from vhostmap.ivshmem.protocol import DAEMON_PEER_ID, GUEST_ID
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestimage import MEMORY_MB, GuestImage, GuestImageMissing
from vhostmap.lab.qemu import QemuGuest
from vhostmap.lab.wait import wait_until
from vhostmap.netmap.abi import PT_MAGIC, PT_VERSION, PtHeader
from vhostmap.netmap.user import POLLIN, POLLOUT
from vhostmap.packets import Addresses, udp_frame
from vhostmap_guest.pktgen import numbered

pytestmark = pytest.mark.slow

# Prints, for the ivshmem device: BAR 0's start address, BAR 2's start address and BAR 2's size.
FIND_BARS = (
    "for d in /sys/bus/pci/devices/*; do "
    'if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1110 ]; then '
    "set -- $(sed -n 1p $d/resource) $(sed -n 3p $d/resource); "
    'echo "$1 $4 $(stat -c %s $d/resource2)"; fi; done'
)
# BAR 0 registers (ivshmem-spec.rst): IVPosition (the guest's ID) and Doorbell (peer << 16 | vector).
IVPOSITION, DOORBELL = 8, 12
N, LENGTH = 1000, 60
PKTGEN = f"python3 -m vhostmap_guest.pktgen -i pt:0 --mode passthrough -l {LENGTH} -n {N} --seq --json"


@pytest.fixture(scope="module")
def python_image() -> GuestImage:
    """The Python guest image, built (or brought up to date) by scripts/guest-image."""
    try:
        return GuestImage.ensure()
    except GuestImageMissing as e:
        pytest.fail(f"cannot build the Python guest image: {e}")


def devmem(guest: QemuGuest, address: int, width: int = 64) -> int:
    return int(guest.run(f"devmem {address:#x} {width}", check=True).output.strip(), 16)


def in_background(guest: QemuGuest, share: Path, name: str, command: str) -> Path:
    """Run ``command`` in the guest in the background; its output lands in the returned share file."""
    out = share / name
    guest.run(f"({command} > /mnt/host/{name}.tmp 2>&1; mv /mnt/host/{name}.tmp /mnt/host/{name}) &")
    return out


def result(guest: QemuGuest, out: Path) -> dict[str, object]:
    wait_until(out.exists, 180, f"the guest to finish {out.name}", details=guest.diagnostics)
    text = out.read_text()
    try:
        return dict(json.loads(text.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        raise AssertionError(f"pktgen in the guest failed:\n{text}") from None


@pytest.fixture
def booted(python_image: GuestImage, sock_dir: Path) -> Iterator[tuple[VhostmapDaemon, QemuGuest, Path]]:
    sock, share = sock_dir / "pt0.sock", sock_dir / "share"
    share.mkdir()
    with VhostmapDaemon(sock_dir, [f"pt0=passthrough,path={sock},slots=512"]) as daemon:
        extra = [
            "-chardev", f"socket,id=iv0,path={sock}",
            "-device", "ivshmem-doorbell,chardev=iv0,vectors=1",
        ]  # fmt: skip
        guest = QemuGuest(
            kernel=python_image.kernel(),
            memory_mb=MEMORY_MB,
            share=share,
            workdir=sock_dir / "q",
            extra_args=extra,
        )
        with guest:
            guest.wait_ready()
            daemon.wait_connected("pt0")
            yield daemon, guest, share
            guest.poweroff()
        # QEMU gone: the port is released.
        wait_until(lambda: not daemon.status()["ports"]["pt0"]["connected"], 10, "pt0 released after QEMU")
        assert not daemon.stats()["pt0"]["passthrough"]["attached"]


def test_a_guest_uses_the_port_in_place(booted: tuple[VhostmapDaemon, QemuGuest, Path]) -> None:
    daemon, guest, share = booted
    counters = daemon.stats()["pt0"]["passthrough"]
    assert counters["attached"] and counters["generation"] == 1

    # The region is BAR 2, header first; the guest's ID and the daemon's doorbell are in BAR 0.
    found = guest.run(FIND_BARS, check=True).output.split()
    assert len(found) == 3, f"no single ivshmem device in the guest: {found}"
    regs, base, bar = int(found[0], 16), int(found[1], 16), int(found[2])
    region = counters["region_bytes"]
    assert bar & (bar - 1) == 0 and region <= bar < 2 * region, (bar, region)
    assert devmem(guest, base).to_bytes(8, "little") == PT_MAGIC
    assert devmem(guest, base + 8) & 0xFFFF_FFFF == PT_VERSION
    assert devmem(guest, base + PtHeader.region_size.offset) == region
    assert devmem(guest, regs + IVPOSITION, 32) == GUEST_ID
    guest.run(f"devmem {regs + DOORBELL:#x} 32 {DAEMON_PEER_ID << 16:#x}", check=True)
    wait_until(lambda: daemon.stats()["pt0"]["passthrough"]["doorbells"] >= 1, 10, "the guest's doorbell")

    want = [numbered(udp_frame(LENGTH, Addresses()), i) for i in range(N)]
    with client.open("pt0", daemon.control) as app:
        # The guest transmits; the application on the host receives every frame, in order.
        out = in_background(guest, share, "tx", f"{PKTGEN} -f tx -b 256")
        got = receive(app, N, guest)
        report = result(guest, out)
        assert (report["driver"], report["packets"]) == ("passthrough", N)
        assert got == want
        # The application transmits; the guest receives every frame, checked.
        ready = share / "ready"
        out = in_background(guest, share, "rx", f"{PKTGEN} -f rx -D 120 --check --ready /mnt/host/ready")
        wait_until(ready.exists, 60, "the guest's receiver", details=guest.diagnostics)
        send(app, want, guest)
        report = result(guest, out)
        assert (report["driver"], report["packets"]) == ("passthrough", N)
        assert report["check"] == {"mismatched": 0, "missing": 0, "duplicates": 0, "reordered": 0}
    q = daemon.stats()["pt0"]["queues"][0]
    assert (q["rx_packets"], q["tx_packets"], q["errors"]) == (N, N, 0)


def receive(app: ClientPort, count: int, guest: QemuGuest) -> list[bytes]:
    got: list[bytes] = []
    ring = app.rx_rings[0]

    def enough() -> bool:
        app.poll(POLLIN, 0.2)
        batch = ring.receive()
        got.extend(batch.frames())
        ring.advance(len(batch))
        app.rxsync()
        return len(got) >= count

    wait_until(enough, 180, f"{count} frames from the guest", details=guest.diagnostics)
    return got


def send(app: ClientPort, frames: list[bytes], guest: QemuGuest) -> None:
    ring = app.tx_rings[0]
    sent = 0

    def all_sent() -> bool:
        nonlocal sent
        moved = ring.send(frames[sent : sent + 128])
        sent += moved
        app.txsync()
        if not moved and sent < len(frames):
            app.poll(POLLOUT, 0.5)
        return sent == len(frames)

    wait_until(all_sent, 180, f"the guest to take {len(frames)} frames", details=guest.diagnostics)
