"""A whole lab from a small dict or TOML file: switches, guests on them, the host's stack on them.

    {
        "switches": ["sw0"],                        # or {"sw0": {"aging": 300}}
        "guests": {
            "server": {"nics": ["sw0"]},            # one NIC (eth0) per entry, in order
            "client": {"nics": ["sw0"], "image": "busybox", "memory_mb": 256, "cmdline": "", "share": "dir"},
        },
        "hosts": {
            "ns0": {"switch": "sw0"},                   # a namespace behind a veth, on the switch
            "t0": {"switch": "sw0", "kind": "tap"},     # a namespace around a TAP (switch port "t0^")
            "t1": {"switch": "sw0", "kind": "tap", "netns": False},  # the TAP left on the host
        },
    }

``image`` is "busybox" (default), "python", or a table extending one of them: ``{"base": "python",
"packages": ["iperf3"], "wheels": ["dist/x.whl"], "files": {"local/path": "/path/in/guest"}}`` (built once,
then cached by content; `vhostmap.lab.userimage`).

A NIC entry is a switch name or a table ``{"switch": "sw0", "ip": "10.9.9.1/24", "mtu": 9000}`` (``"ip":
false`` for none); addresses and MACs come from the lab's ranges unless given. Each NIC is a vhost-user port
of one vhostmap daemon named ``<guest>.<index>``.

A host is the host's network stack on a switch, in a namespace of its own with the lab's next address (or
``ip``, "10.9.8.1/24"); ``.ip``, ``.run([...])`` and ``.ping(ip)`` reach it (a `HostNamespace`). ``kind``
"veth" (default): behind a veth pair, whose host end is a generic port named after the host. ``kind``
"tap": through a TAP, made by the daemon as the host rings (``host=TAP``) of a vhost-user port named after
the host that no front-end uses, so that the switch has a port ``<host>^`` and the stack's checksum and
segmentation offloads are in play. With ``"netns": false`` (TAPs only) the TAP stays in the host's own
namespace, up, a `HostTap`, without an address unless ``ip`` gives one (the lab's subnet is only its own
inside its namespaces: another session's lab may have the same one).

`build` makes the veths' namespaces, starts the daemon, moves the TAPs, starts every guest, then waits for
all of them (they boot side by side).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhostmap.lab.userimage import ImageSpec
from vhostmap.testing.lab import Daemon, Guest, HostNamespace, HostTap, Image, Lab

GUEST_KEYS = {"nics", "image", "memory_mb", "smp", "cmdline", "share", "boot_timeout"}
HOST_KEYS = {"switch", "kind", "ip", "netns"}
HOST_KINDS = ("veth", "tap")


class TopologyError(ValueError):
    """The topology spec is not one: the message says which entry and why."""


@dataclass
class Topology:
    """A built lab: ``vhostmap`` (the daemon), ``guests`` and ``hosts`` by name, and their `Lab`."""

    lab: Lab
    vhostmap: Daemon
    guests: dict[str, Guest] = field(default_factory=dict)
    hosts: dict[str, HostNamespace | HostTap] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Guest | HostNamespace | HostTap:
        """A guest or host by name: ``topo["server"]``."""
        if name in self.guests:
            return self.guests[name]
        if name in self.hosts:
            return self.hosts[name]
        raise KeyError(f"no guest or host {name!r} in this topology")


def image_of(guest: str, image: Any) -> Image:
    """A guest's ``image`` entry as what `Lab.guest` takes."""
    if image in ("busybox", "python"):
        return image
    if not isinstance(image, Mapping):
        raise TopologyError(f"guest {guest}: image must be busybox, python or a table, not {image!r}")
    extra = set(image) - {"base", "packages", "wheels", "files"}
    if extra:
        raise TopologyError(f"guest {guest}: unknown image keys {sorted(extra)}")
    packages = tuple(image.get("packages", ()))
    wheels = tuple(Path(w) for w in image.get("wheels", ()))
    return ImageSpec(
        base=image.get("base", "python" if packages or wheels else "busybox"),
        packages=packages,
        wheels=wheels,
        files=tuple((Path(local), remote) for local, remote in dict(image.get("files", {})).items()),
    )


