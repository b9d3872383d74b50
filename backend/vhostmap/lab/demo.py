"""The demo: two VMs and a host network namespace on a vhostmap switch, shown working end to end.

Makes a network namespace behind a veth pair, starts ``vhostmap serve`` with a VALE-style switch whose ports
are two vhost-user ports and a generic port on the veth's host end, boots two small Linux guests under QEMU
(TCG, stock virtio_net), and shows: the guests pinging each other, a guest and the namespace pinging each
other, HTTP copies guest to guest and namespace to guest with their throughput, and the switch's counters
(what it learnt, how little it flooded). It prints a summary and removes everything it started, also when
interrupted. Run it with ``scripts/demo`` (which sets the machine up first); ``--quick`` copies less.
The exit status is 0 only when every ping and every copy succeeded.
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

from vhostmap.control.client import call
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.netns import namespace_behind_veth
from vhostmap.lab.qemu import Nic, QemuGuest

GUESTS = {"vm0": ("52:54:00:00:00:10", "10.0.0.1"), "vm1": ("52:54:00:00:00:11", "10.0.0.2")}
HOST_NS_ADDR = "10.0.0.100"
NO_IPV6 = "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do [ -e $f ] && echo 1 > $f; done; true"


def say(text: str) -> None:
    """One line of progress."""
    print(f"demo: {text}", flush=True)


class Checks:
    """What passed and what did not."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def record(self, ok: bool, what: str) -> bool:
        """Note ``what`` as failed unless ``ok``."""
        if not ok:
            self.failed.append(what)
        return ok


def run(megabytes: int) -> bool:
    """The demo itself; True when every check passed."""
    workdir = Path(tempfile.mkdtemp(prefix="vhm-demo-", dir="/tmp"))
    checks = Checks()
    try:
        with ExitStack() as stack:
            ns, veth = stack.enter_context(namespace_behind_veth(f"{HOST_NS_ADDR}/24"))
            say(f"network namespace {ns.name} at {HOST_NS_ADDR}, behind veth {veth.name}")
            ports = [f"{n}=vhost-user,path={workdir}/{n}.sock,mac={mac}" for n, (mac, _) in GUESTS.items()]
            ports.append(f"uplink=generic,ifname={veth.name}")
            switch = f"vale0={','.join([*GUESTS, 'uplink'])}"
            daemon = stack.enter_context(VhostmapDaemon(workdir, ports, extra_args=["--switch", switch]))
            say(f"vhostmap serving switch {switch} (sockets in {workdir})")
            guests = {}
            for name, (mac, ip) in GUESTS.items():
                nic = Nic(workdir / f"{name}.sock", mac, ip=f"{ip}/24")
                guests[name] = stack.enter_context(QemuGuest([nic], workdir=workdir / f"q-{name}"))
            say("booting two guests under QEMU (TCG)...")
            for name, guest in guests.items():
                seconds = guest.wait_ready()
                guest.wait_carrier("eth0")
                guest.run(NO_IPV6, check=True)  # only the demo's own traffic crosses the switch
                say(f"{name} up in {seconds:.1f} s, eth0 {GUESTS[name][1]} has carrier")
            vm0, vm1 = guests["vm0"], guests["vm1"]
            for src, dst in (("vm0", "vm1"), ("vm1", "vm0")):
                loss = guests[src].ping(GUESTS[dst][1], count=5)
                say(f"{src} -> {dst} ping: {loss:.0f}% loss")
                checks.record(loss == 0.0, f"{src} -> {dst} ping")
            loss = vm0.ping(HOST_NS_ADDR, count=5)
            say(f"vm0 -> host namespace ping: {loss:.0f}% loss")
            checks.record(loss == 0.0, "vm0 -> host namespace ping")
            ping = ns.run(
                ["busybox", "ping", "-c", "5", "-i", "0.2", "-W", "2", GUESTS["vm1"][1]], check=False
            )
            say(f"host namespace -> vm1 ping: {'ok' if ping.returncode == 0 else 'FAILED'}")
            checks.record(ping.returncode == 0, "host namespace -> vm1 ping")

            say(f"serving {megabytes} MB of random data from vm0 over HTTP...")
            vm0.run(
                f"mkdir -p /srv && dd if=/dev/urandom of=/srv/f bs=1M count={megabytes} 2>/dev/null",
                check=True,
            )
            vm0.run("busybox httpd -p 8080 -h /srv", check=True)
            url = f"http://{GUESTS['vm0'][1]}:8080/f"
            want = vm0.run("md5sum < /srv/f").output.split()[0]
            start = time.monotonic()
            vm1.run(f"wget -q -O /tmp/f {url}", check=True, timeout=600)
            seconds = time.monotonic() - start
            same = vm1.run("md5sum < /tmp/f").output.split()[0] == want
            checks.record(same, "vm0 -> vm1 copy")
            say(f"vm0 -> vm1: {megabytes * 8 * 2**20 / seconds / 1e6:.0f} Mbit/s, checksums equal: {same}")
            start = time.monotonic()
            got = ns.run(["sh", "-c", f"busybox wget -q -O - {url} | md5sum"], check=False, timeout=600)
            seconds = time.monotonic() - start
            same = got.returncode == 0 and got.stdout.split()[0] == want
            checks.record(same, "vm0 -> host namespace copy")
            say(
                f"vm0 -> host namespace: {megabytes * 8 * 2**20 / seconds / 1e6:.0f} Mbit/s, "
                f"checksums equal: {same}"
            )

            sw = call(daemon.control, "switch", op="list", switch="vale0")["switches"]["vale0"]
            learnt = ", ".join(f"{a['mac']} on {a['port']}" for a in sw["addresses"])
            say(f"switch vale0 learnt {len(sw['addresses'])} addresses: {learnt}")
            for port, c in sw["ports"].items():
                say(
                    f"  {port:<8} received {c['rx_frames']:>6} frames: {c['forwarded']:>6} forwarded, "
                    f"{c['flooded']:>3} flooded, {c['dropped']} dropped; sent {c['tx_frames']:>6}"
                )
            for guest in guests.values():
                guest.poweroff()
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        checks.failed.append("interrupted")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if checks.failed:
        say(f"FAIL: {', '.join(checks.failed)}")
    else:
        say("PASS: two VMs and the host talk through a vhostmap switch")
    return not checks.failed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vhostmap.lab.demo [--quick]``."""
    parser = argparse.ArgumentParser(prog="vhostmap-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="copy 2 MB instead of 20 MB")
    args = parser.parse_args(argv)
    return 0 if run(2 if args.quick else 20) else 1


if __name__ == "__main__":
    sys.exit(main())
