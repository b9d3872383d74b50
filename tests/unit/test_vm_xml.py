"""``vhostmap vm``: libvirt XML for vhostmap ports, the TCG workaround, who may connect to a socket, and the
socket group/mode options of ``vhostmap serve``. No libvirt needed: XML is checked as XML."""

from __future__ import annotations

import dataclasses
import grp
import io
import os
import re
import shutil
import socket
import stat
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from vhostmap import cli, vm
from vhostmap.daemon.config import ConfigError, build_config, parse_port_flag
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.system.access import libvirt_access_problems, libvirt_qemu_identity, socket_access_problem
from vhostmap.system.unixsock import bind_listener
from vhostmap.vm import (
    QEMU_NS,
    DomainSpec,
    PortInfo,
    VmError,
    domain_element,
    find_interface,
    interface_alias,
    interface_element,
    tcg_hotplug_problem,
    to_xml,
)

NOBODY = 65534  # uid of `nobody` and gid of `nogroup` on Debian
NOGROUP = grp.getgrgid(NOBODY).gr_name
LISTENING = PortInfo("vm0", "/run/vhostmap/vm0.sock", "server", "52:54:00:00:00:10", queues=4, mtu=9000)
CONNECTING = PortInfo("vm1", "/run/vhostmap/vm1.sock", "client", "52:54:00:00:00:11")
PASSTHROUGH = PortInfo("pt0", "/run/vhostmap/pt0.sock", "server", "", passthrough=True)


def at(element: ET.Element, path: str) -> ET.Element:
    """The element at ``path`` under ``element``, which must be there."""
    found = element.find(path)
    assert found is not None, f"no {path} in {ET.tostring(element, encoding='unicode')}"
    return found


def q(tag: str) -> str:
    return f"{{{QEMU_NS}}}{tag}"


def reparse(element: ET.Element) -> ET.Element:
    """What libvirt would read: the element written out as text and parsed again."""
    return ET.fromstring(to_xml(element))


def overrides(domain: ET.Element) -> dict[str, dict[str, str]]:
    """alias -> {property: value} of the domain's qemu:override."""
    return {
        dev.get("alias", ""): {p.get("name", ""): p.get("value", "") for p in dev.iter(q("property"))}
        for dev in domain.iter(q("device"))
    }


# --- interfaces ------------------------------------------------------------------------------------------


def test_port_vhostmap_listens_on_gets_a_client_source_that_reconnects() -> None:
    iface = reparse(interface_element(LISTENING))
    assert iface.get("type") == "vhostuser"
    assert at(iface, "mac").get("address") == "52:54:00:00:00:10"
    source = iface.find("source")
    assert source is not None
    assert source.attrib == {"type": "unix", "path": "/run/vhostmap/vm0.sock", "mode": "client"}
    assert at(source, "reconnect").attrib == {"enabled": "yes", "timeout": "1"}
    assert at(iface, "model").get("type") == "virtio"
    assert at(iface, "driver").get("queues") == "4"
    assert at(iface, "alias").get("name") == "ua-vhostmap-vm0"
    # libvirt 9.0 cannot start a vhostuser NIC with <mtu>: the MTU goes through the domain's override.
    assert iface.find("mtu") is None


def test_port_vhostmap_connects_to_gets_a_listening_source_without_reconnect() -> None:
    iface = reparse(interface_element(CONNECTING))
    source = iface.find("source")
    assert source is not None and source.get("mode") == "server"
    assert source.find("reconnect") is None  # libvirt refuses reconnect in server mode
    assert iface.find("driver") is None  # one queue pair: libvirt's default


def test_a_port_with_packed_virtqueues_gets_a_driver_with_packed_on() -> None:
    packed = reparse(interface_element(dataclasses.replace(CONNECTING, packed=True)))
    assert at(packed, "driver").attrib == {"packed": "on"}
    both = reparse(interface_element(dataclasses.replace(LISTENING, packed=True)))
    assert at(both, "driver").attrib == {"queues": "4", "packed": "on"}  # one <driver> for both


VALIDATOR = shutil.which("virt-xml-validate")


