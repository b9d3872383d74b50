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
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_RUN_DIR = "/run/vhostmap"
DEFAULT_CONTROL_SOCKET = f"{DEFAULT_RUN_DIR}/control.sock"

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_MAC = re.compile(r"^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$")
PORT_TYPES = ("vhost-user",)
SOCKET_MODES = ("server", "client")


class ConfigError(ValueError):
    """A configuration that cannot work, with the flag or key that is wrong."""


def parse_mac(text: str) -> bytes:
    """``52:54:00:00:00:10`` -> 6 bytes; a clear error otherwise."""
    if not _MAC.match(text):
        raise ConfigError(f"bad MAC address {text!r} (expected six hex bytes like 52:54:00:12:34:56)")
    return bytes(int(b, 16) for b in text.split(":"))


def format_mac(mac: bytes) -> str:
    """6 bytes -> ``52:54:00:00:00:10``."""
    return ":".join(f"{b:02x}" for b in mac)


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

    def __post_init__(self) -> None:
        where = f"port {self.name!r}"
        if not _NAME.match(self.name):
            raise ConfigError(f"{where}: names are 1-32 characters of letters, digits, '_', '.', '-'")
        if self.type not in PORT_TYPES:
            raise ConfigError(f"{where}: unknown type {self.type!r} (known: {', '.join(PORT_TYPES)})")
        if self.mode not in SOCKET_MODES:
            raise ConfigError(f"{where}: mode must be server or client, not {self.mode!r}")
        if not self.path:
            raise ConfigError(f"{where}: path= (the vhost-user socket) is required")
        if len(self.path.encode()) >= 108:
            raise ConfigError(f"{where}: socket path is longer than the 107 bytes UNIX sockets allow")
        if not 1 <= self.queues <= 64:
            raise ConfigError(f"{where}: queues must be 1..64, not {self.queues}")
        if not 68 <= self.mtu <= 9216:
            raise ConfigError(f"{where}: mtu must be 68..9216, not {self.mtu}")


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``vhostmap serve`` runs."""

    ports: tuple[PortConfig, ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    control_socket: str = DEFAULT_CONTROL_SOCKET

    def __post_init__(self) -> None:
        names = [p.name for p in self.ports]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"port {sorted(dupes)[0]!r} is defined twice")
        paths = [p.path for p in self.ports]
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

    def port(self, name: str) -> PortConfig:
        """The port called ``name``."""
        for p in self.ports:
            if p.name == name:
                return p
        raise KeyError(name)


def _port_from_mapping(name: str, values: Mapping[str, Any]) -> PortConfig:
    known = {"type", "path", "mode", "queues", "mac", "mtu"}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(
            f"port {name!r}: unknown option {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})"
        )
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("queues", "mtu"):
            try:
                kwargs[key] = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"port {name!r}: {key} must be a number, not {value!r}") from None
        elif key == "mac":
            kwargs["mac"] = parse_mac(str(value))
        else:
            kwargs[key] = str(value)
    return PortConfig(name=name, **kwargs)


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
) -> DaemonConfig:
    """Merge a TOML document and command-line flags (flags add to the file) into one checked config."""
    toml = dict(toml or {})
    ports = [_port_from_mapping(name, v) for name, v in dict(toml.pop("ports", {})).items()]
    ports += [parse_port_flag(f) for f in port_flags]
    links: list[tuple[str, str]] = []
    for entry in toml.pop("links", []):
        pair = entry.get("ports") if isinstance(entry, Mapping) else None
        if not isinstance(pair, list) or len(pair) != 2:
            raise ConfigError(f"links: each entry needs ports = [A, B], got {entry!r}")
        links.append((str(pair[0]), str(pair[1])))
    links += [parse_link_flag(f) for f in link_flags]
    control = control_socket or str(toml.pop("control_socket", DEFAULT_CONTROL_SOCKET))
    if toml:
        raise ConfigError(
            f"unknown configuration key {sorted(toml)[0]!r} (known: ports, links, control_socket)"
        )
    return DaemonConfig(tuple(ports), tuple(links), control)
