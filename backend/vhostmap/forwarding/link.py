"""Link: what one port receives, the other sends, both ways (``--link A,B``).

A netmap user of both ports' rings, like netmap's bridge application: received slots are handed to the other
port's TX ring by swapping buffer indices (zero copy, one allocator). Between two ports with compiled queues
a round is one C call (vhu_link_pass), which copies each frame once, from guest to guest (passes.OneCopy);
otherwise one ring at a time through the ports' syncs.
"""

from __future__ import annotations

from typing import Any

from vhostmap.datapath import ffi, lib
from vhostmap.forwarding.passes import (
    BUDGET,
    BURST,
    CompiledPass,
    OneCopy,
    Owns,
    PassOutcome,
    Side,
    owned,
    owned_wake_fds,
    with_stash,
)
from vhostmap.forwarding.rings import SWAP_ALL, ring_lock
from vhostmap.netmap.adapter import NetmapAdapter


class Link:
    """What one port receives, the other sends, both ways, queue ``i`` to queue ``i mod n``.

    Between two ports with compiled queues a round is one compiled call (vhu_link_pass: for every queue both
    ways, the source's rxsync, the buffer swap, the destination's txsync), as long as neither port needs the
    Python path (NetmapAdapter.fast_queues); otherwise it is the calls below, one ring at a time.

    A lane (a receive queue of one port and the TX ring it feeds) is the unit several datapath threads share
    a link by: ``part`` makes a link that runs only the lanes whose receive queue ``owns`` names. A TX ring
    fed by lanes of two threads (ports with different queue counts) is filled and synced under its lock.
    """

    def __init__(self, a: NetmapAdapter, b: NetmapAdapter, owns: Owns = None) -> None:
        self.a, self.b = a, b
        self.name = f"link {a.name}<->{b.name}"
        self.owns = owns
        self._plan: CompiledPass | None = None
        self._refs: OneCopy | None = None
        self._outcome = PassOutcome()

    def rx_queues(self) -> list[tuple[NetmapAdapter, int]]:
        """The receive queues (port, RX ring) of both ports: one lane each."""
        return [(p, i) for p in (self.a, self.b) for i in range(p.num_rx_rings)]

    def part(self, owns: Owns) -> Link:
        """The same link running only the lanes whose receive queue ``owns`` names (one thread's)."""
        return Link(self.a, self.b, owns)

    def wake_fds(self) -> list[int]:
        """Kicks of both ports (of the receive queues it serves)."""
        ports = [self.a, self.b]
        return owned_wake_fds(self.owns, ports, [list(range(p.num_rx_rings)) for p in ports])

    def _flushed(self, dst: NetmapAdapter, fed: set[int]) -> list[int]:
        """The TX rings of ``dst`` this part syncs though none of its lanes feeds them: those of the RX rings
        it serves (whose kicks wake it, a guest's new receive buffers among them), so that frames another
        thread left there for want of room go out."""
        if self.owns is None:
            return []
        return [
            j for j in range(dst.num_tx_rings) if j not in fed and j < dst.num_rx_rings and self.owns(dst, j)
        ]

    def run(self) -> bool:
        """One round both ways; True when any slot moved."""
        plan = self._compiled()
        if plan is None:
            self._share_offloads()  # cheap beside the Python round, and features may have changed
            return (self._one_way(self.a, self.b) + self._one_way(self.b, self.a)) > 0
        out = self._outcome
        assert self._refs is not None
        moved = lib.vhu_link_pass(plan.c, plan.n, self._refs.c, BURST, BUDGET, out.failed, out.status)
        # Side 2k is lane k's source, 2k + 1 its destination: the index vhu_link_pass reports.
        return out.check(plan.sides) or moved > 0

    def _compiled(self) -> CompiledPass | None:
        """The compiled round for the ports as they are now, or None if this round takes the Python path."""
        qa, qb = self.a.fast_queues(), self.b.fast_queues()
        if qa is None or qb is None:
            return None
        plan = self._plan
        if plan is not None and plan.versions == (qa.version, qb.version):
            return plan
        self._share_offloads()  # a new version: features may have changed
        lanes: list[Any] = []
        sides: list[Side] = []
        cap = 1
        for src, qs, dst, qd in ((self.a, qa, self.b, qb), (self.b, qb, self.a, qa)):
            pairs: list[tuple[int | None, int]] = [
                (i, i % dst.num_tx_rings) for i in range(src.num_rx_rings) if owned(self.owns, src, i)
            ]
            # A lane without a source only delivers what waits in its TX ring.
            pairs += [(None, j) for j in self._flushed(dst, {j for _, j in pairs})]
            for i, j in pairs:
                s, d = (None if i is None else qs.rx.get(i)), qd.tx.get(j)
                if d is None:
                    if s is not None:
                        return None  # frames but no receive queue: the Python path drops them, counted
                    continue
                lane = ffi.new("struct vhu_lane *")
                if s is not None:
                    lane.src = with_stash(s, qs)[0]
                    cap = max(cap, src.rx_rings[i or 0].ring.num_slots)
                lane.dst = with_stash(d, qd)[0]
                lanes.append(lane)
                # (A lane without a source never fails on its side 2k: any kring names it.)
                sides += [(src, src.rx_rings[i or 0], True), (dst, dst.tx_rings[j], False)]
        if self._refs is None or self._refs.c.cap < cap:
            self._refs = OneCopy(cap)
        self._plan = plan = CompiledPass((qa, qb), "struct vhu_lane", lanes, sides)
        return plan

    def _share_offloads(self) -> None:
        """Each port's frames keep the offloads the other takes (NetmapAdapter.pass_offloads)."""
        self.a.pass_offloads(self.b.accepted_offloads)
        self.b.pass_offloads(self.a.accepted_offloads)

    def _one_way(self, src: NetmapAdapter, dst: NetmapAdapter) -> int:
        moved = 0
        ntx = dst.num_tx_rings
        fed: set[int] = set()
        for i in range(src.num_rx_rings):
            if not owned(self.owns, src, i):
                continue
            j = i % ntx
            fed.add(j)
            src.rxsync(i)
            with ring_lock(dst, j):
                moved += lib.nm_swap_slots(src.rx_rings[i].c, dst.tx_rings[j].c, SWAP_ALL)
                dst.txsync(j)
        for j in self._flushed(dst, fed):
            with ring_lock(dst, j):
                dst.txsync(j)
        return moved
