"""Typed errors of the netmap layer (allocator, rings, krings, adapters).

Each error carries what went wrong and where as attributes, so that callers and logs need not parse messages.
Errors that reject an argument also derive from ValueError or IndexError, so generic handlers still work.
"""

from __future__ import annotations

import os


class NetmapError(Exception):
    """Base class of every error raised by vhostmap.netmap."""


class AllocatorConfigError(NetmapError, ValueError):
    """A tunable of the allocator is out of range or cannot be honoured.

    ``field`` names the AllocatorParams field, ``value`` is what was asked for and ``allowed`` says what would
    have been accepted (a range, or nearby valid values).
    """

    def __init__(self, field: str, value: int, allowed: str, why: str = "") -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        detail = f": {why}" if why else ""
        super().__init__(f"{field}={value} is not valid{detail}; allowed: {allowed}")


class AllocatorExhausted(NetmapError):
    """A pool has fewer free objects than a request needs. Nothing was taken."""

    def __init__(self, pool: str, requested: int, available: int) -> None:
        self.pool = pool
        self.requested = requested
        self.available = available
        super().__init__(f"{pool} pool exhausted: {requested} object(s) requested, {available} free")


class BufferIndexError(NetmapError, IndexError):
    """A buffer index that cannot be used for the operation (reserved, out of range, not allocated)."""

    def __init__(self, idx: int, reason: str) -> None:
        self.idx = idx
        self.reason = reason
        super().__init__(f"buffer {idx}: {reason}")


class RegionError(NetmapError, ValueError):
    """A mapped region does not hold what a view expects (offset or size outside the region)."""


class BadRingId(NetmapError, ValueError):
    """A ring index or registration that names rings the adapter does not have."""

    def __init__(self, port: str, what: str) -> None:
        self.port = port
        self.what = what
        super().__init__(f"{port}: {what}")


class PortBroken(NetmapError):
    """Raised by an adapter's sync hook when its peer did something that stops the port (e.g. a guest
    handing out a descriptor loop). The adapter is marked broken; other adapters carry on."""

    def __init__(self, port: str, reason: str) -> None:
        self.port = port
        self.reason = reason
        super().__init__(f"{port}: {reason}")


class InterfaceError(NetmapError, OSError):
    """An operation on a network interface failed. ``ifname`` names the interface, ``op`` the operation
    and ``errno`` the OS error (0 when the failure is not an OS error)."""

    def __init__(self, ifname: str, op: str, err: int, detail: str = "") -> None:
        self.ifname = ifname
        self.op = op
        why = detail or (os.strerror(err) if err else "failed")
        super().__init__(err, f"{ifname}: {op}: {why}")


class TapError(InterfaceError):
    """Opening, creating or configuring a TAP device failed."""
