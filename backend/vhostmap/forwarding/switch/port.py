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