@pytest.mark.skipif(
    VALIDATOR is None or shutil.which("xmllint") is None,
    reason="virt-xml-validate and xmllint (libvirt-clients, libxml2-utils: scripts/setup installs them)",
)
def test_domains_validate_against_libvirts_schema(tmp_path: Path) -> None:
    """libvirt's own RELAX NG schema (virt-xml-validate) takes what vm xml makes: packed virtqueues and
    queues on one <driver>, the TCG overrides in the qemu namespace, direct kernel boot, a passthrough port's
    <shmem>; and refuses a <driver packed> or a shmem model it does not know, so the check has teeth."""
    spec = DomainSpec("vm0", kernel="/k", initrd="/i", console_log="/tmp/console.log")
    ports = [
        dataclasses.replace(LISTENING, packed=True),
        dataclasses.replace(CONNECTING, packed=True),
        PASSTHROUGH,
    ]
    good = tmp_path / "good.xml"
    good.write_text(to_xml(domain_element(spec, ports)))
    bad = tmp_path / "bad.xml"
    bad.write_text(good.read_text().replace('packed="on"', 'packed="maybe"'))
    bad_shmem = tmp_path / "bad-shmem.xml"
    bad_shmem.write_text(good.read_text().replace('"ivshmem-doorbell"', '"ivshmem-bell"'))
    # The q35 domain with an IOMMU (--iommu); a model or an ioapic driver the schema does not know fails.
    iommu = tmp_path / "iommu.xml"
    iommu.write_text(to_xml(domain_element(dataclasses.replace(spec, iommu=True), ports)))
    assert 'model="intel"' in iommu.read_text() and 'driver="qemu"' in iommu.read_text()
    bad_iommu = tmp_path / "bad-iommu.xml"
    bad_iommu.write_text(iommu.read_text().replace('model="intel"', 'model="amd-vi"'))
    bad_ioapic = tmp_path / "bad-ioapic.xml"
    bad_ioapic.write_text(iommu.read_text().replace('<ioapic driver="qemu"', '<ioapic driver="split"'))
    assert VALIDATOR is not None
    cases = [(good, True), (bad, False), (bad_shmem, False), (iommu, True), (bad_iommu, False)]
    for path, valid in [*cases, (bad_ioapic, False)]:
        result = subprocess.run([VALIDATOR, str(path), "domain"], capture_output=True, text=True)
        assert ("fails to validate" not in result.stderr + result.stdout) is valid, result.stderr
        assert (result.returncode == 0) is valid, result.stderr


def test_a_passthrough_port_gets_an_ivshmem_doorbell_device_whose_server_is_vhostmap() -> None:
    shmem = reparse(interface_element(PASSTHROUGH))
    assert (shmem.tag, shmem.get("name")) == ("shmem", "vhostmap-pt0")
    assert at(shmem, "model").attrib == {"type": "ivshmem-doorbell"}
    assert at(shmem, "server").attrib == {"path": "/run/vhostmap/pt0.sock"}
    assert at(shmem, "msi").attrib == {"vectors": "1"}  # the port's interrupt is vector 0
    assert at(shmem, "alias").get("name") == "ua-vhostmap-pt0"
    # In a domain: beside the NIC, no interface and no override of its own (MSI-X is its only interrupt).
    domain = reparse(domain_element(DomainSpec("vm0"), [LISTENING, PASSTHROUGH]))
    assert [i.get("type") for i in domain.findall("devices/interface")] == ["vhostuser"]
    assert [s.get("name") for s in domain.findall("devices/shmem")] == ["vhostmap-pt0"]
    assert set(overrides(domain)) == {"ua-vhostmap-vm0"}


def test_interface_aliases_are_valid_libvirt_user_aliases_and_distinct() -> None:
    names = ["vm0", "a.b", "a_b", "a-b", "a__b", "a._b", "a_.b", "A.1_-"]
    aliases = [interface_alias(n) for n in names]
    assert all(re.fullmatch(r"ua-[A-Za-z0-9_-]+", a) for a in aliases), aliases
    assert len(set(aliases)) == len(names)


def test_untrusted_values_are_escaped_not_pasted() -> None:
    port = PortInfo("p", "/tmp/a'b\"<c>&d.sock", "server", "52:54:00:00:00:01")
    spec = DomainSpec("x'<y>&\"z", kernel="/k", cmdline="console=ttyS0 a=<b>&'c'")
    domain = reparse(domain_element(spec, [port]))
    assert domain.findtext("name") == "x'<y>&\"z"
    assert at(domain, "devices/interface/source").get("path") == port.path
    assert domain.findtext("os/cmdline") == "console=ttyS0 a=<b>&'c' pci=nomsi"


