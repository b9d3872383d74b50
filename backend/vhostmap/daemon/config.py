"""Daemon configuration: ports and how they are connected, from command-line flags or a TOML file.

Flags and TOML describe the same thing::

    --port vm0=vhost-user,path=/run/vhostmap/vm0.sock,mode=server,queues=4,mac=52:54:00:00:00:10
    --link vm0,vm1

    [ports.vm0]
    type = "vhost-user"
    path = "/run/vhostmap/vm0.sock"
    mode = "server"
    queues = 4
    mac = "52:54:00:00:00:10"

    [[links]]
    ports = ["vm0", "vm1"]

A switch (a VALE-style learning bridge) joins any number of ports; ``host=TAP`` gives a port host rings on a
TAP (created if missing): alone, the port and its TAP are cross-connected ("a VM on a TAP"); on a switch, its
host side is one more switch port. A ``generic`` port attaches an existing interface (veth, TAP, NIC)::

    --port uplink=generic,ifname=veth0
    --port vm2=vhost-user,path=/run/vhostmap/vm2.sock,host=tap-vm2
    --switch vale0=vm0,vm1,uplink,aging=300

    [ports.uplink]
    type = "generic"
    ifname = "veth0"

    [switches.vale0]
    ports = ["vm0", "vm1", "uplink"]
    aging = 300

A ``passthrough`` port hands a guest netmap rings of its own (ptnetmap over QEMU's ivshmem-doorbell device):
vhostmap is the ivshmem server on ``path``; ``rings`` ring pairs of ``slots`` slots (netmap/passthrough.py)::

    --port pt0=passthrough,path=/run/vhostmap/pt0.sock,rings=1,slots=1024

A server-mode port's socket can be given to a group with a mode, so that QEMU running as another user (as
libvirt runs it) may connect: ``group=libvirt-qemu,perm=0660`` per port, or ``--socket-group`` and
``--socket-mode`` (TOML ``socket_group``, ``socket_mode``) for every server-mode port that sets neither.

The datapath thread busy-polls instead of sleeping on kicks with ``--poll`` (TOML ``poll = true``) and is
pinned to a CPU with ``--cpu N`` (``cpu = N``); ``--control-cpu N`` (``control_cpu = N``) pins the control
thread. A CPU list (``--cpu 2-5``, ``--cpu 2,4-5``; TOML ``cpu = "2-5"``) runs one datapath thread per CPU,
each pinned to its own; receive queues are given to them round-robin, or pinned per port with
``rxq_affinity`` (QUEUE:CPU pairs, as OVS's pmd-rxq-affinity; every CPU must be in the list)::

    --cpu 0-1 --port vm0=vhost-user,path=/tmp/vm0.sock,queues=2,rxq_affinity=0:1,1:0

    [ports.vm0]
    rxq_affinity = "0:1,1:0"

A thread serving a pinned queue gets no other queue (OVS's pmd-rxq-isolate, true by default there too), so
that a queue pinned for its own CPU shares it with nothing; ``--no-rxq-isolate`` (``rxq_isolate = false``)
lets the round-robin use those threads as well.
"""

from __future__ import annotations

import grp
import pwd
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vhostmap import ethernet
from vhostmap.control.client import DEFAULT_CONTROL_SOCKET
from vhostmap.ethernet import ETH_HLEN
from vhostmap.forwarding.switch.table import DEFAULT_AGING
from vhostmap.packets import MAX_FRAME, MIN_FRAME, TSO_MAX_FRAME
from vhostmap.system.cpu import check_cpu, parse_cpu_list
from vhostmap.system.privileges import lookup
from vhostmap.system.unixsock import UNIX_PATH_MAX
from vhostmap.vhost_user.device import ALL_OFFLOADS, MAX_MTU, MAX_QUEUE_PAIRS, MIN_MTU, offload_features

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
PORT_TYPES = ("vhost-user", "generic", "passthrough")
# A passthrough port's guest rings: slots per ring (slots=) and ring pairs (rings=).
PT_SLOTS = (64, 4096)
PT_DEFAULT_SLOTS = 1024
PT_MAX_RINGS = 16
# Linux interface names: 1..15 bytes, no '/', no ':', no whitespace.
_IFNAME = re.compile(r"^[^/:\s]{1,15}$")
SOCKET_MODES = ("server", "client")


