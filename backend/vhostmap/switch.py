"""A VALE-style learning switch whose ports are adapters (ARCHITECTURE.md, "Switch").

Like netmap's VALE (netmap_vale.c: nm_bdg_preflush, nm_bdg_flush, the learning bridge lookup), the switch is a
netmap *user* of its ports' rings: it takes what a port received from its RX rings a batch at a time, learns
the source MAC address of every frame, looks the destination up and puts the frame in the TX ring of the port
that address was learnt on. Broadcast, multicast and unknown unicast frames are flooded to every port but the
one they came from; a frame whose destination was learnt on its own source port is filtered (dropped, as a
bridge does). Learnt addresses age out after ``aging`` seconds without a frame from them.

A port of an adapter is its hardware rings; an adapter with a host port (a TAP, ``host=``) also brings its
host rings as a second switch port, named with a trailing ``^`` (netmap's name for a port's host rings), so
frames from the host stack count as coming from that port's host side.

Batches, not slots: the slots of a batch are read once into a numpy snapshot, frames (runs of NS_MOREFRAG
slots, kept whole) are delimited and checked with numpy, and the destination and source MAC addresses of
every frame are gathered from the buffers with one fancy index. Python runs once per *distinct* address of a
batch (a dict lookup), and once per destination port. A unicast frame moves zero copy: its slots swap buffer
indices with free slots of the destination TX ring (ports of the same allocator), and so does a flooded frame
with a single destination (a switch of two ports); a frame flooded to several ports is copied into each
destination's own buffers (whole buffers, by numpy). When the destination ring has no room for a
frame, the frame is dropped for that destination and counted, as VALE does: one slow port never stalls the
others, and the source ring is always released.

Two implementations do the per-frame work of a batch (ARCHITECTURE.md: "Per-packet work lives in compiled
kernels"): the compiled kernel ``sw_forward`` (datapath/switch.c, one C call per batch, the GIL released, the
address table in C memory owned by the switch: CompiledMacTable) and the numpy/Python reference described
above (``_forward_reference`` with MacTable), selected as the rest of the datapath is: the reference when
VHOSTMAP_REFERENCE_DATAPATH is set to anything but 0. Both do the same thing, frame for frame and counter for
counter (tests/unit/test_switch_differential.py); Python keeps the policy: which rings to sync and when, ports
coming and going, statistics.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import ffi, lib
from vhostmap.forward import PassOutcome, Side, fast_queues, struct_array, with_stash
from vhostmap.netmap.abi import (
    NM_RESERVED_BUFS,
    NS_BUF_CHANGED,
    NS_MOREFRAG,
    NS_NO_LEARN,
    RING_HEADER_SIZE,
    NetmapRing,
    RingView,
)
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import NetmapMemory
from vhostmap.vhost_user.kernels import REFERENCE_ENV
from vhostmap.vhost_user.port import FastQueues, VhostUserPort

log = logging.getLogger(__name__)

# Learnt addresses are forgotten after this many seconds without a frame from them (VALE and Linux bridges
# use 300 s too).
DEFAULT_AGING = 300.0
# Entries of the address table: beyond it new addresses are not learnt (their frames are flooded), so a guest
# sending from random addresses cannot grow the daemon's memory.
DEFAULT_MAX_ADDRESSES = 8192
# The largest table one may ask for (the compiled one takes 32 bytes per entry).
MAX_ADDRESSES_LIMIT = 1 << 20
# A switch has at most this many ports (VALE: NM_BDG_MAXPORTS).
MAX_PORTS = 254
ETH_HLEN = 14
ETH_ALEN = 6

_FLOOD = -1
_MULTICAST = 1 << 40  # the group bit: the lowest bit of the first byte, in a MAC read as a big-endian integer
_MAC_LIMIT = 1 << 48


def reference_selected(reference: bool | None = None) -> bool:
    """Whether switches run the numpy/Python reference: ``reference`` if given, else whether the
    VHOSTMAP_REFERENCE_DATAPATH environment variable is set to anything but 0 (as select_datapath decides)."""
    if reference is None:
        return os.environ.get(REFERENCE_ENV, "0").strip() not in ("", "0")
    return reference


def format_mac(key: int) -> str:
    """A MAC address held as a 48-bit integer -> ``52:54:00:00:00:10``."""
    return ":".join(f"{b:02x}" for b in key.to_bytes(ETH_ALEN, "big"))


@dataclass
class SwitchPortStats:
    """Counters of one switch port.

    From the port: ``rx_frames``/``rx_bytes`` received; of those ``forwarded`` to a learnt port, ``flooded``
    to all others, ``filtered`` (destination learnt on this same port) and ``dropped`` (malformed, or no
    room at a destination: counted once per destination that missed it). To the port: ``tx_frames``/
    ``tx_bytes`` put in its TX rings and ``tx_dropped`` frames that found its TX ring full.
    """

    rx_frames: int = 0
    rx_bytes: int = 0
    forwarded: int = 0
    flooded: int = 0
    filtered: int = 0
    dropped: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0


_STAT_FIELDS = tuple(f.name for f in fields(SwitchPortStats))


class SwitchPort:
    """One port of a switch: the hardware rings of ``adapter``, or its host rings when ``host``.

    ``rx_rings`` are the adapter's RX ring indexes the switch reads; a frame from the ``q``-th of them goes to
    TX ring ``tx_ring(q)`` of its destination.
    """

    def __init__(self, adapter: NetmapAdapter, host: bool = False) -> None:
        self.adapter = adapter
        self.host = host
        self.name = f"{adapter.name}^" if host else adapter.name
        # The counters live in C memory (struct sw_stats) that both implementations update.
        self.counters: Any = ffi.new("struct sw_stats *")
        if host:
            self.rx_rings = [adapter.num_rx_rings]
            self.tx_rings = [adapter.num_tx_rings]
        else:
            self.rx_rings = list(range(adapter.num_rx_rings))
            self.tx_rings = list(range(adapter.num_tx_rings))

    @property
    def stats(self) -> SwitchPortStats:
        """A snapshot of the port's counters."""
        c = self.counters
        return SwitchPortStats(*(int(getattr(c, name)) for name in _STAT_FIELDS))

    def tx_ring(self, q: int) -> int:
        """The TX ring index that frames from the ``q``-th RX ring of a source go to."""
        return self.tx_rings[q % len(self.tx_rings)]

    def __repr__(self) -> str:
        return f"SwitchPort({self.name!r})"


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


