"""Attaching VMs through libvirt: domain XML matching vhostmap ports, and the libvirt calls that use it.

``vhostmap vm xml PORT`` asks the running daemon (control socket, ``status``) for the port's socket path,
mode, MAC, queues, MTU and whether it offers packed virtqueues, and prints a libvirt domain, or the
``<interface type='vhostuser'>`` alone, that matches it. ``vm define|start|attach|detach`` do the same
through libvirt-python, which is imported only then, so the rest of vhostmap works without it. XML is built
with xml.etree, never by pasting strings.

Socket directions (vmconfigs/README.md): a vhostmap ``mode=server`` port (vhostmap listens) gets a source
in ``mode='client'`` with ``<reconnect enabled='yes' timeout='1'/>``: a domain started before vhostmap
waits for it, and QEMU reconnects after a vhostmap restart. A vhostmap ``mode=client`` port gets
``mode='server'``: QEMU listens and waits for vhostmap at start (libvirt allows no reconnect there; vhostmap
does the reconnecting), and a vhostmap restart costs the guest no more than a link flap.

MTU: libvirt 9.0 (Debian 12) fails to start a domain whose vhostuser interface has ``<mtu size='N'/>``
("Cannot set interface MTU on '(null)'": it looks for a host netdev to set it on, and there is none), so a
port's MTU other than 1500 reaches the guest as the device's ``host_mtu`` through a ``qemu:override``.
No override reaches a hot-plugged NIC: the guest then sees 1500 and may raise it itself.

TCG (QEMU 7.2 without KVM): vhost-user on a virtio-net device with MSI-X makes QEMU segfault in
msix_set_vector_notifiers, so ``--tcg`` (the default) gives every NIC ``vectors=0`` (the guest uses INTx):
a ``qemu:override`` per interface at start (it also replaces the vectors libvirt sets itself on multiqueue
NICs), ``-global virtio-net-pci.vectors=0`` for NICs hot-plugged later (no override reaches those), and
``pci=nomsi`` on a direct-boot kernel's command line, for hot-plugged multiqueue NICs, whose vectors libvirt
sets explicitly, beating the global.

The daemon calls `libvirt_access_problems` on its listening sockets: QEMU run by libvirt as the user and
group of /etc/libvirt/qemu.conf must be able to connect to them.

Passthrough ports (``NAME=passthrough``, vhostmap is their ivshmem server) get a ``<shmem>`` device instead
of an interface: ``<model type='ivshmem-doorbell'/>``, ``<server path=SOCK/>`` and ``<msi vectors='1'/>``
(the port's doorbell is vector 0; QEMU raises it as MSI-X only, and the device needs at least one vector
to accept the server's eventfds). The guest finds the port's region as BAR 2 of PCI device 1af4:1110
(vhostmap_guest ``open("pt:0")``). QEMU connects once, at start, and never reconnects to an ivshmem server:
start vhostmap first, and restart the domain after a vhostmap restart.

The interrupt of a passthrough port reaches guest userspace only through vfio-pci, which needs an IOMMU in
the guest (Debian's kernel has no VFIO no-IOMMU mode): ``--iommu`` makes the domain a q35 machine with
QEMU's intel-iommu and interrupt remapping (``<iommu model='intel'><driver intremap='on'/></iommu>``, which
libvirt accepts only with ``<ioapic driver='qemu'/>``), and a direct-boot kernel gets ``intel_iommu=on``
instead of ``pci=nomsi`` (MSI-X must work for the interrupt; the vhost-user NICs keep ``vectors=0``). It is
on by default for a domain with a passthrough port: without it the guest's driver can only busy-poll, a
vCPU spinning whenever the application waits; ``--no-iommu`` keeps a pc machine (busy polling, PCI
hot-plug through ACPI: a q35 domain hot-plugs into PCIe root ports, of which libvirt adds only those the
defined devices need). A disk-booted guest must add ``intel_iommu=on`` to its own command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import os
import platform
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from vhostmap.control.client import DEFAULT_CONTROL_SOCKET, ControlError, call
from vhostmap.system.access import libvirt_access_problems

LIBVIRT_URI = "qemu:///system"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Whom libvirt's QEMU driver runs QEMU as when qemu.conf does not say (Debian's build).
ALIAS_PREFIX = "ua-vhostmap-"  # libvirt keeps user aliases ("ua-...") across define, start and hot-plug
RECONNECT_SECONDS = 1
TCG_GLOBAL = "virtio-net-pci.vectors=0"
TCG_CMDLINE = "pci=nomsi"
IOMMU_CMDLINE = "intel_iommu=on"  # the guest kernel uses QEMU's intel-iommu (vfio-pci needs it)
DEFAULT_CMDLINE = "console=ttyS0"
DEFAULT_MTU = 1500  # what a virtio-net guest uses when the device does not say
DETACH_TIMEOUT = 30.0
PT_VECTORS = 1  # a passthrough port's ivshmem-doorbell: vector 0 interrupts the guest

ET.register_namespace("qemu", QEMU_NS)


class VmError(Exception):
    """A VM operation that cannot be done (no daemon or port, no libvirt, libvirt refused); says why."""


def _q(tag: str) -> str:
    """A tag in libvirt's QEMU namespace."""
    return f"{{{QEMU_NS}}}{tag}"


