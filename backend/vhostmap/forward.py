"""Simple forwarders: a link cross-connecting two ports, and a sink for a port nobody consumes.

They are netmap *users* of the ports' rings, exactly like an application: they read received slots between
head and tail of an RX ring, hand them to a TX ring by swapping buffer indices (zero copy: both rings come
from the same allocator, as netmap's bridge and VALE do), advance head/cur and call txsync/rxsync.
Per-slot work is done by compiled kernels over whole ranges (numpy references beside them); Python runs once
per batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vhostmap.datapath import ffi, lib
from vhostmap.netmap.abi import NS_MOREFRAG, RingView
from vhostmap.netmap.adapter import NetmapAdapter, swap_buffers
from vhostmap.netmap.kring import Kring
from vhostmap.packets import Addresses, udp_frame
from vhostmap.vhost_user.port import FastQueues, VhostUserPort


def ring_space(ring: RingView) -> int:
    """Slots the user owns: received frames on an RX ring, free slots on a TX ring."""
    return (ring.tail - ring.head) % ring.num_slots


# No limit for nm_swap_slots.
SWAP_ALL = 0xFFFF_FFFF


def swap_slots(src: RingView, dst: RingView, limit: int | None = None) -> int:
    """Move up to ``limit`` slots from ``src`` (an RX ring) to ``dst`` (a TX ring) by swapping buffers.

    Returns how many slots moved; both rings' head and cur advance by that much. The reference of the
    compiled nm_swap_slots the forwarders use (datapath/kring.cdef).
    """
    n = min(ring_space(src), ring_space(dst))
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        return 0
    swap_buffers(src, src.head, dst, dst.head, n)
    src.head = src.cur = (src.head + n) % src.num_slots
    dst.head = dst.cur = (dst.head + n) % dst.num_slots
    return n


def count_frames(ring: RingView, first: int, n: int) -> int:
    """Frames (slots without NS_MOREFRAG) among ``n`` slots from ``first``."""
    idx = (first + np.arange(n)) % ring.num_slots
    return int(np.count_nonzero((ring.slots["flags"][idx] & NS_MOREFRAG) == 0))


class _Pass:
    """The compiled form of a forwarder's round over vhost-user ports: the C array it runs and, for each
    kring it syncs, who to tell when that sync fails. Good while the ports' FastQueues ``versions`` hold."""

    def __init__(
        self, queues: tuple[FastQueues, ...], ctype: str, items: list[Any], sides: list[Side]
    ) -> None:
        # The FastQueues hold the objects the items point into.
        self.queues = queues
        self.versions = tuple(q.version for q in queues)
        self.n = len(items)
        self.c = struct_array(ctype, items)
        self.sides = sides


def struct_array(ctype: str, items: list[Any]) -> Any:
    """A C array of ``ctype`` holding copies of the structs ``items`` point to (at least one element)."""
    array = ffi.new(f"{ctype}[]", max(len(items), 1))
    for k, item in enumerate(items):
        array[k] = item[0]
    return array


# (port, kring, whether it is an RX kring) of one sync of a pass.
Side = tuple[VhostUserPort, Kring, bool]


def with_stash(q: Any, port: VhostUserPort) -> Any:
    """A copy of struct vhu_queue ``q`` whose syncs recycle buffers through ``port``'s stash: for the
    forwarders' passes, where the daemon is the ring user (netmap/stash.py)."""
    copy = ffi.new("struct vhu_queue *", q[0])
    copy.stash = port.stash.c
    return copy


def fast_queues(port: NetmapAdapter) -> FastQueues | None:
    """The port's FastQueues if it is a vhost-user port that can take the compiled path now."""
    return port.fast_queues() if isinstance(port, VhostUserPort) else None


