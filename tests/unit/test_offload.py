"""Offloads completed in software (netmap/offload.py, datapath/offload.c): the compiled kernel against its
reference on random and hostile frames and headers, and the segments and checksums judged by scapy, which
knows nothing of either: every segment parses with correct IP and TCP/UDP checksums and lengths, the
payload comes out whole and in order, sequence numbers and IP ids follow, FIN and PSH end the last segment
only and CWR the first only."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrRouting
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from vhostmap.datapath import lib
from vhostmap.netmap.offload import (
    HEAD_MAX,
    OffloadError,
    VnetHeader,
    check,
    check_compiled,
    complete,
    complete_compiled,
    ones_sum,
)
from vhostmap.virtio.spec import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
)

MAX_SEGS, CAP = 128, 1 << 18
MAC = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


def outcome(fn: object, h: VnetHeader, frame: bytes, max_segs: int = MAX_SEGS, cap: int = CAP) -> object:
    try:
        return fn(h, frame, max_segs, cap)  # type: ignore[operator]
    except OffloadError as e:
        return e.status


def super_frame(l3: str, l4: str, payload: bytes, vlan: bool = False, options: bool = False) -> Packet:
    """A GSO frame as a guest's stack hands it over: headers for the whole payload."""
    ip: Packet = (
        IP(src="10.0.0.1", dst="10.0.0.2", id=0xFFFE, options=b"\x01" * 4 if options else b"")
        if l3 == "4"
        else IPv6(src="fd00::1", dst="fd00::2")
    )
    tp: Packet = (
        TCP(
            sport=1234, dport=80, seq=0xFFFFFF00, flags="FPAC", options=[("NOP", None)] * 4 if options else []
        )
        if l4 == "tcp"
        else UDP(sport=1234, dport=53)
    )
    eth = Ether(**MAC) / Dot1Q(vlan=7) if vlan else Ether(**MAC)
    return eth / ip / tp / Raw(payload)


def kind(l3: str, l4: str) -> int:
    if l4 == "udp":
        return VIRTIO_NET_HDR_GSO_UDP_L4
    return VIRTIO_NET_HDR_GSO_TCPV4 if l3 == "4" else VIRTIO_NET_HDR_GSO_TCPV6


