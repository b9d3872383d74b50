"""The demo: vhostmap between two VMs, shown working end to end.

Starts ``vhostmap serve`` with two linked vhost-user ports, boots two small Linux guests under QEMU (TCG,
stock virtio_net) on them, pings one from the other, copies a file between them to measure throughput, prints
the daemon's counters and a summary, and removes everything it started, also when interrupted.
Run it with ``scripts/demo`` (which sets the machine up first); ``--quick`` copies less.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.qemu import Nic, QemuGuest

GUESTS = {"vm0": ("52:54:00:00:00:10", "10.0.0.1"), "vm1": ("52:54:00:00:00:11", "10.0.0.2")}


def say(text: str) -> None:
    """One line of progress."""
    print(f"demo: {text}", flush=True)


def run(megabytes: int) -> bool:
    """The demo itself; True when every check passed."""
    workdir = Path(tempfile.mkdtemp(prefix="vhm-demo-", dir="/tmp"))
    ok = True
    try:
        with ExitStack() as stack:
            ports = [f"{n}=vhost-user,path={workdir}/{n}.sock,mac={mac}" for n, (mac, _) in GUESTS.items()]
            daemon = stack.enter_context(VhostmapDaemon(workdir, ports, ["vm0,vm1"]))
            say(f"vhostmap serving {', '.join(GUESTS)} (linked) under {workdir}")
            guests = {}
            for name, (mac, ip) in GUESTS.items():
                nic = Nic(workdir / f"{name}.sock", mac, ip=f"{ip}/24")
                guests[name] = stack.enter_context(QemuGuest([nic], workdir=workdir / f"q-{name}"))
            say("booting two guests under QEMU (TCG)...")
            for name, guest in guests.items():
                seconds = guest.wait_ready()
                guest.wait_carrier("eth0")
                say(f"{name} up in {seconds:.1f} s, eth0 {GUESTS[name][1]} has carrier")
            vm0, vm1 = guests["vm0"], guests["vm1"]
            loss = vm0.ping(GUESTS["vm1"][1], count=5)
            say(f"vm0 -> vm1 ping: {loss:.0f}% loss")
            ok &= loss == 0.0
            loss = vm1.ping(GUESTS["vm0"][1], count=5)
            say(f"vm1 -> vm0 ping: {loss:.0f}% loss")
            ok &= loss == 0.0
            say(f"copying {megabytes} MB from vm0 to vm1 over HTTP...")
            vm0.run(
                f"mkdir -p /srv && dd if=/dev/urandom of=/srv/f bs=1M count={megabytes} 2>/dev/null",
                check=True,
            )
            vm0.run("busybox httpd -p 8080 -h /srv", check=True)
            start = time.monotonic()
            vm1.run("wget -q -O /tmp/f http://10.0.0.1:8080/f", check=True, timeout=600)
            seconds = time.monotonic() - start
            same = vm0.run("md5sum < /srv/f").output == vm1.run("md5sum < /tmp/f").output
            ok &= same
            mbit = megabytes * 8 * 2**20 / seconds / 1e6
            say(f"copied in {seconds:.1f} s: {mbit:.0f} Mbit/s between TCG guests, checksums equal: {same}")
            stats = daemon.stats()
            for name in GUESTS:
                t = stats[name]["totals"]
                say(
                    f"port {name}: from guest {t['rx_packets']} pkts / {t['rx_bytes']} B, "
                    f"to guest {t['tx_packets']} pkts / {t['tx_bytes']} B, "
                    f"drops {t['rx_dropped'] + t['tx_dropped']}, errors {t['errors']}"
                )
            for guest in guests.values():
                guest.poweroff()
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        ok = False
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    say("PASS: two VMs talk through vhostmap" if ok else "FAIL")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vhostmap.lab.demo [--quick]``."""
    parser = argparse.ArgumentParser(prog="vhostmap-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="copy 2 MB instead of 20 MB")
    args = parser.parse_args(argv)
    return 0 if run(2 if args.quick else 20) else 1


if __name__ == "__main__":
    sys.exit(main())