# --- domains ---------------------------------------------------------------------------------------------


def test_tcg_domain_boots_the_kernel_with_shared_memfd_and_no_msix_anywhere(tmp_path: Path) -> None:
    spec = DomainSpec(
        "vm", memory_mb=512, vcpus=4, kernel="vmlinux", initrd="initrd.gz", console_log=str(tmp_path / "c")
    )
    domain = reparse(domain_element(spec, [LISTENING, CONNECTING]))
    assert domain.get("type") == "qemu"
    assert at(domain, "memory").attrib == {"unit": "MiB"} and domain.findtext("memory") == "512"
    assert domain.findtext("vcpu") == "4"
    assert domain.findtext("os/kernel") == os.path.abspath("vmlinux")
    assert domain.findtext("os/initrd") == os.path.abspath("initrd.gz")
    assert domain.findtext("os/cmdline") == "console=ttyS0 pci=nomsi"
    assert domain.find("features/acpi") is not None  # PCI hot-plug on a pc machine needs ACPI
    assert at(domain, "memoryBacking/source").get("type") == "memfd"
    assert at(domain, "memoryBacking/access").get("mode") == "shared"
    assert [at(i, "alias").get("name") for i in domain.iterfind("devices/interface")] == [
        "ua-vhostmap-vm0",
        "ua-vhostmap-vm1",
    ]
    serial = domain.find("devices/serial")
    assert serial is not None and serial.get("type") == "file"
    assert at(serial, "source").get("path") == str(tmp_path / "c")
    args = [a.get("value") for a in domain.iter(q("arg"))]
    assert args == ["-global", "virtio-net-pci.vectors=0"]
    assert overrides(domain) == {
        "ua-vhostmap-vm0": {"vectors": "0", "host_mtu": "9000"},
        "ua-vhostmap-vm1": {"vectors": "0"},
    }


def test_an_iommu_domain_is_q35_with_interrupt_remapping_and_keeps_msi_on() -> None:
    spec = DomainSpec("vm", kernel="/k", iommu=True)
    domain = reparse(domain_element(spec, [LISTENING, PASSTHROUGH]))
    assert at(domain, "os/type").get("machine") == "q35"
    assert at(domain, "features/ioapic").attrib == {"driver": "qemu"}
    assert at(domain, "features/acpi") is not None
    iommu = at(domain, "devices/iommu")
    assert iommu.attrib == {"model": "intel"} and at(iommu, "driver").attrib == {"intremap": "on"}
    # MSI-X is the interrupt's only way in: no pci=nomsi; the guest kernel uses the IOMMU.
    assert domain.findtext("os/cmdline") == "console=ttyS0 intel_iommu=on"
    # The vhost-user NIC keeps its TCG workaround; the shmem is there as without an IOMMU.
    assert overrides(domain)["ua-vhostmap-vm0"]["vectors"] == "0"
    assert at(domain, "devices/shmem").get("name") == "vhostmap-pt0"
    # Without: a pc machine, nothing of the above.
    plain = reparse(domain_element(DomainSpec("vm", kernel="/k"), [LISTENING, PASSTHROUGH]))
    assert at(plain, "os/type").get("machine") == "pc"
    assert plain.find("devices/iommu") is None and plain.find("features/ioapic") is None
    assert plain.findtext("os/cmdline") == "console=ttyS0 pci=nomsi"


def test_kvm_domain_has_no_tcg_workaround_and_overrides_only_the_mtu() -> None:
    domain = reparse(
        domain_element(DomainSpec("vm", kernel="/k", cmdline="root=/dev/vda", tcg=False), [LISTENING])
    )
    assert domain.get("type") == "kvm"
    assert domain.findtext("os/cmdline") == "root=/dev/vda"
    assert list(domain.iter(q("arg"))) == []
    assert overrides(domain) == {"ua-vhostmap-vm0": {"host_mtu": "9000"}}
    assert list(reparse(domain_element(DomainSpec("vm", tcg=False), [CONNECTING])).iter(q("override"))) == []