@pytest.mark.parametrize("vlan,options", [(False, False), (True, True)])
@pytest.mark.parametrize("l3,l4", [("4", "tcp"), ("6", "tcp"), ("4", "udp"), ("6", "udp")])
@pytest.mark.parametrize("payload_len,gso_size", [(4000, 1448), (1448, 1448), (0, 1448), (65000, 8948)])
def test_segments_are_what_scapy_would_send(
    l3: str, l4: str, payload_len: int, gso_size: int, vlan: bool, options: bool
) -> None:
    payload = bytes(k % 251 for k in range(payload_len))
    frame = bytes(super_frame(l3, l4, payload, vlan, options))
    hdr_len = len(frame) - payload_len
    h = VnetHeader(
        VIRTIO_NET_HDR_F_NEEDS_CSUM, kind(l3, l4) | VIRTIO_NET_HDR_GSO_ECN, hdr_len, gso_size, 0, 0
    )
    segments = complete_compiled(h, frame, MAX_SEGS, CAP)
    assert segments == complete(h, frame, MAX_SEGS, CAP)
    assert len(segments) == max(1, -(-payload_len // gso_size))
    got = b""
    for k, raw in enumerate(segments):
        pkt = Ether(raw)
        ip, tp = pkt[IP] if l3 == "4" else pkt[IPv6], pkt[TCP] if l4 == "tcp" else pkt[UDP]
        # scapy recomputes every length and checksum we left out: the frame must come back the same.
        fresh = pkt.copy()
        for layer, fields in (
            (IP, ("len", "chksum")),
            (IPv6, ("plen",)),
            (TCP, ("chksum",)),
            (UDP, ("len", "chksum")),
        ):
            if layer in fresh:
                for f in fields:
                    setattr(fresh[layer], f, None)
        assert bytes(fresh) == raw, f"segment {k}: lengths or checksums differ from scapy's"
        data = bytes(tp.payload)
        assert len(data) == min(gso_size, payload_len - k * gso_size) or payload_len == 0
        got += data
        if l3 == "4":
            assert ip.id == (0xFFFE + k) & 0xFFFF
        if l4 == "tcp":
            assert tp.seq == (0xFFFFFF00 + k * gso_size) & 0xFFFFFFFF
            last = k == len(segments) - 1
            assert (
                bool(tp.flags.F) == bool(tp.flags.P) == last and tp.flags.A and bool(tp.flags.C) == (k == 0)
            )
    assert got == payload


@pytest.mark.parametrize("l3,l4", [("4", "tcp"), ("6", "tcp"), ("4", "udp"), ("6", "udp")])
def test_a_checksum_left_to_the_device_is_filled_in(l3: str, l4: str) -> None:
    pkt = super_frame(l3, l4, b"payload of a checksum offload" * 10)
    raw = bytearray(bytes(pkt))
    ip = pkt[IP] if l3 == "4" else pkt[IPv6]
    start = len(raw) - len(ip.payload)
    where = start + (16 if l4 == "tcp" else 6)
    # What a sender with CHECKSUM_PARTIAL leaves there: the pseudo-header's sum, not complemented.
    length = len(raw) - start
    pseudo = (
        bytes(raw[26:34]) + struct.pack("!BBH", 0, 6 if l4 == "tcp" else 17, length)
        if l3 == "4"
        else bytes(raw[22:54]) + struct.pack("!IxxxB", length, 6 if l4 == "tcp" else 17)
    )
    struct.pack_into("!H", raw, where, ones_sum(pseudo))
    h = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, start, where - start)
    [done] = complete_compiled(h, bytes(raw), 1, len(raw))
    assert [done] == complete(h, bytes(raw), 1, len(raw))
    assert done == bytes(pkt)  # scapy computed the right checksum when it built pkt


@pytest.mark.parametrize(
    "h,frame,status",
    [
        # A checksum field beyond the frame (DPDK CVE-2024-11614).
        (VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 60, 1), bytes(62), lib.NM_OFF_BAD_CSUM),
        (VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 0xFFFF, 0xFFFF), bytes(62), lib.NM_OFF_BAD_CSUM),
        # UFO was not offered; 2 is no gso type at all.
        (
            VnetHeader(0, VIRTIO_NET_HDR_GSO_UDP, 42, 1000, 0, 0),
            bytes(super_frame("4", "udp", bytes(3000))),
            lib.NM_OFF_BAD_GSO,
        ),
        (VnetHeader(0, 2, 42, 1000, 0, 0), bytes(super_frame("4", "tcp", bytes(3000))), lib.NM_OFF_BAD_GSO),
        # A TCPv4 header on an IPv6 frame, and on a UDP one.
        (
            VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 74, 1000, 0, 0),
            bytes(super_frame("6", "tcp", bytes(3000))),
            lib.NM_OFF_BAD_GSO,
        ),
        (
            VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 42, 1000, 0, 0),
            bytes(super_frame("4", "udp", bytes(3000))),
            lib.NM_OFF_BAD_GSO,
        ),
        # IPv6 with an extension header, an IPv4 fragment.
        (
            VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV6, 0, 1000, 0, 0),
            bytes(Ether(**MAC) / IPv6() / IPv6ExtHdrRouting() / TCP() / Raw(bytes(3000))),
            lib.NM_OFF_BAD_GSO,
        ),
        (
            VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 0, 1000, 0, 0),
            bytes(Ether(**MAC) / IP(flags="MF") / TCP() / Raw(bytes(3000))),
            lib.NM_OFF_BAD_GSO,
        ),
        # Truncated headers; a gso_size of 0; an hdr_len beyond the frame.
        (
            VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 0, 1000, 0, 0),
            bytes(super_frame("4", "tcp", b""))[:40],
            lib.NM_OFF_BAD_GSO,
        ),
        (
            VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 54, 0, 0, 0),
            bytes(super_frame("4", "tcp", bytes(3000))),
            lib.NM_OFF_BAD_SIZE,
        ),
        (
            VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 60000, 1000, 0, 0),
            bytes(super_frame("4", "tcp", bytes(3000))),
            lib.NM_OFF_BAD_SIZE,
        ),
        # Segments longer than an IP length can say; more segments than there is room for.
        (
            VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 54, 0xFFFF, 0, 0),
            bytes(Ether(**MAC) / IP(len=0) / TCP() / Raw(bytes(65500))),
            lib.NM_OFF_BAD_SIZE,
        ),
        (
            VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1, 0, 0),
            bytes(super_frame("4", "tcp", bytes(3000))),
            lib.NM_OFF_NO_ROOM,
        ),
    ],
)
def test_headers_the_frame_does_not_bear_out_are_refused(h: VnetHeader, frame: bytes, status: int) -> None:
    assert outcome(complete_compiled, h, frame) == outcome(complete, h, frame) == status