def _buffers(memory: NetmapMemory) -> npt.NDArray[np.uint8]:
    """The buffer pool as a (nbufs, buf_size) array: row ``i`` is buffer ``i``."""
    start = memory.buffers_offset
    return memory.array[start : start + memory.nbufs * memory.buf_size].reshape(memory.nbufs, memory.buf_size)


class _Batch:
    """The complete frames among the received slots [head, tail) of a source RX ring, read once.

    ``starts``/``nslots`` delimit frame ``i`` (slots relative to ``head``), ``used`` counts the slots the
    frames cover (a trailing unfinished frame stays in the ring), ``valid`` says whether every slot of a frame
    holds a usable buffer and length and its first slot a whole Ethernet header, ``dst``/``src`` are the MAC
    addresses (48-bit integers; 0 for invalid frames), ``lengths`` the frame lengths.
    """

    def __init__(self, port: SwitchPort, ring_index: int) -> None:
        kring = port.adapter.rx_rings[ring_index]
        ring = kring.ring
        memory = port.adapter.memory
        n = ring.num_slots
        self.ring = ring
        self.head = ring.head
        count = (ring.tail - self.head) % n
        snap = ring.slots[(self.head + np.arange(count)) % n]  # fancy indexing copies: our snapshot
        self.bufs = snap["buf_idx"].astype(np.int64)
        self.lens = snap["len"].astype(np.int64)
        self.flags = snap["flags"]
        ends = np.flatnonzero((self.flags & NS_MOREFRAG) == 0) + 1
        # Fragments that fill the whole ring without ending a frame can never complete: all are dropped.
        self.stuck = not ends.size and count == n - 1
        self.used = count if self.stuck else int(ends[-1]) if ends.size else 0
        self.starts = np.concatenate((np.zeros(1, dtype=np.int64), ends[:-1])) if ends.size else ends
        self.nslots = ends - self.starts
        usable = (
            (self.bufs >= NM_RESERVED_BUFS)
            & (self.bufs < memory.nbufs)
            & (self.lens >= 1)
            & (self.lens <= memory.buf_size)
        )
        if ends.size:
            self.valid = np.logical_and.reduceat(usable[: int(ends[-1])], self.starts) & (
                self.lens[self.starts] >= ETH_HLEN
            )
            self.lengths = np.add.reduceat(self.lens[: int(ends[-1])], self.starts)
            first = np.where(self.valid, self.bufs[self.starts], 0)
            offsets = memory.buffers_offset + first * memory.buf_size
            header = memory.array[offsets[:, None] + np.arange(2 * ETH_ALEN)]
            # Each address in the low 6 bytes of a big-endian u64: byte 0 of the MAC is the most significant.
            wide = np.zeros((len(first), 16), dtype=np.uint8)
            wide[:, 2:8] = header[:, :ETH_ALEN]
            wide[:, 10:16] = header[:, ETH_ALEN:]
            macs = wide.view(">u8").astype(np.int64)
            self.dst = np.where(self.valid, macs[:, 0], 0)
            self.src = np.where(self.valid, macs[:, 1], 0)
            self.no_learn = (self.flags[self.starts] & NS_NO_LEARN) != 0
        else:
            self.valid = np.zeros(0, dtype=bool)
            self.lengths = self.dst = self.src = np.zeros(0, dtype=np.int64)
            self.no_learn = np.zeros(0, dtype=bool)

    def __len__(self) -> int:
        return len(self.starts)

    def release(self) -> None:
        """Hand the slots of the batch back to the ring (released at the next rxsync)."""
        n = self.ring.num_slots
        self.ring.head = self.ring.cur = (self.head + self.used) % n


