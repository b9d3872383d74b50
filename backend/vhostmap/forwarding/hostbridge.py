"""HostBridge: a port's hardware rings cross-connected to its own host rings ("a VM on a TAP").

A port given ``host=TAP`` and nothing else behaves like a VM NIC plugged into a TAP device: what the guest
sends (the port's hardware RX rings) goes to the host TX ring, hence to the TAP; what the host stack sends
into the TAP (the host RX ring) goes to hardware TX ring 0, hence to the guest. It is a netmap user moving
whole frames (NS_MOREFRAG runs are never split) by swapping buffer indices, like netmap's bridge application
between a NIC and its host rings. A frame that does not fit waits in its RX ring (backpressure); the TAP side
never waits, as the host TX ring is reclaimed at once and the host RX ring is drained on every run (what finds
no room is dropped and counted by the host stack), so the worker never spins on a readable TAP.
"""

from __future__ import annotations

from vhostmap.forwarding.rings import move_frames
from vhostmap.netmap.adapter import NetmapAdapter


class HostBridge:
    """Forwarder: the hardware rings of ``adapter`` <-> its host rings. The adapter must have a host port."""

    def __init__(self, adapter: NetmapAdapter) -> None:
        if adapter.host_port is None:
            raise ValueError(f"{adapter.name}: no host rings bound (host=) to bridge with")
        self.adapter = adapter
        self.name = f"host bridge {adapter.name}<->{adapter.host_port.name}"
        self.dropped = 0

    def rx_queues(self) -> list[tuple[NetmapAdapter, int]]:
        """Its port's first receive queue: the whole bridge runs on the datapath thread that owns it (it is
        the only user of the port's rings, so it needs no lock)."""
        return [(self.adapter, 0)]

    def wake_fds(self) -> list[int]:
        """The port's kicks and its TAP."""
        return list(self.adapter.wake_fds())

    def run(self) -> bool:
        """One round each way; True when a frame moved."""
        a = self.adapter
        assert a.host_port is not None
        # Each side's frames keep the offloads the other takes (cheap beside the round; features change).
        a.pass_offloads(a.host_port.accepted_offloads)
        a.host_port.pass_offloads(a.accepted_offloads)
        nbufs = a.memory.nbufs
        host_tx, host_rx = a.num_tx_rings, a.num_rx_rings
        up = dropped = 0
        for i in range(a.num_rx_rings):
            a.rxsync(i)
            m, d = move_frames(a.rx_rings[i].ring, a.tx_rings[host_tx].ring, nbufs)
            up += m
            dropped += d
        if up:
            a.txsync(host_tx)
        # Every run reads the TAP (host rxsync drains it), whether or not it woke us.
        a.rxsync(host_rx)
        guest = a.tx_rings[0]
        if guest.pending():
            a.txsync(0)  # frames waiting for guest buffers first: what they leave is room for new ones
        down, d = move_frames(a.rx_rings[host_rx].ring, guest.ring, nbufs)
        dropped += d
        if down:
            a.txsync(0)
        self.dropped += dropped
        return up + down + dropped > 0