def frames() -> st.SearchStrategy[bytes]:
    """Frames a guest may hand over: well-formed super-frames of every kind, and those mangled anywhere in
    their first 80 bytes or cut short."""
    good = st.builds(
        lambda l3, l4, n, vlan, options: bytes(
            super_frame(l3, l4, bytes(k % 7 for k in range(n)), vlan, options)
        ),
        st.sampled_from("46"),
        st.sampled_from(["tcp", "udp"]),
        st.integers(0, 6000),
        st.booleans(),
        st.booleans(),
    )
    mangled = st.tuples(good, st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)), max_size=4)).map(
        lambda fm: bytes(dict(fm[1]).get(k, b) for k, b in enumerate(fm[0]))
    )
    cut = st.tuples(good, st.integers(0, 120)).map(lambda fc: fc[0][: fc[1]])
    return st.one_of(good, mangled, cut, st.binary(max_size=200))


headers = st.builds(
    VnetHeader,
    st.sampled_from([0, VIRTIO_NET_HDR_F_NEEDS_CSUM, 0xFF]),
    st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x85, 2, 0x7F]),
    st.one_of(st.integers(0, 100), st.integers(0, 0xFFFF)),
    st.one_of(st.integers(1, 2000), st.just(0), st.integers(0, 0xFFFF)),
    st.one_of(st.integers(0, 80), st.integers(0, 0xFFFF)),
    st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF)),
)


@example(
    h=VnetHeader(0, VIRTIO_NET_HDR_GSO_TCPV4, 54, 500, 0, 0),
    frame=bytes(super_frame("4", "tcp", bytes(2000))),
    max_segs=3,
    cap=CAP,
)
@given(
    h=headers,
    frame=frames(),
    max_segs=st.one_of(st.just(MAX_SEGS), st.integers(0, 8)),
    cap=st.one_of(st.just(CAP), st.integers(0, 9000)),
)
def test_compiled_offloads_agree_with_the_reference(
    h: VnetHeader, frame: bytes, max_segs: int, cap: int
) -> None:
    assert outcome(complete_compiled, h, frame, max_segs, cap) == outcome(complete, h, frame, max_segs, cap)


def check_outcome(fn: Callable[[VnetHeader, bytes, int], None], h: VnetHeader, head: bytes, n: int) -> int:
    try:
        fn(h, head, n)
    except OffloadError as e:
        return e.status
    return int(lib.NM_OFF_OK)


@given(h=headers, frame=frames(), cut=st.one_of(st.just(HEAD_MAX), st.integers(0, 300)))
def test_compiled_check_agrees_with_the_reference(h: VnetHeader, frame: bytes, cut: int) -> None:
    """What may travel with its header (nm_offload_check), judged on the frame's first ``cut`` bytes."""
    head, n = frame[:cut], len(frame)
    assert check_outcome(check_compiled, h, head, n) == check_outcome(check, h, head, n)


@pytest.mark.parametrize("l3,l4", [("4", "tcp"), ("6", "tcp"), ("4", "udp")])
def test_a_segmentation_travels_only_with_its_checksum_at_the_transport_header(l3: str, l4: str) -> None:
    frame = bytes(super_frame(l3, l4, bytes(3000)))
    start, field = 14 + (20 if l3 == "4" else 40), 16 if l4 == "tcp" else 6
    kind = {"4tcp": VIRTIO_NET_HDR_GSO_TCPV4, "6tcp": VIRTIO_NET_HDR_GSO_TCPV6}.get(
        l3 + l4, VIRTIO_NET_HDR_GSO_UDP_L4
    )
    good = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, kind, start + 20, 1000, start, field)
    for fn in (check, check_compiled):
        fn(good, frame[:HEAD_MAX], len(frame))
        for bad in (
            replace(good, flags=0),
            replace(good, csum_start=0),
            replace(good, csum_offset=field + 2),
        ):
            with pytest.raises(OffloadError) as e:
                fn(bad, frame[:HEAD_MAX], len(frame))
            assert e.value.status == lib.NM_OFF_BAD_CSUM
        complete(replace(good, flags=0, csum_start=0, csum_offset=0), frame, MAX_SEGS, CAP)  # need not
