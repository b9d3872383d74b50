"""Guest to guest through a vhostmap switch with both guests in passthrough mode (ptnetmap), by hand.

    python -m vhostmap.lab.ptswitch [-n FRAMES] [-l LENGTH] [--busy] [--json]

Starts a daemon with passthrough ports ``pt0`` and ``pt1`` on switch ``vale0`` and boots two guests of the
Python image (`vhostmap.lab.guestimage`) under TCG, each with an ``ivshmem-doorbell`` device on one of the
ports and no NIC. The receiver runs ``python3 -m vhostmap_guest.pktgen -i pt:0 --mode passthrough -f rx
--seq --check``, the sender the same with ``-f tx --seq`` (broadcast frames: the switch floods them to the
receiver, its only other port). It prints both rates and the exact accounting: every frame the sender
handed over is either delivered (the receiver checked it: none mismatched, duplicated or out of order) or
counted dropped by the switch (VALE drops what finds no room at a slower receiver, and counts it).

Both guests are q35 machines with QEMU's intel-iommu (interrupt remapping, the guest booted with
``intel_iommu=on``), whose kernel has the vfio modules loaded (scripts/guest-kernel), so their drivers open
the devices through vfio-pci and sleep on the MSI-X interrupt (appl_need_kick) when they wait: the result
says how often the receiver slept and how many interrupts the daemon raised to it, against the sender's
batches. ``--busy`` (``interrupts=False``) boots pc machines without an IOMMU, busy-polling instead.

tests/integration/test_passthrough_guests.py runs it (short); the same topology runs with in-process guests
in tests/unit/test_guest_passthrough.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestimage import MEMORY_MB, GuestImage
from vhostmap.lab.qemu import QemuGuest
from vhostmap.lab.wait import wait_until

PKTGEN = "python3 -m vhostmap_guest.pktgen -i pt:0 --mode passthrough --seq --json"
BATCH = 256  # the sender's frames per head move


@dataclass(frozen=True)
class PtSwitchResult:
    """One run: what the sender handed over, what the receiver took (checked), what the switch dropped, and
    both sides' rates."""

    length: int
    sent: int
    received: int
    dropped: int
    tx_pps: float
    rx_pps: float
    check: dict[str, int]
    taken: int  # frames the daemon took from the sender's ring
    delivered: int  # frames the daemon put in the receiver's ring
    batches: int  # the sender's head moves (sent / BATCH, rounded up)
    interrupts: int  # the daemon's interrupts to the receiver
    rx_sleeps: int  # the receiver's polls that slept on its interrupt
    rx_interrupt_problem: str | None  # why the receiver had no interrupt (busy-polled), if so

    @property
    def exact(self) -> bool:
        """Every frame accounted for, none damaged."""
        bad = self.check["mismatched"] + self.check["duplicates"] + self.check["reordered"]
        return (
            bad == 0
            and self.taken == self.sent
            and self.delivered == self.received
            and self.received + self.dropped == self.sent
        )

    def table(self) -> str:
        """What people read."""
        return "\n".join(
            [
                f"guest to guest through switch vale0, both in passthrough mode, {self.length}-byte frames "
                "(TCG)",
                f"sender    {self.sent:>9} frames  {self.tx_pps:>10.0f} pps",
                f"receiver  {self.received:>9} frames  {self.rx_pps:>10.0f} pps  (check {self.check})",
                f"switch dropped {self.dropped} (no room at the receiver); accounted exactly: {self.exact}",
                f"receiver slept {self.rx_sleeps} times on its interrupt, {self.interrupts} interrupts "
                f"raised, sender batches {self.batches}"
                + (f" (no interrupts: {self.rx_interrupt_problem})" if self.rx_interrupt_problem else ""),
            ]
        )


def _guest(image: GuestImage, sock: Path, workdir: Path, interrupts: bool) -> QemuGuest:
    return QemuGuest(
        kernel=image.kernel(),
        memory_mb=MEMORY_MB,
        share=workdir / "share",
        workdir=workdir / "q",
        machine="q35" if interrupts else "pc",
        iommu=interrupts,
        extra_args=[
            "-chardev", f"socket,id=iv0,path={sock}",
            "-device", "ivshmem-doorbell,chardev=iv0,vectors=1",
        ],
    )  # fmt: skip


