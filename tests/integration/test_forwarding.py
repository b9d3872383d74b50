"""Forwarding with stock Linux guests (QEMU TCG, virtio_net): a learning switch between guests, a guest on a
TAP (its port's host rings) reaching a network namespace, a guest reaching a namespace through a generic port
on a veth pair (both copying a file each way with their offloads on, TSO frames crossing whole), and a port
attached and detached at run time while the other guests keep pinging.

Guests are 10.0.0.1 (a) and 10.0.0.2 (b); namespaces are 10.0.0.3. IPv6 is turned off in the guests and on
the host-side interfaces, so that the only multicast the switch floods is what the test causes.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from vhostmap.control.client import call
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.netns import (
    Netns,
    VethPair,
    add_address,
    disable_ipv6,
    ip,
    link_exists,
    set_up,
    unique_name,
)
from vhostmap.lab.netns import namespace_behind_veth as lab_namespace_behind_veth
from vhostmap.lab.qemu import Nic, QemuGuest
from vhostmap.lab.wait import wait_until

pytestmark = pytest.mark.slow

GUESTS = {"a": ("52:54:00:00:00:0a", "10.0.0.1/24"), "b": ("52:54:00:00:00:0b", "10.0.0.2/24")}
NETNS_ADDR = "10.0.0.3"
PING_STATS = re.compile(r"(\d+) packets transmitted, (\d+) packets received")
NO_IPV6 = "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do [ -e $f ] && echo 1 > $f; done; true"


@contextmanager
def vhostmap_and_guests(
    kernel: GuestKernel,
    workdir: Path,
    names: list[str],
    *,
    port_options: dict[str, str] | None = None,
    extra_ports: tuple[str, ...] = (),
    switches: tuple[str, ...] = (),
) -> Iterator[tuple[VhostmapDaemon, list[QemuGuest]]]:
    """vhostmap with a vhost-user port per guest in ``names`` (plus ``extra_ports`` and ``switches``), and
    the guests booted, with carrier and IPv6 off."""
    options = port_options or {}
    ports = [
        f"{n}=vhost-user,path={workdir}/{n}.sock,mac={GUESTS[n][0]}"
        + (f",{options[n]}" if n in options else "")
        for n in names
    ]
    extra = [arg for s in switches for arg in ("--switch", s)]
    daemon = VhostmapDaemon(workdir, [*ports, *extra_ports], extra_args=extra)
    guests = [
        QemuGuest(
            [Nic(workdir / f"{n}.sock", GUESTS[n][0], ip=GUESTS[n][1])],
            kernel=kernel,
            workdir=workdir / f"q{n}",
        )
        for n in names
    ]
    with ExitStack() as stack:
        stack.enter_context(daemon)
        for g in guests:
            stack.enter_context(g)
        for g in guests:
            g.wait_ready()
            g.wait_carrier("eth0")
            g.run(NO_IPV6, check=True)
        yield daemon, guests
        for g in guests:
            g.poweroff()


def switch_ports(daemon: VhostmapDaemon, switch: str = "vale0") -> dict[str, dict[str, int]]:
    """Per-port counters of ``switch``."""
    return dict(call(daemon.control, "switch", op="list", switch=switch)["switches"][switch]["ports"])


def vhostmap_cli(daemon: VhostmapDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``vhostmap`` CLI against ``daemon``, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "vhostmap.cli", *args, "--control", daemon.control],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )


@contextmanager
def namespace_behind_veth() -> Iterator[tuple[Netns, VethPair]]:
    """A namespace at 10.0.0.3/24 behind a veth pair (``veth.name`` here, for a generic port)."""
    with lab_namespace_behind_veth(f"{NETNS_ADDR}/24") as (ns, veth):
        yield ns, veth
    assert not veth.exists and not ns.exists


def test_two_guests_on_a_switch_stop_flooding_once_both_addresses_are_learnt(
    guest_kernel: GuestKernel, sock_dir: Path
) -> None:
    with vhostmap_and_guests(guest_kernel, sock_dir, ["a", "b"], switches=("vale0=a,b",)) as (daemon, (a, b)):
        assert a.ping("10.0.0.2", count=3) == 0.0  # ARP broadcast flooded, the reply forwarded: both learnt
        learnt = call(daemon.control, "switch", op="list")["switches"]["vale0"]["addresses"]
        assert {(e["mac"], e["port"]) for e in learnt} == {(GUESTS["a"][0], "a"), (GUESTS["b"][0], "b")}
        before = switch_ports(daemon)
        assert a.ping("10.0.0.2", count=20, interval=0.1) == 0.0
        assert b.ping("10.0.0.1", count=5, interval=0.1) == 0.0
        after = switch_ports(daemon)
        for port in ("a", "b"):
            assert after[port]["flooded"] == before[port]["flooded"], f"port {port} still floods"
            assert after[port]["forwarded"] >= before[port]["forwarded"] + 25
            assert after[port]["dropped"] == 0 and after[port]["tx_dropped"] == 0
        listing = vhostmap_cli(daemon, "switch", "list").stdout
        assert listing.startswith("vale0: 2 port(s), 2 address(es), aging 300 s")


@contextmanager
def serving(ns: Netns, megabytes: int) -> Iterator[str]:
    """busybox httpd in ``ns`` serving a random file of ``megabytes`` MiB as /blob; yields its md5."""
    with tempfile.TemporaryDirectory() as srv:
        blob = os.urandom(megabytes << 20)
        Path(srv, "blob").write_bytes(blob)
        httpd = ["busybox", "httpd", "-f", "-p", f"{NETNS_ADDR}:8080", "-h", srv]
        with subprocess.Popen(["ip", "netns", "exec", ns.name, *httpd]) as server:
            try:
                listening = ["ss", "-Hltn", "sport = :8080"]
                wait_until(lambda: ns.run(listening).stdout.strip(), 10, "httpd in the namespace to listen")
                yield hashlib.md5(blob).hexdigest()
            finally:
                server.kill()


def fetch(guest: QemuGuest, ns: Netns, megabytes: int = 8) -> None:
    """The guest fetches a file of ``megabytes`` MiB from the namespace by HTTP, md5 intact."""
    with serving(ns, megabytes) as md5:
        guest.run(f"wget -q -O /tmp/blob http://{NETNS_ADDR}:8080/blob", check=True, timeout=240)
        assert guest.run("md5sum /tmp/blob", check=True).output.split()[0] == md5


def upload(guest: QemuGuest, ns: Netns, megabytes: int = 8) -> None:
    """The namespace fetches a random file of ``megabytes`` MiB from the guest's busybox httpd, md5 intact."""
    guest.run(
        f"mkdir -p /srv && dd if=/dev/urandom of=/srv/blob bs=1M count={megabytes} 2>/dev/null",
        check=True,
        timeout=60,
    )
    md5 = guest.run("md5sum /srv/blob", check=True).output.split()[0]
    guest.run("busybox httpd -p 8081 -h /srv", check=True)
    url = f"http://{GUESTS['a'][1].split('/')[0]}:8081/blob"
    got = ns.run(["sh", "-c", f"busybox wget -q -O - {url} | md5sum"], timeout=240)
    assert got.stdout.split()[0] == md5, got.stderr