def check_host(name: str, host: Any) -> dict[str, Any]:
    """A ``hosts`` entry, checked, with its defaults: ``kind`` and (for a TAP) ``netns``."""
    if not isinstance(host, Mapping) or "switch" not in host:
        raise TopologyError(f"host {name}: expected a table with a switch")
    extra = set(host) - HOST_KEYS
    if extra:
        raise TopologyError(f"host {name}: unknown keys {sorted(extra)} (expected {sorted(HOST_KEYS)})")
    kind = host.get("kind", "veth")
    if kind not in HOST_KINDS:
        raise TopologyError(f"host {name}: kind must be veth or tap, not {kind!r}")
    ip = host.get("ip")
    if ip is not None and not isinstance(ip, str):
        raise TopologyError(f"host {name}: ip must be an address with its prefix length, not {ip!r}")
    if kind == "veth":
        if "netns" in host:
            raise TopologyError(f"host {name}: netns is for kind tap (a veth host is always a namespace)")
        return {"switch": host["switch"], "kind": kind, "ip": ip}
    netns = host.get("netns", True)
    if not isinstance(netns, bool):
        raise TopologyError(f"host {name}: netns must be true or false, not {netns!r}")
    return {"switch": host["switch"], "kind": kind, "ip": ip, "netns": netns}


def load(spec: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """``spec`` as a dict: itself, or the TOML file it names."""
    if isinstance(spec, Mapping):
        return dict(spec)
    with open(spec, "rb") as f:
        return tomllib.load(f)


def build(lab: Lab, spec: Mapping[str, Any] | str | Path) -> Topology:
    """Make what ``spec`` describes in ``lab`` and return it, every guest up with carrier on its NICs."""
    data = load(spec)
    unknown = set(data) - {"switches", "guests", "hosts"}
    if unknown:
        raise TopologyError(f"unknown topology keys {sorted(unknown)} (expected switches, guests, hosts)")
    raw_switches = data.get("switches", {})
    switches: dict[str, dict[str, Any]] = (
        {s: {} for s in raw_switches} if isinstance(raw_switches, list) else dict(raw_switches)
    )
    members: dict[str, list[str]] = {s: [] for s in switches}
    ports: dict[str, str] = {}
    guests: dict[str, Any] = dict(data.get("guests", {}))
    hosts: dict[str, Any] = dict(data.get("hosts", {}))
    clash = set(guests) & set(hosts)
    if clash:
        raise TopologyError(f"{sorted(clash)} name both a guest and a host")

    def attach(owner: str, switch: Any, port: str) -> None:
        if switch not in members:
            raise TopologyError(f"{owner}: no switch {switch!r} (switches: {sorted(members)})")
        members[switch].append(port)

    checked = {name: check_host(name, host) for name, host in hosts.items()}
    for name, host in checked.items():
        attach(f"host {name}", host["switch"], name)
    made_hosts: dict[str, HostNamespace | HostTap] = {}
    taps: dict[str, str] = {}
    for name, host in checked.items():
        if host["kind"] == "tap":
            taps[name] = lab.tap_name()
            ports[name] = f"vhost-user,host={taps[name]}"
        else:
            ns = lab.netns(name, address=host["ip"])
            made_hosts[name] = ns
            ports[name] = f"generic,ifname={ns.ifname}"

    nic_options: dict[str, dict[str, Any]] = {}
    for name, g in guests.items():
        if not isinstance(g, Mapping):
            raise TopologyError(f"guest {name}: expected a table")
        extra = set(g) - GUEST_KEYS
        if extra:
            raise TopologyError(f"guest {name}: unknown keys {sorted(extra)} (expected {sorted(GUEST_KEYS)})")
        for i, nic in enumerate(g.get("nics", [])):
            port = f"{name}.{i}"
            options = dict(nic) if isinstance(nic, Mapping) else {"switch": nic}
            attach(f"guest {name} NIC {i}", options.get("switch"), port)
            ports[port] = "vhost-user"
            nic_options[port] = options

    daemon = lab.vhostmap(
        ports,
        switches={
            s: [*members[s], *([f"aging={o['aging']}"] if "aging" in o else [])] for s, o in switches.items()
        },
    )
    for name, tap in taps.items():
        host = checked[name]
        if host["netns"]:
            made_hosts[name] = lab.netns(name, address=host["ip"], tap=tap)
        else:
            made_hosts[name] = lab.host_tap(name, tap, address=host["ip"])
    made_guests: dict[str, Guest] = {}
    for name, g in guests.items():
        nics = []
        for i in range(len(g.get("nics", []))):
            port = f"{name}.{i}"
            options = nic_options[port]
            address = options.get("ip", True)
            nics.append(lab.nic(port, ip=None if address is False else address, mtu=options.get("mtu")))
        made_guests[name] = lab.guest(
            name,
            nics,
            image=image_of(name, g.get("image", "busybox")),
            memory_mb=g.get("memory_mb"),
            smp=g.get("smp", 1),
            cmdline=g.get("cmdline", ""),
            share=g.get("share"),
            boot_timeout=g.get("boot_timeout", 120.0),
            wait=False,
        )
    lab.wait_guests(made_guests.values())
    return Topology(lab, daemon, made_guests, made_hosts)
