"""libvirt domains on vhostmap ports, through ``vhostmap vm`` and the real libvirtd (scripts/setup starts it).

A domain defined from ``vhostmap vm xml`` boots and pings a lab guest through a link (with one queue it also
holds a passthrough port, which makes it a q35 machine with an emulated IOMMU: the guest gets an ivshmem
device it can hand to vfio-pci, the way to the port's MSI-X interrupt); an interface hot-plugged
with ``vhostmap vm attach`` becomes a working port and ``vm detach`` removes it cleanly; with QEMU listening
(vhostmap the client), vhostmap restarts under a running domain without the guest rebooting.

Domains boot the lab's guest kernel (direct kernel boot, TCG). Their second serial port is the guest's command
channel (scripts/guest-init.sh): a UNIX socket this test listens on and QEMU connects to when it starts.
Every domain a test defines is destroyed and undefined when the test ends, whether it passed or not.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from vhostmap.lab.channel import CommandChannel
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.qemu import Nic, QemuGuest
from vhostmap.lab.wait import tail, wait_until
from vhostmap.vm import (
    QEMU_NS,
    DomainSpec,
    LibvirtHost,
    VmError,
    domain_element,
    interface_alias,
    to_xml,
)

pytestmark = pytest.mark.slow

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (scripts/setup installs it)")

MAC_A, MAC_B = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
IP_A, IP_B = "10.0.0.1", "10.0.0.2"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")


def lab_cmdline(*extra: str) -> str:
    """The lab guest's kernel command line (as `QemuGuest` boots it), plus ``extra`` words."""
    words = ["console=ttyS0", "panic=-1", "quiet", "vhostmap.cmd=ttyS1", "mitigations=off", "tsc=reliable"]
    words += ["no_timer_check", "rcupdate.rcu_expedited=1", "8250.nr_uarts=2"]
    return " ".join([*words, *extra])


def find(element: ET.Element, path: str) -> ET.Element:
    """The element at ``path`` under ``element``, which must be there."""
    found = element.find(path)
    assert found is not None, f"no {path} in\n{ET.tostring(element, encoding='unicode')}"
    return found