def copy_both_ways_with_offloads(daemon: VhostmapDaemon, guest: QemuGuest, ns: Netns, stack: str) -> None:
    """A file each way between the guest and the namespace, md5 intact, with the guest's offloads
    negotiated; then, from the counters of the guest's port and of the ``stack`` side of the daemon's stats
    (``host`` of port a, or ``generic`` of port up): the guest's TSO frames went to the stack whole, and the
    stack's (TSO on the namespace's side) reached the guest whole, which takes them."""
    features = set(daemon.status()["ports"]["a"]["features"])
    assert features >= {"VIRTIO_NET_F_CSUM", "VIRTIO_NET_F_HOST_TSO4", "VIRTIO_NET_F_GUEST_TSO4"}, features
    upload(guest, ns)
    fetch(guest, ns)
    stats = daemon.stats()
    port, side = stats["a"]["totals"], stats["a"]["host"] if stack == "host" else stats["up"]["generic"]
    assert port["rx_offload_passed"] > 0 and port["rx_bytes"] / port["rx_packets"] > 2000, port
    assert side["rx_offload_passed"] > 0 and side["rx_offloaded"] == 0, side
    assert port["tx_offloaded"] == 0 and port["tx_bytes"] / port["tx_packets"] > 2000, port


def test_a_guest_on_a_tap_reaches_a_namespace_through_its_host_rings(
    guest_kernel: GuestKernel, sock_dir: Path
) -> None:
    tap = unique_name("vhmt")
    with (
        Netns() as ns,
        vhostmap_and_guests(guest_kernel, sock_dir, ["a"], port_options={"a": f"host={tap}"}) as (
            daemon,
            (a,),
        ),
    ):
        # vhostmap made the TAP (the port's host stack); it goes to the namespace, which gets an address.
        assert daemon.status()["ports"]["a"]["host"] == tap
        ip("link", "set", "dev", tap, "netns", ns.name)
        disable_ipv6(tap, ns.name)  # a device's IPv6 settings are made afresh in its new namespace
        add_address(tap, f"{NETNS_ADDR}/24", netns=ns.name)
        set_up(tap, netns=ns.name)
        assert a.ping(NETNS_ADDR, count=5) == 0.0
        reply = ns.run(["busybox", "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.0.1"], check=False)
        assert reply.returncode == 0, reply.stdout + reply.stderr
        host = daemon.stats()["a"]["host"]
        assert host["tx_packets"] >= 8 and host["rx_packets"] >= 8
        copy_both_ways_with_offloads(daemon, a, ns, "host")
    assert not link_exists(tap)  # vhostmap's TAP went with it