def test_disks_are_virtio_in_order_with_their_format(tmp_path: Path) -> None:
    qcow = tmp_path / "a.qcow2"
    qcow.write_bytes(b"QFI\xfb" + bytes(60))
    raw = tmp_path / "b.img"
    raw.write_bytes(bytes(512))
    domain = reparse(domain_element(DomainSpec("vm", disks=(str(qcow), str(raw))), []))
    disks = domain.findall("devices/disk")
    assert [
        (at(d, "driver").get("type"), at(d, "source").get("file"), at(d, "target").get("dev")) for d in disks
    ] == [
        ("qcow2", str(qcow), "vda"),
        ("raw", str(raw), "vdb"),
    ]
    assert at(domain, "os/boot").get("dev") == "hd"
    assert at(domain, "devices/serial").get("type") == "pty"


@pytest.mark.parametrize(
    "spec",
    [
        {"name": ""},
        {"name": "a/b"},
        {"name": "vm", "memory_mb": 8},
        {"name": "vm", "vcpus": 0},
        {"name": "vm", "initrd": "/i"},
        {"name": "vm", "cmdline": "quiet"},
    ],
)
def test_domain_spec_refuses_what_cannot_boot(spec: dict[str, Any]) -> None:
    with pytest.raises(VmError):
        DomainSpec(**spec)


# --- hot-plug under TCG ----------------------------------------------------------------------------------


def live(spec: DomainSpec) -> ET.Element:
    return reparse(domain_element(spec, []))


def test_hotplug_is_safe_under_kvm_and_with_the_tcg_global_for_one_queue() -> None:
    single = PortInfo("p", "/s", "server", "52:54:00:00:00:01")
    assert tcg_hotplug_problem(live(DomainSpec("vm", tcg=False)), LISTENING) is None
    assert tcg_hotplug_problem(live(DomainSpec("vm")), single) is None  # the -global reaches it
    assert tcg_hotplug_problem(live(DomainSpec("vm", kernel="/k")), LISTENING) is None  # pci=nomsi


def test_hotplug_that_would_crash_tcg_qemu_is_explained() -> None:
    multiqueue = tcg_hotplug_problem(live(DomainSpec("vm")), LISTENING)
    assert multiqueue is not None and "multiqueue" in multiqueue and "pci=nomsi" in multiqueue
    bare = ET.fromstring("<domain type='qemu'><name>vm</name><devices/></domain>")
    single = PortInfo("p", "/s", "server", "52:54:00:00:00:01")
    problem = tcg_hotplug_problem(bare, single)
    assert problem is not None and "virtio-net-pci.vectors=0" in problem


def test_interfaces_are_found_by_alias_or_by_socket_path() -> None:
    domain = reparse(domain_element(DomainSpec("vm"), [LISTENING]))
    assert find_interface(domain, "vm0") is not None
    assert find_interface(domain, "other") is None
    for alias in domain.iter("alias"):
        alias.set("name", "net0")  # as if defined by hand
    assert find_interface(domain, "vm0") is None
    assert find_interface(domain, "vm0", LISTENING.path) is not None


# --- who may connect -------------------------------------------------------------------------------------


def test_qemu_conf_user_and_group_with_debian_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    assert libvirt_qemu_identity(conf) is None
    conf.write_text('#user = "root"\nstdio_handler = "file"\n')
    assert libvirt_qemu_identity(conf) == ("libvirt-qemu", "libvirt-qemu")
    conf.write_text('user = "root"\n  group="kvm"  # comment\n')
    assert libvirt_qemu_identity(conf) == ("root", "kvm")


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory everyone may enter (tmp_path's parents are 0700) with a listening socket in it."""
    d = Path("/tmp") / f"vhm-vmxml-{os.getpid()}-{tmp_path.name[-12:]}"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(d / "s.sock"))
    yield d
    listener.close()
    (d / "s.sock").unlink(missing_ok=True)
    d.rmdir()


def test_socket_access_needs_write_on_the_socket_and_search_on_directories(socket_dir: Path) -> None:
    sock = socket_dir / "s.sock"
    nobody = frozenset({NOBODY})
    assert socket_access_problem(str(sock), 0, frozenset({0})) is None  # root may do anything
    os.chmod(sock, 0o755)
    problem = socket_access_problem(str(sock), NOBODY, nobody)
    assert problem is not None and "write" in problem and "0755" in problem
    os.chown(sock, -1, NOBODY)
    os.chmod(sock, 0o660)
    assert socket_access_problem(str(sock), NOBODY, nobody) is None  # through its group
    os.chmod(socket_dir, 0o700)
    problem = socket_access_problem(str(sock), NOBODY, nobody)
    assert problem is not None and str(socket_dir) in problem
    assert socket_access_problem(str(socket_dir / "missing.sock"), NOBODY, frozenset()) is not None