# --- ports ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortInfo:
    """What a domain needs to know of a vhostmap port. ``mode`` is vhostmap's side of the socket;
    ``offers_packed``: the port offers packed virtqueues (``packed=on``, its default); ``packed``: the NIC
    offers them to the guest too (``vm xml --packed``; off by default, as in QEMU and libvirt)."""

    name: str
    path: str
    mode: str
    mac: str
    queues: int = 1
    mtu: int = 1500
    offers_packed: bool = False
    packed: bool = False
    passthrough: bool = False

    @property
    def qemu_mode(self) -> str:
        """QEMU's side of the socket (libvirt's ``<source mode=...>``): the other one."""
        return "client" if self.mode == "server" else "server"

    @property
    def alias(self) -> str:
        """The user alias of this port's ``<interface>``."""
        return interface_alias(self.name)


def port_info(control: str, name: str) -> PortInfo:
    """Port ``name`` of the daemon answering on ``control``."""
    try:
        ports = call(control, "status")["ports"]
    except ControlError as e:
        raise VmError(str(e)) from None
    if name not in ports:
        raise VmError(f"the daemon has no port {name!r} (it has: {', '.join(sorted(ports)) or 'none'})")
    p = ports[name]
    if p.get("type") == "passthrough" and isinstance(p.get("path"), str):
        if not os.path.isabs(p["path"]):
            raise VmError(f"port {name!r}: libvirt needs an absolute socket path, not {p['path']!r}")
        return PortInfo(name=name, path=p["path"], mode="server", mac="", passthrough=True)
    if not isinstance(p.get("path"), str) or p.get("mode") not in ("server", "client"):
        raise VmError(f"port {name!r} is not a vhost-user port: a VM cannot attach to it")
    if not os.path.isabs(p["path"]):
        raise VmError(
            f"port {name!r}: socket path {p['path']!r} is relative to the daemon's directory; "
            "libvirt needs an absolute path= in the daemon's configuration"
        )
    return PortInfo(
        name=name,
        path=p["path"],
        mode=p["mode"],
        mac=p["mac"],
        queues=int(p.get("queues", 1)),
        mtu=int(p.get("mtu", 1500)),
        offers_packed=bool(p.get("packed", False)),
    )


def interface_alias(port: str) -> str:
    """``ua-vhostmap-NAME``: the libvirt user alias of port ``port``'s interface.

    libvirt silently drops user aliases with characters other than letters, digits, '_' and '-'; port names
    may hold '.', so '_' is written '__' and '.' '_-', which keeps distinct names distinct.
    """
    return ALIAS_PREFIX + port.replace("_", "__").replace(".", "_-")


# --- XML ------------------------------------------------------------------------------------------------


