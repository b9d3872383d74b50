"""The switch's reference forwarder: one source ring's batch in numpy and Python, frame for frame what the
compiled kernel (sw_forward, datapath/switch.c) does, counter for counter (test_switch_differential.py).

The slots of a batch are read once into a numpy snapshot, frames (runs of NS_MOREFRAG slots, kept whole) are
delimited and checked with numpy, and the destination and source MAC addresses of every frame are gathered
from the buffers with one fancy index. Python runs once per *distinct* address of a batch (a table lookup),
and once per destination port. A unicast frame moves zero copy when both ports share an allocator, and so
does a flood with a single destination (a switch of two ports); other floods are copied into each
destination's own buffers. A destination ring without room loses the frame, counted (VALE's rule).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from vhostmap.ethernet import ETH_ALEN, ETH_HLEN, MAC_GROUP_BIT
from vhostmap.forwarding.rings import ring_lock, tx_room
from vhostmap.forwarding.switch.port import SwitchPort
from vhostmap.forwarding.switch.table import AddressTable
from vhostmap.netmap.abi import NM_RESERVED_BUFS, NS_BUF_CHANGED, NS_MOREFRAG, NS_NO_LEARN, NS_VNET_HDR
from vhostmap.virtio.spec import VIRTIO_NET_HDR

# A destination code meaning "every port but the source".
FLOOD = -1


class Batch:
    """The complete frames among the received slots [head, tail) of a source RX ring, read once.

    ``starts``/``nslots`` delimit frame ``i`` (slots relative to ``head``), ``used`` counts the slots the
    frames cover (a trailing unfinished frame stays in the ring), ``valid`` says whether every slot of a frame
    holds a usable buffer and length and its first slot a whole Ethernet header (after the virtio-net header
    of a frame with NS_VNET_HDR, which only a ``vnet`` port's frames have), ``dst``/``src`` are the MAC
    addresses (48-bit integers; 0 for invalid frames), ``lengths`` the frame lengths (without that header).
    """

    def __init__(self, port: SwitchPort, ring_index: int) -> None:
        kring = port.adapter.rx_rings[ring_index]
        ring = kring.ring
        memory = port.adapter.memory
        n = ring.num_slots
        self.ring = ring
        self.head = ring.head
        count = (ring.tail - self.head) % n
        snap = ring.slots[(self.head + np.arange(count)) % n]  # fancy indexing copies: our snapshot
        self.bufs = snap["buf_idx"].astype(np.int64)
        self.lens = snap["len"].astype(np.int64)
        self.flags = snap["flags"] if port.vnet else snap["flags"] & (0xFFFF ^ NS_VNET_HDR)
        ends = np.flatnonzero((self.flags & NS_MOREFRAG) == 0) + 1
        # Fragments that fill the whole ring without ending a frame can never complete: all are dropped.
        self.stuck = not ends.size and count == n - 1
        self.used = count if self.stuck else int(ends[-1]) if ends.size else 0
        self.starts = np.concatenate((np.zeros(1, dtype=np.int64), ends[:-1])) if ends.size else ends
        self.nslots = ends - self.starts
        usable = (
            (self.bufs >= NM_RESERVED_BUFS)
            & (self.bufs < memory.nbufs)
            & (self.lens >= 1)
            & (self.lens <= memory.buf_size)
        )
        if ends.size:
            self.vnet = (self.flags[self.starts] & NS_VNET_HDR) != 0
            at = np.where(self.vnet, VIRTIO_NET_HDR.size, 0)
            self.valid = np.logical_and.reduceat(usable[: int(ends[-1])], self.starts) & (
                self.lens[self.starts] >= at + ETH_HLEN
            )
            self.lengths = np.maximum(np.add.reduceat(self.lens[: int(ends[-1])], self.starts) - at, 0)
            first = np.where(self.valid, self.bufs[self.starts], 0)
            offsets = memory.buffers_offset + first * memory.buf_size + np.where(self.valid, at, 0)
            header = memory.array[offsets[:, None] + np.arange(2 * ETH_ALEN)]
            # Each address in the low 6 bytes of a big-endian u64: byte 0 of the MAC is the most significant.
            wide = np.zeros((len(first), 16), dtype=np.uint8)
            wide[:, 2:8] = header[:, :ETH_ALEN]
            wide[:, 10:16] = header[:, ETH_ALEN:]
            macs = wide.view(">u8").astype(np.int64)
            self.dst = np.where(self.valid, macs[:, 0], 0)
            self.src = np.where(self.valid, macs[:, 1], 0)
            self.no_learn = (self.flags[self.starts] & NS_NO_LEARN) != 0
        else:
            self.valid = self.vnet = np.zeros(0, dtype=bool)
            self.lengths = self.dst = self.src = np.zeros(0, dtype=np.int64)
            self.no_learn = np.zeros(0, dtype=bool)

    def __len__(self) -> int:
        return len(self.starts)

    def release(self) -> None:
        """Hand the slots of the batch back to the ring (released at the next rxsync)."""
        n = self.ring.num_slots
        self.ring.head = self.ring.cur = (self.head + self.used) % n


def forward(
    table: AddressTable,
    ports: list[SwitchPort],
    index: dict[SwitchPort, int],
    src: SwitchPort,
    q: int,
    ring_index: int,
    now: float,
) -> tuple[int, list[tuple[SwitchPort, int]]]:
    """Forward the frames received on RX ring ``ring_index`` (the ``q``-th of ``src``) among ``ports``
    (``index``: each port's position), learning into and looking up in ``table``, and release them.
    Returns the slots taken and the destination (port, TX ring) pairs that got frames."""
    ring = src.adapter.rx_rings[ring_index].ring
    if ring.tail == ring.head:
        return 0, []
    batch = Batch(src, ring_index)
    st = src.rx_counters[q]
    touched: list[tuple[SwitchPort, int]] = []
    if batch.stuck:
        st.dropped += 1
    elif len(batch):
        valid = batch.valid
        st.rx_frames += len(batch)
        st.rx_bytes += int(batch.lengths.sum())
        st.dropped += len(batch) - int(np.count_nonzero(valid))
        # Other datapath threads may run sources of this switch: learning and lookups hold the table's lock.
        with table.lock:
            # Learning: one dict update per distinct unicast source address of the batch.
            learn = valid & ((batch.src & MAC_GROUP_BIT) == 0) & (batch.src != 0) & ~batch.no_learn
            if learn.any():
                for mac in np.unique(batch.src[learn]).tolist():
                    table.learn(mac, src, now)
            # Lookup: one per distinct destination address; group addresses flood.
            uniq, inverse = np.unique(batch.dst, return_inverse=True)
            codes = np.empty(len(uniq), dtype=np.int64)
            for j, mac in enumerate(uniq.tolist()):
                port = None if mac & MAC_GROUP_BIT else table.lookup(mac, now)
                codes[j] = FLOOD if port is None else index[port]
        dest = codes[inverse]
        s = index[src]
        flood = valid & (dest == FLOOD)
        st.flooded += int(np.count_nonzero(flood))
        st.forwarded += int(np.count_nonzero(valid & (dest >= 0) & (dest != s)))
        st.filtered += int(np.count_nonzero(valid & (dest == s)))
        # A flood on a switch of two ports has one destination: it moves like a unicast frame.
        lone = len(ports) == 2
        for d, dst in enumerate(ports):
            if d == s:
                continue
            sel = np.flatnonzero(flood | (valid & (dest == d)))
            if sel.size:
                tx = dst.tx_ring(q)
                # Another datapath thread may fill this ring too: reserve, fill and publish under its lock.
                with ring_lock(dst.adapter, tx):
                    deliver(src, batch, sel, (dest[sel] == d) | lone, dst, tx, st)
                touched.append((dst, tx))
    batch.release()
    return batch.used, touched


def deliver(
    src: SwitchPort,
    batch: Batch,
    sel: npt.NDArray[np.int64],
    unicast: npt.NDArray[np.bool_],
    dst: SwitchPort,
    tx: int,
    src_counters: Any,
) -> None:
    """Put frames ``sel`` of ``batch`` in TX ring ``tx`` of ``dst``, in order, as far as they fit whole;
    the rest are dropped and counted, and so are frames with their virtio-net header for a port that does not
    take them (``vnet``). ``unicast[i]`` says frame ``sel[i]`` goes only there: it moves zero
    copy when both ports share an allocator. The ring's head advances; the caller txsyncs. ``src_counters``:
    the source ring's counters (SwitchPort.rx_counters)."""
    if not dst.vnet:
        refused = batch.vnet[sel]
        if refused.any():
            dst.tx_counters[tx].tx_dropped += int(np.count_nonzero(refused))
            src_counters.dropped += int(np.count_nonzero(refused))
            sel, unicast = sel[~refused], unicast[~refused]
    ring = dst.adapter.tx_rings[tx].ring
    dn = ring.num_slots
    head = ring.head
    dmem, smem = dst.adapter.memory, src.adapter.memory
    free = tx_room(ring.slots, head, (ring.tail - head) % dn, dmem.nbufs)
    nslots = batch.nslots[sel]
    cum = np.cumsum(nslots)
    take = int(np.searchsorted(cum, len(free), side="right"))  # frames that fit whole, in order
    missed = len(sel) - take
    if missed:
        dst.tx_counters[tx].tx_dropped += missed
        src_counters.dropped += missed
    if take == 0:
        return
    total = int(cum[take - 1])
    ns = nslots[:take]
    # The source slot (relative to the batch head) of each destination slot; a frame's slots are in a row.
    rel = np.arange(total) + np.repeat(batch.starts[sel[:take]] - (cum[:take] - ns), ns)
    d_idx = (head + np.arange(total)) % dn
    sbufs = batch.bufs[rel]
    dbufs = free[:total]
    swap = np.repeat(unicast[:take], ns) if smem is dmem else np.zeros(total, dtype=bool)
    copy = ~swap
    if copy.any():
        # Whole rows in one numpy copy, as many bytes as the longest slot copied needs; the bytes of a row
        # past its own slot's length keep what the destination buffer held (as the compiled kernel's
        # copy of len bytes leaves them).
        lens = batch.lens[rel][copy]
        width = int(lens.max())
        dview = dmem.buffer_rows()
        rows = smem.buffer_rows()[sbufs[copy], :width]  # fancy indexing copies
        beyond = np.arange(width) >= lens[:, None]
        if beyond.any():
            rows[beyond] = dview[dbufs[copy], :width][beyond]
        dview[dbufs[copy], :width] = rows
    slots = ring.slots
    if swap.any():
        s_idx = (batch.head + rel[swap]) % batch.ring.num_slots
        slots["buf_idx"][d_idx[swap]] = sbufs[swap]
        batch.ring.slots["buf_idx"][s_idx] = dbufs[swap]
        batch.ring.slots["flags"][s_idx] = NS_BUF_CHANGED
    slots["len"][d_idx] = batch.lens[rel]
    kept = batch.flags[rel] & (NS_MOREFRAG | NS_VNET_HDR)
    slots["flags"][d_idx] = kept | np.where(swap, NS_BUF_CHANGED, 0)
    ring.head = ring.cur = (head + total) % dn
    dst.tx_counters[tx].tx_frames += take
    dst.tx_counters[tx].tx_bytes += int(batch.lengths[sel[:take]].sum())
