"""The switch's address table: learnt MAC address -> port, with aging and a bound on its size.

Two implementations with one interface (``AddressTable``): ``MacTable``, a dict, for the reference forwarder,
and ``CompiledMacTable``, the same table in C memory (struct sw_table, datapath/switch.c) that the compiled
kernel learns into and looks addresses up in. Addresses are 48-bit integers (vhostmap.ethernet).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import ffi, lib
from vhostmap.forwarding.rings import WordLock
from vhostmap.forwarding.switch.port import SwitchPort

# Learnt addresses are forgotten after this many seconds without a frame from them (VALE and Linux bridges
# use 300 s too).
DEFAULT_AGING = 300.0
# Entries of the address table: beyond it new addresses are not learnt (their frames are flooded), so a guest
# sending from random addresses cannot grow the daemon's memory.
DEFAULT_MAX_ADDRESSES = 8192
# The largest table one may ask for (the compiled one takes 32 bytes per entry).
MAX_ADDRESSES_LIMIT = 1 << 20

_MAC_LIMIT = 1 << 48


class AddressTable(Protocol):
    """What the switch needs of its address table: MacTable (the reference) or CompiledMacTable."""

    @property
    def aging(self) -> float:
        """Seconds a learnt address lives without traffic from it."""
        ...

    @property
    def max_entries(self) -> int:
        """Most addresses learnt at once."""
        ...

    @property
    def not_learnt(self) -> int:
        """New addresses that found the table full."""
        ...

    @property
    def lock(self) -> AbstractContextManager[Any]:
        """Held by a forwarder while it learns and looks up a batch (datapath threads share the table)."""
        ...

    def __len__(self) -> int: ...

    def learn(self, mac: int, port: SwitchPort, now: float) -> None:
        """``mac`` was seen as a source on ``port`` at ``now``."""

    def lookup(self, mac: int, now: float) -> SwitchPort | None:
        """The port ``mac`` was learnt on, None if unknown or aged out (the entry is then removed)."""

    def expire(self, now: float) -> int:
        """Remove every entry older than ``aging``; how many went."""
        ...

    def forget(self, port: SwitchPort) -> None:
        """Remove every address learnt on ``port``."""

    def reindex(self, ports: list[SwitchPort]) -> None:
        """The switch's ports are now ``ports`` (after an attach or a detach)."""

    def items(self, now: float) -> Iterator[tuple[int, SwitchPort, float]]:
        """(mac, port, age in seconds) of every live entry."""
        ...

    def entries(self) -> dict[int, tuple[SwitchPort, float]]:
        """Every entry, aged ones not yet removed included: mac -> (port, when last seen)."""
        ...


def _check_table_args(aging: float, max_entries: int) -> None:
    if not aging > 0:
        raise ValueError(f"aging {aging} must be > 0 seconds")
    if not 1 <= max_entries <= MAX_ADDRESSES_LIMIT:
        raise ValueError(f"max_entries {max_entries} must be in 1..{MAX_ADDRESSES_LIMIT}")


def _check_mac(mac: int) -> None:
    if not 0 < mac < _MAC_LIMIT:
        raise ValueError(f"{mac:#x} is not a 48-bit address (nor 0)")


class MacTable:
    """Learnt addresses: MAC (a 48-bit integer) -> the port it was last seen on, and when. The reference
    implementation (a dict), used by ``_forward_reference``."""

    def __init__(self, aging: float = DEFAULT_AGING, max_entries: int = DEFAULT_MAX_ADDRESSES) -> None:
        _check_table_args(aging, max_entries)
        self.aging = aging
        self.max_entries = max_entries
        self._entries: dict[int, tuple[SwitchPort, float]] = {}
        self.not_learnt = 0
        self.lock: AbstractContextManager[Any] = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, mac: int, port: SwitchPort, now: float) -> None:
        """``mac`` was seen as a source on ``port`` at ``now`` (an address moving to another port follows)."""
        _check_mac(mac)
        entries = self._entries
        if mac not in entries and len(entries) >= self.max_entries:
            self.expire(now)
            if len(entries) >= self.max_entries:
                self.not_learnt += 1
                return
        entries[mac] = (port, now)

    def lookup(self, mac: int, now: float) -> SwitchPort | None:
        """The port ``mac`` was learnt on, None if unknown or aged out (the entry is then removed)."""
        entry = self._entries.get(mac)
        if entry is None:
            return None
        port, seen = entry
        if now - seen > self.aging:
            del self._entries[mac]
            return None
        return port

    def expire(self, now: float) -> int:
        """Remove every entry older than ``aging``; how many went."""
        old = [mac for mac, (_, seen) in self._entries.items() if now - seen > self.aging]
        for mac in old:
            del self._entries[mac]
        return len(old)

    def forget(self, port: SwitchPort) -> None:
        """Remove every address learnt on ``port``."""
        for mac in [m for m, (p, _) in self._entries.items() if p is port]:
            del self._entries[mac]

    def reindex(self, ports: list[SwitchPort]) -> None:
        """Nothing to do: entries hold the ports themselves."""

    def items(self, now: float) -> Iterator[tuple[int, SwitchPort, float]]:
        """(mac, port, age in seconds) of every live entry."""
        for mac, (port, seen) in self._entries.items():
            if now - seen <= self.aging:
                yield mac, port, now - seen

    def entries(self) -> dict[int, tuple[SwitchPort, float]]:
        """Every entry, aged ones not yet removed included: mac -> (port, when last seen)."""
        return dict(self._entries)


