"""A VALE-style learning switch whose ports are adapters (docs/architecture.md).

Like netmap's VALE (netmap_vale.c: nm_bdg_preflush, nm_bdg_flush, the learning bridge lookup), the switch is a
netmap *user* of its ports' rings: it takes what a port received from its RX rings a batch at a time, learns
the source MAC address of every frame, looks the destination up and puts the frame in the TX ring of the port
that address was learnt on. Broadcast, multicast and unknown unicast frames are flooded to every port but the
one they came from; a frame whose destination was learnt on its own source port is filtered (dropped, as a
bridge does). Learnt addresses age out after ``aging`` seconds without a frame from them.

A port of an adapter is its hardware rings; an adapter with a host port (a TAP, ``host=``) also brings its
host rings as a second switch port, named with a trailing ``^`` (netmap's name for a port's host rings), so
frames from the host stack count as coming from that port's host side.

A unicast frame moves zero copy (its slots swap buffer indices with free slots of the destination TX ring,
ports of the same allocator), and so does a flooded frame with a single destination (a switch of two ports);
a frame flooded to several ports is copied into each destination's own buffers. When the destination ring has
no room for a frame, the frame is dropped for that destination and counted, as VALE does: one slow port never
stalls the others, and the source ring is always released.

This module is the switch itself: its ports coming and going, which rings to sync and when, statistics. The
per-frame work of a batch is done by one of two forwarders, selected as the rest of the datapath is
(vhostmap.datapath.choice): the compiled kernel (compiled.py, with the address table in C memory:
CompiledMacTable) or the numpy/Python reference (reference.py, with MacTable). Both do the same thing, frame
for frame and counter for counter (tests/unit/test_switch_differential.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict

from vhostmap.datapath.choice import reference_selected
from vhostmap.ethernet import format_mac
from vhostmap.forwarding.passes import Owns, owned, owned_wake_fds
from vhostmap.forwarding.rings import ring_lock
from vhostmap.forwarding.switch import reference
from vhostmap.forwarding.switch.compiled import CompiledSwitch, flushes
from vhostmap.forwarding.switch.port import SwitchPort
from vhostmap.forwarding.switch.table import (
    DEFAULT_AGING,
    DEFAULT_MAX_ADDRESSES,
    AddressTable,
    CompiledMacTable,
    MacTable,
)
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.offload import ALL_NEEDS

log = logging.getLogger(__name__)

# A switch has at most this many ports (VALE: NM_BDG_MAXPORTS).
MAX_PORTS = 254


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
        # The compiled kernel's view of the ports (None: the reference forwards).
        self._compiled: CompiledSwitch | None = None
        if self.reference:
            self.table = MacTable(aging, max_addresses)
        else:
            ctable = CompiledMacTable(aging, max_addresses)
            self.table = ctable
            self._compiled = CompiledSwitch(ctable, self.share_offloads)
        self.clock = clock
        self.ports: list[SwitchPort] = []
        self._index: dict[SwitchPort, int] = {}

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
        if self._compiled is not None:
            self._compiled.reset(self.ports, self._index)

    # --- the forwarder --------------------------------------------------------------------------------------
    def rx_queues(self) -> list[tuple[NetmapAdapter, int]]:
        """The receive queues (port, RX ring) of every switch port: the sources of the switch."""
        return [(p.adapter, r) for p in self.ports for r in p.rx_rings]

    def part(self, owns: Owns) -> SwitchPart:
        """The forwarder of one datapath thread's share of the switch: the sources ``owns`` names."""
        if self._compiled is not None:
            self._compiled.threaded = True
        return SwitchPart(self, owns)

    def wake_fds(self, owns: Owns = None) -> list[int]:
        """Every attached adapter's fds (kicks, its TAP or socket), or with ``owns`` those of the receive
        queues it names. Every run syncs every RX ring it serves, host rings included, so fds
        that are not eventfds are always drained."""
        adapters = self.adapters
        rings = [[r for p in self.ports if p.adapter is a for r in p.rx_rings] for a in adapters]
        return owned_wake_fds(owns, adapters, rings)

    def run(self, owns: Owns = None) -> bool:
        """One round: every RX ring of every port once (those ``owns`` names); True when anything was
        received.

        When every port has compiled queues (and none is a host port), the whole round is one call
        (vhu_switch_pass: the syncs and sw_forward, in the order below); otherwise the calls below. A TX ring
        is synced under its lock: sources of other datapath threads may fill it at the same time.
        """
        if self._compiled is not None and self.ports:
            done = self._compiled.round(self.clock(), owns)
            if done is not None:
                return done
        self.share_offloads()  # cheap beside the Python round, and features may have changed
        now = self.clock()
        received = 0
        synced: set[tuple[SwitchPort, int]] = set()
        for src in self.ports:
            for q, ring_index in enumerate(src.rx_rings):
                if not owned(owns, src.adapter, ring_index):
                    continue
                src.adapter.rxsync(ring_index)
                slots, touched = self.forward(src, q, ring_index, now)
                received += slots
                # Deliver at once: the next source finds the rings emptied as far as their peers take frames.
                for dst, tx in touched:
                    with ring_lock(dst.adapter, tx):
                        dst.adapter.txsync(tx)
                    synced.add((dst, tx))
        # Frames still waiting in a TX ring (a guest had no receive buffers a moment ago) go out as soon as
        # there is room, whichever fd woke us; each ring by one thread.
        for p in self.ports:
            for k, tx in enumerate(p.tx_rings):
                if (p, tx) in synced or not flushes(owns, p, k):
                    continue
                with ring_lock(p.adapter, tx):
                    if p.adapter.tx_rings[tx].pending():
                        p.adapter.txsync(tx)
        return received > 0

    def share_offloads(self) -> None:
        """Each port's frames keep the offloads that every other port takes (NetmapAdapter.pass_offloads):
        a frame may go to any of them, a flood to all. Linear in the ports: it runs every Python round."""
        ports = self.ports
        takes = [p.accepted_offloads for p in ports]
        # What all ports before k take, and all after k: port k's is both together (one of each per port,
        # none for a switch whose ports all left).
        before, after = [], []
        acc = ALL_NEEDS
        for t in takes:
            before.append(acc)
            acc &= t
        acc = ALL_NEEDS
        for t in reversed(takes):
            after.append(acc)
            acc &= t
        after.reverse()
        for p, b, a in zip(ports, before, after, strict=True):
            p.pass_offloads(b & a)

    def forward(
        self, src: SwitchPort, q: int, ring_index: int, now: float
    ) -> tuple[int, list[tuple[SwitchPort, int]]]:
        """Forward the frames received on RX ring ``ring_index`` (the ``q``-th of ``src``) and release them,
        with the implementation this switch runs. Returns the slots taken and the destination (port, TX ring)
        pairs that were offered frames."""
        if self._compiled is None:
            return reference.forward(self.table, self.ports, self._index, src, q, ring_index, now)
        return self._compiled.forward(src, q, ring_index, now)

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


class SwitchPart:
    """One datapath thread's share of a switch (Switch.part): the sources ``owns`` names, and the flushing of
    the TX rings that go with them. The switch itself (ports, table, counters) stays one."""

    def __init__(self, switch: Switch, owns: Owns) -> None:
        self.switch = switch
        self.owns = owns
        self.name = f"switch {switch.name}"

    def wake_fds(self) -> list[int]:
        """The fds of the ports with a receive queue of this part."""
        return self.switch.wake_fds(self.owns)

    def run(self) -> bool:
        """One round of this part's sources."""
        return self.switch.run(self.owns)
