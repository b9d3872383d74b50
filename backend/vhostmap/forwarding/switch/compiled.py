"""The switch's compiled forwarding: its ports' rings as the kernels see them, and a whole round in C.

``sw_forward`` (datapath/switch.c) forwards one source ring's batch in one call, the GIL released, over the
struct sw_ring of every destination and the address table in C memory (CompiledMacTable). When every port
has compiled queues (``NetmapAdapter.fast_queues``) and none is a host port, the whole round is one call:
vhu_switch_pass = every source's rxsync, sw_forward, the txsync of each TX ring it touched, then the TX rings
still holding frames; each frame copied once per destination, from guest to guest (passes.OneCopy). The
structs are built on first use and dropped whenever the ports change (``reset``) or a port's queues do (their
version).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vhostmap.datapath import ffi, lib
from vhostmap.ethernet import ETH_HLEN
from vhostmap.forwarding.passes import (
    BUDGET,
    BURST,
    OneCopy,
    Owns,
    PassOutcome,
    Side,
    owned,
    struct_array,
    with_stash,
)
from vhostmap.forwarding.switch.port import SwitchPort
from vhostmap.forwarding.switch.table import CompiledMacTable
from vhostmap.netmap.abi import RING_HEADER_SIZE, NetmapRing, RingView
from vhostmap.netmap.adapter import FastQueues, NetmapAdapter
from vhostmap.netmap.allocator import NetmapMemory


class CompiledSwitch:
    """The compiled kernel's view of a switch's ``ports`` (``index``: each one's position), over ``table``.

    ``forward`` runs sw_forward for one source ring; ``round`` runs a whole vhu_switch_pass when the ports
    allow it (else returns None). ``reset`` after every attach or detach. A round may be one datapath
    thread's part of the switch (``owns``: its receive queues); each part has its own pass.
    """

    def __init__(self, table: CompiledMacTable, share_offloads: Callable[[], None]) -> None:
        self.table = table
        # Called whenever a pass is made for new ports or versions (their features may have changed).
        self._share_offloads = share_offloads
        self.ports: list[SwitchPort] = []
        self.index: dict[SwitchPort, int] = {}
        self._sources: dict[tuple[SwitchPort, int], _Source] = {}
        self._pools: dict[int, _Pool] = {}
        self._passes: dict[Owns, _SwitchPass] = {}
        self._outcomes: dict[Owns, PassOutcome] = {}
        # Several datapath threads run parts of this switch (Switch.part): its TX rings take their locks, and
        # a frame's tickets never stay in one (sw_deliver). With one thread, none: one copy everywhere.
        self.threaded = False

    def reset(self, ports: list[SwitchPort], index: dict[SwitchPort, int]) -> None:
        """The switch's ports are now ``ports``: every struct made for the old ones goes."""
        self.ports, self.index = ports, index
        self._sources.clear()
        self._pools.clear()
        self._passes.clear()

    def round(self, now: float, owns: Owns = None) -> bool | None:
        """One whole round as vhu_switch_pass (True when anything was received), or None when some port
        takes the Python path this round. ``owns``: the receive queues of this thread's part."""
        plan = self._compiled_pass(owns)
        if plan is None:
            return None
        out = self._outcomes.get(owns)
        if out is None:
            out = self._outcomes[owns] = PassOutcome()
        # The TX rings other threads' parts flush start each round as synced (vhu_switch_pass).
        received = lib.vhu_switch_pass(
            self.table.c,
            plan.sources,
            plan.nsources,
            plan.tx,
            plan.ntx,
            plan.flush,
            plan.synced,
            plan.refs.c,
            BURST,
            BUDGET,
            now,
            out.failed,
            out.status,
        )
        return out.check(plan.sides) or received > 0

    def _compiled_pass(self, owns: Owns) -> _SwitchPass | None:
        """The round as one vhu_switch_pass for the ports as they are now, or None (the Python round)."""
        if not self.ports:
            return None
        plan = self._passes.get(owns)
        if plan is not None and plan.current(self.ports):
            return plan
        queues: dict[NetmapAdapter, FastQueues] = {}
        for p in self.ports:
            if p.host:
                return None
            if p.adapter not in queues:
                fast = p.adapter.fast_queues()
                if fast is None:
                    return None
                queues[p.adapter] = fast
        versions = tuple(q.version for q in queues.values())
        if plan is not None and plan.versions == versions and plan.ports == self.ports:
            return plan
        self._share_offloads()
        tx_index: dict[tuple[SwitchPort, int], int] = {}
        tx_items: list[Any] = []
        flush: list[int] = []
        sides: list[Side] = []
        for p in self.ports:
            for k, t in enumerate(p.tx_rings):
                d = queues[p.adapter].tx.get(t)
                if d is None:
                    return None  # nowhere to deliver: the Python round drops as a NIC without carrier
                tx_index[(p, t)] = len(tx_items)
                tx_items.append(with_stash(d, queues[p.adapter]))
                flush.append(0 if flushes(owns, p, k) else 1)
        src_items: list[Any] = []
        keep: list[Any] = [list(queues.values())]
        cap = 1
        for p in self.ports:
            for q, ring_index in enumerate(p.rx_rings):
                if not owned(owns, p.adapter, ring_index):
                    continue
                source = self._sources.get((p, q))
                if source is None:
                    source = self._sources[(p, q)] = self._bind(p, q, ring_index)
                # A TX ring's lock follows the queue it delivers into, which a control-plane change (a new
                # version) may have remapped.
                source.targets.relock(self.threaded)
                item = ffi.new("struct vhu_switch_source *")
                rx = queues[p.adapter].rx.get(ring_index)
                if rx is not None:
                    item.rx = with_stash(rx, queues[p.adapter])[0]
                    cap = max(cap, p.adapter.rx_rings[ring_index].ring.num_slots)
                item.fwd = source.c
                dest_tx = ffi.new("uint32_t[]", [tx_index[pair] for pair in source.targets.pairs])
                item.dest_tx = dest_tx
                keep += [source, dest_tx]
                src_items.append(item)
                sides.append((p.adapter, p.adapter.rx_rings[ring_index], True))
        for p, t in tx_index:
            sides.append((p.adapter, p.adapter.tx_rings[t], False))
        refs = OneCopy(cap, ETH_HLEN)
        plan = _SwitchPass(list(queues), versions, list(self.ports), src_items, tx_items, sides, refs, keep)
        plan.flush = ffi.new("uint8_t[]", flush or [0])
        self._passes[owns] = plan
        return plan

    def forward(
        self, src: SwitchPort, q: int, ring_index: int, now: float
    ) -> tuple[int, list[tuple[SwitchPort, int]]]:
        """reference.forward in one call of the compiled kernel (sw_forward): the slots taken and the
        destination (port, TX ring) pairs that were offered frames."""
        source = self._sources.get((src, q))
        if source is None:
            source = self._sources[(src, q)] = self._bind(src, q, ring_index)
        source.targets.relock(self.threaded)  # the Python round follows no version: read the locks afresh
        c = source.c
        used = int(lib.sw_forward(self.table.c, c, now))
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

    def _bind(self, src: SwitchPort, q: int, ring_index: int) -> _Source:
        kring = src.adapter.rx_rings[ring_index]
        counters = src.rx_counters[q]
        targets = _Targets(self.ports, q, self._pool, self.index[src], counters)
        memory = self._pool(src.adapter.memory)
        return _Source(kring.ring, self.index[src], targets, memory, counters, src.vnet)


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
    """A switch round as vhu_switch_pass takes it: the sources, the TX queues, who to tell when a sync
    fails (``sides``: the sources, then the TX queues), and the references of its one-copy frames. Good while
    ``versions`` (of the FastQueues of ``adapters``, the ports' adapters) and ``ports`` hold; ``keep`` holds
    what the structs point into."""

    def __init__(
        self,
        adapters: list[NetmapAdapter],
        versions: tuple[int, ...],
        ports: list[SwitchPort],
        sources: list[Any],
        tx: list[Any],
        sides: list[Side],
        refs: OneCopy,
        keep: list[Any],
    ) -> None:
        self.versions = versions
        self.ports = ports
        self._checks = list(zip(adapters, versions, strict=True))
        self.nsources, self.ntx = len(sources), len(tx)
        self.sources = struct_array("struct vhu_switch_source", sources)
        self.tx = struct_array("struct vhu_queue", tx)
        self.synced = ffi.new("uint8_t[]", max(self.ntx, 1))
        self.flush: Any = None  # set by the caller: the initial `synced` of each round
        self.sides = sides
        self.refs = refs
        self.keep = keep

    def current(self, ports: list[SwitchPort]) -> bool:
        """Whether the plan still holds for ``ports``: the same ports (none a host port, or there would be
        no plan), each adapter's compiled queues of the same version. Every round asks: the few calls it
        takes instead of _compiled_pass's whole walk."""
        if ports != self.ports:
            return False
        for adapter, version in self._checks:
            fast = adapter.fast_queues()
            if fast is None or fast.version != version:
                return False
        return True


class _Targets:
    """``c``: a struct sw_ring per port, for the TX ring that frames from the ``q``-th RX ring of source
    ``src`` (a port index) go to, with that ring's counters and lock; the source's own entry carries its RX
    ring's counters (``counters``) instead, what the kernel counts the source's frames in. ``pairs``: the same
    as (port, TX ring index), for the caller's txsyncs."""

    __slots__ = ("c", "keep", "pairs")

    def __init__(
        self,
        ports: list[SwitchPort],
        q: int,
        pool: Callable[[NetmapMemory], _Pool],
        src: int,
        counters: Any,
    ) -> None:
        self.c = ffi.new("struct sw_ring[]", max(len(ports), 1))
        self.pairs = [(p, p.tx_ring(q)) for p in ports]
        self.keep: list[Any] = []  # what the structs point into: counters, exported mappings
        for d, (p, tx) in enumerate(self.pairs):
            memory = pool(p.adapter.memory)
            stats = counters if d == src else p.tx_counters[tx]
            memory.ring(self.c[d], p.adapter.tx_rings[tx].ring, stats)
            self.c[d].vnet = p.vnet
            self.keep += [stats, memory]
        # The locks: relock, by whoever binds it (none until then).

    def relock(self, shared: bool) -> None:
        """Point every destination at the lock of its TX ring as the ports map them now (tx_lock); or at none
        when not ``shared`` (one thread serves the whole switch)."""
        for d, (p, tx) in enumerate(self.pairs):
            self.c[d].lock = p.adapter.tx_lock(tx) if shared else ffi.NULL


class _Source:
    """The struct sw_source of one RX ring of the switch port with index ``port``: the ring, its
    destinations, the scratch arrays of its batches."""

    __slots__ = ("c", "keep", "targets")

    def __init__(
        self, ring: RingView, port: int, targets: _Targets, pool: _Pool, counters: Any, vnet: bool
    ) -> None:
        n, nports = ring.num_slots, len(targets.pairs)
        # The kernel addresses every pool with the source's buffer size (attach lets no other size in).
        if any(p.adapter.memory.buf_size != pool.memory.buf_size for p, _ in targets.pairs):
            raise ValueError("switch ports with different buffer sizes")
        self.targets = targets
        self.c = c = ffi.new("struct sw_source *")
        pool.ring(c.rx, ring, counters)
        c.rx.vnet = vnet
        c.ports = targets.c
        c.nports = nports
        c.port = port
        c.buf_size = pool.memory.buf_size
        self.keep = [
            ffi.new("struct sw_slot[]", n),
            ffi.new("struct sw_frame[]", n),
            ffi.new("uint64_t[]", n),
            ffi.new("uint32_t[]", n),
            ffi.new("uint32_t[]", nports),
            counters,
            pool,
        ]
        c.snap, c.frames, c.macs, c.dbufs, c.touched = self.keep[:5]


def flushes(owns: Owns, port: SwitchPort, k: int) -> bool:
    """Whether the part ``owns`` describes flushes the ``k``-th TX ring of ``port`` (syncs it when it still
    holds frames): the part of the port's RX ring of that position (modulo their number), so that exactly one
    thread does it, the one a kick of that port wakes."""
    return owned(owns, port.adapter, port.rx_rings[k % len(port.rx_rings)])
