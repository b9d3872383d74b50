"""SwitchPort: one port of a switch (an adapter's hardware rings, or its host rings) and its counters."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vhostmap.datapath import ffi
from vhostmap.netmap.adapter import NetmapAdapter


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

    The counters live in C memory (struct sw_stats) that both implementations update, one struct per ring so
    that each has a single writer when several datapath threads run the switch: ``rx_counters[q]`` the
    source-side fields of the ``q``-th RX ring (written by the thread that owns it), ``tx_counters[t]`` the
    destination-side fields of TX ring index ``t`` (written under that ring's lock). ``stats`` adds them up.
    """

    def __init__(self, adapter: NetmapAdapter, host: bool = False) -> None:
        self.adapter = adapter
        self.host = host
        self.name = f"{adapter.name}^" if host else adapter.name
        # Its frames may start with their virtio-net header (NS_VNET_HDR), and it takes such frames: a host
        # port (a TAP with IFF_VNET_HDR) always does.
        self.vnet = host or adapter.carries_vnet_header
        if host:
            self.rx_rings = [adapter.num_rx_rings]
            self.tx_rings = [adapter.num_tx_rings]
        else:
            self.rx_rings = list(range(adapter.num_rx_rings))
            self.tx_rings = list(range(adapter.num_tx_rings))
        self.rx_counters: list[Any] = [ffi.new("struct sw_stats *") for _ in self.rx_rings]
        self.tx_counters: dict[int, Any] = {t: ffi.new("struct sw_stats *") for t in self.tx_rings}

    @property
    def stats(self) -> SwitchPortStats:
        """A snapshot of the port's counters (every ring's, added up)."""
        structs = [*self.rx_counters, *self.tx_counters.values()]
        return SwitchPortStats(*(sum(int(getattr(c, name)) for c in structs) for name in _STAT_FIELDS))

    @property
    def accepted_offloads(self) -> int:
        """The NEEDS_* a frame given to this port may keep (NetmapAdapter.accepted_offloads, or its host
        port's)."""
        if not self.host:
            return self.adapter.accepted_offloads if self.vnet else 0
        hp = self.adapter.host_port
        return hp.accepted_offloads if hp is not None else 0

    def pass_offloads(self, needs: int) -> None:
        """Frames this port receives may keep the offloads ``needs`` names (NetmapAdapter.pass_offloads)."""
        if not self.host:
            self.adapter.pass_offloads(needs)
        elif self.adapter.host_port is not None:
            self.adapter.host_port.pass_offloads(needs)

    def tx_ring(self, q: int) -> int:
        """The TX ring index that frames from the ``q``-th RX ring of a source go to."""
        return self.tx_rings[q % len(self.tx_rings)]

    def __repr__(self) -> str:
        return f"SwitchPort({self.name!r})"