class Switch:
    """A learning switch (a forwarder for the worker) named ``name``.

    ``aging``: seconds an address stays learnt without a frame from it. ``max_addresses``: the most addresses
    learnt at once. ``clock``: the time source (tests pass their own). ``reference``: run the numpy/Python
    reference instead of the compiled kernel (default: as VHOSTMAP_REFERENCE_DATAPATH says). Ports attach and
    detach at any time between runs (under the datapath lock). Every port must have the buffer size of the
    first one; ports of the same allocator exchange buffers, others copy.
    """

    def __init__(
        self,
        name: str,
        *,
        aging: float = DEFAULT_AGING,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
        reference: bool | None = None,
    ) -> None:
        self.name = name
        self.reference = reference_selected(reference)
        self.table: AddressTable
        if self.reference:
            self.table = MacTable(aging, max_addresses)
        else:
            self._ctable = CompiledMacTable(aging, max_addresses)
            self.table = self._ctable
        self.clock = clock
        self.ports: list[SwitchPort] = []
        self._index: dict[SwitchPort, int] = {}
        # The compiled kernel's view of the ports, made on first use and dropped whenever the ports change.
        self._sources: dict[tuple[SwitchPort, int], _Source] = {}
        self._targets: dict[int, _Targets] = {}
        self._pools: dict[int, _Pool] = {}
        self._pass: _SwitchPass | None = None
        self._outcome = PassOutcome()

    @property
    def aging(self) -> float:
        """Seconds a learnt address lives without traffic from it."""
        return self.table.aging

    # --- ports ----------------------------------------------------------------------------------------------
    def attach(self, adapter: NetmapAdapter) -> list[SwitchPort]:
        """Add ``adapter`` (its hardware rings, and its host rings if it has a host port); the new ports.

        Raises ValueError when it is already attached, when its buffers differ in size from the other
        ports', or when the switch is full.
        """
        if any(p.adapter is adapter for p in self.ports):
            raise ValueError(f"{self.name}: port {adapter.name} is already attached")
        if any(p.adapter.name == adapter.name for p in self.ports):
            raise ValueError(f"{self.name}: a port named {adapter.name} is already attached")
        if self.ports and adapter.memory.buf_size != self.ports[0].adapter.memory.buf_size:
            raise ValueError(
                f"{self.name}: {adapter.name} has {adapter.memory.buf_size}-byte buffers, the switch "
                f"{self.ports[0].adapter.memory.buf_size}-byte ones"
            )
        new = [SwitchPort(adapter)]
        if adapter.host_port is not None:
            new.append(SwitchPort(adapter, host=True))
        if len(self.ports) + len(new) > MAX_PORTS:
            raise ValueError(f"{self.name}: no room for {adapter.name} ({MAX_PORTS} ports at most)")
        self.ports += new
        self._reindex()
        log.info(
            "%s: attached %s",
            self.name,
            ", ".join(p.name for p in new),
            extra={"switch": self.name, "port": adapter.name},
        )
        return new

    def detach(self, adapter: NetmapAdapter) -> list[SwitchPort]:
        """Remove ``adapter``'s ports and forget the addresses learnt on them; the removed ports.

        Raises KeyError when it is not attached.
        """
        gone = [p for p in self.ports if p.adapter is adapter]
        if not gone:
            raise KeyError(f"{self.name}: port {adapter.name} is not attached")
        for p in gone:
            self.table.forget(p)
        self.ports = [p for p in self.ports if p.adapter is not adapter]
        self._reindex()
        log.info(
            "%s: detached %s", self.name, adapter.name, extra={"switch": self.name, "port": adapter.name}
        )
        return gone

    def port(self, name: str) -> SwitchPort:
        """The switch port called ``name`` (``vm0``, or ``vm0^`` for its host rings)."""
        for p in self.ports:
            if p.name == name:
                return p
        raise KeyError(f"{self.name}: no port {name}")

    @property
    def adapters(self) -> list[NetmapAdapter]:
        """The attached adapters, in attach order."""
        out: list[NetmapAdapter] = []
        for p in self.ports:
            if p.adapter not in out:
                out.append(p.adapter)
        return out

    def _reindex(self) -> None:
        self._index = {p: i for i, p in enumerate(self.ports)}
        self.table.reindex(self.ports)
        self._sources.clear()
        self._targets.clear()
        self._pools.clear()
        self._pass = None

    # --- the forwarder --------------------------------------------------------------------------------------
    def wake_fds(self) -> list[int]:
        """Every attached adapter's fds (kicks, its TAP or socket). Every run syncs every RX ring of every
        port, host rings included, so fds that are not eventfds are always drained."""
        fds: list[int] = []
        for adapter in self.adapters:
            fds += [fd for fd in adapter.wake_fds() if fd not in fds]
        return fds

    def run(self) -> bool:
        """One round: every RX ring of every port once; True when anything was received.

        When every port is a vhost-user port that can take the compiled path, the whole round is one call
        (vhu_switch_pass: the syncs and sw_forward, in the order below); otherwise the calls below.
        """
        plan = self._compiled_pass()
        if plan is not None:
            out = self._outcome
            received = lib.vhu_switch_pass(
                self._ctable.c,
                plan.sources,
                plan.nsources,
                plan.tx,
                plan.ntx,
                plan.synced,
                self.clock(),
                out.failed,
                out.status,
            )
            return out.check(plan) or received > 0
        now = self.clock()
        received = 0
        synced: set[tuple[SwitchPort, int]] = set()
        for src in self.ports:
            for q, ring_index in enumerate(src.rx_rings):
                src.adapter.rxsync(ring_index)
                slots, touched = self._forward(src, q, ring_index, now)
                received += slots
                # Deliver at once: the next source finds the rings emptied as far as their peers take frames.
                for dst, tx in touched:
                    dst.adapter.txsync(tx)
                    synced.add((dst, tx))
        # Frames still waiting in a TX ring (a guest had no receive buffers a moment ago) go out as soon as
        # there is room, whichever fd woke us.
        for p in self.ports:
            for tx in p.tx_rings:
                if (p, tx) not in synced and p.adapter.tx_rings[tx].pending():
                    p.adapter.txsync(tx)
        return received > 0

    def _forward(
        self, src: SwitchPort, q: int, ring_index: int, now: float
    ) -> tuple[int, list[tuple[SwitchPort, int]]]:
        """Forward the frames received on RX ring ``ring_index`` (the ``q``-th of ``src``) and release them,
        with the implementation this switch runs. Returns the slots taken and the destination (port, TX ring)
        pairs that were offered frames."""
        if self.reference:
            return self._forward_reference(src, q, ring_index, now)
        return self._forward_compiled(src, q, ring_index, now)

    def _compiled_pass(self) -> _SwitchPass | None:
        """The round as one vhu_switch_pass for the ports as they are now, or None (the Python round)."""
        if self.reference or not self.ports:
            return None
        queues: dict[NetmapAdapter, FastQueues] = {}
        for p in self.ports:
            if p.host:
                return None
            if p.adapter not in queues:
                fast = fast_queues(p.adapter)
                if fast is None:
                    return None
                queues[p.adapter] = fast
        versions = tuple(q.version for q in queues.values())
        plan = self._pass
        if plan is not None and plan.versions == versions and plan.ports == self.ports:
            return plan
        tx_index: dict[tuple[SwitchPort, int], int] = {}
        tx_items: list[Any] = []
        sides: list[Side] = []
        for p in self.ports:
            assert isinstance(p.adapter, VhostUserPort)
            for t in p.tx_rings:
                d = queues[p.adapter].tx.get(t)
                if d is None:
                    return None  # nowhere to deliver: the Python round drops as a NIC without carrier
                tx_index[(p, t)] = len(tx_items)
                tx_items.append(with_stash(d, p.adapter))
        src_items: list[Any] = []
        keep: list[Any] = [list(queues.values())]
        for p in self.ports:
            assert isinstance(p.adapter, VhostUserPort)
            for q, ring_index in enumerate(p.rx_rings):
                source = self._sources.get((p, q))
                if source is None:
                    source = self._sources[(p, q)] = self._bind(p, q, ring_index)
                item = ffi.new("struct vhu_switch_source *")
                rx = queues[p.adapter].rx.get(ring_index)
                if rx is not None:
                    item.rx = with_stash(rx, p.adapter)[0]
                item.fwd = source.c
                dest_tx = ffi.new("uint32_t[]", [tx_index[pair] for pair in source.targets.pairs])
                item.dest_tx = dest_tx
                keep += [source, dest_tx]
                src_items.append(item)
                sides.append((p.adapter, p.adapter.rx_rings[ring_index], True))
        for p, t in tx_index:
            assert isinstance(p.adapter, VhostUserPort)
            sides.append((p.adapter, p.adapter.tx_rings[t], False))
        self._pass = plan = _SwitchPass(versions, list(self.ports), src_items, tx_items, sides, keep)
        return plan

    # --- the compiled kernel -------------------------------------------------------------------------------
    def _forward_compiled(
        self, src: SwitchPort, q: int, ring_index: int, now: float
    ) -> tuple[int, list[tuple[SwitchPort, int]]]:
        """_forward_reference in one call of the compiled kernel (sw_forward)."""
        source = self._sources.get((src, q))
        if source is None:
            source = self._sources[(src, q)] = self._bind(src, q, ring_index)
        c = source.c
        used = int(lib.sw_forward(self._ctable.c, c, now))
        n = c.ntouched
        if not n:
            return used, []
        targets = source.targets.pairs
        return used, [targets[d] for d in ffi.unpack(c.touched, n)]

    def _pool(self, memory: NetmapMemory) -> _Pool:
        pool = self._pools.get(id(memory))
        if pool is None:
            pool = self._pools[id(memory)] = _Pool(memory, len(self._pools))
        return pool

    def _targets_for(self, q: int) -> _Targets:
        """The TX ring of every port that frames from the ``q``-th RX ring of a source go to."""
        targets = self._targets.get(q)
        if targets is None:
            targets = self._targets[q] = _Targets(self.ports, q, self._pool)
        return targets

    def _bind(self, src: SwitchPort, q: int, ring_index: int) -> _Source:
        kring = src.adapter.rx_rings[ring_index]
        return _Source(
            kring.ring, self._index[src], self._targets_for(q), self._pool(src.adapter.memory), src.counters
        )

    # --- the reference --------------------------------------------------------------------------------------
    def _forward_reference(
        self, src: SwitchPort, q: int, ring_index: int, now: float
    ) -> tuple[int, list[tuple[SwitchPort, int]]]:
        """Forward the frames received on RX ring ``ring_index`` (the ``q``-th of ``src``) and release them.
        Returns the slots taken and the destination (port, TX ring) pairs that got frames."""
        ring = src.adapter.rx_rings[ring_index].ring
        if ring.tail == ring.head:
            return 0, []
        batch = _Batch(src, ring_index)
        st = src.counters
        touched: list[tuple[SwitchPort, int]] = []
        if batch.stuck:
            st.dropped += 1
        elif len(batch):
            valid = batch.valid
            st.rx_frames += len(batch)
            st.rx_bytes += int(batch.lengths.sum())
            st.dropped += len(batch) - int(np.count_nonzero(valid))
            # Learning: one dict update per distinct unicast source address of the batch.
            learn = valid & ((batch.src & _MULTICAST) == 0) & (batch.src != 0) & ~batch.no_learn
            if learn.any():
                for mac in np.unique(batch.src[learn]).tolist():
                    self.table.learn(mac, src, now)
            # Lookup: one per distinct destination address; group addresses flood.
            uniq, inverse = np.unique(batch.dst, return_inverse=True)
            codes = np.empty(len(uniq), dtype=np.int64)
            for j, mac in enumerate(uniq.tolist()):
                port = None if mac & _MULTICAST else self.table.lookup(mac, now)
                codes[j] = _FLOOD if port is None else self._index[port]
            dest = codes[inverse]
            s = self._index[src]
            flood = valid & (dest == _FLOOD)
            st.flooded += int(np.count_nonzero(flood))
            st.forwarded += int(np.count_nonzero(valid & (dest >= 0) & (dest != s)))
            st.filtered += int(np.count_nonzero(valid & (dest == s)))
            # A flood on a switch of two ports has one destination: it moves like a unicast frame.
            lone = len(self.ports) == 2
            for d, dst in enumerate(self.ports):
                if d == s:
                    continue
                sel = np.flatnonzero(flood | (valid & (dest == d)))
                if sel.size:
                    tx = dst.tx_ring(q)
                    self._deliver(src, batch, sel, (dest[sel] == d) | lone, dst, tx)
                    touched.append((dst, tx))
        batch.release()
        return batch.used, touched

    @staticmethod
    def _deliver(
        src: SwitchPort,
        batch: _Batch,
        sel: npt.NDArray[np.int64],
        unicast: npt.NDArray[np.bool_],
        dst: SwitchPort,
        tx: int,
    ) -> None:
        """Put frames ``sel`` of ``batch`` in TX ring ``tx`` of ``dst``, in order, as far as they fit whole;
        the rest are dropped and counted. ``unicast[i]`` says frame ``sel[i]`` goes only there: it moves zero
        copy when both ports share an allocator. The ring's head advances; the caller txsyncs."""
        ring = dst.adapter.tx_rings[tx].ring
        dn = ring.num_slots
        head = ring.head
        dmem, smem = dst.adapter.memory, src.adapter.memory
        free = tx_room(ring.slots, head, (ring.tail - head) % dn, dmem.nbufs)
        nslots = batch.nslots[sel]
        cum = np.cumsum(nslots)
        take = int(np.searchsorted(cum, len(free), side="right"))  # frames that fit whole, in order
        missed = len(sel) - take
        if missed:
            dst.counters.tx_dropped += missed
            src.counters.dropped += missed
        if take == 0:
            return
        total = int(cum[take - 1])
        ns = nslots[:take]
        # The source slot (relative to the batch head) of each destination slot; a frame's slots are in a row.
        rel = np.arange(total) + np.repeat(batch.starts[sel[:take]] - (cum[:take] - ns), ns)
        d_idx = (head + np.arange(total)) % dn
        sbufs = batch.bufs[rel]
        dbufs = free[:total]
        swap = np.repeat(unicast[:take], ns) if smem is dmem else np.zeros(total, dtype=bool)
        copy = ~swap
        if copy.any():
            # Whole rows in one numpy copy, as many bytes as the longest slot copied needs; the bytes of a row
            # past its own slot's length keep what the destination buffer held (as the compiled kernel's
            # copy of len bytes leaves them).
            lens = batch.lens[rel][copy]
            width = int(lens.max())
            dview = _buffers(dmem)
            rows = _buffers(smem)[sbufs[copy], :width]  # fancy indexing copies
            beyond = np.arange(width) >= lens[:, None]
            if beyond.any():
                rows[beyond] = dview[dbufs[copy], :width][beyond]
            dview[dbufs[copy], :width] = rows
        slots = ring.slots
        if swap.any():
            s_idx = (batch.head + rel[swap]) % batch.ring.num_slots
            slots["buf_idx"][d_idx[swap]] = sbufs[swap]
            batch.ring.slots["buf_idx"][s_idx] = dbufs[swap]
            batch.ring.slots["flags"][s_idx] = NS_BUF_CHANGED
        slots["len"][d_idx] = batch.lens[rel]
        slots["flags"][d_idx] = (batch.flags[rel] & NS_MOREFRAG) | np.where(swap, NS_BUF_CHANGED, 0)
        ring.head = ring.cur = (head + total) % dn
        dst.counters.tx_frames += take
        dst.counters.tx_bytes += int(batch.lengths[sel[:take]].sum())

    # --- state ----------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        """Ports with their counters, and the learnt addresses."""
        now = self.clock()
        return {
            "name": self.name,
            "aging": self.aging,
            "ports": {p.name: asdict(p.stats) for p in self.ports},
            "addresses": [
                {"mac": format_mac(mac), "port": port.name, "age": round(age, 3)}
                for mac, port, age in sorted(self.table.items(now), key=lambda e: e[0])
            ],
            "not_learnt": self.table.not_learnt,
        }