def test_a_guest_reaches_a_namespace_through_a_generic_port_on_a_veth(
    guest_kernel: GuestKernel, sock_dir: Path
) -> None:
    with (
        namespace_behind_veth() as (ns, veth),
        vhostmap_and_guests(
            guest_kernel,
            sock_dir,
            ["a"],
            extra_ports=(f"up=generic,ifname={veth.name}",),
            switches=("vale0=a,up",),
        ) as (daemon, (a,)),
    ):
        assert a.ping(NETNS_ADDR, count=5) == 0.0
        reply = ns.run(["busybox", "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.0.1"], check=False)
        assert reply.returncode == 0, reply.stdout + reply.stderr
        # TCP too: the namespace's veth leaves checksums to offload, which the generic port completes.
        a.run(
            "mkdir -p /srv && echo vhostmap-over-veth > /srv/hello && busybox httpd -p 8080 -h /srv",
            check=True,
        )
        got = ns.run(["busybox", "wget", "-q", "-O", "-", "http://10.0.0.1:8080/hello"], check=False)
        assert got.stdout == "vhostmap-over-veth\n", got.stderr
        up: dict[str, Any] = daemon.stats()["up"]["totals"]
        assert up["rx_packets"] >= 8 and up["tx_packets"] >= 8
        copy_both_ways_with_offloads(daemon, a, ns, "generic")


def test_a_port_attached_and_detached_at_run_time_while_the_others_keep_pinging(
    guest_kernel: GuestKernel, sock_dir: Path
) -> None:
    with (
        namespace_behind_veth() as (_ns, veth),
        vhostmap_and_guests(
            guest_kernel,
            sock_dir,
            ["a", "b"],
            extra_ports=(f"up=generic,ifname={veth.name}",),
            switches=("vale0=a,b",),
        ) as (daemon, (a, b)),
    ):
        assert a.ping("10.0.0.2", count=2) == 0.0
        # b pings a all along, in the background, while the namespace's port comes and goes.
        b.run("ping -i 0.1 10.0.0.1 > /tmp/ping.log 2>&1 &", check=True)
        assert a.ping(NETNS_ADDR, count=2, interval=0.5) == 100.0  # not attached yet
        assert vhostmap_cli(daemon, "switch", "attach", "vale0", "up").stdout == "attached up to vale0\n"
        wait_until(lambda: a.ping(NETNS_ADDR, count=1) == 0.0, 30, "the namespace to answer once attached")
        assert a.ping(NETNS_ADDR, count=5, interval=0.2) == 0.0
        assert vhostmap_cli(daemon, "switch", "detach", "vale0", "up").stdout == "detached up from vale0\n"
        assert a.ping(NETNS_ADDR, count=3, interval=0.2) == 100.0
        assert list(switch_ports(daemon)) == ["a", "b"]
        assert b.run("pidof ping").rc == 0, "b's ping ended before the port came and went"
        b.run("kill -INT $(pidof ping)", check=True)  # ping prints its statistics and exits

        def finished() -> re.Match[str] | None:
            return PING_STATS.search(b.run("cat /tmp/ping.log").output)

        stats = wait_until(finished, 30, "b's background ping to print its statistics", interval=0.5)
        sent, received = int(stats.group(1)), int(stats.group(2))
        # Every echo got its reply but, perhaps, the last one, in flight when ping was interrupted.
        assert sent >= 50 and received >= sent - 1, stats.group(0)