def test_daemon_warning_names_the_qemu_user_and_the_fix(socket_dir: Path, tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text(f'user = "+{NOBODY}"\ngroup = "+{NOBODY}"\n')
    os.chmod(socket_dir / "s.sock", 0o755)
    [problem] = libvirt_access_problems({"vm0": str(socket_dir / "s.sock")}, conf)
    assert problem.startswith("port vm0:") and "--socket-group" in problem and 'user = "root"' in problem
    os.chmod(socket_dir / "s.sock", 0o777)
    assert libvirt_access_problems({"vm0": str(socket_dir / "s.sock")}, conf) == []
    conf.write_text('user = "no-such-user-here"\n')
    [problem] = libvirt_access_problems({"vm0": str(socket_dir / "s.sock")}, conf)
    assert "does not exist" in problem
    assert libvirt_access_problems({"vm0": "/x.sock"}, tmp_path / "absent.conf") == []


# --- socket group and mode -------------------------------------------------------------------------------


def test_port_group_and_perm_options() -> None:
    port = parse_port_flag(f"a=vhost-user,path=/tmp/a.sock,group={NOGROUP},perm=0640")
    assert (port.gid, port.socket_perm) == (NOBODY, 0o640)
    assert parse_port_flag("a=vhost-user,path=/tmp/a.sock,group=0").socket_perm == 0o660
    assert parse_port_flag("a=vhost-user,path=/tmp/a.sock,perm=600").socket_perm == 0o600
    assert parse_port_flag("a=vhost-user,path=/tmp/a.sock").socket_perm is None


@pytest.mark.parametrize(
    "flag",
    [
        "a=vhost-user,path=/tmp/a.sock,mode=client,group=0",
        "a=vhost-user,path=/tmp/a.sock,perm=0999",
        "a=vhost-user,path=/tmp/a.sock,perm=1777",
        "a=vhost-user,path=/tmp/a.sock,group=no-such-group-here",
    ],
)
def test_bad_group_or_perm_is_a_config_error(flag: str) -> None:
    with pytest.raises(ConfigError):
        parse_port_flag(flag)


def test_socket_group_and_mode_flags_apply_to_listening_ports_that_set_neither() -> None:
    flags = [
        "a=vhost-user,path=/tmp/a.sock",
        "b=vhost-user,path=/tmp/b.sock,mode=client",
        "c=vhost-user,path=/tmp/c.sock,perm=0600",
    ]
    config = build_config(None, flags, socket_group=NOGROUP, socket_mode="0660")
    assert [(p.group, p.perm) for p in config.ports] == [(NOGROUP, 0o660), (None, None), (None, 0o600)]
    toml = {"socket_mode": "0666", "ports": {"d": {"path": "/tmp/d.sock"}}}
    assert build_config(toml).port("d").socket_perm == 0o666
    with pytest.raises(ConfigError):
        build_config(None, flags, socket_mode="rw")


def test_listener_gets_its_owner_group_and_mode_before_it_listens(tmp_path: Path) -> None:
    path = str(tmp_path / "l.sock")
    listener = bind_listener(path, owner=65534, group=NOBODY, perm=0o660)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_gid == NOBODY and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_uid == 65534
    finally:
        listener.close()
        os.unlink(path)


# --- the command line against a running daemon -----------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[VhostmapDaemon]:
    d = Path("/tmp") / f"vhm-vmcli-{os.getpid()}-{tmp_path.name[-12:]}"
    d.mkdir()
    ports = [
        f"vm0=vhost-user,path={d}/vm0.sock,mode=server,queues=2,mtu=9000,mac=52:54:00:00:00:10,packed=off",
        f"vm1=vhost-user,path={d}/vm1.sock,mode=client",
        f"pt0=passthrough,path={d}/pt0.sock",
    ]
    with VhostmapDaemon(d, ports, extra_args=["--socket-group", NOGROUP]) as running:
        yield running
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def test_vm_xml_matches_the_running_ports(daemon: VhostmapDaemon) -> None:
    rc, out, err = run_cli("vm", "xml", "vm0", "vm1", "--control", daemon.control, "--kernel", "/k")
    assert rc == 0, err
    domain = ET.fromstring(out)
    assert domain.findtext("name") == "vhostmap-vm0"
    first, second = domain.findall("devices/interface")
    assert at(first, "source").get("mode") == "client"
    assert at(first, "driver").get("queues") == "2"
    assert at(first, "mac").get("address") == "52:54:00:00:00:10"
    assert at(second, "source").get("mode") == "server"
    assert overrides(domain)["ua-vhostmap-vm0"] == {"vectors": "0", "host_mtu": "9000"}
    # The daemon made its listening socket for the group, mode 0660 by default.
    st = os.stat(at(first, "source").get("path", ""))
    assert st.st_gid == NOBODY and stat.S_IMODE(st.st_mode) == 0o660

    rc, out, _ = run_cli("vm", "xml", "--interface-only", "vm1", "--control", daemon.control)
    assert rc == 0 and ET.fromstring(out).tag == "interface"
    rc, _, err = run_cli("vm", "xml", "--interface-only", "vm0", "vm1", "--control", daemon.control)
    assert rc == 1 and "one port" in err
    rc, _, err = run_cli("vm", "xml", "nope", "--control", daemon.control)
    assert rc == 1 and "no port 'nope'" in err and "pt0, vm0, vm1" in err


def test_vm_xml_adds_a_passthrough_ports_shmem_and_attach_refuses_it(daemon: VhostmapDaemon) -> None:
    rc, out, err = run_cli("vm", "xml", "vm0", "pt0", "--control", daemon.control, "--kernel", "/k")
    assert rc == 0, err
    domain = ET.fromstring(out)
    assert len(domain.findall("devices/interface")) == 1
    shmem = at(domain, "devices/shmem")
    assert at(shmem, "server").get("path") == str(Path(daemon.control).parent / "pt0.sock")
    rc, out, err = run_cli("vm", "xml", "--interface-only", "pt0", "--control", daemon.control)
    assert rc == 0 and ET.fromstring(out).tag == "shmem", err
    # A domain with a passthrough port gets the IOMMU its interrupt needs, unless told not to; others not.
    assert at(domain, "devices/iommu").get("model") == "intel"
    assert at(domain, "os/type").get("machine") == "q35"
    rc, out, err = run_cli("vm", "xml", "vm0", "pt0", "--no-iommu", "--control", daemon.control)
    assert rc == 0 and ET.fromstring(out).find("devices/iommu") is None, err
    rc, out, err = run_cli("vm", "xml", "vm0", "--control", daemon.control)
    assert rc == 0 and ET.fromstring(out).find("devices/iommu") is None, err
    rc, out, err = run_cli("vm", "xml", "vm0", "--iommu", "--control", daemon.control)
    assert rc == 0 and at(ET.fromstring(out), "devices/iommu").get("model") == "intel", err
    # QEMU connects to an ivshmem server at start only: no hot-plug.
    rc, _, err = run_cli("vm", "attach", "pt0", "somevm", "--control", daemon.control)
    assert rc == 1 and "passthrough port" in err


def test_vm_xml_gives_packed_virtqueues_when_told_and_warns_of_ports_without(daemon: VhostmapDaemon) -> None:
    def driver(*args: str) -> tuple[dict[str, str], str]:
        rc, out, err = run_cli("vm", "xml", "--interface-only", *args, "--control", daemon.control)
        assert rc == 0, err
        found = ET.fromstring(out).find("driver")
        return (dict(found.attrib) if found is not None else {}), err

    # The port offers them (its default), the NIC only when told: split rings are QEMU's default too.
    assert driver("vm1") == ({}, "")
    assert driver("vm1", "--no-packed") == ({}, "")
    assert driver("vm1", "--packed") == ({"packed": "on"}, "")
    assert driver("vm0") == ({"queues": "2"}, "")
    attrib, err = driver("vm0", "--packed")  # packed=off: the NIC would offer what the port does not
    assert attrib == {"queues": "2", "packed": "on"}
    assert "port vm0 does not offer packed virtqueues" in err


def test_vm_commands_say_how_to_get_libvirt_python_when_it_is_missing(
    daemon: VhostmapDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_libvirt(name: str) -> object:
        raise ImportError(name)

    monkeypatch.setattr(vm.importlib, "import_module", no_libvirt)
    rc, _, err = run_cli("vm", "start", "somevm")
    assert rc == 1 and "libvirt-python is not installed" in err
    rc, _, err = run_cli("vm", "attach", "vm0", "somevm", "--control", daemon.control)
    assert rc == 1 and "libvirt-python is not installed" in err


def test_vm_xml_without_a_daemon_says_so(tmp_path: Path) -> None:
    rc, _, err = run_cli("vm", "xml", "vm0", "--control", str(tmp_path / "none.sock"))
    assert rc == 1 and "no vhostmap daemon" in err


# --- the templates in vmconfigs/ ------------------------------------------------------------------------

VMCONFIGS = Path(__file__).resolve().parents[2] / "vmconfigs"
TEMPLATE_PORTS = {
    "qemu-client": PortInfo(
        "vm0", "/run/vhostmap/vm0.sock", "server", "52:54:00:00:00:10", queues=4, mtu=9000
    ),
    "qemu-server": PortInfo("vm0", "/run/vhostmap/vm0.sock", "client", "52:54:00:00:00:10"),
}


def canonical(element: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(element, encoding="unicode"), strip_text=True)


@pytest.mark.parametrize("direction", sorted(TEMPLATE_PORTS))
def test_domain_templates_match_what_vm_xml_makes(direction: str) -> None:
    template = ET.parse(VMCONFIGS / f"libvirt-domain-{direction}.xml").getroot()
    port = TEMPLATE_PORTS[direction]
    made = reparse(domain_element(DomainSpec("vm0"), [port]))
    assert canonical(at(template, "devices/interface")) == canonical(interface_element(port))
    for part in ("memoryBacking", "features", f"{q('commandline')}", f"{q('override')}"):
        assert canonical(at(template, part)) == canonical(at(made, part)), part


def test_passthrough_templates_match_what_vm_xml_makes() -> None:
    template = ET.parse(VMCONFIGS / "libvirt-shmem-passthrough.xml").getroot()
    assert canonical(template) == canonical(interface_element(PASSTHROUGH))
    args = [
        line for line in (VMCONFIGS / "qemu-passthrough.args").read_text().splitlines() if line[:1] != "#"
    ]
    chardev = args[args.index("-chardev") + 1]
    assert chardev == f"socket,id=pt0,path={PASSTHROUGH.path}"  # a client: QEMU never reconnects to ivshmem
    assert args[args.index("-device") + 1] == "ivshmem-doorbell,chardev=pt0,vectors=1"


@pytest.mark.parametrize("direction", sorted(TEMPLATE_PORTS))
def test_interface_templates_are_hot_pluggable_vhostuser_interfaces(direction: str) -> None:
    iface = ET.parse(VMCONFIGS / f"libvirt-interface-{direction}.xml").getroot()
    vhostmap_mode = TEMPLATE_PORTS[direction].mode
    port = PortInfo(
        "vm1", "/run/vhostmap/vm1.sock", vhostmap_mode, "52:54:00:00:00:11", queues=iface_queues(iface)
    )
    assert canonical(iface) == canonical(interface_element(port))


def iface_queues(iface: ET.Element) -> int:
    driver = iface.find("driver")
    return int(driver.get("queues", "1")) if driver is not None else 1


def test_toml_template_is_a_valid_daemon_configuration() -> None:
    with open(VMCONFIGS / "vhostmap.toml", "rb") as f:
        toml = tomllib.load(f)
    toml["socket_group"] = NOGROUP  # libvirt-qemu exists only where scripts/setup ran
    config = build_config(toml)
    assert [(p.name, p.mode, p.socket_perm) for p in config.ports] == [
        ("vm0", "server", 0o660),
        ("vm1", "client", None),
    ]
    assert config.links == (("vm0", "vm1"),)


@pytest.mark.parametrize("name", ["qemu-client.args", "qemu-server.args"])
def test_qemu_argument_templates_share_memory_and_turn_msix_off(name: str) -> None:
    args = [line for line in (VMCONFIGS / name).read_text().splitlines() if not line.startswith("#")]
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in args
    device = next(a for a in args if a.startswith("virtio-net-pci,"))
    assert "vectors=0" in device.split(",")
    chardev = args[args.index("-chardev") + 1]
    assert ("server=on" in chardev) == (name == "qemu-server.args")
