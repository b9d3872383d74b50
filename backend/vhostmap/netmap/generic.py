"""The generic adapter: netmap rings emulated over an unmodified interface through an AF_PACKET socket.

Follows netmap's netmap_generic.c. It steals frames from the driver's receive
path into a per-ring queue capped at 1024 frames and copies them into the RX ring at nr_hwtail on rxsync; it
copies TX slots into preallocated mbufs, hands them to the driver and reclaims slots as completions come
back. Here the interface (veth, TAP, NIC) is reached through one AF_PACKET socket bound to it, so the port has
one hardware ring pair (plus the host pair, left to the default or to a host port, as on any adapter):

- receive: a TPACKET_V3 ring mapped from the socket (PACKET_RX_RING). The kernel fills blocks of frames and
  hands a block over by setting its status to TP_STATUS_USER (when it is full, or after ``retire_tov_ms``);
  rxsync walks the blocks it owns, copies every frame into the RX kring from nr_hwtail (frames longer than a
  buffer span slots with NS_MOREFRAG; VLAN tags the kernel moved out of the frame are put back) and gives the
  block back with TP_STATUS_KERNEL. Frames the kring has no room for wait in a queue of at most
  ``rx_queue_limit`` frames (the seed's 1024) and are dropped, counted, beyond it. Every block is given back
  on every rxsync, so the socket never stays readable for nothing and a level-triggered poller cannot spin.
- transmit: one send()/sendmsg() per frame from the slots' buffers (gathering the slots of a multi-slot
  frame). A send completes at once, so txsync reclaims everything it sent. When the interface has no room
  (EAGAIN: the socket's send buffer is full of frames the driver has not completed; ENOBUFS: the qdisc is
  full) the rest of the batch is dropped and counted, or, with ``tx_backpressure``, stays in the ring for
  the next txsync, as the seed leaves slots when the driver is busy (an application waits for POLLOUT on
  ``socket_fd``). ENETDOWN/EMSGSIZE drop the frame. txsync never blocks and never retries in a loop.
- PACKET_IGNORE_OUTGOING keeps our own transmissions out of our receive ring; PACKET_ADD_MEMBERSHIP with
  PACKET_MR_PROMISC puts the interface in promiscuous mode for as long as the socket lives.
- PACKET_VNET_HDR: every frame comes with a virtio-net header, and goes with one. A frame the host stack
  left a checksum or segmentation to (a veth or TAP peer with its offloads on: up to 64 KiB of TCP at once)
  keeps its header (NS_VNET_HDR) when every port it may go to takes the offloads (``pass_offloads``), and
  is completed in software on the way in otherwise (netmap/offload.py), so its peer needs no
  `ethtool -K ... off`; what we send keeps what the stack takes.

Unlike the seed, AF_PACKET does not steal frames: the host stack of the interface still sees what arrives.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import socket
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import numpy.typing as npt

from vhostmap.ethernet import ETH_P_8021Q, ETH_P_ALL
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import NetmapMemory
from vhostmap.netmap.errors import InterfaceError, PortBroken
from vhostmap.netmap.frames import DropReport, RxFill, send_frames
from vhostmap.netmap.kring import Kring
from vhostmap.netmap.offload import STACK_OFFLOADS, VLAN_HLEN, OffloadError, StackIngress, VnetHeader
from vhostmap.netmap.tap import if_index
from vhostmap.virtio.spec import VIRTIO_NET_HDR, VIRTIO_NET_HDR_LEGACY

log = logging.getLogger(__name__)

# netmap_generic.c: frames waiting between the interface and the RX ring, beyond which they are dropped.
GENERIC_RX_QUEUE_LIMIT = 1024
# netmap_generic_ringsize: slots per emulated ring.
GENERIC_RING_SIZE = 1024

# --- linux/if_packet.h and linux/if_ether.h -----------------------------------------------------------------
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_VNET_HDR = 15
# With PACKET_VNET_HDR, the header before every frame each way is the legacy struct virtio_net_hdr (no
# num_buffers).
VNET_HDR = VIRTIO_NET_HDR_LEGACY
PACKET_IGNORE_OUTGOING = 23
PACKET_MR_PROMISC = 1
TPACKET_V3 = 2
TPACKET_ALIGNMENT = 16

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6


class TpacketReq3(ctypes.Structure):
    """struct tpacket_req3: the geometry of a TPACKET_V3 ring (PACKET_RX_RING)."""

    _fields_ = [
        ("tp_block_size", ctypes.c_uint32),
        ("tp_block_nr", ctypes.c_uint32),
        ("tp_frame_size", ctypes.c_uint32),
        ("tp_frame_nr", ctypes.c_uint32),
        ("tp_retire_blk_tov", ctypes.c_uint32),
        ("tp_sizeof_priv", ctypes.c_uint32),
        ("tp_feature_req_word", ctypes.c_uint32),
    ]


class TpacketBlockDesc(ctypes.Structure):
    """struct tpacket_block_desc with its tpacket_hdr_v1 inlined (timestamps left out): a block's header."""

    _fields_ = [
        ("version", ctypes.c_uint32),
        ("offset_to_priv", ctypes.c_uint32),
        ("block_status", ctypes.c_uint32),
        ("num_pkts", ctypes.c_uint32),
        ("offset_to_first_pkt", ctypes.c_uint32),
        ("blk_len", ctypes.c_uint32),
        ("seq_num", ctypes.c_uint64),
    ]