def port_pass(port: NetmapAdapter, plan: _Pass | None, receive: bool, stash: bool) -> _Pass | None:
    """The compiled pass over one port's running RX (``receive``) or TX queues, ``plan`` again while it holds,
    or None when the port takes the Python path. ``stash``: the queues recycle buffers through the port's
    stash (netmap/stash.py)."""
    q = fast_queues(port)
    if q is None:
        return None
    if plan is not None and plan.versions == (q.version,):
        return plan
    assert isinstance(port, VhostUserPort)
    queues, krings = (q.rx, port.rx_rings) if receive else (q.tx, port.tx_rings)
    rings = sorted(queues)
    sides: list[Side] = [(port, krings[i], receive) for i in rings]
    items = [with_stash(queues[i], port) if stash else queues[i] for i in rings]
    return _Pass((q,), "struct vhu_queue", items, sides)


class PassOutcome:
    """Where a compiled pass says which sync stopped it, and why."""

    def __init__(self) -> None:
        self.failed = ffi.new("int32_t *")
        self.status = ffi.new("int32_t *")

    def check(self, plan: _Pass | Any) -> bool:
        """Hand a stopped sync to its port (fault, or the Python sync); True if one did stop. ``plan.sides``
        lists the syncs of the pass in the order the pass numbers them."""
        k = int(self.failed[0])
        if k < 0:
            return False
        port, kring, receive = plan.sides[k]
        port.fast_failed(kring, receive, int(self.status[0]))
        return True


class Link:
    """What one port receives, the other sends, both ways, queue ``i`` to queue ``i mod n``.

    Between two vhost-user ports a round is one compiled call (vhu_link_pass: for every queue both ways, the
    source's rxsync, the buffer swap, the destination's txsync), as long as neither port needs the Python
    path (see VhostUserPort.fast_queues); otherwise it is the calls below, one ring at a time.
    """

    def __init__(self, a: NetmapAdapter, b: NetmapAdapter) -> None:
        self.a, self.b = a, b
        self.name = f"link {a.name}<->{b.name}"
        self._plan: _Pass | None = None
        self._outcome = PassOutcome()

    def wake_fds(self) -> list[int]:
        """Kicks of both ports."""
        return [*self.a.wake_fds(), *self.b.wake_fds()]

    def run(self) -> bool:
        """One round both ways; True when any slot moved."""
        plan = self._compiled()
        if plan is None:
            return (self._one_way(self.a, self.b) + self._one_way(self.b, self.a)) > 0
        out = self._outcome
        moved = lib.vhu_link_pass(plan.c, plan.n, out.failed, out.status)
        # Side 2k is lane k's source, 2k + 1 its destination: the index vhu_link_pass reports.
        return out.check(plan) or moved > 0

    def _compiled(self) -> _Pass | None:
        """The compiled round for the ports as they are now, or None if this round takes the Python path."""
        qa, qb = fast_queues(self.a), fast_queues(self.b)
        if qa is None or qb is None:
            return None
        plan = self._plan
        if plan is not None and plan.versions == (qa.version, qb.version):
            return plan
        assert isinstance(self.a, VhostUserPort) and isinstance(self.b, VhostUserPort)
        lanes: list[Any] = []
        sides: list[Side] = []
        for src, qs, dst, qd in ((self.a, qa, self.b, qb), (self.b, qb, self.a, qa)):
            for i in range(src.num_rx_rings):
                j = i % dst.num_tx_rings
                s, d = qs.rx.get(i), qd.tx.get(j)
                if d is None:
                    if s is not None:
                        return None  # frames but no receive queue: the Python path drops them, counted
                    continue
                lane = ffi.new("struct vhu_lane *")
                if s is not None:
                    lane.src = with_stash(s, src)[0]
                lane.dst = with_stash(d, dst)[0]
                lanes.append(lane)
                sides += [(src, src.rx_rings[i], True), (dst, dst.tx_rings[j], False)]
        self._plan = plan = _Pass((qa, qb), "struct vhu_lane", lanes, sides)
        return plan

    @staticmethod
    def _one_way(src: NetmapAdapter, dst: NetmapAdapter) -> int:
        moved = 0
        ntx = dst.num_tx_rings
        for i in range(src.num_rx_rings):
            j = i % ntx
            src.rxsync(i)
            moved += lib.nm_swap_slots(src.rx_rings[i].c, dst.tx_rings[j].c, SWAP_ALL)
            dst.txsync(j)
        return moved


