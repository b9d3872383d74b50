"""The guest benchmark: one Python guest, one boot, guest TX rates of native, generic and socket modes.

    python -m vhostmap.lab.guestbench [-D SECONDS] [-l LENGTH] [--json]

Boots the Python guest image (`vhostmap.lab.guestimage`) under TCG with one NIC on a vhostmap port that
nothing consumes (the daemon's sink counts and drops what arrives), then runs
``python -m vhostmap_guest.pktgen -f tx`` in the guest for ``-D`` seconds in each mode with the same frames:
``socket`` (one AF_PACKET send per frame through the guest kernel), ``generic`` (netmap rings over the
kernel's driver) and ``native`` (the userspace virtio driver, busy polling). It prints the rates, what the
daemon counted arriving, and each mode's ratio to the socket path. The kernel modes run first: native mode
takes the NIC away from the kernel (and gives it back at exit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestimage import MEMORY_MB, GuestImage
from vhostmap.lab.qemu import Nic, QemuGuest
from vhostmap.lab.wait import WaitTimeout, wait_until

MAC = "52:54:00:00:00:b1"
MODES = ("socket", "generic", "native")
# QEMU's largest queues (vhost-user allows 1024 for TX too): bigger rings, bigger batches.
QUEUE_OPTIONS = ("rx_queue_size=1024", "tx_queue_size=1024")
HUGEPAGES = 64


@dataclass(frozen=True)
class ModeResult:
    """One mode's run: pps as pktgen measured it, frames it handed over, frames the daemon saw arrive."""

    mode: str
    pps: float
    sent: int
    arrived: int
    seconds: float


@dataclass(frozen=True)
class BenchResult:
    """The whole benchmark; ``boot_seconds`` is how long the guest took to come up."""

    length: int
    duration: float
    boot_seconds: float
    modes: tuple[ModeResult, ...]

    def ratios(self) -> dict[str, float]:
        """Each mode's pps divided by the socket path's."""
        base = next((m.pps for m in self.modes if m.mode == "socket"), 0.0)
        return {m.mode: (m.pps / base if base else 0.0) for m in self.modes}

    def as_dict(self) -> dict[str, Any]:
        """For --json."""
        return {
            "length": self.length,
            "duration": self.duration,
            "boot_seconds": round(self.boot_seconds, 2),
            "modes": {m.mode: {**m.__dict__, "pps": round(m.pps, 1)} for m in self.modes},
            "ratios_to_socket": {k: round(v, 2) for k, v in self.ratios().items()},
        }

    def table(self) -> str:
        """What people read."""
        ratios = self.ratios()
        lines = [
            f"guest TX, {self.length}-byte frames, {self.duration:g} s per mode, QEMU TCG "
            f"(guest booted in {self.boot_seconds:.1f} s)",
            f"{'mode':<8} {'pps':>10} {'sent':>10} {'arrived':>10} {'vs socket':>10}",
        ]
        for m in self.modes:
            lines.append(f"{m.mode:<8} {m.pps:>10.0f} {m.sent:>10} {m.arrived:>10} {ratios[m.mode]:>9.2f}x")
        native, generic = ratios.get("native", 0.0), ratios.get("generic", 0.0)
        if native and generic:
            lines.append(f"native / generic: {native / generic:.2f}x")
        return "\n".join(lines)


def run(duration: float = 3.0, length: int = 60, image: GuestImage | None = None) -> BenchResult:
    """Boot the guest and measure each mode (see the module doc)."""
    image = image or GuestImage.ensure()
    workdir = Path(tempfile.mkdtemp(prefix="vhm-gb", dir="/tmp"))
    try:
        sock = workdir / "b.sock"
        daemon = VhostmapDaemon(workdir, [f"b=vhost-user,path={sock},mode=server,mac={MAC}"])
        guest = QemuGuest(
            [Nic(sock, MAC, options=QUEUE_OPTIONS)],
            kernel=image.kernel(),
            memory_mb=MEMORY_MB,
            hugepages=HUGEPAGES,
            workdir=workdir / "q",
        )
        with daemon, guest:
            boot = guest.wait_ready()
            guest.wait_carrier("eth0")
            guest.run(
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; ip link set eth0 up",
                check=True,
                timeout=30,
            )
            results = []
            for mode in MODES:
                before = daemon.stats()["b"]["totals"]["rx_packets"]
                extra = " --busy" if mode == "native" else ""
                out = guest.run(
                    f"python3 -m vhostmap_guest.pktgen -i eth0 -f tx -l {length} -D {duration:g} "
                    f"--mode {mode} --json{extra}",
                    timeout=duration + 120,
                    check=True,
                ).output
                report = json.loads(out.strip().splitlines()[-1])
                sent = int(report["packets"])

                def arrived(before: int = before, sent: int = sent) -> int | None:
                    n = int(daemon.stats()["b"]["totals"]["rx_packets"]) - before
                    return n if n >= sent else None

                try:
                    # Frames still queued in the guest when pktgen returns arrive a moment later.
                    got = wait_until(arrived, 5.0, "the frames sent to arrive")
                except WaitTimeout:
                    got = int(daemon.stats()["b"]["totals"]["rx_packets"]) - before  # some were dropped
                results.append(ModeResult(mode, float(report["pps"]), sent, got, float(report["seconds"])))
            guest.poweroff()
        return BenchResult(length, duration, boot, tuple(results))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m vhostmap.lab.guestbench", description=__doc__.split("\n")[0])
    p.add_argument("-D", "--duration", type=float, default=3.0, help="seconds per mode")
    p.add_argument("-l", "--length", type=int, default=60, help="frame length")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.duration, args.length)
    print(json.dumps(result.as_dict()) if args.json else result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
