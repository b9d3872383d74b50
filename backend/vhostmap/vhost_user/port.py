"""A vhost-user connection seen as a netmap adapter (docs/architecture.md, "Mapping virtio onto it").

What the guest transmits lands in the port's RX krings (as a NIC receives from the wire); what the port's TX
krings send is delivered into the guest's receive queue. Queue pair ``i`` (virtqueues ``2i`` receive and
``2i+1`` transmit) maps to kring pair ``i``. The device state machine decides which queues run; this module
only syncs krings with virtqueues, counts, and turns driver faults into "device broken".
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from vhostmap.datapath import ffi, lib
from vhostmap.ethernet import BROADCAST, ETH_P_RARP, ETH_ZLEN
from vhostmap.netmap.abi import NS_MOREFRAG
from vhostmap.netmap.adapter import FastQueues, NetmapAdapter
from vhostmap.netmap.allocator import NetmapMemory
from vhostmap.netmap.kring import Kring
from vhostmap.netmap.offload import ALL_NEEDS
from vhostmap.netmap.stash import BufferStash
from vhostmap.vhost_user import kernels
from vhostmap.vhost_user.device import DeviceQueue, NetConfig, VhostUserNetDevice
from vhostmap.vhost_user.kernels import select_datapath
from vhostmap.vhost_user.messages import ProtocolFeature
from vhostmap.vhost_user.packed import PackedVirtqueue
from vhostmap.vhost_user.protocol import Message, Payload
from vhostmap.vhost_user.rxtx import Buffers
from vhostmap.vhost_user.virtqueue import CallRefused, SplitVirtqueue, VirtqueueError
from vhostmap.virtio.spec import feature_names

log = logging.getLogger(__name__)

# netmap ring size of every kring of a vhost-user port (virtqueues are 256 by default, up to 1024 in QEMU).
PORT_RING_SLOTS = 1024
#: RARP announcements a port holds while ring 0 has no room (SEND_RARP repeated; the oldest go first).
MAX_PENDING_ANNOUNCEMENTS = 4


# Counters of one queue pair (struct vhu_stats, which the compiled passes add to). rx: from the guest (its
# transmissions); tx: to the guest.
QUEUE_COUNTERS = (
    "rx_packets",
    "rx_bytes",
    "rx_dropped",
    "tx_packets",
    "tx_bytes",
    "tx_dropped",
    "errors",
    "rx_unconnected",
    "tx_no_carrier",
    "rx_bad_header",
    "rx_offloaded",
    "rx_offload_passed",
    "tx_bad_header",
    "tx_offloaded",
)


class VhostUserPort(NetmapAdapter):
    """One vhost-user virtio-net device, ``name``, as a netmap adapter with a kring pair per queue pair of
    ``net`` (the device's MAC, MTU and queue pairs).

    ``reference_datapath`` runs the pure-Python reference kernels instead of the compiled ones (None: as the
    VHOSTMAP_REFERENCE_DATAPATH environment variable says; see kernels.py). ``poll``: a polling worker
    serves the port, so the driver is asked not to kick.
    """

    def __init__(
        self,
        name: str,
        net: NetConfig,
        memory: NetmapMemory,
        lock: AbstractContextManager[Any],
        on_change: Callable[[], None] = lambda: None,
        reference_datapath: bool | None = None,
        poll: bool = False,
    ) -> None:
        super().__init__(
            name,
            memory,
            num_tx_rings=net.queue_pairs,
            num_rx_rings=net.queue_pairs,
            num_tx_desc=PORT_RING_SLOTS,
            num_rx_desc=PORT_RING_SLOTS,
        )
        self.net = net
        self.lock = lock
        self._on_change = on_change
        self.device = VhostUserNetDevice(name, net, self)
        self.queue_stats = ffi.new("struct vhu_stats[]", net.queue_pairs)
        # Bumped by every control-plane change; a FastQueues of another version is stale.
        self._version = 0
        self._fast: FastQueues | None = None
        self._bufs = Buffers(memory.array, memory.buffers_offset, memory.buf_size)
        # Receive into the buffers the last deliveries freed (the forwarders' passes; netmap/stash.py).
        self.stash = BufferStash.allocate(memory)
        self.datapath = select_datapath(reference_datapath)
        self.poll = poll
        # RARP frames waiting for room in RX kring 0, newest last. Bounded: a front-end repeating SEND_RARP
        # while ring 0 cannot drain must not grow it, and an older announcement of a MAC says nothing a
        # newer one does not.
        self._announcements: deque[bytes] = deque(maxlen=MAX_PENDING_ANNOUNCEMENTS)

    carries_vnet_header = True

    @property
    def accepted_offloads(self) -> int:
        """Every offload: the enqueue passes what the guest negotiated (SplitVirtqueue.guest_offloads) and
        completes the rest for it."""
        return ALL_NEEDS

    def pass_offloads(self, needs: int) -> None:
        """Set the guest's transmit queues' pass_offloads (see NetmapAdapter)."""
        for vq in self.device.vqs[1::2]:
            vq.pass_offloads = needs

    # --- DeviceListener -----------------------------------------------------------------------------------
    def queues_changed(self) -> None:
        """The device started, stopped or remapped queues: the worker re-reads our kick fds. A polled port
        asks the driver not to kick (SplitVirtqueue.kicks): nobody would listen."""
        for vq in self.device.vqs:
            vq.kicks = not self.poll
        self._changed()
        self._on_change()

    def _changed(self) -> None:
        """Something the datapath relies on may have changed: the next fast_queues() looks again."""
        self._version += 1
        self._fast = None

    def fast_queues(self) -> FastQueues | None:
        """The queues as the compiled passes take them, or None when this port must take the Python path now
        (broken, a host port, a RARP to send, the reference datapath, dirty logging, a queue not running).

        Split and packed rings alike (struct vhu_queue carries either): the passes (vhost_sync.cdef) take
        any mix of layouts, the one-copy path included."""
        if self.broken is not None or self.host_port is not None or self._announcements:
            return None
        fast = self._fast
        if fast is not None and fast.version == self._version:
            return fast
        if not self.datapath.compiled or self.device.broken is not None:
            return None
        dev = self.device
        mem, hdr_len, mergeable = dev.memory, dev.vnet_hdr_size, dev.mergeable_rx
        rx: dict[int, Any] = {}
        tx: dict[int, Any] = {}
        keep: list[Any] = [mem]
        for i in range(self.num_rx_rings):
            for ring, vq, kring in (
                (rx, self._queue(2 * i + 1), self.rx_rings[i]),
                (tx, self._rx_queue_for(i), self.tx_rings[i]),
            ):
                if vq is None:
                    continue  # not running: nothing to receive / nowhere to deliver (Python path)
                if vq.log_dirty:
                    return None  # migrating: dirty pages are logged by the per-sync path
                q = ffi.new("struct vhu_queue *")
                q.kring, q.mem = kring.c, mem.c
                if isinstance(vq, PackedVirtqueue):
                    # The same out and scratch as its per-sync batches: fast_failed reads a fault there.
                    compiled = kernels.packed_ring(vq, mem)
                    scratch = compiled.scratch()
                    q.packed, q.packed_scratch, q.out = vq.c, scratch, compiled.out
                    keep += [compiled, scratch]
                else:
                    assert isinstance(vq, SplitVirtqueue)
                    q.vq, q.scratch, q.out = vq.c, vq.scratch, vq.out
                q.stats = ffi.addressof(self.queue_stats[vq.index // 2])
                q.call_fd = -1 if vq.call_fd is None else vq.call_fd
                q.hdr_len, q.mergeable = hdr_len, mergeable
                if ring is tx:
                    q.lock = self.tx_lock(i)
                ring[i] = q
                keep += [kring, vq]
        self._fast = FastQueues(self._version, rx, tx, self.stash.c, tuple(keep))
        return self._fast

    def fast_failed(self, kring: Kring, receive: bool, status: int) -> None:
        """A compiled pass stopped at ``kring`` with ``status``: a driver fault marks the device broken, as
        the Python sync would; a ring the prologue refused is synced the Python way, which says why."""
        if status == lib.VHU_FAULTED:
            return  # the pass that met this queue's fault (another thread's, maybe) reports it
        index = kring.ring_id
        vq = self._queue(2 * index + 1) if receive else self._rx_queue_for(index)
        if status == lib.VHU_REJECT or vq is None:
            (NetmapAdapter.rxsync if receive else NetmapAdapter.txsync)(self, index)
            return
        try:
            kernels.finish(vq, self.device.memory, status, not receive)
        except VirtqueueError as e:
            self._fault(kring, e)

    def announce(self, mac: bytes) -> None:
        """SEND_RARP (after a migration): send a RARP broadcast from ``mac`` as if the guest had, so that
        switches and the host stack learn where it is now. It leaves with the next rxsync of ring 0."""
        frame = rarp_frame(mac)
        if frame in self._announcements:
            log.debug("port %s: %s already waits to be announced", self.name, mac.hex(":"))
            return
        if len(self._announcements) == self._announcements.maxlen:
            log.warning(
                "port %s: %d RARP announcements already wait for ring 0; dropping the oldest",
                self.name,
                len(self._announcements),
            )
        log.info("port %s: announcing %s (RARP)", self.name, mac.hex(":"))
        self._announcements.append(frame)
        self._changed()
        self._on_change()

    @property
    def pending_announcements(self) -> int:
        """RARP frames announced and not yet in RX kring 0 (at most MAX_PENDING_ANNOUNCEMENTS)."""
        return len(self._announcements)

    # --- MessageHandler (server.py) ----------------------------------------------------------------------
    def handle_message(self, msg: Message) -> Payload | None:
        """Run one request against the device, never while a datapath batch runs."""
        with self.lock:
            try:
                return self.device.handle(msg)
            finally:
                self._changed()

    def reply_ack_negotiated(self) -> bool:
        """Whether the front-end asked for REPLY_ACK."""
        return self.device.has_protocol_feature(ProtocolFeature.REPLY_ACK)

    def connected(self) -> None:
        """A new front-end: start from a clean device."""
        with self.lock:
            self.device.close()
            self._changed()

    def disconnected(self) -> None:
        """The front-end left: unmap its memory and close its fds."""
        with self.lock:
            self.device.close()
            self._changed()

    def close(self) -> None:
        """The daemon stops: release the front-end's resources, then our rings and buffers."""
        with self.lock:
            self.device.close()
            self._changed()
            super().close()
            self.stash.close()

    # --- the datapath -------------------------------------------------------------------------------------
    def wake_fds(self) -> list[int]:
        """Kick eventfds of the queues that run now, and the host port's fds (the TAP of ``host=``)."""
        kicks = (
            []
            if self.device.broken
            else [vq.kick_fd for vq in self.device.vqs if vq.ready and vq.kick_fd is not None]
        )
        return [*kicks, *super().wake_fds()]

    def tx_lock(self, ring_index: int) -> Any:
        """The lock of the guest receive queue TX kring ``ring_index`` delivers into now (its own pair's, or
        the running pair it falls back on): krings that share a virtqueue share its word."""
        vq = self._rx_queue_for(ring_index) if ring_index < self.num_tx_rings else None
        return super().tx_lock(ring_index if vq is None else vq.index // 2)

    def queue_wake_fds(self, ring_index: int) -> list[int]:
        """The kicks of queue pair ``ring_index`` (its transmit queue fills RX ring i, its receive queue
        drains TX ring i), or the host port's fds for the host RX ring."""
        if ring_index >= self.num_rx_rings:
            return list(super().queue_wake_fds(ring_index))
        if self.device.broken:
            return []
        vqs = self.device.vqs[2 * ring_index : 2 * ring_index + 2]
        return [vq.kick_fd for vq in vqs if vq.ready and vq.kick_fd is not None]

    def carrier(self, ring_index: int) -> bool:
        """Whether TX kring ``ring_index`` has a guest receive queue to deliver into now."""
        return self._rx_queue_for(ring_index) is not None

    def _queue(self, index: int) -> DeviceQueue | None:
        """The virtqueue with ``index`` if it may be processed now."""
        if self.device.broken or index >= len(self.device.vqs):
            return None
        vq = self.device.vqs[index]
        return vq if vq.ready else None

    def _rx_queue_for(self, pair: int) -> DeviceQueue | None:
        """The receive virtqueue TX kring ``pair`` delivers into: its own pair's when it runs, else one of the
        pairs that do (``pair`` mod their number). A multiqueue driver may run fewer pairs than the device has
        (QEMU disables the others with SET_VRING_ENABLE 0), while the peer still sends on every kring."""
        vq = self._queue(2 * pair)
        if vq is not None or self.device.broken:
            return vq
        running = [q for q in self.device.vqs[0::2] if q.ready]
        return running[pair % len(running)] if running else None

    def _fault(self, kring: Kring, e: VirtqueueError) -> None:
        self.queue_stats[kring.ring_id].errors += 1
        self.device.mark_broken(str(e), queue=e.queue)

    def rxsync(self, ring_index: int, flags: int = 0) -> None:
        """NetmapAdapter.rxsync, in one compiled call (vhu_queue_rxsync) when fast_queues() has the ring."""
        fast = self.fast_queues()
        q = fast.rx.get(ring_index) if fast is not None else None
        if q is None:
            super().rxsync(ring_index, flags)
            return
        status = lib.vhu_queue_rxsync(q)
        if status != lib.VQ_OK:
            self.fast_failed(self.rx_rings[ring_index], True, status)

    def txsync(self, ring_index: int, flags: int = 0) -> None:
        """NetmapAdapter.txsync, in one compiled call (vhu_queue_txsync) when fast_queues() has the ring."""
        fast = self.fast_queues()
        q = fast.tx.get(ring_index) if fast is not None else None
        if q is None:
            super().txsync(ring_index, flags)
            return
        status = lib.vhu_queue_txsync(q)
        if status != lib.VQ_OK:
            self.fast_failed(self.tx_rings[ring_index], False, status)

    def nm_rxsync(self, kring: Kring, flags: int = 0) -> None:
        """Release what the user returned, then import what the guest transmitted on queue pair i."""
        n = kring.nkr_num_slots
        kring.nr_hwcur = kring.rhead
        if self._announcements and kring.ring_id == 0:
            self._import_announcements(kring)
        vq = self._queue(2 * kring.ring_id + 1)
        if vq is None:
            return
        space = (kring.nr_hwcur - kring.nr_hwtail - 1) % n
        try:
            res = self.datapath.dequeue(
                vq,
                self.device.memory,
                self.device.vnet_hdr_size,
                kring.ring.slots,
                kring.nr_hwtail,
                space,
                self._bufs,
            )
        except CallRefused as e:
            # The batch went through, only its interrupt did not: count it, and the device is broken.
            self._fault(kring, e)
            res = e.batch
        except VirtqueueError as e:
            self._fault(kring, e)
            return
        kring.nr_hwtail = (kring.nr_hwtail + res.slots) % n
        st = self.queue_stats[kring.ring_id]
        st.rx_packets += res.packets
        st.rx_bytes += res.bytes
        st.rx_dropped += res.dropped
        st.rx_bad_header += res.bad_headers
        st.rx_offloaded += res.offloaded
        st.rx_offload_passed += res.passed

    def _import_announcements(self, kring: Kring) -> None:
        """Put queued RARP frames into free slots of RX kring 0, as received frames."""
        n = kring.nkr_num_slots
        slots = kring.ring.slots
        while self._announcements and (kring.nr_hwcur - kring.nr_hwtail - 1) % n:
            frame = self._announcements.popleft()
            i = kring.nr_hwtail
            self.memory.buf_view(int(slots["buf_idx"][i]))[: len(frame)] = np.frombuffer(
                frame, dtype=np.uint8
            )
            slots["len"][i] = len(frame)
            slots["flags"][i] = 0
            kring.nr_hwtail = (i + 1) % n
            self.queue_stats[0].rx_packets += 1
            self.queue_stats[0].rx_bytes += len(frame)

    def nm_txsync(self, kring: Kring, flags: int = 0) -> None:
        """Deliver slots [hwcur, head) into the guest's receive queue of pair i, as far as it has room."""
        n = kring.nkr_num_slots
        count = (kring.rhead - kring.nr_hwcur) % n
        if count == 0:
            return
        st = self.queue_stats[kring.ring_id]
        vq = self._rx_queue_for(kring.ring_id)
        if vq is None:
            # No guest to deliver to (link down): drop like a NIC without carrier, and count frames. A frame
            # whose last fragment is not here yet waits for it, so that no tail is ever taken for a frame.
            idx = (kring.nr_hwcur + np.arange(count)) % n
            ends = np.flatnonzero((kring.ring.slots["flags"][idx] & NS_MOREFRAG) == 0)
            st.tx_dropped += int(ends.size)
            st.tx_no_carrier += int(ends.size)
            consumed = int(ends[-1]) + 1 if ends.size else 0
        else:
            st = self.queue_stats[vq.index // 2]
            try:
                res = self.datapath.enqueue(
                    vq,
                    self.device.memory,
                    self.device.vnet_hdr_size,
                    self.device.mergeable_rx,
                    kring.ring.slots,
                    kring.nr_hwcur,
                    count,
                    self._bufs,
                )
            except CallRefused as e:
                self._fault(kring, e)  # delivered: counted, and the device is broken
                res = e.batch
            except VirtqueueError as e:
                self._fault(kring, e)
                return
            consumed = res.slots
            st.tx_packets += res.packets
            st.tx_bytes += res.bytes
            st.tx_dropped += res.dropped
            st.tx_bad_header += res.bad_headers
            st.tx_offloaded += res.offloaded
        kring.nr_hwcur = (kring.nr_hwcur + consumed) % n
        # Delivered slots were copied out: they are free again at once.
        kring.nr_hwtail = (kring.nr_hwcur - 1) % n

    def count_dropped(self, ring: int, frames: int) -> None:
        """A consumer discarded ``frames`` received on RX ring ``ring`` (no one to deliver them to)."""
        self.queue_stats[ring].rx_dropped += frames
        self.queue_stats[ring].rx_unconnected += frames

    def stats_dict(self, kicks: Mapping[int, int] | None = None) -> dict[str, Any]:
        """Counters for ``vhostmap stats``; per queue pair also ``calls`` (interrupts signalled on its two
        virtqueues since they were set up) and ``kicks`` (the guest's notifications on them, from ``kicks``:
        kick eventfd -> kicks the datapath read from it, Datapath.kicks)."""
        queues = [
            {
                "queue": i,
                **{name: int(getattr(q, name)) for name in QUEUE_COUNTERS},
                **self._notifications(i, kicks),
            }
            for i, q in enumerate(self.queue_stats)
        ]
        totals = {name: sum(q[name] for q in queues) for name in (*QUEUE_COUNTERS, "calls", "kicks")}
        occupancy = [{"queue": i, **self._occupancy(i)} for i in range(len(queues))]
        return {"queues": queues, "totals": totals, "occupancy": occupancy, "broken": self.device.broken}

    def _notifications(self, pair: int, kicks: Mapping[int, int] | None) -> dict[str, int]:
        vqs = self.device.vqs[2 * pair : 2 * pair + 2]
        return {
            "calls": sum(int(vq.c.calls) for vq in vqs),
            "kicks": sum((kicks or {}).get(vq.kick_fd, 0) for vq in vqs if vq.kick_fd is not None),
        }

    def _occupancy(self, pair: int) -> dict[str, int]:
        """What waits in queue pair ``pair`` now: chains the guest queued for transmission and vhostmap has
        not taken (``guest_tx_waiting``), receive buffers the guest posted and vhostmap has not filled
        (``guest_rx_buffers``), and frames for the guest held in the port's TX ring until it posts some
        (``held``). Where the frames of a busy path pile up says which side is slower."""
        guest_rx, guest_tx = self.device.vqs[2 * pair], self.device.vqs[2 * pair + 1]
        kring = self.tx_rings[pair] if pair < len(self.tx_rings) else None
        return {
            "guest_tx_waiting": guest_tx.waiting() if guest_tx.ready else 0,
            "guest_rx_buffers": guest_rx.waiting() if guest_rx.ready else 0,
            "held": kring.pending() if kring is not None else 0,
        }

    def inspect(self, pair: int | None = None, chains: int = 0) -> dict[str, Any]:
        """What ``vhostmap inspect`` shows: the device and its ring layout, and per queue pair (all, or
        ``pair``) both virtqueues (SplitVirtqueue.snapshot or PackedVirtqueue.snapshot, with up to ``chains``
        waiting chains walked), both krings, and why traffic stands still there when it does (``stalled``).
        Read-only: safe on a hostile guest."""
        dev = self.device
        pairs = range(len(self.queue_stats)) if pair is None else [pair]
        if pair is not None and not 0 <= pair < len(self.queue_stats):
            raise ValueError(f"port {self.name} has queue pairs 0..{len(self.queue_stats) - 1}, not {pair}")
        queues = []
        for i in pairs:
            guest_rx, guest_tx = (dev.vqs[2 * i].snapshot(chains), dev.vqs[2 * i + 1].snapshot(chains))
            rx_kring, tx_kring = self.rx_rings[i].snapshot(), self.tx_rings[i].snapshot()
            queues.append(
                {
                    "queue": i,
                    "guest_receive": guest_rx,
                    "guest_transmit": guest_tx,
                    "rx_kring": rx_kring,
                    "tx_kring": tx_kring,
                    "stalled": _stalled(dev.broken, guest_rx, guest_tx, rx_kring, tx_kring),
                }
            )
        return {
            "port": self.name,
            "broken": dev.broken,
            "status": dev.status,
            "ring": dev.layout,
            "features": feature_names(dev.features),
            "queues": queues,
        }


def _stalled(
    broken: str | None,
    rx: dict[str, Any],
    tx: dict[str, Any],
    rx_kring: dict[str, Any],
    tx_kring: dict[str, Any],
) -> list[str]:
    """Why frames stand still in one queue pair, as an engineer asks when a guest "has no network"."""
    if broken:
        return [f"the device is broken: {broken} (the driver must reset it)"]
    why = []
    for vq, what in ((rx, "receive"), (tx, "transmit")):
        if not vq["started"] or not vq["enabled"] or not vq["mapped"]:
            state = ", ".join(k for k in ("started", "enabled", "mapped") if not vq[k])
            why.append(f"the guest's {what} queue is not running (not {state})")
        elif vq["faulted"]:
            why.append(f"the guest's {what} queue faulted (the port is being marked broken)")
        elif vq.get("pending", 0) > vq["size"]:
            why.append(f"the guest's {what} queue has an available index {vq['pending']} entries ahead")
    if rx.get("pending") == 0 and tx_kring["pending"]:
        why.append(f"no receive buffers: {tx_kring['pending']} frame(s) wait until the guest posts some")
    if tx.get("pending") and _held(rx_kring) == rx_kring["slots"] - 1:
        why.append("the guest's frames wait: the port's RX ring is full (its peer takes nothing)")
    for vq, what in ((rx, "receive"), (tx, "transmit")):
        for chain in vq.get("chains", ()):
            if "fault" in chain:
                why.append(f"the guest's {what} queue holds a bad chain: {chain['fault']}")
                break
    return why


def _held(kring: dict[str, Any]) -> int:
    """Slots of an RX kring received and not released by its user ([head, hwtail))."""
    return (kring["hwtail"] - kring["head"]) % kring["slots"]


def rarp_frame(mac: bytes) -> bytes:
    """The reverse-ARP broadcast QEMU sends to announce a guest's MAC (RFC 903, "request reverse")."""
    eth = BROADCAST + mac + ETH_P_RARP.to_bytes(2, "big")
    rarp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)
    return (eth + rarp).ljust(ETH_ZLEN, b"\0")
