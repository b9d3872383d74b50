"""The vhost-user virtio-net device: the back-end's state machine (docs/interop/vhost-user.rst).

Sans-IO: ``handle(message)`` applies one parsed front-end request to the device state and returns what to
reply, or raises ``DeviceError`` for a request that cannot be honoured. The server owns the socket and the
reply framing; the port owns the datapath and reacts to ``DeviceListener`` callbacks. The device never parses
bytes and never touches packets.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from vhostmap.datapath import eventfds
from vhostmap.netmap.offload import NEEDS_CSUM, NEEDS_ECN, NEEDS_TSO4, NEEDS_TSO6, NEEDS_USO
from vhostmap.vhost_user.errors import GuestMemoryError
from vhostmap.vhost_user.memory import MAX_MEM_SLOTS, GuestMemory
from vhostmap.vhost_user.messages import (
    U64,
    DeviceConfig,
    LogDescriptor,
    MemoryTable,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    VringAddr,
    VringFile,
    VringState,
)
from vhostmap.vhost_user.packed import PackedRingAddresses, PackedVirtqueue
from vhostmap.vhost_user.protocol import Message, Payload
from vhostmap.vhost_user.virtqueue import SplitVirtqueue, VirtqueueError, VringAddresses
from vhostmap.virtio.spec import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_CONFIG,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_USO,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    bit,
    virtio_net_hdr_size,
)

log = logging.getLogger(__name__)

# One virtqueue of the device, in the layout the driver negotiated: split (spec 2.7) or packed (spec 2.8,
# VIRTIO_F_RING_PACKED). Both offer the operations rxtx.py and the port run (rxtx.Virtqueue and the rest),
# and the compiled kernels and passes run over both.
DeviceQueue = SplitVirtqueue | PackedVirtqueue

# What vhostmap offers every driver; the offloads below come on top unless the port says offloads=off.
OFFERED_FEATURES = (
    bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_F_ANY_LAYOUT)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_F_IN_ORDER)
    | bit(VIRTIO_NET_F_MQ)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
    | bit(VHOST_F_LOG_ALL)
    | bit(VHOST_USER_F_PROTOCOL_FEATURES)
)

# Offloads of the guest's transmit path: the driver may leave checksums and TCP/UDP segmentation to the
# device. A frame that asks for them keeps them on its way when every port it may reach takes or completes
# them (the forwarders set SplitVirtqueue.pass_offloads), and is completed in software as it is dequeued
# otherwise.
HOST_OFFLOADS = (
    bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_HOST_USO)
)
# Offloads of the guest's receive path: it takes frames whose checksum is left to it and up to 64 KiB of TCP
# or UDP at once (SplitVirtqueue.guest_offloads), as another guest sent them.
GUEST_OFFLOADS = (
    bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_USO4)
    | bit(VIRTIO_NET_F_GUEST_USO6)
)

# The offloads a port offers, by the name `offloads=` takes (both directions each: the guest sends them and
# takes them); TSO, ECN and USO need the checksum, as the spec makes them (5.1.3.1).
OFFLOADS = {
    "csum": bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM),
    "tso4": bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO4),
    "tso6": bit(VIRTIO_NET_F_HOST_TSO6) | bit(VIRTIO_NET_F_GUEST_TSO6),
    "ecn": bit(VIRTIO_NET_F_HOST_ECN) | bit(VIRTIO_NET_F_GUEST_ECN),
    "uso": bit(VIRTIO_NET_F_HOST_USO) | bit(VIRTIO_NET_F_GUEST_USO4) | bit(VIRTIO_NET_F_GUEST_USO6),
}
ALL_OFFLOADS = HOST_OFFLOADS | GUEST_OFFLOADS


def offload_features(names: Iterable[str]) -> int:
    """The feature bits of the offloads ``names`` (keys of OFFLOADS); ValueError for an unknown name or one
    without what it needs (csum; ecn also needs tso4 or tso6)."""
    chosen = set(names)
    unknown = sorted(chosen - OFFLOADS.keys())
    if unknown:
        raise ValueError(f"unknown offload {unknown[0]!r} (known: {', '.join(OFFLOADS)})")
    if chosen and "csum" not in chosen:
        raise ValueError(f"{'+'.join(sorted(chosen))} needs csum: segmentation leaves the checksum too")
    if "ecn" in chosen and not chosen & {"tso4", "tso6"}:
        raise ValueError("ecn needs tso4 or tso6")
    features = 0
    for name in chosen:
        features |= OFFLOADS[name]
    return features


def accepted_offloads(features: int) -> int:
    """The NEEDS_* bits (netmap/offload.py) of the frames a driver with ``features`` takes as they are: the
    receive offloads it negotiated (segmentation only with GUEST_CSUM, which the spec makes them need)."""

    def has(feature: int) -> bool:
        return bool(features & bit(feature))

    if not has(VIRTIO_NET_F_GUEST_CSUM):
        return 0
    needs = NEEDS_CSUM
    needs |= NEEDS_TSO4 if has(VIRTIO_NET_F_GUEST_TSO4) else 0
    needs |= NEEDS_TSO6 if has(VIRTIO_NET_F_GUEST_TSO6) else 0
    needs |= NEEDS_USO if has(VIRTIO_NET_F_GUEST_USO4) and has(VIRTIO_NET_F_GUEST_USO6) else 0
    needs |= NEEDS_ECN if has(VIRTIO_NET_F_GUEST_ECN) else 0
    return needs


OFFERED_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.LOG_SHMFD)
    | bit(ProtocolFeature.RARP)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.NET_MTU)
    | bit(ProtocolFeature.BACKEND_REQ)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.STATUS)
)


class DeviceError(Exception):
    """A front-end request the device refuses; the connection goes on (a failure ack under REPLY_ACK)."""

    def __init__(self, request: Request, reason: str) -> None:
        super().__init__(f"{request.name}: {reason}")
        self.request = request
        self.reason = reason


# The device's limits, which the configuration checks against too. MTU: IPv4's minimum (RFC 791) up to the
# common jumbo size (a frame then spans several netmap buffers); queue pairs: one kring pair each.
MIN_MTU = 68
MAX_MTU = 9216
MAX_QUEUE_PAIRS = 64


@dataclass(frozen=True)
class NetConfig:
    """Static configuration of one virtio-net device: its MAC, its MTU (MIN_MTU..MAX_MTU), its queue
    pairs (1..MAX_QUEUE_PAIRS), the offloads it offers (feature bits of ALL_OFFLOADS: offload_features) and
    whether it offers packed virtqueues (VIRTIO_F_RING_PACKED: ``packed``; off by default until packed rings
    run compiled batch kernels as split ones do, issue #18)."""

    mac: bytes = b"\x52\x54\x00\x00\x00\x01"
    mtu: int = 1500
    queue_pairs: int = 1
    offloads: int = ALL_OFFLOADS
    packed: bool = False

    def __post_init__(self) -> None:
        if len(self.mac) != 6:
            raise ValueError("mac must be 6 bytes")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"mtu {self.mtu} outside {MIN_MTU}..{MAX_MTU}")
        if not 1 <= self.queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue_pairs {self.queue_pairs} outside 1..{MAX_QUEUE_PAIRS}")
        if self.offloads & ~ALL_OFFLOADS:
            raise ValueError(f"offloads {self.offloads:#x} are not offload features")


