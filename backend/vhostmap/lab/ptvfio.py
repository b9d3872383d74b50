"""A passthrough port's interrupt reaching a guest application through vfio-pci, by hand.

    python -m vhostmap.lab.ptvfio [-n FRAMES] [-b BATCH] [--json]

Boots the Python guest image under TCG on a q35 machine with QEMU's intel-iommu (the guest booted with
``intel_iommu=on``) and an ``ivshmem-doorbell`` device on passthrough port ``pt0`` (the lab's guest kernel
image has the vfio modules loaded: scripts/guest-kernel). In the guest,
``python3 -m vhostmap_guest.pktgen -i pt:0 --mode passthrough -f rx --check`` opens the device through
vfio-pci and sleeps on its MSI-X interrupt; the host holds pt0 (vhostmap.apps.client) and sends numbered
frames in batches, each once the guest took the one before, so the receiver goes back to sleep between
them. It prints what the guest received (checked) and how many interrupts the daemon raised: one per batch
at most, none unless the guest asked for them (``appl_need_kick``), which only the vfio path does.

In the test suite the same path runs in tests/integration/test_passthrough_guests.py (two guests through a
switch, vhostmap.lab.ptswitch); this tool paces the host's sender so that the guest sleeps between batches.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from vhostmap.apps import client
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestimage import MEMORY_MB, GuestImage
from vhostmap.lab.qemu import QemuGuest
from vhostmap.lab.wait import wait_until
from vhostmap.netmap.user import POLLOUT
from vhostmap.packets import Addresses, udp_frame
from vhostmap_guest.pktgen import numbered

PKTGEN_SRC = bytes.fromhex("020000000001")  # pkt-gen's source address when the port is no interface


@dataclass(frozen=True)
class PtVfioResult:
    """What the guest received (checked), in how many batches, and the interrupts the daemon raised."""

    frames: int
    batches: int
    received: int
    check: dict[str, int]
    interrupts: int
    rx_pps: float

    @property
    def ok(self) -> bool:
        """Every frame received unchanged, and the guest slept on interrupts (at most one per batch)."""
        bad = sum(self.check.values())
        return bad == 0 and self.received == self.frames and 0 < self.interrupts <= self.batches


def run(count: int = 20_000, batch: int = 256, image: GuestImage | None = None) -> PtVfioResult:
    """Boot the guest, send ``count`` frames in batches, collect the receiver's report (module doc)."""
    image = image or GuestImage.ensure()
    kernel = image.kernel()
    workdir = Path(tempfile.mkdtemp(prefix="vhm-ptv", dir="/tmp"))
    try:
        share, sock = workdir / "share", workdir / "pt0.sock"
        share.mkdir()
        guest = QemuGuest(
            kernel=kernel,
            memory_mb=MEMORY_MB,
            share=share,
            workdir=workdir / "q",
            machine="q35",
            iommu=True,
            extra_args=[
                "-chardev", f"socket,id=iv0,path={sock}",
                "-device", "ivshmem-doorbell,chardev=iv0,vectors=1",
            ],
        )  # fmt: skip
        with (
            VhostmapDaemon(workdir, [f"pt0=passthrough,path={sock},slots=512"]) as daemon,
            guest,
            client.open("pt0", daemon.control) as app,
        ):
            guest.wait_ready()
            receiver = (
                f"python3 -m vhostmap_guest.pktgen -i pt:0 --mode passthrough -f rx -n {count} -D 120 --seq "
                "--check --json --ready /mnt/host/ready"
            )
            guest.run(f"({receiver} > /mnt/host/rx.tmp 2>&1; mv /mnt/host/rx.tmp /mnt/host/rx) &", check=True)
            wait_until((share / "ready").exists, 120, "the guest's receiver", details=guest.diagnostics)
            frames = [numbered(udp_frame(60, Addresses(PKTGEN_SRC)), i) for i in range(count)]
            batches = 0

            def taken() -> int:
                return int(daemon.stats()["pt0"]["queues"][0]["tx_packets"])

            # One batch at a time, each once the guest took the one before: it sleeps in between.
            for k in range(0, count, batch):
                chunk = frames[k : k + batch]
                while chunk:
                    chunk = chunk[app.tx_rings[0].send(chunk) :]
                    app.txsync()
                    if chunk:
                        app.poll(POLLOUT, 0.5)
                batches += 1
                end = min(k + batch, count)

                def took(end: int = end) -> bool:
                    return taken() >= end

                wait_until(took, 30, f"the guest to take {end} frames", details=guest.diagnostics)
            wait_until((share / "rx").exists, 60, "the guest's report", details=guest.diagnostics)
            text = (share / "rx").read_text()
            try:
                got = json.loads(text.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise RuntimeError(f"the guest's receiver failed:\n{text}") from None
            result = PtVfioResult(
                frames=count,
                batches=batches,
                received=int(got["packets"]),
                check={k: int(v) for k, v in got["check"].items()},
                interrupts=int(daemon.stats()["pt0"]["passthrough"]["interrupts"]),
                rx_pps=float(got["pps"]),
            )
            guest.poweroff()
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: 0 when every frame came and the guest slept on interrupts."""
    p = argparse.ArgumentParser(prog="python -m vhostmap.lab.ptvfio", description=__doc__.split("\n")[0])
    p.add_argument("-n", "--count", type=int, default=20_000, help="frames to send")
    p.add_argument("-b", "--batch", type=int, default=256, help="frames per batch")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.count, args.batch)
    if args.json:
        print(json.dumps({**asdict(result), "ok": result.ok}))
    else:
        print(
            f"guest received {result.received} of {result.frames} frames in {result.batches} batches "
            f"({result.rx_pps:.0f} pps, check {result.check}); the daemon raised {result.interrupts} "
            f"interrupts; ok: {result.ok}"
        )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