class Tpacket3Hdr(ctypes.Structure):
    """struct tpacket3_hdr (with tpacket_hdr_variant1): the header of one frame in a block."""

    _fields_ = [
        ("tp_next_offset", ctypes.c_uint32),
        ("tp_sec", ctypes.c_uint32),
        ("tp_nsec", ctypes.c_uint32),
        ("tp_snaplen", ctypes.c_uint32),
        ("tp_len", ctypes.c_uint32),
        ("tp_status", ctypes.c_uint32),
        ("tp_mac", ctypes.c_uint16),
        ("tp_net", ctypes.c_uint16),
        ("tp_rxhash", ctypes.c_uint32),
        ("tp_vlan_tci", ctypes.c_uint32),
        ("tp_vlan_tpid", ctypes.c_uint16),
        ("tp_padding", ctypes.c_uint16),
        ("tp_padding2", ctypes.c_uint8 * 8),
    ]


class TpacketStatsV3(ctypes.Structure):
    """struct tpacket_stats_v3 (PACKET_STATISTICS; reading it resets the counters)."""

    _fields_ = [
        ("tp_packets", ctypes.c_uint32),
        ("tp_drops", ctypes.c_uint32),
        ("tp_freeze_q_cnt", ctypes.c_uint32),
    ]


class PacketMreq(ctypes.Structure):
    """struct packet_mreq (PACKET_ADD_MEMBERSHIP)."""

    _fields_ = [
        ("mr_ifindex", ctypes.c_int),
        ("mr_type", ctypes.c_uint16),
        ("mr_alen", ctypes.c_uint16),
        ("mr_address", ctypes.c_uint8 * 8),
    ]


