"""Network namespaces, veth pairs and TAP devices for the lab, made with iproute2 and always removed.

Every object is a context manager that deletes exactly what it created, even when the body raises. Names
default to a prefix plus a short random suffix (`unique_name`), so concurrent tests and a crashed run's
leftovers do not collide; Linux interface names are at most 15 bytes.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from vhostmap.lab.wait import wait_until

IFNAMSIZ = 16  # including the NUL: names are at most 15 bytes
NETNS_DIR = Path("/var/run/netns")


class NetnsError(RuntimeError):
    """An ip(8) command failed; the message carries the command and its stderr."""


def unique_name(prefix: str = "vhm", length: int = IFNAMSIZ - 1) -> str:
    """``prefix`` plus random hex, ``length`` characters long (a valid interface name by default)."""
    room = length - len(prefix)
    if room < 4:
        raise ValueError(f"prefix {prefix!r} leaves fewer than 4 random characters in {length}")
    return prefix + secrets.token_hex(room)[:room]


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (inside ``netns`` if given); raise `NetnsError` on failure when ``check``."""
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def netns_exists(name: str) -> bool:
    """Whether the named network namespace exists."""
    return (NETNS_DIR / name).exists()


def link_exists(name: str, netns: str | None = None) -> bool:
    """Whether interface ``name`` exists (in ``netns`` if given)."""
    if netns is not None and not netns_exists(netns):
        return False
    return ip("link", "show", "dev", name, netns=netns, check=False).returncode == 0


def set_up(dev: str, *, netns: str | None = None, mtu: int | None = None) -> None:
    """Bring ``dev`` up, optionally setting its MTU first."""
    if mtu is not None:
        ip("link", "set", "dev", dev, "mtu", str(mtu), netns=netns)
    ip("link", "set", "dev", dev, "up", netns=netns)


def wait_transmitting(dev: str, *, netns: str | None = None, timeout: float = 10.0) -> None:
    """Wait until ``dev``, brought up, has its carrier and its queueing discipline: until the kernel's link
    watch has run (it is deferred, by a second or more on a busy machine), the device has the noop qdisc,
    which drops whatever is sent through it without an error."""

    def ready() -> bool:
        [link] = json.loads(ip("-j", "link", "show", "dev", dev, netns=netns).stdout)
        return bool(link.get("operstate") == "UP" and link.get("qdisc") != "noop")

    wait_until(ready, timeout, f"{dev} to be up with its qdisc attached")


def add_address(dev: str, address: str, *, netns: str | None = None) -> None:
    """Add ``address`` ("10.0.0.1/24") to ``dev``."""
    ip("addr", "add", address, "dev", dev, netns=netns)


class _Managed:
    """Create on enter (or `create`), delete on exit (or `delete`), idempotently."""

    created = False

    def create(self) -> Self:
        raise NotImplementedError

    def delete(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.create()
        except BaseException:
            self.delete()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.delete()


class Netns(_Managed):
    """A named network namespace (``ip netns add``); its loopback is brought up."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or unique_name("vhmns")

    def create(self) -> Self:
        """Create the namespace."""
        ip("netns", "add", self.name)
        self.created = True
        ip("link", "set", "dev", "lo", "up", netns=self.name)
        return self

    def delete(self) -> None:
        """Delete the namespace (and with it every interface still inside)."""
        if self.created:
            ip("netns", "delete", self.name, check=False)
            self.created = False

    @property
    def exists(self) -> bool:
        """Whether the namespace exists."""
        return netns_exists(self.name)

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace and return its result (text output captured)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )


class VethPair(_Managed):
    """A veth pair ``name`` <-> ``peer``; either end may be placed in a namespace at creation."""

    def __init__(
        self,
        name: str | None = None,
        peer: str | None = None,
        *,
        netns: str | None = None,
        peer_netns: str | None = None,
    ) -> None:
        self.name = name or unique_name("vhmv")
        self.peer = peer or unique_name("vhmp")
        self.netns, self.peer_netns = netns, peer_netns

    def create(self) -> Self:
        """Create the pair (both ends down)."""
        args = ["link", "add", self.name, *(["netns", self.netns] if self.netns else [])]
        args += [
            "type",
            "veth",
            "peer",
            "name",
            self.peer,
            *(["netns", self.peer_netns] if self.peer_netns else []),
        ]
        ip(*args)
        self.created = True
        return self

    def delete(self) -> None:
        """Delete the pair (deleting one end removes both)."""
        if not self.created:
            return
        self.created = False
        for dev, netns in ((self.name, self.netns), (self.peer, self.peer_netns)):
            if link_exists(dev, netns):
                ip("link", "delete", "dev", dev, netns=netns, check=False)

    @property
    def exists(self) -> bool:
        """Whether either end still exists."""
        return link_exists(self.name, self.netns) or link_exists(self.peer, self.peer_netns)


class Tap(_Managed):
    """A persistent TAP device (``ip tuntap add mode tap``), optionally multiqueue or in a namespace."""

    def __init__(
        self, name: str | None = None, *, netns: str | None = None, multi_queue: bool = False
    ) -> None:
        self.name = name or unique_name("vhmt")
        self.netns = netns
        self.multi_queue = multi_queue

    def create(self) -> Self:
        """Create the TAP device (down)."""
        ip(
            "tuntap",
            "add",
            "dev",
            self.name,
            "mode",
            "tap",
            *(["multi_queue"] if self.multi_queue else []),
            netns=self.netns,
        )
        self.created = True
        return self

    def delete(self) -> None:
        """Delete the TAP device."""
        if self.created:
            self.created = False
            if link_exists(self.name, self.netns):
                ip("link", "delete", "dev", self.name, netns=self.netns, check=False)

    @property
    def exists(self) -> bool:
        """Whether the device still exists."""
        return link_exists(self.name, self.netns)


def disable_ipv6(ifname: str, netns: str | None = None) -> None:
    """No router solicitations, DAD or MLD from ``ifname``: the host sends nothing of its own on it."""
    args = ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"]
    if netns is not None:
        args = ["ip", "netns", "exec", netns, *args]
    subprocess.run(args, check=False, capture_output=True)


@contextlib.contextmanager
def namespace_behind_veth(address: str) -> Iterator[tuple[Netns, VethPair]]:
    """A namespace holding ``address`` (e.g. ``10.0.0.3/24``) behind a veth pair: ``veth.name`` stays here,
    up and without an address (for a generic port), ``veth.peer`` is in the namespace. IPv6 is off on both
    ends. Both go away on exit."""
    with Netns() as ns, VethPair(peer_netns=ns.name) as veth:
        disable_ipv6(veth.name)
        disable_ipv6(veth.peer, ns.name)
        set_up(veth.name)
        add_address(veth.peer, address, netns=ns.name)
        set_up(veth.peer, netns=ns.name)
        yield ns, veth
