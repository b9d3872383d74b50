"""Sink: the consumer of a port with nothing attached, which receives everything and drops it, counted."""

from __future__ import annotations

from vhostmap.datapath import ffi, lib
from vhostmap.forwarding.passes import (
    BUDGET,
    BURST,
    CompiledPass,
    Owns,
    PassOutcome,
    owned,
    owned_wake_fds,
    port_pass,
)
from vhostmap.netmap.adapter import NetmapAdapter


class Sink:
    """The consumer of a port with nothing attached: receives everything and drops it, counted.

    ``owns``: the receive queues this one serves (a part of the sink, ``part``); None: all.
    """

    def __init__(self, port: NetmapAdapter, owns: Owns = None) -> None:
        self.port = port
        self.name = f"sink {port.name}"
        self.owns = owns
        self._plan: CompiledPass | None = None
        self._outcome = PassOutcome()

    def rx_queues(self) -> list[tuple[NetmapAdapter, int]]:
        """The receive queues (port, RX ring) it consumes."""
        return [(self.port, i) for i in range(self.port.num_rx_rings)]

    def part(self, owns: Owns) -> Sink:
        """A sink of the same port serving only the receive queues ``owns`` names (one datapath thread's)."""
        return Sink(self.port, owns)

    def _compiled(self) -> CompiledPass | None:
        """vhu_sink_pass over the running queues of a port with compiled queues, or None (the Python path)."""
        self._plan = port_pass(self.port, self._plan, receive=True, stash=True, owns=self.owns)
        return self._plan

    def wake_fds(self) -> list[int]:
        """Kicks of the port (of the queues it serves)."""
        return owned_wake_fds(self.owns, [self.port], [list(range(self.port.num_rx_rings))])

    def run(self) -> bool:
        """Receive and release every ring once; True when anything arrived."""
        plan = self._compiled()
        if plan is not None:
            out = self._outcome
            frames = lib.vhu_sink_pass(plan.c, plan.n, BURST, BUDGET, out.failed, out.status)
            return out.check(plan.sides) or frames > 0
        got = 0
        for i in range(self.port.num_rx_rings):
            if not owned(self.owns, self.port, i):
                continue
            self.port.rxsync(i)
            frames = lib.nm_release_received(self.port.rx_rings[i].c, ffi.NULL)
            if frames:
                self.port.count_dropped(i, frames)
                got += frames
        return got > 0