class _Pool:
    """A buffer pool as the kernel sees it: ``memory``'s mapping held exported (it stays mapped while a kernel
    may use it), its address, and a number shared by the ports of this allocator in one binding."""

    __slots__ = ("address", "export", "id", "memory")

    def __init__(self, memory: NetmapMemory, id: int) -> None:
        self.memory = memory
        self.id = id
        region = memory.region
        end = memory.buffers_offset + memory.nbufs * memory.buf_size
        if end > region.size:
            raise ValueError(f"buffer pool ends at {end}, past the region of {region.size} bytes")
        self.export = ffi.from_buffer(region.array)
        self.address = int(ffi.cast("uintptr_t", self.export))

    def ring(self, out: Any, ring: RingView, stats: Any) -> None:
        """Fill ``out`` (a struct sw_ring) with ``ring``, a ring of this pool's region (its view checked that
        the header and ``num_slots`` slots lie inside), and ``stats``."""
        m = self.memory
        if ring.region is not m.region:
            raise ValueError("ring outside its port's memory")
        base = self.address + ring.offset
        out.slots = ffi.cast("struct nm_slot *", base + RING_HEADER_SIZE)
        out.head = ffi.cast("uint32_t *", base + NetmapRing.head.offset)
        out.cur = ffi.cast("uint32_t *", base + NetmapRing.cur.offset)
        out.tail = ffi.cast("uint32_t *", base + NetmapRing.tail.offset)
        out.bufs = ffi.cast("uint8_t *", self.address + m.buffers_offset)
        out.num_slots = ring.num_slots
        out.nbufs = m.nbufs
        out.mem = self.id
        out.stats = stats


