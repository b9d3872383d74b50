"""One test's lab: a vhostmap daemon, QEMU guests, testpmd peers and host namespaces, all torn down together.

`Lab` wraps `vhostmap.lab` (`VhostmapDaemon`, `QemuGuest`, `Testpmd`, `Netns`, `VethPair`) with what a test
of someone else's software needs and should not have to think about: a fresh short directory for the
sockets, names and addresses no other lab uses (`vhostmap.testing.names`), a record of everything it makes
so a killed session's leftovers are found later (`vhostmap.testing.leftovers`), the daemon and guests dying
with the test process, and the logs that explain a failure (`Lab.report_sections`). It knows nothing of
pytest; `vhostmap.testing.plugin` hands one to each test.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, Self

from vhostmap.lab.channel import CompletedCommand
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestimage import MEMORY_MB as PYTHON_IMAGE_MEMORY_MB
from vhostmap.lab.guestimage import GuestImage
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.netns import Netns, VethPair, add_address, disable_ipv6, set_up
from vhostmap.lab.netns import ip as ip_command
from vhostmap.lab.qemu import Nic, QemuGuest
from vhostmap.lab.testpmd import PortSpec, Testpmd, VirtioUserPort
from vhostmap.lab.userimage import ImageSpec
from vhostmap.lab.userimage import build as build_image
from vhostmap.lab.userimage import memory_mb as image_memory_mb
from vhostmap.lab.wait import tail
from vhostmap.testing.leftovers import LAB_ROOT, Record
from vhostmap.testing.names import LabNames

# A lab image by name, or one extended with packages, wheels and files (`vhostmap.lab.userimage`).
Image = Literal["busybox", "python"] | ImageSpec
# How much of each log a failure report shows.
REPORT_LINES = 200


class Daemon(VhostmapDaemon):
    """``vhostmap serve`` in a lab: `VhostmapDaemon` that dies with the thread that started it, and knows
    where its vhost-user sockets are (`socket`)."""

    def __init__(
        self,
        workdir: Path,
        ports: Mapping[str, str | Mapping[str, Any]],
        links: Iterable[Sequence[str]] = (),
        switches: Mapping[str, Sequence[str] | str] | None = None,
        *,
        name: str = "vhostmap",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.sockets: dict[str, Path] = {}
        port_args = []
        for port, spec in ports.items():
            text = spec if isinstance(spec, str) else _port_text(spec)
            options = dict(o.split("=", 1) for o in text.split(",")[1:] if "=" in o)
            if text.split(",")[0] == "vhost-user":
                if "path" not in options:
                    options["path"] = str(workdir / f"{port}.sock")
                    text += f",path={options['path']}"
                self.sockets[port] = Path(options["path"])
            port_args.append(f"{port}={text}")
        link_args = [",".join(pair) for pair in links]
        switch_args = []
        for switch, members in (switches or {}).items():
            listed = members if isinstance(members, str) else ",".join(members)
            switch_args += ["--switch", f"{switch}={listed}" if listed else switch + "="]
        super().__init__(workdir, port_args, link_args, [*switch_args, *extra_args], name=name)

    def command_line(self) -> list[str]:
        """`VhostmapDaemon.command_line`, killed by the kernel if the test process dies (pdeathsig)."""
        return ["setpriv", "--pdeathsig", "KILL", "--", *super().command_line()]

    def socket(self, port: str) -> Path:
        """The vhost-user socket of ``port``."""
        try:
            return self.sockets[port]
        except KeyError:
            raise KeyError(f"{port!r} is not a vhost-user port of {self.log_path.stem}") from None


def _port_text(spec: Mapping[str, Any]) -> str:
    """``{"type": "vhost-user", "queues": 2}`` as ``vhost-user,queues=2``."""
    rest = {k: v for k, v in spec.items() if k != "type"}
    return ",".join([str(spec.get("type", "vhost-user")), *(f"{k}={v}" for k, v in rest.items())])


class Guest(QemuGuest):
    """A QEMU guest of a lab (`QemuGuest`): ``name``, and the addresses its NICs were given.

    `run` returns a `CompletedCommand` (``.rc``: the exit status, ``.output``: stdout and stderr);
    ``check=True`` raises on a non-zero status. ``ips`` are eth0, eth1, ... addresses with their prefix
    ("10.100.1.1/24", None for a NIC without one); ``ip`` is eth0's address alone ("10.100.1.1").
    """

    def __init__(self, name: str, nics: Sequence[Nic], **kwargs: Any) -> None:
        super().__init__(nics, **kwargs)
        self.name = name

    @property
    def ips(self) -> list[str | None]:
        """Each NIC's address with its prefix length, in NIC order."""
        return [nic.ip for nic in self.nics]

    @property
    def macs(self) -> list[str]:
        """Each NIC's MAC address, in NIC order."""
        return [nic.mac for nic in self.nics]

    @property
    def ip(self) -> str:
        """eth0's address without the prefix length."""
        if not self.nics or self.nics[0].ip is None:
            raise ValueError(f"guest {self.name} has no address on eth0")
        return self.nics[0].ip.split("/")[0]

    def run(self, cmd: str, timeout: float = 30.0, *, check: bool = False) -> CompletedCommand:
        """Run ``cmd`` with the guest's /bin/sh (busybox); its exit status and output."""
        return super().run(cmd, timeout, check=check)