class Sink:
    """The consumer of a port with nothing attached: receives everything and drops it, counted."""

    def __init__(self, port: NetmapAdapter) -> None:
        self.port = port
        self.name = f"sink {port.name}"
        self._plan: _Pass | None = None
        self._outcome = PassOutcome()

    def _compiled(self) -> _Pass | None:
        """vhu_sink_pass over the running queues of a vhost-user port, or None (the Python path)."""
        self._plan = port_pass(self.port, self._plan, receive=True, stash=True)
        return self._plan

    def wake_fds(self) -> list[int]:
        """Kicks of the port."""
        return list(self.port.wake_fds())

    def run(self) -> bool:
        """Receive and release every ring once; True when anything arrived."""
        plan = self._compiled()
        if plan is not None:
            out = self._outcome
            frames = lib.vhu_sink_pass(plan.c, plan.n, out.failed, out.status)
            return out.check(plan) or frames > 0
        got = 0
        for i in range(self.port.num_rx_rings):
            self.port.rxsync(i)
            frames = lib.nm_release_received(self.port.rx_rings[i].c, ffi.NULL)
            if frames:
                self.port.count_dropped(i, frames)
                got += frames
        return got > 0


class Source(Sink):
    """A port whose guest receives generated frames as fast as it takes them (``generate=LEN``), as
    testpmd's txonly mode does on DPDK's side: a traffic source for guest receive benchmarks. What the guest
    sends is dropped and counted, as by a Sink.

    Every buffer of the port's TX rings holds the same UDP frame (`vhostmap.packets.udp_frame`, to the
    guest's MAC), written once: the syncs copy from the buffers and never change them (no stash here), so
    each pass only hands the ring's free slots back to it and syncs. Nothing is handed while the guest has no
    receive queue running, so no frame is counted as dropped for want of a guest.
    """

    def __init__(self, port: VhostUserPort, length: int) -> None:
        super().__init__(port)
        self.name = f"source {port.name} ({length} B)"
        self._tx_plan: _Pass | None = None
        self._tx_outcome = PassOutcome()
        self.frame = np.frombuffer(udp_frame(length, Addresses(dst_mac=port.config.mac)), dtype=np.uint8)
        for kring in port.tx_rings:
            slots = kring.ring.slots
            for buf_idx in slots["buf_idx"]:
                port.memory.buf_view(int(buf_idx))[: len(self.frame)] = self.frame
            slots["len"] = len(self.frame)
            slots["flags"] = 0

    def run(self) -> bool:
        """Drop what arrived, then give the guest every frame its TX rings have room for; True when
        anything moved."""
        got = super().run()
        plan = self._compiled_tx()
        if plan is not None:
            out = self._tx_outcome
            sent = lib.vhu_source_pass(plan.c, plan.n, out.failed, out.status)
            return out.check(plan) or got or sent > 0
        port = self.port
        assert isinstance(port, VhostUserPort)
        moved = False
        for i, kring in enumerate(port.tx_rings):
            if not port.carrier(i):
                continue
            ring = kring.ring
            ring.head = ring.cur = ring.tail
            before = kring.nr_hwcur
            port.txsync(i)
            moved = moved or kring.nr_hwcur != before
        return got or moved

    def _compiled_tx(self) -> _Pass | None:
        """vhu_source_pass over the TX rings that have a guest receive queue, or None (the Python path). No
        stash: the buffers keep the generated frame."""
        self._tx_plan = port_pass(self.port, self._tx_plan, receive=False, stash=False)
        return self._tx_plan