class _SwitchPass:
    """A switch round as vhu_switch_pass takes it: the sources, the TX queues, and who to tell when a sync
    fails (``sides``: the sources, then the TX queues). Good while ``versions`` (of the ports' FastQueues)
    and ``ports`` hold; ``keep`` holds what the structs point into."""

    def __init__(
        self,
        versions: tuple[int, ...],
        ports: list[SwitchPort],
        sources: list[Any],
        tx: list[Any],
        sides: list[Side],
        keep: list[Any],
    ) -> None:
        self.versions = versions
        self.ports = ports
        self.nsources, self.ntx = len(sources), len(tx)
        self.sources = struct_array("struct vhu_switch_source", sources)
        self.tx = struct_array("struct vhu_queue", tx)
        self.synced = ffi.new("uint8_t[]", max(self.ntx, 1))
        self.sides = sides
        self.keep = keep


class _Targets:
    """``c``: a struct sw_ring per port, for the TX ring that frames from the ``q``-th RX ring of a source go
    to; ``pairs``: the same as (port, TX ring index), for the caller's txsyncs."""

    __slots__ = ("c", "keep", "pairs")

    def __init__(self, ports: list[SwitchPort], q: int, pool: Callable[[NetmapMemory], _Pool]) -> None:
        self.c = ffi.new("struct sw_ring[]", max(len(ports), 1))
        self.pairs = [(p, p.tx_ring(q)) for p in ports]
        self.keep: list[Any] = []  # what the structs point into: counters, exported mappings
        for d, (p, tx) in enumerate(self.pairs):
            memory = pool(p.adapter.memory)
            memory.ring(self.c[d], p.adapter.tx_rings[tx].ring, p.counters)
            self.keep += [p.counters, memory]


