"""Source: a port whose guest receives generated frames as fast as it takes them (``generate=LEN``)."""

from __future__ import annotations

import numpy as np

from vhostmap.datapath import lib
from vhostmap.ethernet import ETH_DATA_LEN, ETH_HLEN
from vhostmap.forwarding.passes import ROUNDS, CompiledPass, PassOutcome, port_pass
from vhostmap.forwarding.sink import Sink
from vhostmap.netmap.abi import NS_MOREFRAG, NS_VNET_HDR
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.frames import SLOT_LEN_MAX
from vhostmap.netmap.offload import TCP_CSUM_OFFSET, VnetHeader
from vhostmap.packets import IP_HLEN, TCP_HLEN, Addresses, tcp_frame, udp_frame
from vhostmap.virtio.spec import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4


class Source:
    """A port whose guest receives generated frames as fast as it takes them (``generate=``), as
    testpmd's txonly mode does on DPDK's side: a traffic source for guest receive benchmarks. What the guest
    sends is dropped and counted by a Sink of the port. Not split between datapath threads (it has no
    ``part``): its TX rings are fed by this forwarder alone, and all of it runs on the thread of the port's
    first receive queue (vhostmap.daemon.worker.Datapath).

    Frames of ``length`` bytes up to the ``mtu`` (plus the Ethernet header) are UDP (`packets.udp_frame`);
    longer ones, up to TSO_MAX_FRAME, are TCP with a virtio-net header asking for segmentation into ``mtu``
    packets and the checksum (`packets.tcp_frame`, NS_VNET_HDR), as a guest with TSO sends: its guest gets
    them whole if it negotiated GUEST_TSO4, else its port completes them on the way out. Either way every
    frame is addressed to ``mac``, the guest's, and takes the same run of slots (`frame_slots`).

    Every buffer of the port's TX rings holds the same bytes, written once, and every slot keeps its length
    and flags: the syncs copy from the buffers and change neither (no stash here), so each pass only hands
    the ring's free slots back to it and syncs. Nothing is handed while the guest has no receive queue
    running (``NetmapAdapter.carrier``), so no frame is counted as dropped for want of a guest.
    """

    def __init__(self, port: NetmapAdapter, length: int, mac: bytes, mtu: int = ETH_DATA_LEN) -> None:
        self.port = port
        self.sink = Sink(port)
        addr = Addresses(dst_mac=mac)
        if length <= mtu + ETH_HLEN:
            self.name = f"source {port.name} ({length} B)"
            data, first_flags = udp_frame(length, addr), 0
        else:
            l4, mss = ETH_HLEN + IP_HLEN, mtu - IP_HLEN - TCP_HLEN
            self.name = f"source {port.name} ({length} B TSO, mss {mss})"
            tso = VnetHeader(
                VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, l4 + TCP_HLEN, mss, l4, TCP_CSUM_OFFSET
            )
            data, first_flags = tso.pack() + tcp_frame(length, addr), NS_VNET_HDR
        self._tx_plan: CompiledPass | None = None
        self._tx_outcome = PassOutcome()
        for kring in port.tx_rings:
            lens = frame_slots(len(data), min(kring.buf_size, SLOT_LEN_MAX), kring.nkr_num_slots)
            k, n = len(lens), kring.nkr_num_slots
            flags = np.array([NS_MOREFRAG] * (k - 1) + [0], dtype=np.uint16)
            flags[0] |= first_flags
            slots = kring.ring.slots
            # Slot j carries the first lens[j] bytes of its buffer: the frame's first slot its headers, the
            # others payload that happens to repeat them.
            for buf_idx in slots["buf_idx"]:
                port.memory.buf_view(int(buf_idx))[: max(lens)] = np.frombuffer(data[: max(lens)], np.uint8)
            slots["len"] = np.tile(np.array(lens, dtype=np.uint16), n // k)
            slots["flags"] = np.tile(flags, n // k)

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


def frame_slots(length: int, cap: int, ring: int) -> list[int]:
    """The slot lengths of a frame of ``length`` bytes (its header included) in a ring of ``ring`` slots of
    ``cap`` bytes each, repeated around the ring: as few slots as it fits in, rounded up to a divisor of
    ``ring`` (so that the ring holds whole frames and the pattern survives the wrap), the bytes spread evenly.
    ValueError when even half the ring is too short (a ring keeps a slot empty: one frame must leave room)."""
    need = -(-length // cap)
    per = next((d for d in range(need, ring // 2 + 1) if ring % d == 0), None)
    if per is None:
        raise ValueError(f"a frame of {length} bytes takes {need} slots of {cap} bytes; the ring has {ring}")
    base, extra = divmod(length, per)
    return [base + 1] * extra + [base] * (per - extra)
