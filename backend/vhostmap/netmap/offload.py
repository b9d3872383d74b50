"""Completing a frame's offloads in software: what a port that did not negotiate an offload needs from a
frame whose virtio-net header asks for one (netmap's VALE "mismatch datapath", netmap_offloadings.c; Linux's
skb_checksum_help and GSO).

A sender with VIRTIO_NET_F_CSUM leaves the TCP/UDP checksum to the device (NEEDS_CSUM: sum from csum_start to
the end, store at csum_start + csum_offset; the field already holds the pseudo-header's sum); one with
HOST_TSO4/6 or HOST_USO hands over up to 64 KiB of TCP or UDP payload at once (gso_type, gso_size: the
payload of each segment). `complete` turns such a frame into frames with nothing left to do: the checksum
filled in, or one frame per segment with the headers each needs (IPv4 total length, identification and
header checksum, IPv6 payload length, TCP sequence number, FIN and PSH on the last segment only, CWR on the
first only, UDP length, and the TCP or UDP checksum over the pseudo-header).

The header comes from a guest and is checked like a descriptor (DPDK's CVE-2024-11614 was a csum_start beyond
the frame): a checksum field outside the frame, a segmentation that does not match the frame (not TCP or UDP
over IPv4 or IPv6 without extension headers or fragments, at most one 802.1Q tag), a gso_size of 0 or an
hdr_len beyond the frame, and UFO (not offered) raise OffloadError with the reason it is dropped for.

This is the pure-Python reference of the compiled kernel nm_offload_complete (datapath/offload.cdef); the
differential tests compare them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from vhostmap.datapath import ffi, lib
from vhostmap.ethernet import ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6
from vhostmap.netmap.abi import NS_VNET_HDR
from vhostmap.virtio.spec import (
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_LEGACY,
)

IPPROTO_TCP = 6
IPPROTO_UDP = 17
VLAN_HLEN = 4
IPV4_MIN_HLEN = 20
IPV6_HLEN = 40
TCP_MIN_HLEN = 20
UDP_HLEN = 8
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
TCP_CSUM_OFFSET, UDP_CSUM_OFFSET = 16, 6  # offsetof(struct tcphdr, check), offsetof(struct udphdr, check)
IP_MAX_LEN = 0xFFFF
# A UDP checksum that comes out 0 is sent as 0xffff (0 means "none"), as Linux's CSUM_MANGLED_0.
CSUM_MANGLED_0 = 0xFFFF

#: A legacy virtio-net header that asks for nothing: what goes before a frame written to a TAP or packet
#: socket with a header each way (IFF_VNET_HDR, PACKET_VNET_HDR).
NO_OFFLOADS = bytes(VIRTIO_NET_HDR_LEGACY.size)

#: Why a frame is dropped instead (the kernel's NM_OFF_* statuses), for the counters.
REASONS = {
    int(lib.NM_OFF_BAD_CSUM): "checksum field outside the frame",
    int(lib.NM_OFF_BAD_GSO): "segmentation the frame does not match",
    int(lib.NM_OFF_BAD_SIZE): "gso_size 0, hdr_len beyond the frame, or segments too long for IP",
    int(lib.NM_OFF_NO_ROOM): "more segments than there is room for",
    int(lib.NM_OFF_NOT_TAKEN): "an offload the receiver does not take",
}


class Layers(NamedTuple):
    """Where a frame to segment has its IP header (``l3``, IPv4 or not) and transport header (``l4``, of
    IP protocol ``proto``)."""

    l3: int
    ipv4: bool
    l4: int
    proto: int


class OffloadError(Exception):
    """The frame cannot be completed; ``status`` is the kernel's NM_OFF_* code (REASONS says why)."""

    def __init__(self, status: int) -> None:
        super().__init__(REASONS[status])
        self.status = status