class HostNamespace:
    """A network namespace on the host with one interface in the lab's subnet.

    Made behind a veth pair (``ifname``: the end left on the host, for a ``generic,ifname=...`` port) or
    around a TAP a port made (``host=TAP``), which is moved into it. ``address`` is "10.100.1.5/24", ``ip``
    the address alone; `run` runs a host command inside it.
    """

    def __init__(self, name: str, address: str, *, ifname: str | None, inside: str) -> None:
        self.name = name
        self.address = address
        self.ifname = ifname
        self.inside = inside  # the interface inside the namespace
        self.netns = Netns(name)
        self._veth: VethPair | None = None

    @property
    def ip(self) -> str:
        """The namespace's address without the prefix length."""
        return self.address.split("/")[0]

    def run(
        self, cmd: Sequence[str], *, check: bool = False, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (an argv) inside the namespace; text output captured."""
        return self.netns.run(cmd, check=check, timeout=timeout)

    def ping(self, addr: str, count: int = 3) -> bool:
        """Whether ``count`` pings of ``addr`` from the namespace all came back (busybox ping)."""
        return self.run(["busybox", "ping", "-c", str(count), "-i", "0.2", "-W", "2", addr]).returncode == 0

    def close(self) -> None:
        """Delete the namespace (and the veth pair with it; a TAP goes back to the host first)."""
        if self._veth is None and self.netns.exists:
            ip_command("link", "set", "dev", self.inside, "netns", "1", netns=self.name, check=False)
        if self._veth is not None:
            self._veth.delete()
        self.netns.delete()


class HostTap:
    """A TAP left on the host itself (no namespace of its own): the host's stack on a switch port, made by a
    port's ``host=`` option (`Lab.tap_name`). ``ifname`` is the TAP, up; ``address`` its address if it was
    given one ("10.9.9.1/24"), else None; `run` runs a host command as it is. The TAP goes with its daemon.
    """

    def __init__(self, name: str, ifname: str, address: str | None = None) -> None:
        self.name = name
        self.ifname = ifname
        self.address = address

    @property
    def ip(self) -> str:
        """The TAP's address without the prefix length."""
        if self.address is None:
            raise ValueError(f"host {self.name} ({self.ifname}) has no address")
        return self.address.split("/")[0]

    def run(
        self, cmd: Sequence[str], *, check: bool = False, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (an argv) on the host; text output captured."""
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)

    def ping(self, addr: str, count: int = 3) -> bool:
        """Whether ``count`` pings of ``addr`` out of the TAP all came back (busybox ping)."""
        ping = ["busybox", "ping", "-I", self.ifname, "-c", str(count), "-i", "0.2", "-W", "2", addr]
        return self.run(ping).returncode == 0


class Lab:
    """The daemons, guests, testpmds and namespaces of one test, made through it and closed together.

    Use as a context manager (or call `close`). ``dir`` is a fresh directory under /tmp for sockets and logs;
    ``names`` hands out its subnet (``names.subnet``), MACs and host-wide names. ``kernel`` overrides the
    busybox guest's kernel and initramfs (default: the cached build of scripts/guest-kernel).
    """

    def __init__(self, names: LabNames | None = None, *, kernel: GuestKernel | None = None) -> None:
        self.names = names or LabNames.next()
        self.record = Record(lab=self.names.label)
        self.dir = LAB_ROOT / (self.names.dir_prefix + secrets.token_hex(3))
        self.record.dirs.append(str(self.dir))
        self.record.save()  # before making anything: a killed session's leftovers are found by it
        self.dir.mkdir(mode=0o755)
        self._kernel = kernel
        self._stack = ExitStack()
        self.daemons: list[Daemon] = []
        self.guests: dict[str, Guest] = {}
        self.namespaces: dict[str, HostNamespace] = {}
        self.testpmds: list[Testpmd] = []
        self._snapshot: list[tuple[str, str]] | None = None
        self.closed = False

    # --- what a lab makes ----------------------------------------------------------------------------------

    def vhostmap(
        self,
        ports: Mapping[str, str | Mapping[str, Any]],
        links: Iterable[Sequence[str]] = (),
        switches: Mapping[str, Sequence[str] | str] | None = None,
        *,
        name: str = "vhostmap",
        extra_args: Sequence[str] = (),
    ) -> Daemon:
        """Start ``vhostmap serve`` and return it once its control socket answers.

        ``ports``: name -> ``--port`` value without the name ("vhost-user", "vhost-user,queues=2",
        "generic,ifname=veth0") or a mapping ({"type": "vhost-user", "queues": 2}); a vhost-user port without
        ``path`` gets a socket in the lab's directory (`Daemon.socket`). ``links``: pairs of ports to
        cross-connect. ``switches``: name -> its ports. The control socket and the log are in the lab's
        directory, named after ``name``.
        """
        daemon = Daemon(self.dir, ports, links, switches, name=name, extra_args=extra_args)
        self._stack.enter_context(daemon)
        self.daemons.append(daemon)
        assert daemon.pid is not None
        self.record.daemons.append((daemon.pid, daemon.control))
        self.record.save()
        return daemon

    def kernel(self, image: Image = "busybox") -> tuple[GuestKernel, int]:
        """The guest to boot and the RAM (MiB) it needs: the busybox image (kernel network stack, busybox
        tools); the Debian image with Python and vhostmap (built or refreshed from this vhostmap checkout,
        which needs its .venv, by scripts/guest-image on first use: about a minute, then seconds); or an
        `ImageSpec`, one of those extended with Debian packages, wheels and files (made in seconds, then
        cached by content: `vhostmap.lab.userimage`)."""
        if isinstance(image, ImageSpec):
            kernel = build_image(image)
            return kernel, image_memory_mb(kernel, image.base)
        if image == "python":
            return GuestImage.ensure().kernel(), PYTHON_IMAGE_MEMORY_MB
        if self._kernel is None:
            self._kernel = GuestKernel.from_cache()
        return self._kernel, 256

    def nic(self, port: str, *, ip: str | Literal[True] | None = True, mtu: int | None = None) -> Nic:
        """A guest NIC on vhost-user ``port`` of one of this lab's daemons, with the lab's next MAC and
        (unless ``ip`` is None or given) its next address."""
        owners = [d for d in self.daemons if port in d.sockets]
        if len(owners) != 1:
            where = "no" if not owners else "more than one"
            raise ValueError(f"{where} daemon of this lab has a vhost-user port {port!r}")
        address = self.names.ip() if ip is True else ip
        return Nic(owners[0].socket(port), self.names.mac(), ip=address, mtu=mtu)

    def guest(
        self,
        name: str | None = None,
        nics: Sequence[str | Nic] = (),
        *,
        image: Image = "busybox",
        memory_mb: int | None = None,
        smp: int = 1,
        cmdline: str = "",
        share: str | Path | None = None,
        boot_timeout: float = 120.0,
        wait: bool = True,
    ) -> Guest:
        """Start a guest with a NIC on each of ``nics`` (port names of this lab's daemons, made with `nic`,
        or `Nic`s) and, if ``wait``, wait until it is up and every NIC has carrier.

        ``image``: "busybox" (default; boots in seconds), "python" or an `ImageSpec` (`kernel`).
        ``cmdline`` is added to the kernel command line; ``share`` is a host directory mounted at /mnt/host
        in the guest (9p).
        """
        name = name or f"vm{len(self.guests)}"
        if name in self.guests:
            raise ValueError(f"this lab already has a guest {name!r}")
        made = [self.nic(n) if isinstance(n, str) else n for n in nics]
        kernel, needed = self.kernel(image)
        guest = Guest(
            name,
            made,
            kernel=kernel,
            workdir=self.dir / f"q-{name}",
            memory_mb=memory_mb or needed,
            smp=smp,
            cmdline=cmdline,
            share=share,
            boot_timeout=boot_timeout,
        )
        self._stack.enter_context(guest)
        self.guests[name] = guest
        if wait:
            self.wait_guests([guest])
        return guest

    def wait_guests(self, guests: Iterable[Guest] | None = None) -> None:
        """Wait until ``guests`` (default: all of this lab's) are up and each of their NICs has carrier."""
        for g in list(self.guests.values()) if guests is None else guests:
            g.wait_ready()
            for i in range(len(g.nics)):
                g.wait_carrier(f"eth{i}")

    def testpmd(self, ports: Sequence[str | PortSpec], **options: Any) -> Testpmd:
        """Start dpdk-testpmd with ``ports`` (port names of this lab's daemons, for a virtio-user front-end on
        each, or `VirtioUserPort`/`VhostPort`s); ``options`` go to `Testpmd` (forward_mode, cpu, ...). Its
        hugepage files carry a prefix a later session can sweep."""
        specs = [self._testpmd_port(p) if isinstance(p, str) else p for p in ports]
        options.setdefault("file_prefix", self.names.hugepage_prefix())
        options.setdefault("workdir", self.dir)
        pmd = Testpmd(specs, **options)
        self._stack.enter_context(pmd)
        self.testpmds.append(pmd)
        return pmd

    def _testpmd_port(self, port: str) -> VirtioUserPort:
        owners = [d for d in self.daemons if port in d.sockets]
        if len(owners) != 1:
            raise ValueError(f"no single daemon of this lab has a vhost-user port {port!r}")
        return VirtioUserPort(owners[0].socket(port))

    def tap_name(self) -> str:
        """A TAP name for a port's ``host=`` option (the daemon makes the TAP; `netns` can take it in)."""
        name = self.names.ifname("t")
        self.record.links.append(name)
        self.record.save()
        return name

    def host_tap(self, name: str, tap: str, *, address: str | None = None) -> HostTap:
        """The TAP a port's ``host=`` option made (see `tap_name`), left on the host: IPv6 off (the host sends
        nothing of its own on the lab network), ``address`` added if given, up. For one in a namespace of its
        own, with the lab's next address, see `netns`."""
        disable_ipv6(tap)
        if address is not None:
            add_address(tap, address)
        set_up(tap)
        return HostTap(name, tap, address)

    def netns(
        self, name: str | None = None, *, address: str | None = None, tap: str | None = None
    ) -> HostNamespace:
        """A network namespace with an address of the lab's subnet (or ``address``).

        Without ``tap``: behind a new veth pair whose host end (``.ifname``, up, no address) is for a
        ``generic,ifname=...`` port; make it before the daemon that uses it. With ``tap``: the TAP a port's
        ``host=`` option made (see `tap_name`) is moved into the namespace and gets the address.
        """
        key = name or f"ns{len(self.namespaces)}"
        if key in self.namespaces:
            raise ValueError(f"this lab already has a namespace {key!r}")
        ns_name = self.names.ifname("n")
        address = address or self.names.ip()
        self.record.namespaces.append(ns_name)
        if tap is None:
            host_end, inside = self.names.ifname("v"), self.names.ifname("v")
            self.record.links.append(host_end)
        else:
            host_end, inside = None, tap
        self.record.save()
        made = HostNamespace(ns_name, address, ifname=host_end, inside=inside)
        self._stack.callback(made.close)
        made.netns.create()
        if tap is None:
            assert host_end is not None
            made._veth = VethPair(host_end, inside, peer_netns=ns_name).create()
            disable_ipv6(host_end)
            set_up(host_end)
        else:
            ip_command("link", "set", "dev", tap, "netns", ns_name)
        disable_ipv6(inside, ns_name)  # no router solicitations or MLD of the host's own on the lab network
        add_address(inside, address, netns=ns_name)
        set_up(inside, netns=ns_name)
        self.namespaces[key] = made
        return made

    # --- failure reports and teardown ----------------------------------------------------------------------

    def report_sections(self, lines: int = REPORT_LINES) -> list[tuple[str, str]]:
        """(title, text) per guest console and daemon log: what a failed test's report shows. Read from the
        files while the lab runs, from what `close` kept after."""
        if self._snapshot is not None:
            return self._snapshot
        sections = []
        for name, g in self.guests.items():
            text = _read(g.console_log, lines)
            qemu = _read(g.qemu_log, lines)
            if qemu.strip():
                text += f"\n--- QEMU stderr ---\n{qemu}"
            boot = f"booted in {g.boot_seconds:.1f} s" if g.boot_seconds is not None else "not up"
            sections.append((f"guest {name} console ({boot})", text or "(empty)"))
        for d in self.daemons:
            sections.append((f"{d.log_path.stem} log", _read(d.log_path, lines) or "(empty)"))
        return sections

    def boot_seconds(self) -> dict[str, float]:
        """Seconds from QEMU's start to each booted guest's /init saying it is up, by guest name."""
        return {n: g.boot_seconds for n, g in self.guests.items() if g.boot_seconds is not None}

    def close(self) -> None:
        """Stop everything the lab started, in reverse order, remove its directory and its record."""
        if self.closed:
            return
        self.closed = True
        self._snapshot = self.report_sections()
        try:
            self._stack.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.record.remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(path: Path, lines: int) -> str:
    with contextlib.suppress(OSError):
        return tail(path.read_text(errors="replace"), lines)
    return ""