def shmem_element(port: PortInfo) -> ET.Element:
    """The ``<shmem>`` of passthrough port ``port``: an ivshmem-doorbell device whose server is vhostmap."""
    shmem = ET.Element("shmem", name=f"vhostmap-{port.name}")
    ET.SubElement(shmem, "model", type="ivshmem-doorbell")
    ET.SubElement(shmem, "server", path=port.path)
    ET.SubElement(shmem, "msi", vectors=str(PT_VECTORS))
    ET.SubElement(shmem, "alias", name=port.alias)
    return shmem


def interface_element(port: PortInfo) -> ET.Element:
    """The ``<interface type='vhostuser'>`` of ``port``: socket, MAC, queues and packed virtqueues if
    ``port.packed`` (``<driver packed='on'/>``: QEMU's virtio-net-pci,packed=on; a guest gets them only when
    the port offers them too) (MTU: `domain_element`); for a passthrough port, its ``<shmem>``
    (`shmem_element`)."""
    if port.passthrough:
        return shmem_element(port)
    iface = ET.Element("interface", type="vhostuser")
    ET.SubElement(iface, "mac", address=port.mac)
    source = ET.SubElement(iface, "source", type="unix", path=port.path, mode=port.qemu_mode)
    if port.qemu_mode == "client":
        # QEMU retries while vhostmap is not listening (libvirt allows this in client mode only).
        ET.SubElement(source, "reconnect", enabled="yes", timeout=str(RECONNECT_SECONDS))
    ET.SubElement(iface, "model", type="virtio")
    driver = {"queues": str(port.queues)} if port.queues > 1 else {}
    if port.packed:
        driver["packed"] = "on"
    if driver:
        ET.SubElement(iface, "driver", driver)
    ET.SubElement(iface, "alias", name=port.alias)
    return iface


@dataclass(frozen=True)
class DomainSpec:
    """A domain around vhostmap ports: memory, CPUs, direct kernel boot and/or disks, console, TCG."""

    name: str
    memory_mb: int = 256
    vcpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    disks: tuple[str, ...] = ()
    console_log: str | None = None
    tcg: bool = True
    iommu: bool = False  # q35 with intel-iommu and interrupt remapping (module docstring)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise VmError(f"bad domain name {self.name!r}")
        if self.memory_mb < 16:
            raise VmError(f"memory must be at least 16 MiB, not {self.memory_mb}")
        if self.vcpus < 1:
            raise VmError(f"vcpus must be at least 1, not {self.vcpus}")
        if (self.initrd is not None or self.cmdline is not None) and self.kernel is None:
            raise VmError("--initrd and --cmdline need --kernel (direct kernel boot)")
        if len(self.disks) > 26:
            raise VmError("at most 26 disks (vda..vdz)")

    def kernel_cmdline(self) -> str:
        """The kernel command line: as given (default ``console=ttyS0``), plus ``pci=nomsi`` under TCG, or
        ``intel_iommu=on`` with an IOMMU (whose interrupts are MSI-X: they must stay on)."""
        words = (self.cmdline if self.cmdline is not None else DEFAULT_CMDLINE).split()
        extra = IOMMU_CMDLINE if self.iommu else TCG_CMDLINE if self.tcg else None
        if extra is not None and extra not in words:
            words.append(extra)
        return " ".join(words)


def _disk_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    except OSError:
        return "raw"


