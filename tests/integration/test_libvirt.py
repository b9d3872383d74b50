"""libvirt domains on vhostmap ports, through ``vhostmap vm`` and the real libvirtd (scripts/setup starts it).

A domain defined from ``vhostmap vm xml`` boots and pings a lab guest through a link; an interface hot-plugged
with ``vhostmap vm attach`` becomes a working port and ``vm detach`` removes it cleanly; with QEMU listening
(vhostmap the client), vhostmap restarts under a running domain without the guest rebooting.

Domains boot the lab's guest kernel (direct kernel boot, TCG). Their second serial port is the guest's command
channel (scripts/guest-init.sh): a UNIX socket this test listens on and QEMU connects to when it starts.
Every domain a test defines is destroyed and undefined when the test ends, whether it passed or not.
"""

from __future__ import annotations

import base64
import math
import os
import re
import select
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import pytest

from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.qemu import READY_MARKER, CompletedCommand, Nic, QemuGuest
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
_RC = re.compile(rb"@@VHM-RC (\d+) (\S+)@@\n")
_LOSS = re.compile(r"(\d+(?:\.\d+)?)% packet loss")
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


class GuestChannel:
    """The lab guest's command channel on a domain's second serial port: a UNIX socket QEMU connects to.

    Speaks the protocol of scripts/guest-init.sh, as `vhostmap.lab.qemu.QemuGuest` does for its own QEMU.
    """

    def __init__(self, path: Path, details: Callable[[], str]) -> None:
        self.path = path
        self.details = details
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._conn: socket.socket | None = None
        self._buffer = b""
        self._seq = 0

    def serial_element(self) -> ET.Element:
        """The ``<serial>`` that connects the domain's ttyS1 to this channel."""
        serial = ET.Element("serial", type="unix")
        ET.SubElement(serial, "source", mode="connect", path=str(self.path))
        ET.SubElement(serial, "target", port="1")
        return serial

    def _receive(self, timeout: float) -> None:
        """Accept QEMU's connection, or append what the guest sent; waits up to ``timeout`` for either."""
        sock = self._conn if self._conn is not None else self._listener
        readable, _, _ = select.select([sock], [], [], timeout)
        if not readable:
            return
        if self._conn is None:
            self._conn, _ = self._listener.accept()
            return
        data = self._conn.recv(65536)
        if not data:
            raise AssertionError(f"the guest's command channel closed\n{self.details()}")
        self._buffer += data

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the guest's /init says it is up."""

        def ready() -> bool:
            self._receive(0.1)
            at = self._buffer.find(READY_MARKER)
            if at < 0:
                return False
            self._buffer = self._buffer[at + len(READY_MARKER) :]
            return True

        wait_until(ready, timeout, "the domain's guest to boot", interval=0.01, details=self.details)

    def run(self, cmd: str, timeout: float = 30.0, *, check: bool = False) -> CompletedCommand:
        """Run ``cmd`` with the guest's /bin/sh: its exit status and output."""
        assert self._conn is not None, "wait_ready() first"
        self._seq += 1
        seq, guest_timeout = self._seq, max(1, math.ceil(timeout))
        self._conn.settimeout(30)
        self._conn.sendall(b"%d %d %s\n" % (seq, guest_timeout, base64.b64encode(cmd.encode())))
        self._conn.setblocking(False)
        header = b"@@VHM-OUT %d " % seq

        def reply() -> tuple[str, bytes] | None:
            self._receive(0.05)
            start = self._buffer.find(header)
            end_of_header = self._buffer.find(b"@@\n", start) if start >= 0 else -1
            if end_of_header < 0:
                return None
            length = int(self._buffer[start + len(header) : end_of_header])
            body = end_of_header + 3
            match = _RC.match(self._buffer, body + length)
            if match is None:
                return None
            output = self._buffer[body : body + length]
            self._buffer = self._buffer[match.end() :]
            return match.group(2).decode(), output

        status, raw = wait_until(
            reply, guest_timeout + 15, f"the guest to answer {cmd!r}", interval=0.01, details=self.details
        )
        output = raw.decode(errors="replace")
        assert status != "timeout", f"guest command {cmd!r} timed out:\n{output}\n{self.details()}"
        result = CompletedCommand(cmd=cmd, rc=int(status), output=output)
        return result.check() if check else result

    def ping(self, addr: str, count: int = 3, *, size: int = 56, interval: float = 0.2) -> float:
        """Ping ``addr`` from the guest; the loss in %."""
        output = self.run(f"ping -c {count} -s {size} -i {interval} -W 2 {addr}").output
        match = _LOSS.search(output)
        assert match is not None, f"ping printed no loss figure:\n{output}"
        return float(match.group(1))

    def wait_carrier(self, dev: str = "eth0", timeout: float = 30.0) -> None:
        """Wait until ``dev`` has carrier (vhostmap has started the device)."""
        script = f'while [ "$(cat /sys/class/net/{dev}/carrier 2>/dev/null)" != 1 ]; do usleep 50000; done'
        self.run(script, timeout=timeout, check=True)

    def close(self) -> None:
        """Close the sockets and remove the listening one."""
        for sock in (self._conn, self._listener):
            if sock is not None:
                sock.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


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