class _Source:
    """The struct sw_source of one RX ring of the switch port with index ``port``: the ring, its
    destinations, the scratch arrays of its batches."""

    __slots__ = ("c", "keep", "targets")

    def __init__(self, ring: RingView, port: int, targets: _Targets, pool: _Pool, counters: Any) -> None:
        n, nports = ring.num_slots, len(targets.pairs)
        # The kernel addresses every pool with the source's buffer size (attach lets no other size in).
        if any(p.adapter.memory.buf_size != pool.memory.buf_size for p, _ in targets.pairs):
            raise ValueError("switch ports with different buffer sizes")
        self.targets = targets
        self.c = c = ffi.new("struct sw_source *")
        pool.ring(c.rx, ring, counters)
        c.ports = targets.c
        c.nports = nports
        c.port = port
        c.buf_size = pool.memory.buf_size
        self.keep = [
            ffi.new("struct sw_slot[]", n),
            ffi.new("struct sw_frame[]", n),
            ffi.new("uint64_t[]", n),
            ffi.new("uint32_t[]", n),
            ffi.new("struct sw_dest[]", nports),
            ffi.new("uint32_t[]", nports),
            counters,
            pool,
        ]
        c.snap, c.frames, c.macs, c.dbufs, c.dests, c.touched = self.keep[:6]


def tx_room(slots: npt.NDArray[np.void], head: int, space: int, nbufs: int) -> npt.NDArray[np.int64]:
    """Buffer indexes of the ``space`` free slots of a TX ring from ``head``, stopping early at the first slot
    without a usable buffer (buffer 0 after a ring reinit): where a writer may put frames."""
    n = len(slots)
    bufs = slots["buf_idx"][(head + np.arange(space)) % n].astype(np.int64)
    bad = np.flatnonzero((bufs < NM_RESERVED_BUFS) | (bufs >= nbufs))
    return bufs[: int(bad[0])] if bad.size else bufs