def vhostmap(*args: str) -> str:
    """Run the ``vhostmap`` command line; its stdout (the test fails with its stderr if it fails)."""
    result = subprocess.run(
        [sys.executable, "-m", "vhostmap.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"vhostmap {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


class Domains:
    """The domains one test defines, by unique name; `remove_all` destroys and undefines every one."""

    def __init__(self, host: LibvirtHost, prefix: str) -> None:
        self.host = host
        self.prefix = prefix
        self.names: list[str] = []

    def name(self, suffix: str) -> str:
        """A fresh domain name for this test (a leftover of a killed run under the same name goes first)."""
        name = f"{self.prefix}-{suffix}"
        self._remove(name)
        self.names.append(name)
        return name

    def define_and_start(self, domain: ET.Element) -> Any:
        """Define ``domain`` (its name from `name`) and start it; the ``virDomain``."""
        assert domain.findtext("name") in self.names
        dom = self.host.define(to_xml(domain))
        dom.create()
        return dom

    def qemu_log(self, name: str) -> str:
        """The tail of what libvirt logged for domain ``name``'s QEMU."""
        try:
            text = (QEMU_LOG_DIR / f"{name}.log").read_text(errors="replace")
        except OSError:
            return f"(no QEMU log for {name})"
        return f"--- libvirt's QEMU log of {name} ---\n{tail(text)}"

    def remove_all(self) -> None:
        """Destroy and undefine every domain named through `name`."""
        for name in self.names:
            self._remove(name)

    def _remove(self, name: str) -> None:
        try:
            dom = self.host.conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefine()
        (QEMU_LOG_DIR / f"{name}.log").unlink(missing_ok=True)


def serial_element(channel: CommandChannel) -> ET.Element:
    """The ``<serial>`` that connects a domain's ttyS1 (the guest's command channel) to ``channel``."""
    serial = ET.Element("serial", type="unix")
    ET.SubElement(serial, "source", mode="connect", path=str(channel.path))
    ET.SubElement(serial, "target", port="1")
    return serial


@pytest.fixture(scope="module")
def host() -> Iterator[LibvirtHost]:
    """A connection to the system libvirtd (the test is skipped without one)."""
    try:
        h = LibvirtHost()
    except VmError as e:
        pytest.skip(str(e))
    yield h
    h.close()


@pytest.fixture
def domains(host: LibvirtHost, request: pytest.FixtureRequest) -> Iterator[Domains]:
    """Unique domain names for this test; every domain defined under them is removed afterwards."""
    test = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_"))[:24].strip("-")
    d = Domains(host, f"vhmt-{os.getpid()}-{test}")
    yield d
    d.remove_all()


def lab_guest_b(
    kernel: GuestKernel, sock_dir: Path, mtu: int | None = None, mode: Literal["client", "server"] = "client"
) -> QemuGuest:
    """The lab guest on port b (10.0.0.2); ``mode`` is QEMU's side of the socket."""
    nic = Nic(sock_dir / "b.sock", MAC_B, mode=mode, ip=f"{IP_B}/24", mtu=mtu)
    return QemuGuest([nic], kernel=kernel, workdir=sock_dir / "qb")


def boot_id(channel: CommandChannel) -> str:
    """The guest kernel's boot id: another one means the guest rebooted."""
    return channel.run("cat /proc/sys/kernel/random/boot_id", check=True).output.strip()


@pytest.mark.parametrize(
    "queues",
    [
        pytest.param(1, id="1q"),
        pytest.param(2, id="2q"),
    ],
)
def test_domain_from_vm_xml_boots_and_pings_a_lab_guest_through_a_link(
    guest_kernel: GuestKernel, sock_dir: Path, domains: Domains, queues: int
) -> None:
    """Port a: jumbo MTU, vhostmap listening (the domain's QEMU connects, and would reconnect). With one
    queue, passthrough port pt0 too: vm xml makes the domain q35 with intel-iommu (interrupt remapping)."""
    ports = [
        f"a=vhost-user,path={sock_dir}/a.sock,mode=server,mac={MAC_A},queues={queues},mtu=9000",
        f"b=vhost-user,path={sock_dir}/b.sock,mode=server,mac={MAC_B},mtu=9000",
    ]
    passthrough = queues == 1
    if passthrough:
        ports.append(f"pt0=passthrough,path={sock_dir}/pt0.sock,slots=256")
    name = domains.name("a")
    console = sock_dir / "console-a.log"
    with VhostmapDaemon(sock_dir, ports, ["a,b"]) as daemon:

        def details() -> str:
            console_text = console.read_text(errors="replace") if console.exists() else ""
            return f"--- console ---\n{tail(console_text)}\n{domains.qemu_log(name)}\n{daemon.diagnostics()}"

        xml = vhostmap(
            *("vm", "xml", "a", *(["pt0"] if passthrough else [])),
            *("--control", daemon.control, "--name", name, "--vcpus", str(queues)),
            *("--kernel", str(guest_kernel.vmlinux), "--initrd", str(guest_kernel.initrd)),
            *("--cmdline", lab_cmdline(f"vhostmap.ip={IP_A}/24"), "--console-log", str(console)),
        )
        domain = ET.fromstring(xml)
        iface = find(domain, "devices/interface[@type='vhostuser']")
        assert find(iface, "source").attrib == {
            "type": "unix",
            "path": f"{sock_dir}/a.sock",
            "mode": "client",
        }
        assert find(iface, "source/reconnect").attrib == {"enabled": "yes", "timeout": "1"}
        assert find(iface, "mac").get("address") == MAC_A
        if queues > 1:
            assert find(iface, "driver").get("queues") == str(queues)
        # The MTU goes as the device's host_mtu (libvirt 9.0 cannot start a vhostuser NIC with <mtu>).
        overrides = find(domain, f"{{{QEMU_NS}}}override")
        device = find(overrides, f"{{{QEMU_NS}}}device[@alias='{interface_alias('a')}']")
        props = {p.get("name"): p.get("value") for p in device.iter(f"{{{QEMU_NS}}}property")}
        assert props == {"vectors": "0", "host_mtu": "9000"}
        if passthrough:
            assert find(domain, "os/type").get("machine") == "q35"
            assert find(domain, "devices/iommu/driver").get("intremap") == "on"
        with (
            CommandChannel(sock_dir / "chan-a.sock", details) as a,
            lab_guest_b(guest_kernel, sock_dir, 9000) as b,
        ):
            find(domain, "devices").append(serial_element(a))
            domains.define_and_start(domain)
            a.wait_ready()
            b.wait_ready()
            daemon.wait_connected("a")
            a.wait_carrier("eth0")
            b.wait_carrier("eth0")
            # As many vCPUs as queues: virtio_net uses every queue pair vhostmap offers.
            assert int(a.run("ls /sys/class/net/eth0/queues | grep -c rx-", check=True).output) == queues
            assert a.run("cat /sys/class/net/eth0/mtu", check=True).output.strip() == "9000"
            assert a.ping(IP_B, count=5) == 0.0
            assert b.ping(IP_A, count=3, size=8000) == 0.0
            stats = daemon.stats()
            assert stats["a"]["totals"]["rx_packets"] >= 5
            assert stats["a"]["totals"]["errors"] == stats["b"]["totals"]["errors"] == 0
            assert stats["a"]["broken"] is None
            if passthrough:
                the_guest_can_give_its_passthrough_device_to_vfio_pci(a, daemon)
            b.poweroff()


def the_guest_can_give_its_passthrough_device_to_vfio_pci(
    guest: CommandChannel, daemon: VhostmapDaemon
) -> None:
    """libvirt started the domain with the IOMMU and the ivshmem device: QEMU holds pt0, the guest kernel
    found the IOMMU (and, booted with intel_iommu=on, loaded vfio-pci), and the device binds to vfio-pci,
    which gives it a VFIO group: what vhostmap_guest's driver opens to sleep on the port's interrupt."""
    daemon.wait_connected("pt0")
    assert daemon.stats()["pt0"]["passthrough"]["attached"]
    assert "dmar" in guest.run("ls /sys/class/iommu", check=True).output
    bind = (
        "for d in /sys/bus/pci/devices/*; do "
        'if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1110 ]; then '
        "echo vfio-pci > $d/driver_override; echo ${d##*/} > /sys/bus/pci/drivers_probe; "
        'echo "group=$(basename $(readlink $d/iommu_group))"; '
        'echo "driver=$(basename $(readlink $d/driver))"; fi; done'
    )
    # Labelled lines: whatever else the guest printed (a kernel or shell message) is kept for the message.
    out = guest.run(bind, check=True).output
    found = dict(line.split("=", 1) for line in out.splitlines() if line.startswith(("group=", "driver=")))
    assert found.get("driver") == "vfio-pci", out
    assert found.get("group") in guest.run("ls /dev/vfio", check=True).output.split(), out


def test_hot_plugged_interface_becomes_a_working_port_and_unplugs_cleanly(
    guest_kernel: GuestKernel, sock_dir: Path, domains: Domains, host: LibvirtHost
) -> None:
    ports = [
        f"hp=vhost-user,path={sock_dir}/hp.sock,mode=server,mac={MAC_A}",
        f"b=vhost-user,path={sock_dir}/b.sock,mode=server,mac={MAC_B}",
    ]
    name = domains.name("hp")
    console = sock_dir / "console-hp.log"
    with VhostmapDaemon(sock_dir, ports, ["hp,b"]) as daemon:

        def details() -> str:
            console_text = console.read_text(errors="replace") if console.exists() else ""
            return f"--- console ---\n{tail(console_text)}\n{domains.qemu_log(name)}\n{daemon.diagnostics()}"

        # A domain without NICs, as `vhostmap vm xml` makes it (TCG: vectors=0 for NICs plugged later too).
        spec = DomainSpec(
            name,
            kernel=str(guest_kernel.vmlinux),
            initrd=str(guest_kernel.initrd),
            cmdline=lab_cmdline(),
            console_log=str(console),
        )
        domain = domain_element(spec, [])
        with (
            CommandChannel(sock_dir / "chan-hp.sock", details) as a,
            lab_guest_b(guest_kernel, sock_dir) as b,
        ):
            find(domain, "devices").append(serial_element(a))
            dom = domains.define_and_start(domain)
            a.wait_ready()
            b.wait_ready()
            assert not daemon.status()["ports"]["hp"]["connected"]

            for round_ in (1, 2):  # attached, detached, and attached again: the port is as good as new
                vhostmap("vm", "attach", "hp", name, "--control", daemon.control)
                daemon.wait_connected("hp")
                a.run(
                    "while [ ! -e /sys/class/net/eth0 ]; do usleep 50000; done; "
                    f"ip addr add {IP_A}/24 dev eth0 && ip link set eth0 up",
                    check=True,
                )
                a.wait_carrier("eth0")
                assert a.ping(IP_B, count=3) == 0.0, f"round {round_}"
                assert b.ping(IP_A, count=2) == 0.0, f"round {round_}"

                vhostmap("vm", "detach", "hp", name, "--control", daemon.control)
                wait_until(
                    lambda: not daemon.status()["ports"]["hp"]["connected"],
                    30,
                    "vhostmap to see the front-end go",
                    details=details,
                )
                assert a.run("test -e /sys/class/net/eth0").rc != 0, "the guest still has the NIC"
                live = ET.fromstring(dom.XMLDesc(0))
                assert live.find(f"devices/interface/alias[@name='{interface_alias('hp')}']") is None
                assert dom.isActive()

            stats = daemon.stats()
            assert stats["hp"]["totals"]["rx_packets"] >= 6
            assert stats["hp"]["totals"]["errors"] == 0
            assert stats["hp"]["broken"] is None
            b.poweroff()


def test_vhostmap_restart_under_a_running_domain_resumes_traffic_without_reboot(
    guest_kernel: GuestKernel, sock_dir: Path, domains: Domains, host: LibvirtHost
) -> None:
    """vhostmap in client mode: the domain's QEMU listens (mode='server'), vhostmap connects and reconnects.

    The domain's NIC has packed virtqueues (``vm xml --packed``: ``<driver packed='on'/>``, on a port with
    packed=on), which QEMU cannot restart where they were after vhostmap's death: vhostmap resumes them
    where their descriptors say (VhostUserNetDevice._resume_packed). The lab guest on the other end of the
    link (split rings) listens too, so it also outlives the restart.
    """
    ports = [
        f"a=vhost-user,path={sock_dir}/a.sock,mode=client,mac={MAC_A},packed=on",
        f"b=vhost-user,path={sock_dir}/b.sock,mode=client,mac={MAC_B}",
    ]
    name = domains.name("srv")
    console = sock_dir / "console-srv.log"
    with VhostmapDaemon(sock_dir, ports, ["a,b"]) as daemon:

        def details() -> str:
            console_text = console.read_text(errors="replace") if console.exists() else ""
            return f"--- console ---\n{tail(console_text)}\n{domains.qemu_log(name)}\n{daemon.diagnostics()}"

        xml = vhostmap(
            *("vm", "xml", "a", "--control", daemon.control, "--name", name, "--packed"),
            *("--kernel", str(guest_kernel.vmlinux), "--initrd", str(guest_kernel.initrd)),
            *("--cmdline", lab_cmdline(f"vhostmap.ip={IP_A}/24"), "--console-log", str(console)),
        )
        domain = ET.fromstring(xml)
        assert find(domain, "devices/interface/source").get("mode") == "server"
        assert find(domain, "devices/interface/driver").attrib == {"packed": "on"}
        channel = CommandChannel(sock_dir / "chan-srv.sock", details)
        with channel as a, lab_guest_b(guest_kernel, sock_dir, mode="server") as b:
            find(domain, "devices").append(serial_element(a))
            host.define(to_xml(domain))
            vhostmap("vm", "start", name)
            dom = host.domain(name)
            a.wait_ready()
            b.wait_ready()
            daemon.wait_connected("a")
            a.wait_carrier("eth0")
            assert a.ping(IP_B, count=3) == 0.0
            # libvirt kept the attribute, and QEMU's NIC offered packed rings, which the guest took.
            assert find(ET.fromstring(dom.XMLDesc(0)), "devices/interface/driver").get("packed") == "on"
            assert daemon.status()["ports"]["a"]["ring"] == "packed"
            booted, domain_id = boot_id(a), dom.ID()

            daemon.kill()
            # While vhostmap is gone the link is down: nothing gets through.
            assert a.ping(IP_B, count=2, interval=0.5) == 100.0
            daemon.start()
            daemon.wait_connected("a")
            daemon.wait_connected("b")
            a.wait_carrier("eth0")
            # QEMU restarts its rings right after the handshake; the first echo may race that.
            wait_until(lambda: a.ping(IP_B, count=1) == 0.0, 30, "traffic to resume", details=details)
            assert a.ping(IP_B, count=10) == 0.0
            assert b.ping(IP_A, count=3) == 0.0
            assert daemon.status()["ports"]["a"]["ring"] == "packed"
            assert boot_id(a) == booted, "the guest rebooted"
            assert dom.isActive() and dom.ID() == domain_id, "the domain was restarted"
            b.poweroff()