def domain_element(spec: DomainSpec, ports: Sequence[PortInfo]) -> ET.Element:
    """A libvirt domain with one vhost-user NIC per port (eth0, eth1, ... in this order), and one
    ivshmem-doorbell device per passthrough port."""
    domain = ET.Element("domain", type="qemu" if spec.tcg else "kvm")
    ET.SubElement(domain, "name").text = spec.name
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(domain, "os")
    os_type = ET.SubElement(os_el, "type")
    if platform.machine() == "x86_64":
        os_type.set("arch", "x86_64")
        os_type.set("machine", "q35" if spec.iommu else "pc")
    os_type.text = "hvm"
    if spec.kernel is not None:
        ET.SubElement(os_el, "kernel").text = os.path.abspath(spec.kernel)
        if spec.initrd is not None:
            ET.SubElement(os_el, "initrd").text = os.path.abspath(spec.initrd)
        ET.SubElement(os_el, "cmdline").text = spec.kernel_cmdline()
    elif spec.disks:
        ET.SubElement(os_el, "boot", dev="hd")
    # PCI hot-plug on a pc machine goes through ACPI.
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    if spec.iommu:
        # Interrupt remapping needs QEMU's own I/O APIC (libvirt refuses intremap without it).
        ET.SubElement(features, "ioapic", driver="qemu")
    # vhost-user maps guest RAM in the backend: it must be a shareable fd.
    backing = ET.SubElement(domain, "memoryBacking")
    ET.SubElement(backing, "source", type="memfd")
    ET.SubElement(backing, "access", mode="shared")
    devices = ET.SubElement(domain, "devices")
    for i, disk in enumerate(spec.disks):
        d = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type=_disk_format(disk))
        ET.SubElement(d, "source", file=os.path.abspath(disk))
        ET.SubElement(d, "target", dev=f"vd{chr(ord('a') + i)}", bus="virtio")
    for port in ports:
        if not port.passthrough:
            devices.append(interface_element(port))
    if spec.console_log is not None:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=os.path.abspath(spec.console_log))
    else:
        serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    for port in ports:  # after the serial port: libvirt's schema orders devices
        if port.passthrough:
            devices.append(shmem_element(port))
    ET.SubElement(devices, "memballoon", model="none")
    if spec.iommu:
        iommu = ET.SubElement(devices, "iommu", model="intel")
        ET.SubElement(iommu, "driver", intremap="on")
    if spec.tcg:
        commandline = ET.SubElement(domain, _q("commandline"))
        for value in ("-global", TCG_GLOBAL):
            ET.SubElement(commandline, _q("arg"), value=value)
    override = ET.Element(_q("override"))
    for port in (p for p in ports if not p.passthrough):
        # Device properties libvirt cannot set itself (see the module docstring).
        properties: dict[str, int] = {"vectors": 0} if spec.tcg else {}
        if port.mtu != DEFAULT_MTU:
            properties["host_mtu"] = port.mtu
        if properties:
            frontend = ET.SubElement(ET.SubElement(override, _q("device"), alias=port.alias), _q("frontend"))
            for key, number in properties.items():
                ET.SubElement(frontend, _q("property"), name=key, type="unsigned", value=str(number))
    if len(override):
        domain.append(override)
    return domain


def to_xml(element: ET.Element) -> str:
    """``element`` as indented XML text (no declaration), as libvirt and people read it."""
    ET.indent(element)
    return ET.tostring(element, encoding="unicode") + "\n"


def tcg_hotplug_problem(domain: ET.Element, port: PortInfo) -> str | None:
    """Why hot-plugging ``port`` into the running ``domain`` (its live XML) would crash QEMU, or None."""
    if domain.get("type") != "qemu":
        return None  # KVM: MSI-X is fine
    if TCG_CMDLINE in (domain.findtext("os/cmdline") or "").split():
        return None  # the guest never enables MSI-X
    args = [a.get("value") for a in domain.iter(_q("arg"))]
    has_global = any(a == "-global" and b == TCG_GLOBAL for a, b in itertools.pairwise(args))
    if port.queues == 1 and has_global:
        return None
    why = (
        "libvirt gives a hot-plugged multiqueue NIC MSI-X vectors itself, which no override reaches"
        if port.queues > 1
        else f"the domain lacks -global {TCG_GLOBAL}"
    )
    return (
        f"domain {domain.findtext('name')} runs under TCG, where QEMU 7.2 crashes when vhost-user starts "
        f"on a NIC with MSI-X: {why}; boot the guest with {TCG_CMDLINE} (vhostmap vm xml --tcg adds it and "
        "the global)"
    )


def find_interface(domain: ET.Element, port: str, path: str | None = None) -> ET.Element | None:
    """The ``<interface>`` of port ``port`` in ``domain``: by its alias, else by its socket path."""
    for iface in domain.iterfind("devices/interface"):
        alias = iface.find("alias")
        if alias is not None and alias.get("name") == interface_alias(port):
            return iface
    if path is not None:
        for iface in domain.iterfind("devices/interface[@type='vhostuser']"):
            source = iface.find("source")
            if source is not None and source.get("path") == path:
                return iface
    return None