@dataclass(frozen=True)
class VnetHeader:
    """The fields of struct virtio_net_hdr that offloads use (virtio/spec.py VIRTIO_NET_HDR)."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> VnetHeader:
        """The header at the start of ``raw`` (the legacy layout: its first VIRTIO_NET_HDR_LEGACY.size
        bytes)."""
        return cls(*VIRTIO_NET_HDR_LEGACY.unpack_from(raw))

    def pack(self) -> bytes:
        """The header as struct virtio_net_hdr with num_buffers (VIRTIO_NET_HDR, num_buffers 0): what goes
        before a frame in slots with NS_VNET_HDR."""
        return VIRTIO_NET_HDR.pack(
            self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset, 0
        )

    def legacy(self) -> bytes:
        """The header as struct virtio_net_hdr (VIRTIO_NET_HDR_LEGACY): what goes before a frame written to a
        TAP or packet socket."""
        return VIRTIO_NET_HDR_LEGACY.pack(
            self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset
        )

    @property
    def asks_for_work(self) -> bool:
        """Whether the sender left a checksum (NEEDS_CSUM) or a segmentation to the receiver."""
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) or self.gso_type != VIRTIO_NET_HDR_GSO_NONE


def ones_sum(data: bytes | bytearray | memoryview, total: int = 0) -> int:
    """The ones' complement sum of ``data`` as big-endian 16-bit words (an odd byte padded), from ``total``,
    folded to 16 bits."""
    view = bytes(data)
    if len(view) % 2:
        view += b"\0"
    total += sum(struct.unpack(f"!{len(view) // 2}H", view))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


#: What a header asks of whoever receives its frame as it is (nm_offload_needs): the bits a destination must
#: accept (see `accepted`).
NEEDS_CSUM = int(lib.NM_OFF_NEEDS_CSUM)
NEEDS_TSO4 = int(lib.NM_OFF_NEEDS_TSO4)
NEEDS_TSO6 = int(lib.NM_OFF_NEEDS_TSO6)
NEEDS_USO = int(lib.NM_OFF_NEEDS_USO)
NEEDS_ECN = int(lib.NM_OFF_NEEDS_ECN)
ALL_NEEDS = NEEDS_CSUM | NEEDS_TSO4 | NEEDS_TSO6 | NEEDS_USO | NEEDS_ECN
#: What the Linux stack takes with a frame written to a TAP with IFF_VNET_HDR or sent on a packet socket with
#: PACKET_VNET_HDR (virtio_net_hdr_to_skb): a checksum left to it, TCP segmentation (it segments in software
#: for a device that cannot). UDP segmentation too on newer kernels; not counted on.
STACK_OFFLOADS = NEEDS_CSUM | NEEDS_TSO4 | NEEDS_TSO6 | NEEDS_ECN
#: The headers a check looks at are within a frame's first HEAD_MAX bytes.
HEAD_MAX = int(lib.NM_OFF_HEAD_MAX)


def needs(h: VnetHeader) -> int:
    """The NEEDS_* bits of ``h``: what a destination must accept to take its frame unchanged."""
    bits = NEEDS_CSUM if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM else 0
    kind = h.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if kind == VIRTIO_NET_HDR_GSO_TCPV4:
        bits |= NEEDS_TSO4
    elif kind == VIRTIO_NET_HDR_GSO_TCPV6:
        bits |= NEEDS_TSO6
    elif kind != VIRTIO_NET_HDR_GSO_NONE:
        bits |= NEEDS_USO  # UDP_L4; any other type fails `check`
    return bits | (NEEDS_ECN if h.gso_type & VIRTIO_NET_HDR_GSO_ECN else 0)


class _Plan(NamedTuple):
    """How a frame is segmented: its layers and the length of the headers each segment repeats."""

    layers: Layers
    hlen: int


def check(h: VnetHeader, head: bytes, length: int) -> None:
    """OffloadError unless a frame of ``length`` bytes that starts with ``head`` (all of it, or at least
    its first HEAD_MAX bytes) may travel with header ``h`` as it is: the checks of `complete`, without
    segmenting, and a segmentation must leave the checksum at its transport header (nm_offload_check)."""
    if len(head) < min(length, HEAD_MAX):
        raise OffloadError(lib.NM_OFF_BAD_SIZE)
    plan = _plan(h, head, length)
    if plan is None:
        return
    # Whoever segments it relies on the checksum being left at the transport header (the spec: a driver MUST
    # ask for it with segmentation; Linux refuses the frame otherwise). `complete` computes it and need not.
    field = TCP_CSUM_OFFSET if plan.layers.proto == IPPROTO_TCP else UDP_CSUM_OFFSET
    at_transport = h.csum_start == plan.layers.l4 and h.csum_offset == field
    if not (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and at_transport):
        raise OffloadError(lib.NM_OFF_BAD_CSUM)


def for_receiver(raw: bytes, head: bytes, length: int, accepted: int) -> VnetHeader:
    """The header at the start of ``raw`` (a frame's own, NS_VNET_HDR) as it is written for a receiver that
    takes the offloads ``accepted`` (NEEDS_*), for the ``length`` bytes of frame that start with ``head``:
    flags other than NEEDS_CSUM dropped. OffloadError when it asks for more than ``accepted``
    (NM_OFF_NOT_TAKEN) or fails `check`."""
    sent = VnetHeader.unpack(raw)
    h = replace(sent, flags=sent.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
    if needs(h) & ~accepted:
        raise OffloadError(lib.NM_OFF_NOT_TAKEN)
    check(h, head, length)
    return h


def _plan(h: VnetHeader, frame: bytes, length: int) -> _Plan | None:
    """The segmentation ``h`` asks of the ``length`` bytes starting with ``frame``, None for none, or
    OffloadError."""
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and h.csum_start + h.csum_offset + 2 > length:
        raise OffloadError(lib.NM_OFF_BAD_CSUM)
    kind = h.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if kind == VIRTIO_NET_HDR_GSO_NONE:
        return None
    if kind not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4):
        raise OffloadError(lib.NM_OFF_BAD_GSO)
    if h.gso_size == 0 or h.hdr_len > length:
        raise OffloadError(lib.NM_OFF_BAD_SIZE)
    l3, ipv4, l4, proto = _layers(frame, length, kind)
    if proto == IPPROTO_TCP:
        if length < l4 + TCP_MIN_HLEN or frame[l4 + 12] >> 4 < 5:
            raise OffloadError(lib.NM_OFF_BAD_GSO)
        hlen = l4 + 4 * (frame[l4 + 12] >> 4)
    else:
        hlen = l4 + UDP_HLEN
    if length < hlen:
        raise OffloadError(lib.NM_OFF_BAD_GSO)
    if hlen - l3 + min(length - hlen, h.gso_size) > IP_MAX_LEN:
        raise OffloadError(lib.NM_OFF_BAD_SIZE)  # a segment's IP length would not fit its field
    return _Plan(Layers(l3, ipv4, l4, proto), hlen)


def complete(h: VnetHeader, frame: bytes, max_segs: int, cap: int) -> list[bytes]:
    """The frames ``frame`` with header ``h`` becomes with its offloads done: itself (its checksum filled
    in when asked), or its segments; at most ``max_segs`` frames of ``cap`` bytes in all (else
    NM_OFF_NO_ROOM). OffloadError for a header the frame does not bear out."""
    plan = _plan(h, frame, len(frame))
    if plan is None:
        if len(frame) > cap or max_segs < 1:
            raise OffloadError(lib.NM_OFF_NO_ROOM)
        if not h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return [frame]
        out = bytearray(frame)
        at = h.csum_start + h.csum_offset
        csum = ~ones_sum(out[h.csum_start :]) & 0xFFFF
        struct.pack_into("!H", out, at, csum or CSUM_MANGLED_0)
        return [bytes(out)]
    hlen, payload = plan.hlen, frame[plan.hlen :]
    n = max(1, -(-len(payload) // h.gso_size))
    if n > max_segs or n * hlen + len(payload) > cap:
        raise OffloadError(lib.NM_OFF_NO_ROOM)
    g = h.gso_size
    return [_segment(frame[:hlen], payload[k * g : (k + 1) * g], k, n, g, plan.layers) for k in range(n)]


def _layers(frame: bytes, length: int, kind: int) -> Layers:
    """Where the layers of a ``length``-byte frame starting with ``frame`` are, to segment it as ``kind``;
    OffloadError(NM_OFF_BAD_GSO) when it is not that."""
    bad = OffloadError(lib.NM_OFF_BAD_GSO)
    if length < ETH_HLEN:
        raise bad
    l3, ethertype = ETH_HLEN, int.from_bytes(frame[12:14], "big")
    if ethertype == ETH_P_8021Q:
        if length < ETH_HLEN + VLAN_HLEN:
            raise bad
        l3, ethertype = ETH_HLEN + VLAN_HLEN, int.from_bytes(frame[16:18], "big")
    want = IPPROTO_UDP if kind == VIRTIO_NET_HDR_GSO_UDP_L4 else IPPROTO_TCP
    if ethertype == ETH_P_IP and kind != VIRTIO_NET_HDR_GSO_TCPV6:
        if length < l3 + IPV4_MIN_HLEN or frame[l3] >> 4 != 4:
            raise bad
        ihl = 4 * (frame[l3] & 0x0F)
        fragment = int.from_bytes(frame[l3 + 6 : l3 + 8], "big") & 0x3FFF
        if ihl < IPV4_MIN_HLEN or length < l3 + ihl or frame[l3 + 9] != want or fragment:
            raise bad
        return Layers(l3, True, l3 + ihl, want)
    if ethertype == ETH_P_IPV6 and kind != VIRTIO_NET_HDR_GSO_TCPV4:
        if length < l3 + IPV6_HLEN or frame[l3] >> 4 != 6 or frame[l3 + 6] != want:
            raise bad
        return Layers(l3, False, l3 + IPV6_HLEN, want)
    raise bad


def _segment(headers: bytes, data: bytes, k: int, n: int, gso_size: int, at: Layers) -> bytes:
    """Segment ``k`` of ``n``: ``headers`` (copied from the frame) fixed for ``data``."""
    l3, ipv4, l4, proto = at
    seg = bytearray(headers + data)
    l4_len = len(seg) - l4
    if ipv4:
        ihl = l4 - l3
        ident = (int.from_bytes(seg[l3 + 4 : l3 + 6], "big") + k) & 0xFFFF
        struct.pack_into("!HH", seg, l3 + 2, len(seg) - l3, ident)
        struct.pack_into("!H", seg, l3 + 10, 0)
        struct.pack_into("!H", seg, l3 + 10, ~ones_sum(seg[l3 : l3 + ihl]) & 0xFFFF)
        pseudo = bytes(seg[l3 + 12 : l3 + 20]) + struct.pack("!BBH", 0, proto, l4_len)
    else:
        struct.pack_into("!H", seg, l3 + 4, len(seg) - l3 - IPV6_HLEN)
        pseudo = bytes(seg[l3 + 8 : l3 + 40]) + struct.pack("!IxxxB", l4_len, proto)
    if proto == IPPROTO_TCP:
        seq = (int.from_bytes(seg[l4 + 4 : l4 + 8], "big") + k * gso_size) & 0xFFFFFFFF
        struct.pack_into("!I", seg, l4 + 4, seq)
        if k < n - 1:
            seg[l4 + 13] &= ~(TCP_FIN | TCP_PSH) & 0xFF
        if k > 0:
            seg[l4 + 13] &= ~TCP_CWR & 0xFF
        where = l4 + 16
    else:
        struct.pack_into("!H", seg, l4 + 4, l4_len)
        where = l4 + 6
    struct.pack_into("!H", seg, where, 0)
    csum = ~ones_sum(seg[l4:], ones_sum(pseudo)) & 0xFFFF
    if proto == IPPROTO_UDP and csum == 0:
        csum = CSUM_MANGLED_0
    struct.pack_into("!H", seg, where, csum)
    return bytes(seg)


def _c_header(h: VnetHeader, c: Any) -> Any:
    """``h`` written into ``c``, a struct nm_vnet_hdr *; ``c``."""
    c.flags, c.gso_type, c.hdr_len = h.flags, h.gso_type, h.hdr_len
    c.gso_size, c.csum_start, c.csum_offset = h.gso_size, h.csum_start, h.csum_offset
    return c


class Completer:
    """The compiled kernel (nm_offload_complete) with its buffers made once: up to ``max_segs`` frames of
    ``cap`` bytes in all per call."""

    def __init__(self, max_segs: int = 4096, cap: int = 256 << 10) -> None:
        self.max_segs, self.cap = max_segs, cap
        self._hdr = ffi.new("struct nm_vnet_hdr *")
        self._out = ffi.new("uint8_t[]", max(cap, 1))
        self._lens = ffi.new("uint32_t[]", max(max_segs, 1))
        self._n = ffi.new("uint32_t *")

    def __call__(self, h: VnetHeader, frame: bytes | memoryview) -> list[bytes]:
        """`complete`'s frames for ``frame`` with header ``h``; OffloadError as it."""
        c = _c_header(h, self._hdr)
        src = ffi.from_buffer("uint8_t[]", frame)
        status = lib.nm_offload_complete(
            c, src, len(frame), self._out, self.cap, self._lens, self.max_segs, self._n
        )
        if status != lib.NM_OFF_OK:
            raise OffloadError(status)
        frames, at = [], 0
        for k in range(self._n[0]):
            frames.append(bytes(ffi.buffer(self._out + at, self._lens[k])))
            at += self._lens[k]
        return frames


class StackIngress:
    """What becomes of a frame the host stack hands over (a TAP, a packet socket) whose header asks for work:
    it keeps its header (NS_VNET_HDR) when every port it may go to takes what it asks (``passed``, NEEDS_*,
    set through the adapter's pass_offloads by its forwarder), as VALE passes a frame between ports that
    negotiated the same offloads; otherwise it is completed here. Either way its header is checked first."""

    def __init__(self) -> None:
        self.passed = 0
        self._complete = Completer()

    def __call__(self, h: VnetHeader, frame: bytes | memoryview) -> tuple[list[bytes], int]:
        """The frames that go into the ring for ``frame`` with header ``h``, and the flags of their first
        slots: ``h`` packed before the frame and NS_VNET_HDR, or the completed frames and 0. OffloadError
        when ``h`` does not fit the frame."""
        if needs(h) & ~self.passed:
            return self._complete(h, frame), 0
        check_compiled(h, bytes(frame[:HEAD_MAX]), len(frame))
        return [h.pack() + bytes(frame)], NS_VNET_HDR


def check_compiled(h: VnetHeader, head: bytes, length: int) -> None:
    """`check` by the compiled kernel (nm_offload_check)."""
    c = _c_header(h, ffi.new("struct nm_vnet_hdr *"))
    status = lib.nm_offload_check(c, ffi.from_buffer("uint8_t[]", head), len(head), length)
    if status != lib.NM_OFF_OK:
        raise OffloadError(status)


def complete_compiled(h: VnetHeader, frame: bytes, max_segs: int, cap: int) -> list[bytes]:
    """`complete` by the compiled kernel (nm_offload_complete)."""
    return Completer(max_segs, cap)(h, frame)
