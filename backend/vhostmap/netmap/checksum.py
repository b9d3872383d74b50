"""Internet checksums (RFC 1071), and completing the TCP/UDP checksum a sender left to offload.

A frame that the kernel hands to a packet socket with TP_STATUS_CSUMNOTREADY (a veth or TAP peer that
offloads checksums, CHECKSUM_PARTIAL) carries only the pseudo-header part of its TCP or UDP checksum: passed
on as is, the receiver drops it. netmap asks users to turn such offloads off; the generic adapter instead
completes the checksum in software for the frames that need it.
"""

from __future__ import annotations

import struct

import numpy as np

from vhostmap.ethernet import ETH_HLEN, ETH_P_IP, ETH_P_IPV6

IPPROTO_TCP = 6
IPPROTO_UDP = 17
# Where the checksum field is in each transport header.
_CSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}


def inet_checksum(data: bytes, initial: int = 0) -> int:
    """The Internet checksum of ``data`` (ones' complement of the ones' complement sum), from ``initial``."""
    if len(data) % 2:
        data += b"\0"
    total = initial + int(np.frombuffer(data, ">u2").sum(dtype=np.uint64))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def complete_l4_checksum(frame: bytes | memoryview) -> bytes:
    """``frame`` with its TCP or UDP checksum computed over the pseudo-header and segment (IPv4 without
    fragments, IPv6 without extension headers). Anything else comes back unchanged."""
    data = bytearray(frame)
    if len(data) < ETH_HLEN + 20:
        return bytes(data)
    ethertype = struct.unpack_from("!H", data, 12)[0]
    if ethertype == ETH_P_IP:
        ihl = (data[ETH_HLEN] & 0x0F) * 4
        total = struct.unpack_from("!H", data, ETH_HLEN + 2)[0]
        proto = data[ETH_HLEN + 9]
        fragmented = struct.unpack_from("!H", data, ETH_HLEN + 6)[0] & 0x3FFF
        l4, end = ETH_HLEN + ihl, ETH_HLEN + total
        pseudo = bytes(data[ETH_HLEN + 12 : ETH_HLEN + 20]) + struct.pack("!BBH", 0, proto, end - l4)
        if ihl < 20 or fragmented or end > len(data):
            return bytes(data)
    elif ethertype == ETH_P_IPV6 and len(data) >= ETH_HLEN + 40:
        proto = data[ETH_HLEN + 6]
        l4 = ETH_HLEN + 40
        end = l4 + struct.unpack_from("!H", data, ETH_HLEN + 4)[0]
        if end > len(data):
            return bytes(data)
        pseudo = bytes(data[ETH_HLEN + 8 : ETH_HLEN + 40]) + struct.pack("!IxxxB", end - l4, proto)
    else:
        return bytes(data)
    where = _CSUM_OFFSET.get(proto)
    if where is None or end - l4 < where + 2:
        return bytes(data)
    struct.pack_into("!H", data, l4 + where, 0)
    csum = inet_checksum(pseudo + bytes(data[l4:end]))
    if proto == IPPROTO_UDP and csum == 0:
        csum = 0xFFFF  # 0 means "no checksum" in UDP
    struct.pack_into("!H", data, l4 + where, csum)
    return bytes(data)