def run(
    count: int = 100_000,
    length: int = 60,
    image: GuestImage | None = None,
    *,
    interrupts: bool = True,
    idle: float = 3.0,
) -> PtSwitchResult:
    """Boot both guests (side by side), run the sender against the receiver once (see the module doc). The
    receiver stops at ``count`` frames, or once frames came and then none for ``idle`` seconds."""
    image = image or GuestImage.ensure()
    workdir = Path(tempfile.mkdtemp(prefix="vhm-pts", dir="/tmp"))
    try:
        socks = {name: workdir / f"{name}.sock" for name in ("pt0", "pt1")}
        ports = [f"{name}=passthrough,path={sock},slots=1024" for name, sock in socks.items()]
        daemon = VhostmapDaemon(workdir, ports, extra_args=["--switch", "vale0=pt0,pt1"])
        dirs = {name: workdir / name for name in socks}
        for d in dirs.values():
            (d / "share").mkdir(parents=True)
        with (
            daemon,
            _guest(image, socks["pt0"], dirs["pt0"], interrupts) as tx,
            _guest(image, socks["pt1"], dirs["pt1"], interrupts) as rx,
        ):
            tx.wait_ready(180)
            rx.wait_ready(180)
            for name in socks:
                daemon.wait_connected(name)
            common = f"{PKTGEN} -l {length} -n {count}"
            # The receiver stops at -n frames, or (with drops) once nothing came for --idle seconds.
            receiver = f"{common} -f rx -D 120 --idle {idle} --check --ready /mnt/host/ready"
            rx.run(f"({receiver} > /mnt/host/rx.tmp 2>&1; mv /mnt/host/rx.tmp /mnt/host/rx) &")
            wait_until((dirs["pt1"] / "share/ready").exists, 120, "the receiver", details=rx.diagnostics)
            out = tx.run(f"{common} -f tx -b {BATCH}", timeout=300, check=True).output
            sent = json.loads(out.strip().splitlines()[-1])
            wait_until(
                (dirs["pt1"] / "share/rx").exists, 150, "the receiver's report", details=rx.diagnostics
            )
            got = json.loads((dirs["pt1"] / "share/rx").read_text().strip().splitlines()[-1])
            stats = daemon.stats()
            sw = daemon.switches()["vale0"]["ports"]
            result = PtSwitchResult(
                length=length,
                sent=int(sent["packets"]),
                received=int(got["packets"]),
                # Frames that found the receiver's ring full (the sender's port counts the same as "dropped").
                dropped=int(sw["pt1"]["tx_dropped"]),
                tx_pps=float(sent["pps"]),
                rx_pps=float(got["pps"]),
                check={k: int(v) for k, v in got["check"].items()},
                taken=int(stats["pt0"]["queues"][0]["rx_packets"]),
                delivered=int(stats["pt1"]["queues"][0]["tx_packets"]),
                batches=-(-int(sent["packets"]) // BATCH),
                interrupts=int(stats["pt1"]["passthrough"]["interrupts"]),
                rx_sleeps=int(got.get("sleeps", 0)),
                rx_interrupt_problem=got.get("interrupt_problem"),
            )
            tx.poweroff()
            rx.poweroff()
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: 0 when every frame was accounted for."""
    p = argparse.ArgumentParser(prog="python -m vhostmap.lab.ptswitch", description=__doc__.split("\n")[0])
    p.add_argument("-n", "--count", type=int, default=100_000, help="frames to send")
    p.add_argument("-l", "--length", type=int, default=60, help="frame length")
    p.add_argument("--busy", action="store_true", help="pc machines, no IOMMU: the drivers busy-poll")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.count, args.length, interrupts=not args.busy)
    out: dict[str, Any] = {**asdict(result), "exact": result.exact}
    print(json.dumps(out) if args.json else result.table())
    return 0 if result.exact else 1


if __name__ == "__main__":
    sys.exit(main())