_ENTRY_DTYPE = np.dtype([("key", "<u8"), ("seen", "<f8")])


class CompiledMacTable:
    """MacTable in C memory (struct sw_table, datapath/switch.c), the one ``sw_forward`` learns into and looks
    addresses up in: open addressing over twice ``max_entries`` entries with a random hash seed. Entries name
    ports by their index in the switch's port list, kept in step by ``reindex``. Same interface and behaviour
    as MacTable."""

    def __init__(self, aging: float = DEFAULT_AGING, max_entries: int = DEFAULT_MAX_ADDRESSES) -> None:
        _check_table_args(aging, max_entries)
        capacity = 1 << max(4, (2 * max_entries - 1).bit_length())
        self._entries: Any = ffi.new("struct sw_entry[]", capacity)  # zeroed: every entry free
        self.c: Any = ffi.new("struct sw_table *")
        t = self.c
        t.entries = self._entries
        t.capacity = capacity
        t.max_entries = max_entries
        t.seed = int.from_bytes(os.urandom(8), "little")
        # The word sw_forward holds while it learns and looks up.
        self.lock: AbstractContextManager[Any] = WordLock(ffi.addressof(t, "lock"))
        t.aging = aging
        t.swept_at = math.nan
        self._ports: list[SwitchPort] = []
        self._index: dict[SwitchPort, int] = {}

    @property
    def aging(self) -> float:
        """Seconds a learnt address lives without traffic from it."""
        return float(self.c.aging)

    @property
    def max_entries(self) -> int:
        """Most addresses learnt at once."""
        return int(self.c.max_entries)

    @property
    def not_learnt(self) -> int:
        """New addresses that found the table full."""
        return int(self.c.not_learnt)

    def __len__(self) -> int:
        return int(self.c.count)

    def learn(self, mac: int, port: SwitchPort, now: float) -> None:
        """``mac`` was seen as a source on ``port`` (one of the switch's ports) at ``now``."""
        _check_mac(mac)
        lib.sw_table_learn(self.c, mac, self._index[port], now)

    def lookup(self, mac: int, now: float) -> SwitchPort | None:
        """The port ``mac`` was learnt on, None if unknown or aged out (the entry is then removed)."""
        if not 0 <= mac < _MAC_LIMIT:
            return None
        d = lib.sw_table_lookup(self.c, mac, now)
        return None if d < 0 else self._ports[d]

    def expire(self, now: float) -> int:
        """Remove every entry older than ``aging``; how many went."""
        return int(lib.sw_table_expire(self.c, now))

    def forget(self, port: SwitchPort) -> None:
        """Remove every address learnt on ``port``."""
        i = self._index.get(port)
        if i is not None:
            mapping = list(range(len(self._ports)))
            mapping[i] = -1
            lib.sw_table_remap(self.c, ffi.new("int32_t[]", mapping), len(mapping))

    def reindex(self, ports: list[SwitchPort]) -> None:
        """The switch's ports are now ``ports``: entries follow their port to its new index, and those of a
        port that is gone are removed."""
        index = {p: i for i, p in enumerate(ports)}
        mapping = [index.get(p, -1) for p in self._ports]
        if mapping != list(range(len(mapping))):
            lib.sw_table_remap(self.c, ffi.new("int32_t[]", mapping), len(mapping))
        self._ports = list(ports)
        self._index = index

    def _raw(self) -> npt.NDArray[np.void]:
        raw = np.frombuffer(ffi.buffer(self._entries), dtype=_ENTRY_DTYPE)
        return raw[raw["key"] != 0].copy()

    def entries(self) -> dict[int, tuple[SwitchPort, float]]:
        """Every entry, aged ones not yet removed included: mac -> (port, when last seen)."""
        raw = self._raw()
        return {
            key % _MAC_LIMIT: (self._ports[key // _MAC_LIMIT], seen)
            for key, seen in zip(raw["key"].tolist(), raw["seen"].tolist(), strict=True)
        }

    def items(self, now: float) -> Iterator[tuple[int, SwitchPort, float]]:
        """(mac, port, age in seconds) of every live entry."""
        for mac, (port, seen) in self.entries().items():
            if now - seen <= self.aging:
                yield mac, port, now - seen