# Per-frame reads go through struct (one call for the fields rxsync needs); the layout is the ctypes one.
_FRAME_FIELDS = (
    "tp_next_offset",
    "tp_snaplen",
    "tp_len",
    "tp_status",
    "tp_mac",
    "tp_vlan_tci",
    "tp_vlan_tpid",
)
_FRAME_HDR = struct.Struct("<I8xIII H2x4xIH")
assert [getattr(Tpacket3Hdr, f).offset for f in _FRAME_FIELDS] == [0, 12, 16, 20, 24, 32, 36]
assert ctypes.sizeof(Tpacket3Hdr) == 48 and ctypes.sizeof(TpacketBlockDesc) == 32
_BLOCK_STATUS_WORD = TpacketBlockDesc.block_status.offset // 4
_BLOCK_NUM_PKTS_WORD = TpacketBlockDesc.num_pkts.offset // 4
_BLOCK_FIRST_WORD = TpacketBlockDesc.offset_to_first_pkt.offset // 4
# Smallest frame slot: the frame header, aligned, plus the sockaddr_ll the kernel writes after it.
TPACKET3_HDRLEN = -(-ctypes.sizeof(Tpacket3Hdr) // TPACKET_ALIGNMENT) * TPACKET_ALIGNMENT + 20


@dataclass(frozen=True)
class PacketRingParams:
    """Geometry of the TPACKET_V3 receive ring.

    ``block_size`` (a multiple of the page size) bounds the largest frame received whole (larger ones are
    truncated by the kernel, and dropped here); ``block_nr`` blocks make the ring; ``retire_tov_ms`` is how
    long the kernel keeps a partly filled block before handing it over (the latency of a lone frame).
    ``frame_size`` only sets the nominal frame count the kernel asks for.
    """

    block_size: int = 1 << 17
    block_nr: int = 32
    frame_size: int = 2048
    retire_tov_ms: int = 1

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size % mmap.PAGESIZE:
            raise ValueError(
                f"block_size {self.block_size} is not a multiple of the page size {mmap.PAGESIZE}"
            )
        if self.block_nr < 2:
            raise ValueError(f"block_nr {self.block_nr} < 2")
        if (
            self.frame_size < TPACKET3_HDRLEN
            or self.frame_size % TPACKET_ALIGNMENT
            or self.block_size % self.frame_size
        ):
            raise ValueError(
                f"frame_size {self.frame_size} must be >= {TPACKET3_HDRLEN}, a multiple of "
                f"{TPACKET_ALIGNMENT} and divide block_size {self.block_size}"
            )
        if not 0 < self.retire_tov_ms < 1 << 31:
            raise ValueError(f"retire_tov_ms {self.retire_tov_ms} out of range")

    @property
    def size(self) -> int:
        """Bytes of the whole ring."""
        return self.block_size * self.block_nr


@dataclass
class GenericStats:
    """Counters of a generic adapter. ``rx_drops``: frames dropped because the RX ring and the queue were
    full; ``rx_oversize``: frames the kernel truncated or that no ring could hold; ``kernel_drops``: frames
    the kernel dropped because every block was ours (PACKET_STATISTICS, read by ``counters``);
    ``tx_drops``: frames that could not be sent; ``rx_bad_header``: frames whose offload header they did not
    bear out (netmap/offload.py); ``rx_offloaded``: frames whose offloads were completed;
    ``rx_offload_passed``: frames that kept them with their header (NS_VNET_HDR)."""

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_drops: int = 0
    rx_oversize: int = 0
    kernel_drops: int = 0
    rx_bad_header: int = 0
    rx_offloaded: int = 0
    rx_offload_passed: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_drops: int = 0


class GenericAdapter(NetmapAdapter):
    """A port over the existing interface ``ifname`` through AF_PACKET (one hardware ring pair).

    ``num_desc`` slots per ring; ``rx_queue_limit`` frames may wait for room in the RX ring; ``promisc``
    receives frames for any MAC address; ``tx_backpressure`` keeps frames the interface has no room for in
    the TX ring (an application's txsync then loses nothing) instead of dropping them (a datapath that must
    never wait for one port). The socket is open (and frames queue in its ring) from construction
    until ``close``. Raises InterfaceError (with the failing operation and errno) when the interface does not
    exist or the socket cannot be set up.
    """

    # Frames from a guest may keep checksum and TCP segmentation: the socket has PACKET_VNET_HDR.
    carries_vnet_header = True

    @property
    def accepted_offloads(self) -> int:
        """What the stack takes with a frame sent on the socket (STACK_OFFLOADS)."""
        return STACK_OFFLOADS

    def pass_offloads(self, needs: int) -> None:
        """Frames from the interface may keep the offloads ``needs`` names (see NetmapAdapter)."""
        self._ingress.passed = needs

    def __init__(
        self,
        name: str,
        memory: NetmapMemory,
        ifname: str,
        *,
        num_desc: int = GENERIC_RING_SIZE,
        rx_queue_limit: int = GENERIC_RX_QUEUE_LIMIT,
        promisc: bool = True,
        ring: PacketRingParams | None = None,
        tx_backpressure: bool = False,
    ) -> None:
        if rx_queue_limit < 0:
            raise ValueError(f"rx_queue_limit {rx_queue_limit} < 0")
        self.ifname = ifname
        self.ifindex = if_index(ifname)
        self.params = ring if ring is not None else PacketRingParams()
        self.rx_queue_limit = rx_queue_limit
        self.tx_backpressure = tx_backpressure
        self.stats = GenericStats()
        # Frames waiting for room, with the flags of their first slot.
        self._queue: deque[tuple[bytes, int]] = deque()
        self._block = 0
        self._drops = DropReport(log, self.stats, name, ifname)
        self._ingress = StackIngress()
        super().__init__(
            name, memory, num_tx_rings=1, num_rx_rings=1, num_tx_desc=num_desc, num_rx_desc=num_desc
        )
        try:
            self._sock, self._mm = self._open_socket(promisc)
        except BaseException:
            super().close()
            raise
        self._ring_mv = memoryview(self._mm)
        self._ring_u32: npt.NDArray[np.uint32] = np.frombuffer(self._mm, dtype=np.uint32)

    def _open_socket(self, promisc: bool) -> tuple[socket.socket, mmap.mmap]:
        p = self.params
        try:
            # Protocol 0 until bind: nothing is queued before the ring exists.
            sock = socket.socket(
                socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0
            )
        except OSError as e:
            raise InterfaceError(self.ifname, "socket(AF_PACKET)", e.errno or errno.EPERM) from None
        op = "socket"
        try:
            op = "PACKET_VERSION"
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            op = "PACKET_VNET_HDR"  # before the ring exists (EBUSY after)
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            op = "PACKET_RX_RING"
            req = TpacketReq3(
                p.block_size, p.block_nr, p.frame_size, p.size // p.frame_size, p.retire_tov_ms, 0, 0
            )
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, bytes(req))
            op = "mmap"
            mm = mmap.mmap(sock.fileno(), p.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                op = "PACKET_IGNORE_OUTGOING"
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                if promisc:
                    op = "PACKET_ADD_MEMBERSHIP"
                    mreq = PacketMreq(self.ifindex, PACKET_MR_PROMISC, 0)
                    sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, bytes(mreq))
                op = "bind"
                sock.bind((self.ifname, ETH_P_ALL))
            except BaseException:
                mm.close()
                raise
        except OSError as e:
            sock.close()
            raise InterfaceError(self.ifname, op, e.errno or errno.EIO) from None
        except BaseException:
            sock.close()
            raise
        return sock, mm

    # --- NetmapAdapter hooks --------------------------------------------------------------------------------
    @property
    def socket_fd(self) -> int:
        """The packet socket (-1 once closed): readable when the kernel has handed over a block, writable
        when its send buffer has room again."""
        return self._sock.fileno()

    def wake_fds(self) -> Sequence[int]:
        """The packet socket: readable when the kernel has handed over a block."""
        own = [self._sock.fileno()] if self._sock.fileno() >= 0 else []
        return [*own, *super().wake_fds()]

    def nm_rxsync(self, kring: Kring, flags: int) -> None:
        """Take back [nr_hwcur, rhead), then import the queue and every block the kernel handed over."""
        kring.nr_hwcur = kring.rhead
        if self._sock.fileno() < 0:
            return
        with RxFill(kring, self.memory) as fill:
            queue = self._queue
            while queue and fill.put(*queue[0]):
                frame, flags = queue.popleft()
                self._received(len(frame) - (VIRTIO_NET_HDR.size if flags else 0))
            ring32 = self._ring_u32
            words_per_block = self.params.block_size // 4
            # At most one lap: under a steady flood the kernel refills blocks as fast as they are given back.
            for _ in range(self.params.block_nr):
                status_word = self._block * words_per_block + _BLOCK_STATUS_WORD
                if not int(ring32[status_word]) & TP_STATUS_USER:
                    break
                self._import_block(kring, fill, self._block * self.params.block_size)
                ring32[status_word] = TP_STATUS_KERNEL  # the block is the kernel's again
                self._block = (self._block + 1) % self.params.block_nr

    def _import_block(self, kring: Kring, fill: RxFill, base: int) -> None:
        words = base // 4
        num_pkts = int(self._ring_u32[words + _BLOCK_NUM_PKTS_WORD])
        off = base + int(self._ring_u32[words + _BLOCK_FIRST_WORD])
        end = base + self.params.block_size
        ring = self._ring_mv
        unpack = _FRAME_HDR.unpack_from
        queue, limit = self._queue, self.rx_queue_limit
        stats = self.stats
        max_frame = (kring.nkr_num_slots - 1) * fill.cap
        for k in range(num_pkts):
            if len(queue) >= limit:
                # The ring is full (the queue drains into it first) and so is the queue: the rest of the block
                # is dropped at once instead of frame by frame. A receiver slower than its interface then
                # spends each rxsync on what it can take, not on parsing a whole ring of frames it must drop.
                stats.rx_drops += num_pkts - k
                kring.dropped += num_pkts - k
                return
            if not base <= off <= end - _FRAME_HDR.size:
                self._drops.report(kring, f"frame header at {off - base} outside its block")
                return
            next_off, snaplen, length, status, mac, vlan_tci, vlan_tpid = unpack(ring, off)
            start = off + mac
            if snaplen < length or start + snaplen > end or start - VNET_HDR.size < off:
                stats.rx_oversize += 1
                kring.dropped += 1
                off += next_off
                continue
            view = ring[start : start + snaplen]
            tagged = bool(status & TP_STATUS_VLAN_VALID)
            data: bytes | memoryview = _with_vlan_tag(view, vlan_tci, vlan_tpid, status) if tagged else view
            frames, flags = self._offloads_done(kring, ring[start - VNET_HDR.size : start], data, tagged)
            header = VIRTIO_NET_HDR.size if flags else 0
            for frame in frames:
                size = len(frame)
                if size > max_frame or size == 0:
                    stats.rx_oversize += 1
                    kring.dropped += 1
                elif not queue and fill.put(frame, flags):
                    stats.rx_packets += 1
                    stats.rx_bytes += size - header
                elif len(queue) < limit:
                    queue.append((bytes(frame), flags))
                else:
                    stats.rx_drops += 1
                    kring.dropped += 1
            off += next_off

    def _offloads_done(
        self, kring: Kring, vnet: memoryview, frame: bytes | memoryview, tagged: bool
    ) -> tuple[list[bytes | memoryview], int]:
        """What goes into the ring for ``frame`` and its virtio-net header ``vnet`` (PACKET_VNET_HDR), and the
        flags of each one's first slot: itself; or, when the header asks for work, itself after its header
        (NS_VNET_HDR) or its completed frames (StackIngress); none (counted) when the header does not fit
        it. ``tagged``: a VLAN tag was put back, 4 bytes the kernel's offsets do not count."""
        h = VnetHeader.unpack(vnet)
        if not h.asks_for_work:
            return [frame], 0
        if tagged:
            shift = VLAN_HLEN
            h = replace(h, hdr_len=h.hdr_len + shift, csum_start=h.csum_start + shift)
        try:
            frames, flags = self._ingress(h, frame)
        except OffloadError as e:
            self.stats.rx_bad_header += 1
            kring.dropped += 1
            self._drops.report(kring, f"offload header: {e}")
            return [], 0
        if flags:
            self.stats.rx_offload_passed += 1
        else:
            self.stats.rx_offloaded += 1
        return list(frames), flags

    def _received(self, length: int) -> None:
        self.stats.rx_packets += 1
        self.stats.rx_bytes += length

    def nm_txsync(self, kring: Kring, flags: int) -> None:
        """Send the frames of [nr_hwcur, rhead); sends complete at once, so every slot sent is reclaimed.

        A trailing frame whose last slot is not handed over yet waits for the next txsync, unless it alone
        takes every slot the user can hand over (it can never complete, and is dropped). When the interface
        has no room, the rest waits in the ring (``tx_backpressure``) or is dropped (``send_frames``).
        """
        send_frames(
            kring,
            self.memory,
            self._send,
            self._drops,
            backpressure=self.tx_backpressure,
            offloads=STACK_OFFLOADS,
        )

    def _send(self, kring: Kring, payload: list[bytes | memoryview], length: int) -> bool:
        """Send one frame (``payload`` starts with its virtio-net header); False (nothing sent, nothing
        counted) when the interface has no room for it."""
        try:
            self._sock.sendmsg(payload)
        except BlockingIOError:
            return False  # the send buffer is full of frames the driver has not completed
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                return False  # the qdisc is full
            if e.errno in (errno.ENXIO, errno.ENODEV):
                raise PortBroken(self.name, f"interface {self.ifname} is gone") from None
            # ENETDOWN, EMSGSIZE (longer than the MTU): this frame only.
            self._drops.tx(kring, f"send: {errno.errorcode.get(e.errno or 0, e.errno)}")
            return True
        self.stats.tx_packets += 1
        self.stats.tx_bytes += length
        return True

    # --- state ----------------------------------------------------------------------------------------------
    @property
    def rx_queued(self) -> int:
        """Frames waiting for room in the RX ring."""
        return len(self._queue)

    def counters(self) -> dict[str, int]:
        """Every counter, after collecting the kernel's drop count (PACKET_STATISTICS resets on read)."""
        if self._sock.fileno() >= 0:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, ctypes.sizeof(TpacketStatsV3))
            self.stats.kernel_drops += TpacketStatsV3.from_buffer_copy(raw).tp_drops
        return {**asdict(self.stats), "rx_queued": self.rx_queued}

    def close(self) -> None:
        """Close the socket (promiscuous mode ends with it), unmap its ring, free the netmap rings."""
        if self._sock.fileno() >= 0:
            # Views export the mapping: drop ours first so that it can be unmapped now.
            self._ring_mv.release()
            self._ring_u32 = np.empty(0, dtype=np.uint32)
            try:
                self._mm.close()
            except BufferError:
                log.debug("%s: packet ring still referenced; unmapped when released", self.name)
            self._sock.close()
            self._queue.clear()
        super().close()


def _with_vlan_tag(frame: memoryview, tci: int, tpid: int, status: int) -> bytes:
    """``frame`` with the 802.1Q tag the kernel moved into the frame header put back after the MACs."""
    if not status & TP_STATUS_VLAN_TPID_VALID:
        tpid = ETH_P_8021Q
    return b"".join((frame[:12], struct.pack("!HH", tpid, tci & 0xFFFF), frame[12:]))