def boot_id(channel: GuestChannel) -> str:
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
    """Port a: jumbo MTU, vhostmap listening (the domain's QEMU connects, and would reconnect)."""
    ports = [
        f"a=vhost-user,path={sock_dir}/a.sock,mode=server,mac={MAC_A},queues={queues},mtu=9000",
        f"b=vhost-user,path={sock_dir}/b.sock,mode=server,mac={MAC_B},mtu=9000",
    ]
    name = domains.name("a")
    console = sock_dir / "console-a.log"
    with VhostmapDaemon(sock_dir, ports, ["a,b"]) as daemon:

        def details() -> str:
            console_text = console.read_text(errors="replace") if console.exists() else ""
            return f"--- console ---\n{tail(console_text)}\n{domains.qemu_log(name)}\n{daemon.diagnostics()}"

        xml = vhostmap(
            *("vm", "xml", "a", "--control", daemon.control, "--name", name, "--vcpus", str(queues)),
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
        with (
            GuestChannel(sock_dir / "chan-a.sock", details) as a,
            lab_guest_b(guest_kernel, sock_dir, 9000) as b,
        ):
            find(domain, "devices").append(a.serial_element())
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
            b.poweroff()


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
        with GuestChannel(sock_dir / "chan-hp.sock", details) as a, lab_guest_b(guest_kernel, sock_dir) as b:
            find(domain, "devices").append(a.serial_element())
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

    The lab guest on the other end of the link listens too, so it also outlives the restart.
    """
    ports = [
        f"a=vhost-user,path={sock_dir}/a.sock,mode=client,mac={MAC_A}",
        f"b=vhost-user,path={sock_dir}/b.sock,mode=client,mac={MAC_B}",
    ]
    name = domains.name("srv")
    console = sock_dir / "console-srv.log"
    with VhostmapDaemon(sock_dir, ports, ["a,b"]) as daemon:

        def details() -> str:
            console_text = console.read_text(errors="replace") if console.exists() else ""
            return f"--- console ---\n{tail(console_text)}\n{domains.qemu_log(name)}\n{daemon.diagnostics()}"

        xml = vhostmap(
            *("vm", "xml", "a", "--control", daemon.control, "--name", name),
            *("--kernel", str(guest_kernel.vmlinux), "--initrd", str(guest_kernel.initrd)),
            *("--cmdline", lab_cmdline(f"vhostmap.ip={IP_A}/24"), "--console-log", str(console)),
        )
        domain = ET.fromstring(xml)
        assert find(domain, "devices/interface/source").get("mode") == "server"
        channel = GuestChannel(sock_dir / "chan-srv.sock", details)
        with channel as a, lab_guest_b(guest_kernel, sock_dir, mode="server") as b:
            find(domain, "devices").append(a.serial_element())
            host.define(to_xml(domain))
            vhostmap("vm", "start", name)
            dom = host.domain(name)
            a.wait_ready()
            b.wait_ready()
            daemon.wait_connected("a")
            a.wait_carrier("eth0")
            assert a.ping(IP_B, count=3) == 0.0
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
            assert boot_id(a) == booted, "the guest rebooted"
            assert dom.isActive() and dom.ID() == domain_id, "the domain was restarted"
            b.poweroff()