# --- libvirt --------------------------------------------------------------------------------------------


def load_libvirt() -> ModuleType:
    """The ``libvirt`` module, or a `VmError` saying how to get it."""
    try:
        return importlib.import_module("libvirt")
    except ImportError:
        raise VmError(
            "libvirt-python is not installed: `pip install libvirt-python` (it builds against libvirt-dev; "
            "scripts/setup installs both)"
        ) from None


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's error handler: its errors come back as exceptions, not as lines on stderr."""


class LibvirtHost:
    """A connection to libvirtd (``qemu:///system``) and the domain operations of ``vhostmap vm``."""

    def __init__(self, uri: str = LIBVIRT_URI) -> None:
        self.libvirt = load_libvirt()
        self.libvirt.registerErrorHandler(_quiet, None)
        self.uri = uri
        try:
            self.conn: Any = self.libvirt.open(uri)
        except self.libvirt.libvirtError as e:
            raise VmError(f"cannot connect to libvirt at {uri}: {e} (is libvirtd running?)") from None

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> LibvirtHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def domain(self, name: str) -> Any:
        """The ``virDomain`` called ``name``."""
        try:
            return self.conn.lookupByName(name)
        except self.libvirt.libvirtError as e:
            raise VmError(f"no domain {name!r}: {e}") from None

    def define(self, xml: str) -> Any:
        """Define (persistently) the domain in ``xml``; returns its ``virDomain``."""
        try:
            return self.conn.defineXML(xml)
        except self.libvirt.libvirtError as e:
            raise VmError(f"libvirt refused the domain: {e}") from None

    def start(self, name: str) -> Any:
        """Start the defined domain ``name``."""
        dom = self.domain(name)
        if dom.isActive():
            raise VmError(f"domain {name} is already running")
        try:
            dom.create()
        except self.libvirt.libvirtError as e:
            raise VmError(f"cannot start domain {name}: {e}") from None
        return dom

    def attach(self, name: str, port: PortInfo, *, persistent: bool = False, force: bool = False) -> None:
        """Hot-plug ``port``'s interface into running domain ``name`` (and its config if ``persistent``)."""
        lv = self.libvirt
        dom = self.domain(name)
        flags = 0
        if dom.isActive():
            flags |= lv.VIR_DOMAIN_AFFECT_LIVE
            live = ET.fromstring(dom.XMLDesc(0))
            if find_interface(live, port.name, port.path) is not None:
                raise VmError(f"port {port.name} is already attached to domain {name}")
            problem = tcg_hotplug_problem(live, port)
            if problem is not None and not force:
                raise VmError(f"{problem} (--force attaches anyway)")
        if persistent:
            if not dom.isPersistent():
                raise VmError(f"domain {name} is transient: it has no configuration to add to")
            flags |= lv.VIR_DOMAIN_AFFECT_CONFIG
        if not flags:
            raise VmError(f"domain {name} is not running (--persistent adds the interface to its config)")
        try:
            dom.attachDeviceFlags(to_xml(interface_element(port)), flags)
        except lv.libvirtError as e:
            raise VmError(f"cannot attach port {port.name} to domain {name}: {e}") from None

    def detach(
        self,
        name: str,
        port: str,
        path: str | None = None,
        *,
        persistent: bool = False,
        timeout: float = DETACH_TIMEOUT,
    ) -> None:
        """Unplug port ``port``'s interface from running domain ``name`` and wait until the guest let it go.

        ``persistent`` removes it from the domain's config too. The interface is found by its alias, else
        by its socket ``path``.
        """
        lv = self.libvirt
        dom = self.domain(name)
        live = find_interface(ET.fromstring(dom.XMLDesc(0)), port, path) if dom.isActive() else None
        config = None
        if persistent and dom.isPersistent():
            inactive = ET.fromstring(dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE))
            config = find_interface(inactive, port, path)
        if live is None and config is None:
            raise VmError(f"domain {name} has no interface for port {port}")
        try:
            if live is not None:
                dom.detachDeviceFlags(to_xml(live), lv.VIR_DOMAIN_AFFECT_LIVE)
            if config is not None:
                dom.detachDeviceFlags(to_xml(config), lv.VIR_DOMAIN_AFFECT_CONFIG)
        except lv.libvirtError as e:
            raise VmError(f"cannot detach port {port} from domain {name}: {e}") from None
        if live is None:
            return
        # libvirt returns once QEMU was asked; the device is gone when the guest has acknowledged the unplug.
        deadline = time.monotonic() + timeout
        pause = 0.01
        while find_interface(ET.fromstring(dom.XMLDesc(0)), port, path) is not None:
            if time.monotonic() >= deadline:
                raise VmError(
                    f"domain {name} did not release port {port}'s interface within {timeout:g} s "
                    "(does the guest handle ACPI PCI hot-unplug?)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


# --- the vhostmap vm command ----------------------------------------------------------------------------


def add_vm_parser(sub: Any) -> None:
    """Add ``vhostmap vm ...`` to the CLI's subcommands (``sub`` from ``add_subparsers``)."""
    vm = sub.add_parser("vm", help="libvirt domains and interfaces for vhostmap ports")
    vsub = vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND", required=True)

    def control(p: argparse.ArgumentParser) -> None:
        p.add_argument("--control", metavar="SOCK", default=DEFAULT_CONTROL_SOCKET, help="control socket")

    def connect(p: argparse.ArgumentParser) -> None:
        p.add_argument("--connect", metavar="URI", default=LIBVIRT_URI, help=f"libvirt URI ({LIBVIRT_URI})")

    def domain(p: argparse.ArgumentParser) -> None:
        p.add_argument("ports", nargs="+", metavar="PORT", help="running port(s): eth0, eth1, ... in order")
        control(p)
        p.add_argument("--name", help="domain name (default vhostmap-PORT)")
        p.add_argument("--memory", type=int, default=256, metavar="MIB", help="guest RAM (default 256)")
        p.add_argument("--vcpus", type=int, default=1, metavar="N", help="virtual CPUs (default 1)")
        p.add_argument("--kernel", metavar="FILE", help="direct kernel boot: the kernel")
        p.add_argument("--initrd", metavar="FILE", help="direct kernel boot: the initramfs")
        p.add_argument("--cmdline", metavar="TEXT", help=f"kernel command line (default {DEFAULT_CMDLINE})")
        p.add_argument("--disk", action="append", default=[], metavar="FILE", help="a virtio disk image")
        p.add_argument("--console-log", metavar="FILE", help="serial console to this file (default: a pty)")
        p.add_argument(
            "--packed",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="NICs with packed virtqueues (<driver packed='on'/>) or not (default: split, as QEMU's)",
        )
        p.add_argument(
            "--tcg",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="run without KVM, with the vectors=0 workaround QEMU 7.2 needs there (default on)",
        )
        p.add_argument(
            "--iommu",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="q35 with intel-iommu (interrupt remapping), for a passthrough port's interrupt through "
            "vfio-pci in the guest (default: on when a port is a passthrough port)",
        )

    xml = vsub.add_parser("xml", help="print a libvirt domain matching running port(s)")
    domain(xml)
    xml.add_argument("--interface-only", action="store_true", help="print only the <interface> (one port)")
    define = vsub.add_parser("define", help="define a persistent libvirt domain for running port(s)")
    domain(define)
    connect(define)
    start = vsub.add_parser("start", help="start a defined domain")
    start.add_argument("domain", metavar="DOMAIN")
    connect(start)
    hot_plug = {
        "attach": "hot-plug a port's interface into a running domain",
        "detach": "unplug a port's interface from a running domain",
    }
    for verb, text in hot_plug.items():
        p = vsub.add_parser(verb, help=text)
        p.add_argument("port", metavar="PORT")
        p.add_argument("domain", metavar="DOMAIN")
        control(p)
        connect(p)
        p.add_argument("--persistent", action="store_true", help="change the domain's configuration too")
        if verb == "attach":
            p.add_argument("--force", action="store_true", help="attach even where TCG would crash QEMU")
        else:
            p.add_argument("--timeout", type=float, default=DETACH_TIMEOUT, help="seconds to wait")


def _warn_access(ports: Sequence[PortInfo]) -> None:
    for problem in libvirt_access_problems({p.name: p.path for p in ports if p.mode == "server"}):
        print(f"warning: {problem}", file=sys.stderr)


def _ports_from_args(args: argparse.Namespace) -> list[PortInfo]:
    """The ports named on the command line, their NICs with packed virtqueues if ``--packed`` says so."""
    ports = [port_info(args.control, name) for name in args.ports]
    if not args.packed:
        return ports
    for p in ports:
        if not p.offers_packed and not p.passthrough:
            print(
                f"warning: port {p.name} does not offer packed virtqueues (packed=off): its guest will use "
                "split ones",
                file=sys.stderr,
            )
    return [dataclasses.replace(p, packed=True) for p in ports]


def _domain_from_args(args: argparse.Namespace) -> tuple[DomainSpec, list[PortInfo]]:
    ports = _ports_from_args(args)
    spec = DomainSpec(
        name=args.name or f"vhostmap-{args.ports[0]}",
        memory_mb=args.memory,
        vcpus=args.vcpus,
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        disks=tuple(args.disk),
        console_log=args.console_log,
        tcg=args.tcg,
        iommu=any(p.passthrough for p in ports) if args.iommu is None else args.iommu,
    )
    _warn_access(ports)
    return spec, ports


def _run(args: argparse.Namespace) -> None:
    cmd = args.vm_command
    if cmd == "xml":
        if args.interface_only:
            if len(args.ports) != 1:
                raise VmError("--interface-only takes one port")
            (port,) = _ports_from_args(args)
            _warn_access([port])
            sys.stdout.write(to_xml(interface_element(port)))
            return
        spec, ports = _domain_from_args(args)
        sys.stdout.write(to_xml(domain_element(spec, ports)))
    elif cmd == "define":
        spec, ports = _domain_from_args(args)
        with LibvirtHost(args.connect) as host:
            dom = host.define(to_xml(domain_element(spec, ports)))
            print(f"defined domain {dom.name()} ({dom.UUIDString()})")
    elif cmd == "start":
        with LibvirtHost(args.connect) as host:
            host.start(args.domain)
            print(f"started domain {args.domain}")
    elif cmd == "attach":
        port = port_info(args.control, args.port)
        if port.passthrough:
            raise VmError(
                f"port {port.name} is a passthrough port: its <shmem> goes into the domain's definition "
                "(vm xml, vm define), QEMU connects to it at start only"
            )
        _warn_access([port])
        if port.mtu != DEFAULT_MTU:
            print(
                f"warning: port {port.name} has MTU {port.mtu}, which libvirt cannot give a hot-plugged "
                f"vhost-user NIC: the guest sees {DEFAULT_MTU} (set it there: ip link set DEV mtu N)",
                file=sys.stderr,
            )
        with LibvirtHost(args.connect) as host:
            host.attach(args.domain, port, persistent=args.persistent, force=args.force)
            print(f"attached port {port.name} to domain {args.domain}")
    elif cmd == "detach":
        try:
            path: str | None = port_info(args.control, args.port).path
        except VmError:
            path = None  # the daemon is gone or forgot the port: the interface's alias still finds it
        with LibvirtHost(args.connect) as host:
            host.detach(args.domain, args.port, path, persistent=args.persistent, timeout=args.timeout)
            print(f"detached port {args.port} from domain {args.domain}")


def run_vm(args: argparse.Namespace) -> int:
    """``vhostmap vm ...``: 0 on success, 1 with a message on stderr otherwise."""
    try:
        _run(args)
    except VmError as e:
        print(f"vhostmap vm {args.vm_command}: {e}", file=sys.stderr)
        return 1
    return 0