class ConfigError(ValueError):
    """A configuration that cannot work, with the flag or key that is wrong."""


def parse_mac(text: str) -> bytes:
    """``52:54:00:00:00:10`` -> 6 bytes; a ConfigError saying what was expected otherwise."""
    try:
        return ethernet.parse_mac(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _valid_ifname(name: str) -> bool:
    return bool(_IFNAME.match(name)) and len(name.encode()) <= 15


def resolve_user(user: str, where: str) -> int:
    """A user name or number -> its uid; a clear error for an unknown name."""
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ConfigError(f"{where}: no user named {user!r}") from None


def resolve_group(group: str, where: str) -> int:
    """A group name or number -> its gid; a clear error for an unknown name."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"{where}: no group named {group!r}") from None


@dataclass(frozen=True)
class PortConfig:
    """One port of the daemon."""

    name: str
    type: str = "vhost-user"
    path: str = ""
    mode: str = "server"
    queues: int = 1
    mac: bytes = b"\x52\x54\x00\x00\x00\x01"
    mtu: int = 1500
    owner: str | None = None  # owner (name or number) of the socket vhostmap creates (server mode)
    group: str | None = None  # its group (name or number)
    perm: int | None = None  # its permission bits, e.g. 0o660
    host: str | None = None  # TAP the port's host rings are bound to (created if missing)
    ifname: str | None = None  # the interface a generic port attaches to
    generate: int | None = None  # length of the frames the port's guest receives from a built-in generator
    # (RX queue, CPU) pairs: the datapath thread on that CPU serves that receive queue (rxq_affinity).
    rxq_affinity: tuple[tuple[int, int], ...] = ()
    # The offloads offered to the guest, as feature bits (offloads=on|off|csum+tso4+...: parse_offloads).
    offloads: int = ALL_OFFLOADS
    # Whether a vhost-user port offers packed virtqueues (packed=on|off): a front-end that asks for them gets
    # them (QEMU's packed=on, virtio-user's packed_vq=1), one that does not keeps split rings.
    packed: bool = True
    # A passthrough port's ring pairs and the slots of each guest ring (rings=, slots=).
    rings: int = 1
    slots: int = PT_DEFAULT_SLOTS

    def __post_init__(self) -> None:
        where = f"port {self.name!r}"
        if not _NAME.match(self.name):
            raise ConfigError(f"{where}: names are 1-32 characters of letters, digits, '_', '.', '-'")
        if self.type not in PORT_TYPES:
            raise ConfigError(f"{where}: unknown type {self.type!r} (known: {', '.join(PORT_TYPES)})")
        if self.mode not in SOCKET_MODES:
            raise ConfigError(f"{where}: mode must be server or client, not {self.mode!r}")
        if self.type == "generic":
            self._check_generic(where)
        elif self.type == "passthrough":
            self._check_passthrough(where)
        elif not self.path:
            raise ConfigError(f"{where}: path= (the vhost-user socket) is required")
        elif self.ifname is not None:
            raise ConfigError(f"{where}: ifname= is for generic ports (type generic)")
        if self.host is not None and not _valid_ifname(self.host):
            raise ConfigError(f"{where}: host= must be an interface name of 1-15 bytes, not {self.host!r}")
        if len(self.path.encode()) >= UNIX_PATH_MAX:
            raise ConfigError(
                f"{where}: socket path is longer than the {UNIX_PATH_MAX - 1} bytes UNIX sockets allow"
            )
        if not 1 <= self.queues <= MAX_QUEUE_PAIRS:
            raise ConfigError(f"{where}: queues must be 1..{MAX_QUEUE_PAIRS}, not {self.queues}")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ConfigError(f"{where}: mtu must be {MIN_MTU}..{MAX_MTU}, not {self.mtu}")
        if (
            self.owner is not None or self.group is not None or self.perm is not None
        ) and self.mode != "server":
            raise ConfigError(
                f"{where}: owner=, group= and perm= apply to mode=server sockets (QEMU makes others)"
            )
        if self.owner is not None:
            resolve_user(self.owner, where)
        if self.perm is not None and not 0 <= self.perm <= 0o777:
            raise ConfigError(f"{where}: perm must be octal permission bits like 0660, not {self.perm:o}")
        if self.group is not None:
            resolve_group(self.group, where)  # an unknown group is a configuration error, found now
        if self.generate is not None:
            self._check_generate(where)
        queues = [q for q, _ in self.rxq_affinity]
        for q in queues:
            if not 0 <= q < self.ring_pairs:
                raise ConfigError(
                    f"{where}: rxq_affinity names queue {q}; the port has queues 0..{self.ring_pairs - 1}"
                )
            if queues.count(q) > 1:
                raise ConfigError(f"{where}: rxq_affinity pins queue {q} twice")

    def _check_generate(self, where: str) -> None:
        longest = min(MAX_FRAME, self.mtu + ETH_HLEN)
        if self.type != "vhost-user":
            raise ConfigError(f"{where}: generate= is for vhost-user ports")
        length, mtu_frame = self.generate, self.mtu + ETH_HLEN
        assert length is not None
        if not (MIN_FRAME <= length <= longest or mtu_frame < length <= TSO_MAX_FRAME):
            raise ConfigError(
                f"{where}: generate= is a frame length of {MIN_FRAME}..{longest} bytes (mtu {self.mtu}), "
                f"or {mtu_frame + 1}..{TSO_MAX_FRAME} for TCP segmentation offload, not {length}"
            )
        if self.host is not None:
            raise ConfigError(f"{where}: generate= and host= both feed the port's guest; choose one")

    def _check_generic(self, where: str) -> None:
        if not self.ifname:
            raise ConfigError(f"{where}: ifname= (the interface to attach) is required for a generic port")
        if not _valid_ifname(self.ifname):
            raise ConfigError(f"{where}: ifname must be an interface name of 1-15 bytes, not {self.ifname!r}")
        if self.path:
            raise ConfigError(f"{where}: path= is for vhost-user ports; a generic port has no socket")
        if self.queues != 1:
            raise ConfigError(f"{where}: a generic port has one queue, not {self.queues}")
        if self.group is not None or self.perm is not None:
            raise ConfigError(f"{where}: group= and perm= are for vhost-user sockets")

    def _check_passthrough(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}: path= (the ivshmem server socket QEMU connects to) is required")
        if self.mode != "server":
            raise ConfigError(f"{where}: a passthrough port's socket is an ivshmem server: mode=server")
        if self.ifname is not None:
            raise ConfigError(f"{where}: ifname= is for generic ports (type generic)")
        if self.queues != 1:
            raise ConfigError(f"{where}: a passthrough port has rings=, not queues=")
        if not 1 <= self.rings <= PT_MAX_RINGS:
            raise ConfigError(f"{where}: rings must be 1..{PT_MAX_RINGS}, not {self.rings}")
        lo, hi = PT_SLOTS
        if not lo <= self.slots <= hi:
            raise ConfigError(f"{where}: slots must be {lo}..{hi}, not {self.slots}")

    @property
    def ring_pairs(self) -> int:
        """The port's hardware ring pairs: its queue pairs, a passthrough port's rings, a generic port's 1."""
        return self.rings if self.type == "passthrough" else self.queues

    @property
    def serves_socket(self) -> bool:
        """Whether vhostmap listens on ``path`` (owner=, group= and perm= apply)."""
        return self.type in ("vhost-user", "passthrough") and self.mode == "server"

    @property
    def uid(self) -> int | None:
        """The socket's owner uid, or None to leave it to the daemon's user."""
        return None if self.owner is None else resolve_user(self.owner, f"port {self.name!r}")

    @property
    def gid(self) -> int | None:
        """The socket's group id, or None to leave the group alone."""
        return None if self.group is None else resolve_group(self.group, f"port {self.name!r}")

    @property
    def socket_perm(self) -> int | None:
        """The socket's mode: ``perm``, else 0660 when a group is given (so it can connect), else None."""
        if self.perm is None and self.group is not None:
            return 0o660
        return self.perm


@dataclass(frozen=True)
class SwitchConfig:
    """A learning switch and the ports attached to it when the daemon starts."""

    name: str
    ports: tuple[str, ...] = ()
    aging: float = DEFAULT_AGING  # seconds a learnt address lives without traffic from it

    def __post_init__(self) -> None:
        where = f"switch {self.name!r}"
        if not _NAME.match(self.name):
            raise ConfigError(f"{where}: names are 1-32 characters of letters, digits, '_', '.', '-'")
        if not 0 < self.aging <= 1e6:
            raise ConfigError(f"{where}: aging must be 0..1000000 seconds (not 0), not {self.aging:g}")
        dupes = {n for n in self.ports if self.ports.count(n) > 1}
        if dupes:
            raise ConfigError(f"{where}: port {sorted(dupes)[0]!r} is listed twice")


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``vhostmap serve`` runs."""

    ports: tuple[PortConfig, ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    control_socket: str = DEFAULT_CONTROL_SOCKET
    switches: tuple[SwitchConfig, ...] = ()
    poll: bool = False  # the datapath threads busy-poll instead of sleeping on kicks
    # One datapath thread pinned to each of these CPUs (None: one thread, unpinned).
    cpu: tuple[int, ...] | None = None
    control_cpu: int | None = None  # the CPU the control (main) thread is pinned to
    # Threads serving pinned queues get no other queue (OVS's pmd-rxq-isolate).
    rxq_isolate: bool = True
    # Where Prometheus metrics are served, (address, TCP port); None: not served.
    metrics: tuple[str, int] | None = None
    # Who the daemon becomes once its sockets and TAPs exist (USER[:GROUP]); None: it stays who it is.
    user: str | None = None

    def __post_init__(self) -> None:
        cpus = list(self.cpu or ()) + ([self.control_cpu] if self.control_cpu is not None else [])
        for k, value in enumerate(cpus):
            what = "control_cpu: control CPU" if k == len(self.cpu or ()) else "cpu: datapath CPU"
            try:
                check_cpu(value, what)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.cpu is not None and len(set(self.cpu)) != len(self.cpu):
            raise ConfigError(f"cpu: CPU list {self.cpu} names a CPU twice")
        for p in self.ports:
            for q, cpu in p.rxq_affinity:
                if cpu not in (self.cpu or ()):
                    listed = ",".join(map(str, self.cpu)) if self.cpu else "none given"
                    raise ConfigError(
                        f"port {p.name!r}: rxq_affinity pins queue {q} to CPU {cpu}, which runs no datapath "
                        f"thread (datapath CPUs, --cpu / cpu: {listed})"
                    )
        names = [p.name for p in self.ports]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"port {sorted(dupes)[0]!r} is defined twice")
        paths = [p.path for p in self.ports if p.path]
        dupe_paths = {p for p in paths if paths.count(p) > 1}
        if dupe_paths:
            raise ConfigError(f"socket {sorted(dupe_paths)[0]} is used by two ports")
        used: set[str] = set()
        for a, b in self.links:
            for n in (a, b):
                if n not in names:
                    raise ConfigError(f"link {a},{b}: no port named {n!r}")
                if n in used:
                    raise ConfigError(f"link {a},{b}: port {n!r} is already linked")
                used.add(n)
            if a == b:
                raise ConfigError(f"link {a},{b}: a port cannot be linked to itself")
        self._check_switches(names, used)
        self._check_interfaces()

    def _check_switches(self, names: list[str], linked: set[str]) -> None:
        switch_names = [s.name for s in self.switches]
        dupes = {n for n in switch_names if switch_names.count(n) > 1}
        if dupes:
            raise ConfigError(f"switch {sorted(dupes)[0]!r} is defined twice")
        on_switch: dict[str, str] = {}
        for s in self.switches:
            for n in s.ports:
                if n not in names:
                    raise ConfigError(f"switch {s.name!r}: no port named {n!r}")
                if n in linked:
                    raise ConfigError(f"switch {s.name!r}: port {n!r} is already linked")
                if n in on_switch:
                    raise ConfigError(f"switch {s.name!r}: port {n!r} is already on switch {on_switch[n]!r}")
                on_switch[n] = s.name
        for p in self.ports:
            if p.host is not None and p.name in linked:
                raise ConfigError(
                    f"port {p.name!r}: host= cannot be combined with a link (put both ports on a switch)"
                )
            if p.generate is not None and (p.name in linked or p.name in on_switch):
                raise ConfigError(
                    f"port {p.name!r}: a port with generate= feeds its guest alone, "
                    "not in a link or on a switch"
                )

    def _check_interfaces(self) -> None:
        taps = [p.host for p in self.ports if p.host is not None]
        ifnames = [p.ifname for p in self.ports if p.ifname is not None]
        for kind, seen in (("TAP", taps), ("interface", ifnames)):
            dupes = {n for n in seen if seen.count(n) > 1}
            if dupes:
                raise ConfigError(f"{kind} {sorted(dupes)[0]} is used by two ports")
        both = set(taps) & set(ifnames)
        if both:
            raise ConfigError(f"interface {sorted(both)[0]} is both a host= TAP and a generic port's ifname")

    def switch(self, name: str) -> SwitchConfig:
        """The switch called ``name``."""
        for s in self.switches:
            if s.name == name:
                return s
        raise KeyError(name)

    def port(self, name: str) -> PortConfig:
        """The port called ``name``."""
        for p in self.ports:
            if p.name == name:
                return p
        raise KeyError(name)


def _port_from_mapping(name: str, values: Mapping[str, Any]) -> PortConfig:
    known = {
        "type", "path", "mode", "queues", "mac", "mtu", "owner", "group", "perm", "host", "ifname",
        "generate", "rxq_affinity", "offloads", "packed", "rings", "slots",
    }  # fmt: skip
    unknown = set(values) - known
    if unknown:
        raise ConfigError(
            f"port {name!r}: unknown option {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})"
        )
    if "packed" in values and values.get("type", PortConfig.type) != "vhost-user":
        raise ConfigError(f"port {name!r}: packed= is for vhost-user ports")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("queues", "mtu", "generate", "rings", "slots"):
            try:
                kwargs[key] = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"port {name!r}: {key} must be a number, not {value!r}") from None
        elif key == "mac":
            kwargs["mac"] = parse_mac(str(value))
        elif key == "perm":
            kwargs["perm"] = parse_perm(value, f"port {name!r}: perm")
        elif key == "rxq_affinity":
            kwargs["rxq_affinity"] = parse_rxq_affinity(value, f"port {name!r}: rxq_affinity")
        elif key == "offloads":
            kwargs["offloads"] = parse_offloads(value, f"port {name!r}: offloads")
        elif key == "packed":
            kwargs["packed"] = parse_switch(value, f"port {name!r}: packed")
        else:
            kwargs[key] = str(value)
    return PortConfig(name=name, **kwargs)


def parse_switch(value: Any, what: str) -> bool:
    """on/off (a flag's word) or a TOML boolean."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("on", "off"):
        return str(value).lower() == "on"
    raise ConfigError(f"{what} must be on or off, not {value!r}")


def parse_offloads(value: Any, what: str) -> int:
    """The feature bits of ``offloads=``: on (all of vhost_user.device.OFFLOADS), off (none), or some of
    them: ``csum+tso4+tso6`` (a flag's value; commas separate a port's options) or a TOML list of names."""
    if isinstance(value, bool) or str(value).lower() in ("on", "off"):
        return ALL_OFFLOADS if parse_switch(value, what) else 0
    names = value if isinstance(value, list) else str(value).split("+")
    try:
        return offload_features(str(n).strip().lower() for n in names)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


def parse_perm(value: Any, what: str) -> int:
    """Permission bits: an octal string (``"0660"``, ``"660"``) or a number (TOML ``0o660``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value), 8)
    except ValueError:
        raise ConfigError(f"{what} must be octal permission bits like 0660, not {value!r}") from None


def parse_rxq_affinity(value: Any, what: str) -> tuple[tuple[int, int], ...]:
    """``"0:1,1:0"`` (QUEUE:CPU pairs, OVS's pmd-rxq-affinity syntax) -> ((0, 1), (1, 0))."""
    pairs: list[tuple[int, int]] = []
    for item in str(value).split(","):
        queue, sep, cpu = item.strip().partition(":")
        if not sep or not queue.isdigit() or not cpu.isdigit():
            raise ConfigError(f"{what}: expected QUEUE:CPU pairs like 0:1,1:0, not {value!r}")
        pairs.append((int(queue), int(cpu)))
    return tuple(pairs)


def parse_cpu_key(value: Any, what: str) -> tuple[int, ...] | None:
    """A CPU number or a CPU list (``"2-5"``, ``"2,4-5"``) -> the CPUs in ascending order; None stays None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, str) and re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", value.strip()):
        cpus = parse_cpu_list(value)
        if cpus:
            return tuple(sorted(cpus))
    raise ConfigError(f"{what} must be a CPU number or a CPU list like 2-5 or 2,4-5, not {value!r}")


def parse_port_flag(text: str) -> PortConfig:
    """``NAME=TYPE,key=value,...`` as given to ``--port``."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ConfigError(
            f"--port {text!r}: expected NAME=TYPE,key=value,... (e.g. vm0=vhost-user,path=/tmp/vm0.sock)"
        )
    kind, *options = rest.split(",")
    values: dict[str, Any] = {"type": kind}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep and re.fullmatch(r"\d+:\d+", opt) and "rxq_affinity" in values:
            values["rxq_affinity"] += f",{opt}"  # rxq_affinity=0:1,1:0: its pairs are comma-separated too
            continue
        if not sep:
            raise ConfigError(f"--port {text!r}: option {opt!r} is not key=value")
        values[key] = value
    return _port_from_mapping(name, values)


def parse_link_flag(text: str) -> tuple[str, str]:
    """``A,B`` as given to ``--link``."""
    parts = text.split(",")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--link {text!r}: expected two port names, A,B")
    return parts[0], parts[1]


def parse_switch_flag(text: str) -> SwitchConfig:
    """``NAME=PORT,PORT,...[,aging=SECONDS]`` as given to ``--switch`` (no ports: an empty switch)."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise ConfigError(f"--switch {text!r}: expected NAME=PORT,PORT,... (e.g. vale0=vm0,vm1,uplink)")
    ports: list[str] = []
    aging = DEFAULT_AGING
    for item in rest.split(",") if rest else []:
        key, eq, value = item.partition("=")
        if not eq:
            if not item:
                raise ConfigError(f"--switch {text!r}: empty port name")
            ports.append(item)
        elif key == "aging":
            aging = _parse_aging(value, f"--switch {text!r}")
        else:
            raise ConfigError(f"--switch {text!r}: unknown option {key!r} (known: aging)")
    return SwitchConfig(name, tuple(ports), aging)


def _parse_aging(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: aging must be a number of seconds, not {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: aging must be a number of seconds, not {value!r}") from None


def _switch_from_mapping(name: str, values: Any) -> SwitchConfig:
    where = f"switch {name!r}"
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a table with ports = [...], got {values!r}")
    unknown = set(values) - {"ports", "aging"}
    if unknown:
        raise ConfigError(f"{where}: unknown option {sorted(unknown)[0]!r} (known: aging, ports)")
    ports = values.get("ports", [])
    if not isinstance(ports, list) or not all(isinstance(p, str) for p in ports):
        raise ConfigError(f"{where}: ports must be a list of port names, not {ports!r}")
    aging = _parse_aging(values["aging"], where) if "aging" in values else DEFAULT_AGING
    return SwitchConfig(name, tuple(ports), aging)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a clear error for a missing or malformed one."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def build_config(
    toml: Mapping[str, Any] | None = None,
    port_flags: Iterable[str] = (),
    link_flags: Iterable[str] = (),
    control_socket: str | None = None,
    socket_group: str | None = None,
    socket_mode: str | None = None,
    switch_flags: Iterable[str] = (),
    socket_owner: str | None = None,
    poll: bool | None = None,
    cpu: int | str | None = None,
    control_cpu: int | None = None,
    rxq_isolate: bool | None = None,
    metrics: str | None = None,
    user: str | None = None,
) -> DaemonConfig:
    """Merge a TOML document and command-line flags (flags add to the file) into one checked config.

    ``socket_group`` and ``socket_mode`` (or TOML ``socket_group``/``socket_mode``) apply to every server-mode
    port that sets neither ``group`` nor ``perm`` itself. ``poll``, ``cpu``, ``control_cpu`` and
    ``rxq_isolate`` (TOML keys of the same names) override the file's when given; ``cpu`` is a CPU number or a
    CPU list (``"0-1"``).
    """
    toml = dict(toml or {})
    ports = [_port_from_mapping(name, v) for name, v in dict(toml.pop("ports", {})).items()]
    ports += [parse_port_flag(f) for f in port_flags]
    file_group, file_mode = toml.pop("socket_group", None), toml.pop("socket_mode", None)
    group = socket_group if socket_group is not None else file_group
    mode = socket_mode if socket_mode is not None else file_mode
    file_owner = toml.pop("socket_owner", None)
    owner = socket_owner if socket_owner is not None else file_owner
    if owner is not None:
        ports = [replace(p, owner=str(owner)) if p.serves_socket and p.owner is None else p for p in ports]
    if group is not None or mode is not None:
        perm = parse_perm(mode, "--socket-mode") if mode is not None else None
        ports = [
            replace(p, group=None if group is None else str(group), perm=perm)
            if p.serves_socket and p.group is None and p.perm is None
            else p
            for p in ports
        ]
    links: list[tuple[str, str]] = []
    for entry in toml.pop("links", []):
        pair = entry.get("ports") if isinstance(entry, Mapping) else None
        if not isinstance(pair, list) or len(pair) != 2:
            raise ConfigError(f"links: each entry needs ports = [A, B], got {entry!r}")
        links.append((str(pair[0]), str(pair[1])))
    links += [parse_link_flag(f) for f in link_flags]
    switch_tables = toml.pop("switches", {})
    if not isinstance(switch_tables, Mapping):
        raise ConfigError("switches: expected [switches.NAME] tables with ports = [...]")
    switches = [_switch_from_mapping(name, v) for name, v in switch_tables.items()]
    switches += [parse_switch_flag(f) for f in switch_flags]
    control = control_socket or str(toml.pop("control_socket", DEFAULT_CONTROL_SOCKET))
    file_poll = toml.pop("poll", False)
    if not isinstance(file_poll, bool):
        raise ConfigError(f"poll must be true or false, not {file_poll!r}")
    file_cpu = parse_cpu_key(toml.pop("cpu", None), "cpu")
    file_control_cpu = _cpu_key(toml, "control_cpu")
    file_metrics = toml.pop("metrics", None)
    file_isolate = toml.pop("rxq_isolate", True)
    if not isinstance(file_isolate, bool):
        raise ConfigError(f"rxq_isolate must be true or false, not {file_isolate!r}")
    file_user = toml.pop("user", None)
    if toml:
        raise ConfigError(
            f"unknown configuration key {sorted(toml)[0]!r} (known: ports, links, switches, control_socket, "
            "socket_owner, socket_group, socket_mode, poll, cpu, control_cpu, rxq_isolate, metrics, user)"
        )
    run_as = user if user is not None else file_user
    if run_as is not None:
        try:
            lookup(str(run_as))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"user: {e.args[0] if e.args else e}") from None
    return DaemonConfig(
        tuple(ports),
        tuple(links),
        control,
        tuple(switches),
        poll=file_poll if poll is None else poll,
        cpu=file_cpu if cpu is None else parse_cpu_key(cpu, "--cpu"),
        control_cpu=file_control_cpu if control_cpu is None else control_cpu,
        rxq_isolate=file_isolate if rxq_isolate is None else rxq_isolate,
        metrics=parse_listen(file_metrics if metrics is None else metrics, "metrics"),
        user=None if run_as is None else str(run_as),
    )


def parse_listen(value: Any, what: str) -> tuple[str, int] | None:
    """``[ADDR:]PORT`` (a TOML integer for the port alone; ``[::1]:PORT`` for IPv6) as (address, port); the
    address is 127.0.0.1 when not given: metrics name ports and guests, so exposing them is a choice."""
    if value is None:
        return None
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be [ADDR:]PORT, not {value!r}")
    addr, sep, port = text.rpartition(":")
    addr = addr.strip("[]") if sep else "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536 or (sep and not addr):
        raise ConfigError(f"{what} must be [ADDR:]PORT with PORT 1..65535, not {value!r}")
    return addr, int(port)


def _cpu_key(toml: dict[str, Any], key: str) -> int | None:
    """Pop TOML ``key``, a CPU number, if it is there."""
    value = toml.pop(key, None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be a CPU number, not {value!r}")
    return value
