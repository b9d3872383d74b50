"""NetmapAdapter, the base class of every port, its registration (NIOCREGIF) and a loopback example port.

Follows netmap.c (struct netmap_adapter, netmap_set_ringid, netmap_do_regif and
the NIOCTXSYNC/NIOCRXSYNC paths), with the modern NR_REG_* registration modes.

A port has ``num_tx_rings`` TX and ``num_rx_rings`` RX hardware krings plus one host kring per direction;
``tx_rings``/``rx_rings`` list the hardware krings first and the host kring last, so ring index
``num_tx_rings`` is the host TX ring (as netmap numbers them). Subclasses move packets in ``nm_txsync`` /
``nm_rxsync`` (hardware rings); the host rings go to the adapter's ``host_port`` when one is attached (a
HostStack on a TAP, host.py), which also gets the NS_FORWARD slots a hardware rxsync releases on a ring with
NR_FORWARD (transparent mode); without one they drop what is sent and receive nothing. The public
``txsync`` / ``rxsync`` wrap the hooks in the kring prologue and finalize. A hook that raises PortBroken marks
this port broken (one log line, later syncs do nothing) and never disturbs other ports. Syncs of one adapter
are not thread-safe: callers serialise them (the datapath worker holds its lock while a forwarder runs).

Hook contract (what netmap's drivers do):

- ``nm_txsync``: send slots [nr_hwcur, rhead), advance nr_hwcur past what was sent, and reclaim completed
  slots by moving nr_hwtail up to at most nm_prev(nr_hwcur).
- ``nm_rxsync``: take back slots [nr_hwcur, rhead) (nr_hwcur = rhead), and fill at most ``rx_space()`` new
  slots from nr_hwtail, advancing nr_hwtail.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from vhostmap.datapath import ffi
from vhostmap.netmap.abi import (
    NETMAP_DO_RX_POLL,
    NETMAP_NO_TX_POLL,
    NETMAP_RING_MASK,
    NR_FORWARD,
    NR_REG_ALL_NIC,
    NR_REG_NIC_SW,
    NR_REG_ONE_NIC,
    NR_REG_SW,
    NR_TIMESTAMP,
    NS_BUF_CHANGED,
    NS_INDIRECT,
    NS_MOREFRAG,
    NS_VNET_HDR,
    RingView,
    nm_distance,
    nm_prev,
)
from vhostmap.netmap.allocator import IfLayout, NetmapMemory, RingLayout
from vhostmap.netmap.errors import BadRingId, PortBroken
from vhostmap.netmap.kring import Kring

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastQueues:
    """What the compiled passes need of a port right now (``NetmapAdapter.fast_queues``): a C queue handle
    (struct vhu_queue, datapath/vhost_sync.cdef) for each RX kring fed by a running queue and each TX kring
    with a queue to deliver into, by ring index; ``stash``, the port's buffer stash (struct nm_stash, or
    NULL) its forwarders' passes recycle buffers through (netmap/stash.py). Good while the port's
    ``version`` is this one; ``keep`` holds the objects behind the pointers."""

    version: int
    rx: dict[int, Any]
    tx: dict[int, Any]
    stash: Any
    keep: tuple[Any, ...]


REG_MODES = {
    NR_REG_ALL_NIC: "NR_REG_ALL_NIC",
    NR_REG_SW: "NR_REG_SW",
    NR_REG_NIC_SW: "NR_REG_NIC_SW",
    NR_REG_ONE_NIC: "NR_REG_ONE_NIC",
}
REG_FLAGS = NETMAP_NO_TX_POLL | NETMAP_DO_RX_POLL


class HostPort(Protocol):
    """What an adapter's host rings are bound to (netmap: the host stack behind the host rings).

    ``txsync``/``rxsync`` implement the host krings' hooks (same contract as nm_txsync/nm_rxsync);
    ``send_up`` passes to the stack the NS_FORWARD slots of [nr_hwcur, rhead) of a hardware RX kring with
    NR_FORWARD, before they are released; ``wake_fds`` are fds that signal frames from the stack (read by
    ``rxsync``, not drained by the worker); ``close`` detaches it from the adapter.
    """

    @property
    def name(self) -> str:
        """What the host side is (e.g. the TAP's name)."""

    def txsync(self, kring: Kring, flags: int) -> None:
        """Host TX kring -> the stack."""

    def rxsync(self, kring: Kring, flags: int) -> None:
        """The stack -> host RX kring."""

    def send_up(self, kring: Kring) -> int:
        """Transparent mode, NIC -> host; the frames passed up."""

    def wake_fds(self) -> Sequence[int]:
        """Fds readable when the stack sent something."""

    @property
    def accepted_offloads(self) -> int:
        """The NEEDS_* (netmap/offload.py) a frame with its virtio-net header (NS_VNET_HDR) in the host TX
        ring may keep: the stack takes them."""

    def pass_offloads(self, needs: int) -> None:
        """Frames from the stack may keep the offloads ``needs`` names (NetmapAdapter.pass_offloads)."""

    def close(self) -> None:
        """Detach from the adapter and release the stack."""


@dataclass(frozen=True, eq=False)
class Registration:
    """A binding of a user to some krings of a port (netmap_priv_d after NIOCREGIF).

    ``tx_first``..``tx_last`` and ``rx_first``..``rx_last`` are half-open ranges of kring indexes, as
    netmap's np_qfirst/np_qlast. ``nifp`` says where the netmap_if is (nr_offset) and ``memsize`` how much of
    the region to map (nr_memsize).
    """

    adapter: NetmapAdapter
    mode: int
    ring_id: int
    flags: int
    tx_first: int
    tx_last: int
    rx_first: int
    rx_last: int
    nifp: IfLayout
    memsize: int

    @property
    def tx_poll(self) -> bool:
        """Whether poll should txsync (no NETMAP_NO_TX_POLL)."""
        return not self.flags & NETMAP_NO_TX_POLL

    @property
    def rx_poll(self) -> bool:
        """Whether poll should rxsync even when not asked for input (NETMAP_DO_RX_POLL)."""
        return bool(self.flags & NETMAP_DO_RX_POLL)

    @property
    def tx_krings(self) -> list[Kring]:
        """The TX krings bound."""
        return self.adapter.tx_rings[self.tx_first : self.tx_last]

    @property
    def rx_krings(self) -> list[Kring]:
        """The RX krings bound."""
        return self.adapter.rx_rings[self.rx_first : self.rx_last]

    def txsync(self, flags: int = 0) -> None:
        """NIOCTXSYNC: txsync every bound TX ring."""
        for i in range(self.tx_first, self.tx_last):
            self.adapter.txsync(i, flags)

    def rxsync(self, flags: int = 0) -> None:
        """NIOCRXSYNC: rxsync every bound RX ring."""
        for i in range(self.rx_first, self.rx_last):
            self.adapter.rxsync(i, flags)


class NetmapAdapter(abc.ABC):
    """A port: its netmap_if and rings in ``memory``, its krings, its registrations.

    ``broken`` is None while the port works, else the reason it stopped. ``host_port`` is what the host
    rings are bound to, if anything. ``close()`` closes the host port and frees the rings and their buffers.
    """

    #: Whether the hooks themselves capture what they move (a kring's tap, netmap/capture.py) rather than
    #: the syncs around them: ports whose frames move by move_slots, which a peer's sync may call too.
    TAPS_IN_HOOKS = False

    #: Whether frames of its hardware rings may start with their virtio-net header (NS_VNET_HDR), and frames
    #: given to them may too: a port whose syncs write and check that header (a vhost-user port's).
    carries_vnet_header = False

    def __init__(
        self,
        name: str,
        memory: NetmapMemory,
        *,
        num_tx_rings: int = 1,
        num_rx_rings: int = 1,
        num_tx_desc: int = 1024,
        num_rx_desc: int = 1024,
        host_rings: bool = True,
    ) -> None:
        self.name = name
        self.memory = memory
        self.num_tx_rings = num_tx_rings
        self.num_rx_rings = num_rx_rings
        self.num_tx_desc = num_tx_desc
        self.num_rx_desc = num_rx_desc
        self.has_host_rings = host_rings
        self.nifp = memory.create_if(
            name, num_tx_rings, num_rx_rings, num_tx_desc, num_rx_desc, int(host_rings), int(host_rings)
        )
        self.tx_rings = [self._kring(r) for r in self.nifp.tx_rings]
        self.rx_rings = [self._kring(r) for r in self.nifp.rx_rings]
        self.broken: str | None = None
        self.registrations: list[Registration] = []
        self.host_port: HostPort | None = None
        # The lock words of the TX rings (tx_lock), host ring included.
        self.tx_locks: Any = ffi.new("uint32_t[]", len(self.tx_rings))

    @property
    def accepted_offloads(self) -> int:
        """The NEEDS_* (netmap/offload.py) a frame may ask for and be given to this port with its virtio-net
        header: its peer takes them, or the port completes them on the way out. None but for ports that
        carry_vnet_header."""
        return 0

    def pass_offloads(self, needs: int) -> None:
        """Frames this port receives may keep the offloads ``needs`` names (NS_VNET_HDR), because every
        port they can go to accepts them; others are completed as they come in. A forwarder says so each
        time its ports or their features change; ports that never carry the header ignore it."""
        return None

    def _kring(self, r: RingLayout) -> Kring:
        m = self.memory
        view = RingView(
            m.region, r.offset, r.num_slots, buf_ofs=m.buffers_offset - r.offset, nr_buf_size=m.buf_size
        )
        return Kring(
            view,
            direction=r.direction,
            ring_id=r.ringid,
            port=self.name,
            nbufs=m.nbufs,
            buf_size=m.buf_size,
            host=r.host,
            restock=m.restock,
        )

    @property
    def host_tx_ring(self) -> Kring:
        """The host TX kring (what users send to the host stack)."""
        return self.tx_rings[self.num_tx_rings]

    @property
    def host_rx_ring(self) -> Kring:
        """The host RX kring (what the host stack sends to users)."""
        return self.rx_rings[self.num_rx_rings]

    # --- hooks ----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def nm_txsync(self, kring: Kring, flags: int) -> None:
        """Send [nr_hwcur, rhead) of a hardware TX kring and reclaim completed slots (see module doc)."""

    @abc.abstractmethod
    def nm_rxsync(self, kring: Kring, flags: int) -> None:
        """Take back [nr_hwcur, rhead) of a hardware RX kring and import new packets at nr_hwtail."""

    def host_txsync(self, kring: Kring, flags: int) -> None:
        """Send what users put on the host TX ring to the host port; without one, drop and count it."""
        if self.host_port is not None:
            self.host_port.txsync(kring, flags)
            return
        n = kring.pending()
        if n:
            first = kring.nr_hwcur
            idx = (first + np.arange(n)) % kring.nkr_num_slots
            kring.dropped += int(np.count_nonzero((kring.ring.slots["flags"][idx] & NS_MOREFRAG) == 0))
            kring.nr_hwcur = kring.rhead
        kring.nr_hwtail = nm_prev(kring.nr_hwcur, kring.nkr_num_slots)

    def host_rxsync(self, kring: Kring, flags: int) -> None:
        """Import what the host port sent; without one nothing arrives (released slots are taken back)."""
        if self.host_port is not None:
            self.host_port.rxsync(kring, flags)
            return
        kring.nr_hwcur = kring.rhead

    def nm_register(self, onoff: bool) -> None:  # noqa: B027 (an optional hook, not an abstract one)
        """Called when the first user registers (True) and when the last one leaves (False)."""

    def wake_fds(self) -> Sequence[int]:
        """Fds that signal work for this port's rings: by default the host port's. Subclasses add their own
        (kick eventfds, a socket) to ``super().wake_fds()``."""
        return list(self.host_port.wake_fds()) if self.host_port is not None else []

    def queue_wake_fds(self, ring_index: int) -> Sequence[int]:
        """The fds of ``wake_fds`` that the datapath thread serving RX ring ``ring_index`` watches, when
        several threads share the port's queues: each fd goes to one queue only (two threads draining one
        eventfd could each take the other's kick). Here the host port's to the host RX ring, the rest to
        ring 0; a thread serving RX ring i also flushes TX ring i (see Switch.run)."""
        host = list(self.host_port.wake_fds()) if self.host_port is not None else []
        if ring_index == self.num_rx_rings:
            return host
        return [fd for fd in self.wake_fds() if fd not in host] if ring_index == 0 else []

    # --- syncs ----------------------------------------------------------------------------------------------
    def txsync(self, ring_index: int, flags: int = 0) -> None:
        """NIOCTXSYNC on one TX kring (``num_tx_rings`` is the host ring): prologue, hook, finalize."""
        kring = self._ring(self.tx_rings, ring_index, "TX")
        if self.broken is not None or not kring.txsync_prologue():
            return
        tap, first = (None if self.TAPS_IN_HOOKS else kring.tap), kring.nr_hwcur
        if tap is not None:
            # Before the hook, which may give the buffers away; published for the slots it sent.
            tap.stage(first, kring.pending())
        self._run(self.host_txsync if kring.host else self.nm_txsync, kring, flags)
        if tap is not None:
            tap.commit(nm_distance(first, kring.nr_hwcur, kring.nkr_num_slots))

    def rxsync(self, ring_index: int, flags: int = 0) -> None:
        """NIOCRXSYNC on one RX kring (``num_rx_rings`` is the host ring): prologue, hook, finalize."""
        kring = self._ring(self.rx_rings, ring_index, "RX")
        if self.broken is not None or not kring.rxsync_prologue():
            return
        if kring.host:
            hook = self.host_rxsync
        else:
            hook = self.nm_rxsync
            if self.host_port is not None and kring.ring.flags & NR_FORWARD and kring.pending():
                # Transparent mode: NS_FORWARD slots being released go up first (netmap_grab_packets).
                self.host_port.send_up(kring)
        tap, first = (None if self.TAPS_IN_HOOKS else kring.tap), kring.nr_hwtail
        done = self._run(hook, kring, flags)
        if tap is not None:
            tap.capture(first, nm_distance(first, kring.nr_hwtail, kring.nkr_num_slots))
        if done and kring.ring.flags & NR_TIMESTAMP:
            self._timestamp(kring)

    def _ring(self, rings: list[Kring], index: int, kind: str) -> Kring:
        if not 0 <= index < len(rings):
            raise BadRingId(self.name, f"{kind} ring {index} does not exist (0..{len(rings) - 1})")
        return rings[index]

    def _run(self, hook: Callable[[Kring, int], None], kring: Kring, flags: int) -> bool:
        """Hook then finalize; a PortBroken from either marks this port broken. True when all went well."""
        try:
            hook(kring, flags)
            kring.sync_finalize()
        except PortBroken as e:
            self.broken = e.reason
            log.error(
                "%s: port broken in %s sync: %s",
                self.name,
                kring.name,
                e.reason,
                extra={"port": self.name, "ring": kring.name, "reason": e.reason},
            )
            return False
        return True

    @staticmethod
    def _timestamp(kring: Kring) -> None:
        # NR_TIMESTAMP: the user asked for the time of the last rxsync in ring.ts.
        ts = kring.ring.header.ts
        ts.tv_sec, ts.tv_usec = divmod(time.time_ns() // 1000, 1_000_000)

    def count_dropped(self, ring_index: int, frames: int) -> None:
        """Account ``frames`` that a consumer of RX ring ``ring_index`` discarded."""
        self._ring(self.rx_rings, ring_index, "RX").dropped += frames

    def tx_lock(self, ring_index: int) -> Any:
        """The lock word (datapath/locks.cdef) of TX ring ``ring_index``: held by whoever fills or txsyncs it
        while other datapath threads may too (several receive queues forwarding into it). One per ring here;
        a port whose TX rings can share what a txsync writes into answers with one word for those."""
        self._ring(self.tx_rings, ring_index, "TX")
        return self.tx_locks + ring_index

    def carrier(self, ring_index: int) -> bool:
        """Whether TX ring ``ring_index`` has somewhere to deliver to now (a guest receive queue, a link)."""
        return True

    # --- the compiled datapath's seam ---------------------------------------------------------------------
    def fast_queues(self) -> FastQueues | None:
        """The C queue handles the compiled passes of the forwarders run over, or None when this port takes
        the Python path (the default: its syncs are these Python hooks). A port that returns handles answers
        for their syncs through ``fast_failed``."""
        return None

    def fast_failed(self, kring: Kring, receive: bool, status: int) -> None:
        """A compiled pass over ``fast_queues`` stopped at ``kring`` (an RX kring when ``receive``) with the
        kernel's ``status``: handle it as this port's own sync would (a fault, or the Python sync)."""
        raise NotImplementedError(f"{self.name}: has no compiled queues")

    # --- registration ---------------------------------------------------------------------------------------
    def register(self, mode: int, ring_id: int = 0, flags: int = 0) -> Registration:
        """NIOCREGIF: bind a user to the rings ``mode`` selects (netmap_interp_ringid).

        NR_REG_ALL_NIC: every hardware ring; NR_REG_SW: the host rings; NR_REG_NIC_SW: both; NR_REG_ONE_NIC:
        hardware ring pair ``ring_id`` (a direction with fewer rings binds its ring 0, as netmap does).
        ``flags`` may hold NETMAP_NO_TX_POLL and NETMAP_DO_RX_POLL. Raises BadRingId for anything else.
        """
        if mode not in REG_MODES:
            raise BadRingId(
                self.name, f"registration mode {mode} is not one of {', '.join(REG_MODES.values())}"
            )
        if flags & ~REG_FLAGS:
            raise BadRingId(
                self.name, f"registration flags {flags:#x} outside NETMAP_NO_TX_POLL|NETMAP_DO_RX_POLL"
            )
        ntx, nrx = self.num_tx_rings, self.num_rx_rings
        if mode == NR_REG_ONE_NIC:
            if not 0 <= ring_id < max(ntx, nrx) or ring_id > NETMAP_RING_MASK:
                raise BadRingId(self.name, f"ring id {ring_id} out of range 0..{max(ntx, nrx) - 1}")
            t = ring_id if ring_id < ntx else 0
            r = ring_id if ring_id < nrx else 0
            tx, rx = (t, t + 1), (r, r + 1)
        elif ring_id != 0:
            raise BadRingId(
                self.name, f"ring id {ring_id} given with {REG_MODES[mode]}, which binds no single ring"
            )
        elif mode == NR_REG_ALL_NIC:
            tx, rx = (0, ntx), (0, nrx)
        elif mode in (NR_REG_SW, NR_REG_NIC_SW) and not self.has_host_rings:
            raise BadRingId(self.name, f"{REG_MODES[mode]}: this port has no host rings")
        elif mode == NR_REG_SW:
            tx, rx = (ntx, len(self.tx_rings)), (nrx, len(self.rx_rings))
        else:
            tx, rx = (0, len(self.tx_rings)), (0, len(self.rx_rings))
        reg = Registration(self, mode, ring_id, flags, *tx, *rx, self.nifp, self.memory.size)
        if not self.registrations:
            self.nm_register(True)
        self.registrations.append(reg)
        for k in reg.tx_krings + reg.rx_krings:
            k.users += 1
        return reg

    def unregister(self, reg: Registration) -> None:
        """Release a registration made by ``register``."""
        if reg not in self.registrations:
            raise BadRingId(self.name, "registration is not active on this port")
        self.registrations.remove(reg)
        for k in reg.tx_krings + reg.rx_krings:
            k.users -= 1
        if not self.registrations:
            self.nm_register(False)

    def close(self) -> None:
        """Close the host port, drop every registration and free the rings and their buffers."""
        if self.host_port is not None:
            self.host_port.close()
            self.host_port = None
        for reg in list(self.registrations):
            self.unregister(reg)
        self.memory.delete_if(self.nifp)


class LoopbackAdapter(NetmapAdapter):
    """What is sent on TX ring i comes back on RX ring i, zero copy: the TX slot and the next free RX slot
    swap buffers. A full RX ring holds the TX slots back until the user releases RX slots."""

    TAPS_IN_HOOKS = True

    def __init__(self, name: str, memory: NetmapMemory, *, num_rings: int = 1, num_desc: int = 1024) -> None:
        super().__init__(
            name,
            memory,
            num_tx_rings=num_rings,
            num_rx_rings=num_rings,
            num_tx_desc=num_desc,
            num_rx_desc=num_desc,
        )

    def nm_txsync(self, kring: Kring, flags: int) -> None:
        """Move what fits to the peer RX ring; every moved slot is complete at once."""
        move_slots(kring, self.rx_rings[kring.ring_id])

    def nm_rxsync(self, kring: Kring, flags: int) -> None:
        """Take back released slots, then pull TX slots that were waiting for room."""
        kring.nr_hwcur = kring.rhead
        move_slots(self.tx_rings[kring.ring_id], kring)


def move_slots(tx: Kring, rx: Kring) -> int:
    """Move what ``tx`` has pending ([nr_hwcur, rhead)) to the free part of ``rx`` (from nr_hwtail), zero
    copy: each TX slot swaps buffers with the RX slot it fills. Every moved TX slot is complete at once (its
    hwtail follows); what does not fit waits. Returns the slots moved. Both krings must share an allocator.
    The taps of both krings capture what moved.
    """
    n = min(tx.pending(), rx.rx_space())
    if n:
        first = rx.nr_hwtail
        swap_buffers(tx.ring, tx.nr_hwcur, rx.ring, first, n)
        tx.nr_hwcur = (tx.nr_hwcur + n) % tx.nkr_num_slots
        rx.nr_hwtail = (first + n) % rx.nkr_num_slots
        # A capture of either side sees the frames where they are now (TAPS_IN_HOOKS).
        for tap in (tx.tap, rx.tap):
            if tap is not None:
                tap.capture(first, n, rx)
    tx.nr_hwtail = nm_prev(tx.nr_hwcur, tx.nkr_num_slots)
    return n


def swap_buffers(src: RingView, first_src: int, dst: RingView, first_dst: int, n: int) -> None:
    """Give ``n`` slots of ``dst`` from ``first_dst`` the buffers, lengths, NS_MOREFRAG, NS_VNET_HDR, and
    NS_INDIRECT with ``ptr`` of ``n`` slots of ``src`` from ``first_src`` (a slot of a compiled one-copy pass
    refers to guest memory: datapath/virtio.cdef), and the source slots the destination's spare buffers (zero
    copy; both rings share an allocator). Both sides get NS_BUF_CHANGED. Indexes wrap; nothing else moves."""
    si = (first_src + np.arange(n)) % src.num_slots
    di = (first_dst + np.arange(n)) % dst.num_slots
    s, d = src.slots, dst.slots
    spare = d["buf_idx"][di]
    d["buf_idx"][di] = s["buf_idx"][si]
    s["buf_idx"][si] = spare
    d["len"][di] = s["len"][si]
    d["ptr"][di] = s["ptr"][si]
    d["flags"][di] = (s["flags"][si] & (NS_MOREFRAG | NS_INDIRECT | NS_VNET_HDR)) | NS_BUF_CHANGED
    s["flags"][si] = NS_BUF_CHANGED
