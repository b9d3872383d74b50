"""Source: a port whose guest receives generated frames as fast as it takes them (``generate=LEN``)."""

from __future__ import annotations

import numpy as np

from vhostmap.datapath import lib
from vhostmap.forwarding.passes import ROUNDS, CompiledPass, PassOutcome, port_pass
from vhostmap.forwarding.sink import Sink
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.packets import Addresses, udp_frame


class Source:
    """A port whose guest receives generated frames as fast as it takes them (``generate=LEN``), as
    testpmd's txonly mode does on DPDK's side: a traffic source for guest receive benchmarks. What the guest
    sends is dropped and counted by a Sink of the port. Not split between datapath threads (it has no
    ``part``): its TX rings are fed by this forwarder alone, and all of it runs on the thread of the port's
    first receive queue (vhostmap.daemon.worker.Datapath).

    Every buffer of the port's TX rings holds the same UDP frame (`vhostmap.packets.udp_frame`, to ``mac``,
    the guest's), written once: the syncs copy from the buffers and never change them (no stash here), so
    each pass only hands the ring's free slots back to it and syncs. Nothing is handed while the guest has no
    receive queue running (``NetmapAdapter.carrier``), so no frame is counted as dropped for want of a guest.
    """

    def __init__(self, port: NetmapAdapter, length: int, mac: bytes) -> None:
        self.port = port
        self.sink = Sink(port)
        self.name = f"source {port.name} ({length} B)"
        self._tx_plan: CompiledPass | None = None
        self._tx_outcome = PassOutcome()
        self.frame = np.frombuffer(udp_frame(length, Addresses(dst_mac=mac)), dtype=np.uint8)
        for kring in port.tx_rings:
            slots = kring.ring.slots
            for buf_idx in slots["buf_idx"]:
                port.memory.buf_view(int(buf_idx))[: len(self.frame)] = self.frame
            slots["len"] = len(self.frame)
            slots["flags"] = 0

    def rx_queues(self) -> list[tuple[NetmapAdapter, int]]:
        """The receive queues (port, RX ring) it consumes: its sink's."""
        return self.sink.rx_queues()

    def wake_fds(self) -> list[int]:
        """Kicks of the port."""
        return self.sink.wake_fds()

    def run(self) -> bool:
        """Drop what arrived, then give the guest every frame its TX rings have room for; True when
        anything moved."""
        got = self.sink.run()
        plan = self._compiled_tx()
        if plan is not None:
            out = self._tx_outcome
            sent = lib.vhu_source_pass(plan.c, plan.n, ROUNDS, out.failed, out.status)
            return out.check(plan.sides) or got or sent > 0
        port = self.port
        moved = False
        for i, kring in enumerate(port.tx_rings[: port.num_tx_rings]):
            if not port.carrier(i):
                continue
            ring = kring.ring
            ring.head = ring.cur = ring.tail
            before = kring.nr_hwcur
            port.txsync(i)
            moved = moved or kring.nr_hwcur != before
        return got or moved

    def _compiled_tx(self) -> CompiledPass | None:
        """vhu_source_pass over the TX rings that have a guest receive queue, or None (the Python path). No
        stash: the buffers keep the generated frame."""
        self._tx_plan = port_pass(self.port, self._tx_plan, receive=False, stash=False)
        return self._tx_plan