class DeviceListener(Protocol):
    """What the port learns from the device state machine."""

    def queues_changed(self) -> None:
        """A queue was started, stopped, enabled, disabled or remapped: re-evaluate which queues run."""

    def announce(self, mac: bytes) -> None:
        """SEND_RARP: the guest moved here; announce ``mac`` to the network on its behalf."""


class VhostUserNetDevice:
    """State of one virtio-net device behind one vhost-user connection."""

    def __init__(self, name: str, config: NetConfig, listener: DeviceListener) -> None:
        self.name = name
        self.config = config
        self.listener = listener
        self.mac = config.mac
        self.mtu = config.mtu
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.owner = False
        self.memory = GuestMemory()
        self.vqs: list[DeviceQueue] = [SplitVirtqueue(i) for i in range(2 * config.queue_pairs)]
        self.backend_req_fd: int | None = None
        self.broken: str | None = None
        self.link_up = True
        # The front-end started packed rings where they were not (VhostUserNetDevice._resume_packed), until
        # the next GET_VRING_BASE or reset.
        self.packed_base_lost = False

    # --- derived state --------------------------------------------------------------------------------
    def has_feature(self, n: int) -> bool:
        """Whether virtio feature bit ``n`` was negotiated."""
        return bool(self.features & bit(n))

    def has_protocol_feature(self, f: ProtocolFeature) -> bool:
        """Whether vhost-user protocol feature ``f`` was negotiated."""
        return bool(self.protocol_features & bit(f))

    @property
    def packed(self) -> bool:
        """Whether the driver negotiated packed virtqueues (VIRTIO_F_RING_PACKED): every queue is one."""
        return self.has_feature(VIRTIO_F_RING_PACKED)

    @property
    def layout(self) -> str:
        """The negotiated ring layout, "packed" or "split" (what ``vhostmap status`` names)."""
        return "packed" if self.packed else "split"

    @property
    def vnet_hdr_size(self) -> int:
        """Size of the virtio-net header on every buffer under the negotiated features."""
        return virtio_net_hdr_size(self.features)

    @property
    def mergeable_rx(self) -> bool:
        """Whether a received frame may span several receive chains (num_buffers in the header)."""
        return self.has_feature(VIRTIO_NET_F_MRG_RXBUF)

    def config_space(self) -> bytes:
        """virtio_net_config as the driver reads it."""
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return VIRTIO_NET_CONFIG.pack(self.mac, status, self.config.queue_pairs, self.mtu)

    # --- faults ---------------------------------------------------------------------------------------
    def mark_broken(self, reason: str, queue: int | None = None) -> None:
        """The driver violated the spec: stop the datapath of this device until it is reset."""
        if self.broken is None:
            log.error(
                "port %s: device broken: %s",
                self.name,
                reason,
                extra={"port": self.name, "queue": queue, "reason": reason},
            )
        self.broken = reason
        err_fd = self.vqs[queue].err_fd if queue is not None and 0 <= queue < len(self.vqs) else None
        if err_fd is not None:
            # QEMU reports a write to the error eventfd as "vhost vring error in virtqueue N". Guarded: the
            # front-end shares it and may have made it blocking and full; then it just does not hear of it.
            result = eventfds.signal(err_fd)
            if result != eventfds.Signal.OK:
                log.warning(
                    "port %s: queue %d: err eventfd not signalled: %s",
                    self.name,
                    queue,
                    eventfds.SIGNAL_FAILURES[result],
                )
        self.listener.queues_changed()

    def reset(self) -> None:
        """Back to the state of a fresh connection (RESET_OWNER, RESET_DEVICE, disconnect)."""
        for vq in self.vqs:
            _close_vq_fds(vq)
        self.vqs = [SplitVirtqueue(i) for i in range(2 * self.config.queue_pairs)]
        self.memory.close()
        self.memory = GuestMemory()
        if self.backend_req_fd is not None:
            os.close(self.backend_req_fd)
            self.backend_req_fd = None
        self.features = 0
        self.status = 0
        self.broken = None
        self.packed_base_lost = False
        self.mtu = self.config.mtu
        self.listener.queues_changed()

    def close(self) -> None:
        """Release every fd and mapping (the connection is gone)."""
        self.reset()
        self.protocol_features = 0
        self.owner = False

    # --- requests -------------------------------------------------------------------------------------
    def handle(self, msg: Message) -> Payload | None:
        """Apply one request; returns the reply payload for requests that have one, else None."""
        handler = _HANDLERS.get(msg.request)
        if handler is None:
            _close_all(msg.fds)
            raise DeviceError(msg.request, "not supported by this device")
        return handler(self, msg)

    def _map(self, request: Request, vq: DeviceQueue) -> None:
        """Map ``vq``'s rings through the memory table; one outside guest memory is the front-end's error."""
        try:
            vq.map(self.memory)
        except VirtqueueError as e:
            raise DeviceError(request, e.reason) from e

    def _vq(self, request: Request, index: int) -> DeviceQueue:
        if not 0 <= index < len(self.vqs):
            raise DeviceError(request, f"queue {index} does not exist (device has {len(self.vqs)})")
        return self.vqs[index]

    @property
    def offered_features(self) -> int:
        """The virtio features this device offers: OFFERED_FEATURES, the configured offloads, and packed
        virtqueues when the port asks for them (NetConfig.packed)."""
        packed = bit(VIRTIO_F_RING_PACKED) if self.config.packed else 0
        return OFFERED_FEATURES | self.config.offloads | packed

    def _get_features(self, msg: Message) -> Payload:
        return U64(self.offered_features)

    def _set_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        features = msg.payload.value
        if features & ~self.offered_features:
            raise DeviceError(
                msg.request, f"features {features & ~self.offered_features:#x} were never offered"
            )
        self.features = features
        self._relayout()
        for vq in self.vqs:
            vq.event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX)
            vq.indirect = self.has_feature(VIRTIO_RING_F_INDIRECT_DESC)
            vq.log_dirty = self.has_feature(VHOST_F_LOG_ALL)
            vq.host_offloads = self.has_feature(VIRTIO_NET_F_CSUM)
            vq.guest_offloads = accepted_offloads(features)
            if isinstance(vq, PackedVirtqueue):
                # A batch of transmitted chains is one used descriptor (spec 2.8.8); split rings write one
                # used entry per chain either way.
                vq.in_order = self.has_feature(VIRTIO_F_IN_ORDER)
        if not features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            # Without protocol features a ring is enabled as soon as it starts (spec: "Ring states").
            for vq in self.vqs:
                vq.enabled = vq.enabled or vq.started
        self.listener.queues_changed()
        return None

    def _relayout(self) -> None:
        """Make every queue of the negotiated layout (SET_FEATURES decides it, before the rings are set up).

        What the front-end may have sent before SET_FEATURES carries over: the eventfds (QEMU sends
        SET_VRING_CALL and SET_VRING_ERR as it initialises the device, DPDK's virtio-user its calls first),
        the started and enabled states, and the size when the new layout takes it. Ring addresses do not:
        they mean different areas in the two layouts."""
        cls: type[DeviceQueue] = PackedVirtqueue if self.packed else SplitVirtqueue
        if all(type(vq) is cls for vq in self.vqs):
            return
        queues: list[DeviceQueue] = []
        for old in self.vqs:
            vq = cls(old.index)
            vq.kick_fd, vq.call_fd, vq.err_fd = old.kick_fd, old.call_fd, old.err_fd
            vq.started, vq.enabled = old.started, old.enabled
            if old.num:
                # A size only the other layout takes is dropped: SET_VRING_NUM comes again with the ring.
                with contextlib.suppress(VirtqueueError):
                    vq.set_num(old.num)
            queues.append(vq)
        self.vqs = queues
        log.info("port %s: %s virtqueues", self.name, self.layout)

    def _set_owner(self, msg: Message) -> None:
        self.owner = True
        return None

    def _reset_owner(self, msg: Message) -> None:
        self.reset()
        return None

    def _get_protocol_features(self, msg: Message) -> Payload:
        return U64(OFFERED_PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        value = msg.payload.value
        if value & ~OFFERED_PROTOCOL_FEATURES:
            raise DeviceError(
                msg.request, f"protocol features {value & ~OFFERED_PROTOCOL_FEATURES:#x} never offered"
            )
        self.protocol_features = value
        return None

    def _get_queue_num(self, msg: Message) -> Payload:
        return U64(self.config.queue_pairs)

    def _get_max_mem_slots(self, msg: Message) -> Payload:
        return U64(MAX_MEM_SLOTS)

    def _set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemoryTable)
        try:
            self.memory.set_table(msg.payload, msg.fds)
        except GuestMemoryError as e:
            raise DeviceError(msg.request, str(e)) from e
        self._remap_queues()
        return None

    def _add_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleMemoryRegion)
        try:
            self.memory.add_region(msg.payload.region, msg.fds[0])
        except GuestMemoryError as e:
            raise DeviceError(msg.request, str(e)) from e
        self._remap_queues()
        return None

    def _rem_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleMemoryRegion)
        _close_all(msg.fds)
        try:
            self.memory.remove_region(msg.payload.region)
        except GuestMemoryError as e:
            raise DeviceError(msg.request, str(e)) from e
        self._remap_queues()
        return None

    def _remap_queues(self) -> None:
        for vq in self.vqs:
            if vq.addresses is None:
                continue
            try:
                vq.map(self.memory)
            except VirtqueueError:
                # The ring may be in a region that has not arrived yet (ADD_MEM_REG one at a time).
                vq.unmap()
        self.listener.queues_changed()

    def _set_vring_num(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vq = self._vq(msg.request, msg.payload.index)
        try:
            vq.set_num(msg.payload.num)
        except VirtqueueError as e:
            raise DeviceError(msg.request, e.reason) from e
        if vq.addresses is not None:
            # Resized after its addresses were set (even while running): the ring views must cover the new
            # size, or the datapath would index past them.
            try:
                vq.map(self.memory)
            except VirtqueueError:
                vq.unmap()
            self.listener.queues_changed()
        return None

    def _set_vring_addr(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringAddr)
        p = msg.payload
        vq = self._vq(msg.request, p.index)
        if isinstance(vq, PackedVirtqueue):
            # desc, driver area, device area in the desc, avail and used fields (as DPDK's vhost library
            # reads them); the guest addresses to log at come from the memory table (PackedRingAddresses).
            vq.addresses = PackedRingAddresses(
                p.desc_user_addr, p.avail_user_addr, p.used_user_addr, log=p.log_used
            )
            self._map(msg.request, vq)
            if not vq.started:
                self._resume_packed(vq)
            self.listener.queues_changed()
            return None
        vq.addresses = VringAddresses(
            p.desc_user_addr, p.avail_user_addr, p.used_user_addr, p.log_guest_addr, p.log_used
        )
        self._map(msg.request, vq)
        vq.used_idx = vq.signalled_used = vq.read_used_idx()
        if vq.used_idx != vq.last_avail_idx:
            # The front-end lost track (the back-end died without GET_VRING_BASE): resume from what the
            # guest already got back, as every completed descriptor was returned synchronously.
            log.warning(
                "port %s: queue %d: last_avail_idx %d != used idx %d, resuming at %d",
                self.name,
                vq.index,
                vq.last_avail_idx,
                vq.used_idx,
                vq.used_idx,
            )
            vq.last_avail_idx = vq.used_idx
        self.listener.queues_changed()
        return None

    def _resume_packed(self, vq: PackedVirtqueue) -> None:
        """A packed ring about to start where the front-end says (SET_VRING_BASE), which its descriptors
        prove wrong (`PackedVirtqueue.base_is_stale`): the front-end lost track, as QEMU does when its
        back-end died without GET_VRING_BASE. It keeps no packed ring state of its own and sends the
        positions of its last GET_VRING_BASE (a migration's, a stop's) or of the ring's reset. Every queue
        of the device then resumes where its descriptors' USED flags turn (`position_from_used_flags`), both
        positions there, as a split ring resumes at used->idx: chains taken and not used yet are still
        available there and run again. The queues set up before the one that told are resumed then too
        (they started from the same lost state), and those after it as they come, until the next
        GET_VRING_BASE or reset."""
        if not self.packed_base_lost:
            if not vq.base_is_stale():
                return
            self.packed_base_lost = True
            log.warning(
                "port %s: queue %d: the front-end starts a used packed ring where its descriptors say it is "
                "not (its back-end died without GET_VRING_BASE?): its queues resume where their USED flags "
                "turn",
                self.name,
                vq.index,
            )
            for other in self.vqs:
                if other is not vq and isinstance(other, PackedVirtqueue) and other.mapped:
                    self._resume_from_flags(other)
        self._resume_from_flags(vq)

    def _resume_from_flags(self, vq: PackedVirtqueue) -> None:
        was = (vq.last_avail_idx, vq.avail_wrap_counter)
        found = vq.resume_from_flags()
        if found is None:
            log.warning(
                "port %s: queue %d: its descriptors do not say where the device stopped (chains of several "
                "descriptors?): it stays at %d with wrap counter %d, and may stall until the driver resets "
                "the device",
                self.name,
                vq.index,
                *was,
            )
        elif found != was:
            log.warning(
                "port %s: queue %d: resuming at %d with wrap counter %d (the front-end said %d, %d)",
                self.name,
                vq.index,
                *found,
                *was,
            )

    def _set_vring_base(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vq = self._vq(msg.request, msg.payload.index)
        if isinstance(vq, PackedVirtqueue):
            self._set_packed_base(msg, vq)
            return None
        if msg.payload.num > 0xFFFF:
            raise DeviceError(msg.request, f"base {msg.payload.num} does not fit a split ring index")
        vq.last_avail_idx = vq.used_idx = vq.signalled_used = msg.payload.num
        return None

    def _set_packed_base(self, msg: Message, vq: PackedVirtqueue) -> None:
        """SET_VRING_BASE of a packed ring: "vring descriptor indices" (vhost-user.rst), the next available
        position in bits 0-14 with the avail wrap counter in bit 15, the next used position in bits 16-30
        with the used wrap counter in bit 31, as QEMU sends them.

        DPDK's virtio-user sends the lower half only (the upper is 0), and DPDK's vhost library takes the used
        position equal to the available one, "since ring processing was stopped at get time": so does this
        device when the upper half is 0 (a used position 0 with wrap counter 0 then means the available one
        is there too, as GET_VRING_BASE reported it). A used position behind the available one (a back-end
        that stopped without GET_VRING_BASE, chains taken and never returned) resumes both at the used one,
        as a split ring resumes at used->idx: those chains are still available in the ring and run again.
        """
        assert isinstance(msg.payload, VringState)
        value = msg.payload.num
        avail, used = value & 0xFFFF, value >> 16
        if used == 0:
            used = avail
        for what, half in (("available", avail), ("used", used)):
            if vq.num and (half & 0x7FFF) >= vq.num:
                raise DeviceError(
                    msg.request, f"{what} position {half & 0x7FFF} is outside the ring of {vq.num}"
                )
        if used != avail:
            log.warning(
                "port %s: queue %d: available position %d (wrap %d) != used %d (wrap %d), resuming at %d",
                self.name,
                vq.index,
                avail & 0x7FFF,
                avail >> 15,
                used & 0x7FFF,
                used >> 15,
                used & 0x7FFF,
            )
        vq.forget_inflight()
        vq.last_avail_idx = vq.used_idx = vq.signalled_used = used & 0x7FFF
        vq.avail_wrap_counter = vq.used_wrap_counter = vq.signalled_used_wrap = used >> 15

    def _get_vring_base(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, VringState)
        vq = self._vq(msg.request, msg.payload.index)
        self.packed_base_lost = False  # the front-end knows where the rings are again
        vq.flush_used()
        vq.started = False
        vq.enabled = False
        if vq.kick_fd is not None:
            os.close(vq.kick_fd)
            vq.kick_fd = None
        vq.unmap()
        self.listener.queues_changed()
        if isinstance(vq, PackedVirtqueue):
            return VringState(vq.index, packed_vring_base(vq))
        return VringState(vq.index, vq.last_avail_idx)

    def _vring_fd(self, msg: Message) -> tuple[DeviceQueue, int | None]:
        """The queue and the eventfd of SET_VRING_KICK/CALL/ERR (None: ``nofd``).

        The fd must be an eventfd (of counter mode for a kick, which the worker drains): the datapath waits
        for kicks in epoll and signals calls and errors without ever blocking, which only eventfds allow. A
        front-end that sends anything else gets the request refused (a failure ack under REPLY_ACK) and the
        device marked broken, so that the mistake is seen (NEEDS_RESET, the err eventfd, ``vhostmap status``)
        rather than a queue that silently never runs: QEMU does not ask for an ack of these requests.
        """
        assert isinstance(msg.payload, VringFile)
        try:
            vq = self._vq(msg.request, msg.payload.index)
        except DeviceError:
            _close_all(msg.fds)
            raise
        fd = None if msg.payload.nofd else msg.fds[0]
        if fd is not None:
            why = eventfds.check_eventfd(fd, readable=msg.request is Request.SET_VRING_KICK)
            if why is not None:
                _close_all(msg.fds)
                reason = f"queue {vq.index}: {why}"
                self.mark_broken(f"{msg.request.name} {reason}", queue=vq.index)
                raise DeviceError(msg.request, reason)
        return vq, fd

    def _set_vring_kick(self, msg: Message) -> None:
        vq, fd = self._vring_fd(msg)
        if fd is None:
            raise DeviceError(msg.request, "polling a ring without a kick fd is not supported")
        if vq.kick_fd is not None:
            os.close(vq.kick_fd)
        vq.kick_fd = fd
        vq.started = True
        if not self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            vq.enabled = True
        if vq.addresses is not None and not vq.ready:
            self._map(msg.request, vq)
        self.listener.queues_changed()
        return None

    def _set_vring_call(self, msg: Message) -> None:
        vq, fd = self._vring_fd(msg)
        if vq.call_fd is not None:
            os.close(vq.call_fd)
        vq.call_fd = fd
        return None

    def _set_vring_err(self, msg: Message) -> None:
        vq, fd = self._vring_fd(msg)
        if vq.err_fd is not None:
            os.close(vq.err_fd)
        vq.err_fd = fd
        return None

    def _set_vring_enable(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vq = self._vq(msg.request, msg.payload.index)
        vq.enabled = bool(msg.payload.num)
        self.listener.queues_changed()
        return None

    def _get_config(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, DeviceConfig)
        p = msg.payload
        space = self.config_space()
        if p.offset + p.size > len(space):
            raise DeviceError(msg.request, f"config range {p.offset}+{p.size} beyond {len(space)} bytes")
        return DeviceConfig(p.offset, p.size, p.flags, space[p.offset : p.offset + p.size])

    def _set_config(self, msg: Message) -> None:
        assert isinstance(msg.payload, DeviceConfig)
        p = msg.payload
        if p.offset + p.size > 6:
            raise DeviceError(msg.request, "only the MAC address is writable")
        mac = bytearray(self.mac)
        mac[p.offset : p.offset + p.size] = p.data[: p.size]
        self.mac = bytes(mac)
        return None

    def _set_status(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        status = msg.payload.value & 0xFF
        if status & VIRTIO_CONFIG_S_FAILED:
            log.warning("port %s: driver reports FAILED status", self.name)
        if status == 0 and self.broken is not None:
            # The reset of a broken device stops its rings until the driver sets them up again: the chain
            # that broke it is still available, and QEMU before 8.1 sends SET_STATUS 0 before GET_VRING_BASE.
            for vq in self.vqs:
                vq.started = False
            self.listener.queues_changed()
        if status == 0:
            self.broken = None
            for vq in self.vqs:
                vq.faulted = False  # a fault the passes met is the broken state just cleared
        self.status = status
        return None

    def _get_status(self, msg: Message) -> Payload:
        return U64(self.status | (VIRTIO_CONFIG_S_NEEDS_RESET if self.broken else 0))

    def _set_log_base(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, LogDescriptor)
        try:
            self.memory.set_log(msg.fds[0], msg.payload)
        except GuestMemoryError as e:
            raise DeviceError(msg.request, str(e)) from e
        return U64(0)

    def _close_fds(self, msg: Message) -> None:
        # SET_LOG_FD: the fd is for a log we never read; the spec only asks us to accept it.
        _close_all(msg.fds)
        return None

    def _send_rarp(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        self.listener.announce(msg.payload.value.to_bytes(8, "little")[:6])
        return None

    def _net_set_mtu(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        if not 68 <= msg.payload.value <= 65521:
            raise DeviceError(msg.request, f"mtu {msg.payload.value} outside 68..65521")
        self.mtu = msg.payload.value
        return None

    def _set_backend_req_fd(self, msg: Message) -> None:
        if self.backend_req_fd is not None:
            os.close(self.backend_req_fd)
        self.backend_req_fd = msg.fds[0]
        return None

    def _reset_device(self, msg: Message) -> None:
        self.reset()
        return None


def packed_vring_base(vq: PackedVirtqueue) -> int:
    """GET_VRING_BASE of a packed ring: the next available position and the avail wrap counter in the lower
    half, the next used position and the used wrap counter in the upper half (vhost-user.rst, "vring
    descriptor indices"; QEMU reads both halves back, DPDK's virtio-user ignores the reply). Every chain
    taken is used by the end of its batch, so the two halves are equal when the ring stopped."""
    avail = vq.last_avail_idx | int(vq.avail_wrap_counter) << 15
    used = vq.used_idx | int(vq.used_wrap_counter) << 15
    return avail | used << 16


def _close_vq_fds(vq: DeviceQueue) -> None:
    for fd in (vq.kick_fd, vq.call_fd, vq.err_fd):
        if fd is not None:
            os.close(fd)
    vq.kick_fd = vq.call_fd = vq.err_fd = None


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


_D = VhostUserNetDevice
_HANDLERS = {
    Request.GET_FEATURES: _D._get_features,
    Request.SET_FEATURES: _D._set_features,
    Request.SET_OWNER: _D._set_owner,
    Request.RESET_OWNER: _D._reset_owner,
    Request.GET_PROTOCOL_FEATURES: _D._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: _D._set_protocol_features,
    Request.GET_QUEUE_NUM: _D._get_queue_num,
    Request.GET_MAX_MEM_SLOTS: _D._get_max_mem_slots,
    Request.SET_MEM_TABLE: _D._set_mem_table,
    Request.ADD_MEM_REG: _D._add_mem_reg,
    Request.REM_MEM_REG: _D._rem_mem_reg,
    Request.SET_VRING_NUM: _D._set_vring_num,
    Request.SET_VRING_ADDR: _D._set_vring_addr,
    Request.SET_VRING_BASE: _D._set_vring_base,
    Request.GET_VRING_BASE: _D._get_vring_base,
    Request.SET_VRING_KICK: _D._set_vring_kick,
    Request.SET_VRING_CALL: _D._set_vring_call,
    Request.SET_VRING_ERR: _D._set_vring_err,
    Request.SET_VRING_ENABLE: _D._set_vring_enable,
    Request.GET_CONFIG: _D._get_config,
    Request.SET_CONFIG: _D._set_config,
    Request.SET_STATUS: _D._set_status,
    Request.GET_STATUS: _D._get_status,
    Request.SET_LOG_BASE: _D._set_log_base,
    Request.SET_LOG_FD: _D._close_fds,
    Request.SEND_RARP: _D._send_rarp,
    Request.NET_SET_MTU: _D._net_set_mtu,
    Request.SET_BACKEND_REQ_FD: _D._set_backend_req_fd,
    Request.RESET_DEVICE: _D._reset_device,
}
